//! Private guest memory: every RAM region gets a `guest_memfd` of its size,
//! is registered with `KVM_SET_USER_MEMORY_REGION2` (the shared mmap stays
//! as the region's `userspace_addr`: the source of launch pages and the
//! backing of pages the guest converts to shared), and is marked private
//! with `KVM_SET_MEMORY_ATTRIBUTES`.

use kvm_bindings::{kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::kvm::{OpFailure, TeeKvm};

/// The step that failed, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step} for guest memory at {gpa:#x} ({size:#x} bytes) failed: {failure}")]
pub struct PrivateMemoryError {
    pub step: &'static str,
    pub gpa: u64,
    pub size: u64,
    pub failure: OpFailure,
}

/// Registers `mem` as private memory, slot numbers from `first_slot`.
pub fn map_private_memory(
    kvm: &mut dyn TeeKvm,
    mem: &GuestMemoryMmap,
    first_slot: u32,
) -> Result<(), PrivateMemoryError> {
    for (slot, region) in (first_slot..).zip(mem.iter()) {
        let gpa = region.start_addr().raw_value();
        let size = region.len();
        let err = |step| {
            move |failure| PrivateMemoryError {
                step,
                gpa,
                size,
                failure,
            }
        };
        let gmem = kvm
            .create_guest_memfd(size)
            .map_err(err("KVM_CREATE_GUEST_MEMFD"))?;
        let userspace_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| err("host address of guest memory")(OpFailure::errno(libc::EFAULT)))?
            as u64;
        kvm.set_user_memory_region2(&kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr,
            guest_memfd_offset: 0,
            guest_memfd: gmem as u32,
            ..Default::default()
        })
        .map_err(err("KVM_SET_USER_MEMORY_REGION2"))?;
        kvm.set_memory_attributes(gpa, size, true)
            .map_err(err("KVM_SET_MEMORY_ATTRIBUTES"))?;
    }
    Ok(())
}
