//! The KVM VM: memory slots, in-kernel interrupt controllers and timer.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::kvm::KvmContext;
use crate::boot::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Why the VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory has more regions ({0}) than KVM memory slots")]
    TooManyRegions(usize),
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

pub struct Vm {
    fd: VmFd,
    /// The memory KVM maps: kept alive as long as the VM.
    _guest_memory: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, registers guest memory and the in-kernel PIC,
    /// IOAPIC and PIT.
    pub fn new(kvm: &KvmContext, mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.kvm().create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        for (slot, region) in mem.iter().enumerate() {
            let slot =
                u32::try_from(slot).map_err(|_| VmError::TooManyRegions(mem.num_regions()))?;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region's host mapping belongs to `mem`, a clone
            // of which (sharing the mappings) the returned `Vm` owns; each
            // `Vcpu` owns one too, so the mapping outlives every file
            // descriptor through which KVM can touch it.
            unsafe { fd.set_user_memory_region(region) }
                .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
        Ok(Self {
            fd,
            _guest_memory: mem.clone(),
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
}
