//! The KVM operations a confidential launch needs, behind one trait so every
//! ioctl sequence can be checked against a recording fake ([`super::fake`])
//! on hosts without SEV-SNP or TDX hardware.
//!
//! kvm-ioctls 0.25 wraps the generic parts (`KVM_CREATE_VM` with a type,
//! `KVM_CREATE_GUEST_MEMFD`, `KVM_SET_USER_MEMORY_REGION2`,
//! `KVM_SET_MEMORY_ATTRIBUTES`, the VM-scoped `KVM_MEMORY_ENCRYPT_OP`) and
//! kvm-bindings 0.14 has the SEV-SNP command structs; the TDX ones are in
//! [`super::tdx::uapi`]. TDX's vCPU-scoped commands go through
//! `KVM_MEMORY_ENCRYPT_OP` on the vCPU fd, which kvm-ioctls does not wrap.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_create_guest_memfd, kvm_enable_cap, kvm_memory_attributes, kvm_regs,
    kvm_sev_cmd, kvm_sev_init, kvm_sev_snp_launch_finish, kvm_sev_snp_launch_start,
    kvm_sev_snp_launch_update, kvm_sregs, kvm_userspace_memory_region2, CpuId,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::tdx::uapi::{
    kvm_tdx_cmd, kvm_tdx_init_mem_region, KvmTdxCmdId, TdxCapabilitiesBuf, TdxInitVmBuf,
    KVM_TDX_MEASURE_MEMORY_REGION,
};

ioctl_iowr_nr!(
    KVM_MEMORY_ENCRYPT_OP,
    kvm_bindings::KVMIO,
    0xba,
    libc::c_ulong
);

/// `sev_cmd_id` values (`KVM_SEV_INIT2` and the SNP launch commands).
pub const KVM_SEV_INIT2: u32 = kvm_bindings::sev_cmd_id_KVM_SEV_INIT2;
pub const KVM_SEV_SNP_LAUNCH_START: u32 = kvm_bindings::sev_cmd_id_KVM_SEV_SNP_LAUNCH_START;
pub const KVM_SEV_SNP_LAUNCH_UPDATE: u32 = kvm_bindings::sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE;
pub const KVM_SEV_SNP_LAUNCH_FINISH: u32 = kvm_bindings::sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH;

/// A failed ioctl: the step, the errno and, for `KVM_MEMORY_ENCRYPT_OP`,
/// the firmware's (SEV) or TDX module's status the kernel passed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpFailure {
    pub errno: i32,
    /// SEV firmware status (`kvm_sev_cmd.error`) or TDX `hw_error`; 0 when
    /// the kernel refused before reaching the firmware.
    pub firmware_error: u64,
}

impl OpFailure {
    pub fn errno(errno: i32) -> Self {
        Self {
            errno,
            firmware_error: 0,
        }
    }

    pub fn is_eagain(&self) -> bool {
        self.errno == libc::EAGAIN
    }
}

impl std::fmt::Display for OpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.errno))?;
        if self.firmware_error != 0 {
            write!(f, " (firmware error {:#x})", self.firmware_error)?;
        }
        Ok(())
    }
}

/// A vCPU's registers at launch; for SEV-SNP they become its VMSA.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VcpuBootState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

/// SEV commands of `KVM_MEMORY_ENCRYPT_OP` that the SNP launch issues.
#[derive(Debug, Clone, PartialEq)]
pub enum SevCommand {
    Init2(kvm_sev_init),
    SnpLaunchStart(kvm_sev_snp_launch_start),
    /// The kernel advances `gfn_start`, `uaddr` and shrinks `len` as it
    /// goes, also when it returns EAGAIN part-way.
    SnpLaunchUpdate(kvm_sev_snp_launch_update),
    SnpLaunchFinish(kvm_sev_snp_launch_finish),
}

impl SevCommand {
    pub fn id(&self) -> u32 {
        match self {
            SevCommand::Init2(_) => KVM_SEV_INIT2,
            SevCommand::SnpLaunchStart(_) => KVM_SEV_SNP_LAUNCH_START,
            SevCommand::SnpLaunchUpdate(_) => KVM_SEV_SNP_LAUNCH_UPDATE,
            SevCommand::SnpLaunchFinish(_) => KVM_SEV_SNP_LAUNCH_FINISH,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SevCommand::Init2(_) => "KVM_SEV_INIT2",
            SevCommand::SnpLaunchStart(_) => "KVM_SEV_SNP_LAUNCH_START",
            SevCommand::SnpLaunchUpdate(_) => "KVM_SEV_SNP_LAUNCH_UPDATE",
            SevCommand::SnpLaunchFinish(_) => "KVM_SEV_SNP_LAUNCH_FINISH",
        }
    }
}

/// TDX commands of `KVM_MEMORY_ENCRYPT_OP`; the first three are VM-scoped,
/// the vCPU ones name their vCPU.
#[derive(Debug)]
pub enum TdxCommand<'a> {
    Capabilities(&'a mut TdxCapabilitiesBuf),
    InitVm(&'a mut TdxInitVmBuf),
    FinalizeVm,
    InitVcpu {
        vcpu: u8,
        /// Initial RCX of the vCPU (the TD's boot argument).
        rcx: u64,
    },
    /// The kernel advances `region` as it goes (also when it stops early
    /// with EINTR/EAGAIN).
    InitMemRegion {
        vcpu: u8,
        region: &'a mut kvm_tdx_init_mem_region,
        measure: bool,
    },
}

impl TdxCommand<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            TdxCommand::Capabilities(_) => "KVM_TDX_CAPABILITIES",
            TdxCommand::InitVm(_) => "KVM_TDX_INIT_VM",
            TdxCommand::FinalizeVm => "KVM_TDX_FINALIZE_VM",
            TdxCommand::InitVcpu { .. } => "KVM_TDX_INIT_VCPU",
            TdxCommand::InitMemRegion { .. } => "KVM_TDX_INIT_MEM_REGION",
        }
    }
}

/// The KVM operations of a confidential launch, on one VM.
pub trait TeeKvm {
    /// `KVM_CREATE_GUEST_MEMFD`; returns the new fd.
    fn create_guest_memfd(&mut self, size: u64) -> Result<i32, OpFailure>;
    /// `KVM_SET_USER_MEMORY_REGION2`.
    fn set_user_memory_region2(
        &mut self,
        region: &kvm_userspace_memory_region2,
    ) -> Result<(), OpFailure>;
    /// `KVM_SET_MEMORY_ATTRIBUTES`: private or shared.
    fn set_memory_attributes(
        &mut self,
        gpa: u64,
        size: u64,
        private: bool,
    ) -> Result<(), OpFailure>;
    /// Frees the side of `gpa..+size` the guest no longer uses after a
    /// conversion: the guest_memfd pages (`fallocate(PUNCH_HOLE)`) when
    /// the range became shared, the shared mapping's pages
    /// (`madvise(MADV_DONTNEED)`) when it became private. Without it every
    /// converted page would be backed twice.
    fn discard(&mut self, gpa: u64, size: u64, now_private: bool) -> Result<(), OpFailure>;
    /// `KVM_ENABLE_CAP` on the VM.
    fn enable_cap(&mut self, cap: u32, arg0: u64) -> Result<(), OpFailure>;
    /// The interrupt controllers, before any vCPU: in-kernel PIC, IOAPIC
    /// and PIT (`KVM_CREATE_IRQCHIP`, `KVM_CREATE_PIT2`), or with `split`
    /// only the local APICs in the kernel (`KVM_CAP_SPLIT_IRQCHIP`, which
    /// TDX requires).
    fn create_irqchip(&mut self, split: bool) -> Result<(), OpFailure>;
    /// `KVM_CREATE_VCPU`; vCPUs are numbered from 0 in creation order.
    fn create_vcpu(&mut self, id: u8) -> Result<(), OpFailure>;
    /// `KVM_SET_CPUID2`.
    fn set_cpuid(&mut self, vcpu: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), OpFailure>;
    /// `KVM_SET_SREGS` then `KVM_SET_REGS`.
    fn set_boot_state(&mut self, vcpu: u8, state: &VcpuBootState) -> Result<(), OpFailure>;
    /// A SEV command; updates `cmd` with what the kernel wrote back.
    fn sev_command(&mut self, cmd: &mut SevCommand) -> Result<(), OpFailure>;
    /// A TDX command.
    fn tdx_command(&mut self, cmd: TdxCommand<'_>) -> Result<(), OpFailure>;
}

fn errno_of(e: kvm_ioctls::Error) -> OpFailure {
    OpFailure::errno(e.errno())
}

/// A private memory slot: where its guest_memfd and shared mapping are.
#[derive(Debug, Clone, Copy)]
struct PrivateSlot {
    gpa: u64,
    size: u64,
    userspace_addr: u64,
    guest_memfd: i32,
    guest_memfd_offset: u64,
}

/// [`TeeKvm`] on a real VM.
pub struct KvmTeeVm {
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    guest_memfds: Vec<OwnedFd>,
    slots: Vec<PrivateSlot>,
    /// `/dev/sev`, handed to every SEV command as QEMU does.
    sev: Option<File>,
}

impl KvmTeeVm {
    /// Wraps a VM created with a confidential type; `sev` is the open
    /// `/dev/sev` for an SNP VM.
    pub fn new(vm: VmFd, sev: Option<File>) -> Self {
        Self {
            vm,
            vcpus: Vec::new(),
            guest_memfds: Vec::new(),
            slots: Vec::new(),
            sev,
        }
    }

    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The vCPUs, for the run loop once the launch is finished (the VM
    /// and its guest_memfds stay here).
    pub fn take_vcpus(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.vcpus)
    }

    fn vcpu(&self, index: u8) -> Result<&VcpuFd, OpFailure> {
        self.vcpus
            .get(usize::from(index))
            .ok_or(OpFailure::errno(libc::ENOENT))
    }

    fn encrypt_op_on<T>(fd: &impl AsRawFd, arg: &mut T) -> Result<(), OpFailure> {
        // SAFETY: KVM_MEMORY_ENCRYPT_OP reads and writes at most the
        // command struct `arg` points to (and the buffers it names, which
        // the callers keep alive across the call); the fd is a KVM VM or
        // vCPU fd.
        let ret = unsafe { ioctl_with_mut_ref(fd, KVM_MEMORY_ENCRYPT_OP(), arg) };
        if ret == 0 {
            Ok(())
        } else {
            Err(OpFailure::errno(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ))
        }
    }

    fn tdx_op(fd: &impl AsRawFd, id: KvmTdxCmdId, flags: u32, data: u64) -> Result<(), OpFailure> {
        let mut cmd = kvm_tdx_cmd {
            id: id as u32,
            flags,
            data,
            hw_error: 0,
        };
        Self::encrypt_op_on(fd, &mut cmd).map_err(|f| OpFailure {
            errno: f.errno,
            firmware_error: cmd.hw_error,
        })
    }
}

impl TeeKvm for KvmTeeVm {
    fn create_guest_memfd(&mut self, size: u64) -> Result<i32, OpFailure> {
        let fd = self
            .vm
            .create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags: 0,
                reserved: [0; 6],
            })
            .map_err(errno_of)?;
        // SAFETY: the kernel just returned this fd to us; we own it.
        self.guest_memfds.push(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(fd)
    }

    fn set_user_memory_region2(
        &mut self,
        region: &kvm_userspace_memory_region2,
    ) -> Result<(), OpFailure> {
        // SAFETY: the caller maps `userspace_addr..+memory_size` for the
        // VM's lifetime (guest memory outlives the VM in the builder), and
        // `guest_memfd` is one of ours.
        unsafe { self.vm.set_user_memory_region2(*region) }.map_err(errno_of)?;
        self.slots.push(PrivateSlot {
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            userspace_addr: region.userspace_addr,
            guest_memfd: region.guest_memfd as i32,
            guest_memfd_offset: region.guest_memfd_offset,
        });
        Ok(())
    }

    fn discard(&mut self, gpa: u64, size: u64, now_private: bool) -> Result<(), OpFailure> {
        let slot = self
            .slots
            .iter()
            .find(|s| gpa >= s.gpa && gpa + size <= s.gpa + s.size)
            .copied()
            .ok_or(OpFailure::errno(libc::EINVAL))?;
        let offset = gpa - slot.gpa;
        let len = libc::off_t::try_from(size).map_err(|_| OpFailure::errno(libc::EINVAL))?;
        let ret = if now_private {
            // SAFETY: the range lies inside the slot's shared mapping, which
            // stays mapped for the VM's lifetime; MADV_DONTNEED only drops
            // its pages (they read back as zero), the mapping stays valid.
            unsafe {
                libc::madvise(
                    (slot.userspace_addr + offset) as *mut libc::c_void,
                    size as usize,
                    libc::MADV_DONTNEED,
                )
            }
        } else {
            let at = libc::off_t::try_from(slot.guest_memfd_offset + offset)
                .map_err(|_| OpFailure::errno(libc::EINVAL))?;
            // SAFETY: fallocate on our own guest_memfd, range inside it.
            unsafe {
                libc::fallocate(
                    slot.guest_memfd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at,
                    len,
                )
            }
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(OpFailure::errno(
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            ))
        }
    }

    fn set_memory_attributes(
        &mut self,
        gpa: u64,
        size: u64,
        private: bool,
    ) -> Result<(), OpFailure> {
        self.vm
            .set_memory_attributes(kvm_memory_attributes {
                address: gpa,
                size,
                attributes: if private {
                    u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
                } else {
                    0
                },
                flags: 0,
            })
            .map_err(errno_of)
    }

    fn enable_cap(&mut self, cap: u32, arg0: u64) -> Result<(), OpFailure> {
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = arg0;
        self.vm.enable_cap(&enable).map_err(errno_of)
    }

    fn create_irqchip(&mut self, split: bool) -> Result<(), OpFailure> {
        if split {
            // IOAPIC pins the VMM would route: KVM's usual 24.
            return self.enable_cap(kvm_bindings::KVM_CAP_SPLIT_IRQCHIP, 24);
        }
        self.vm.create_irq_chip().map_err(errno_of)?;
        self.vm
            .create_pit2(kvm_bindings::kvm_pit_config::default())
            .map_err(errno_of)
    }

    fn create_vcpu(&mut self, id: u8) -> Result<(), OpFailure> {
        let fd = self.vm.create_vcpu(u64::from(id)).map_err(errno_of)?;
        self.vcpus.push(fd);
        Ok(())
    }

    fn set_cpuid(&mut self, vcpu: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), OpFailure> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| OpFailure::errno(libc::E2BIG))?;
        self.vcpu(vcpu)?.set_cpuid2(&cpuid).map_err(errno_of)
    }

    fn set_boot_state(&mut self, vcpu: u8, state: &VcpuBootState) -> Result<(), OpFailure> {
        let fd = self.vcpu(vcpu)?;
        fd.set_sregs(&state.sregs).map_err(errno_of)?;
        fd.set_regs(&state.regs).map_err(errno_of)
    }

    fn sev_command(&mut self, cmd: &mut SevCommand) -> Result<(), OpFailure> {
        let sev_fd = self
            .sev
            .as_ref()
            .map(|f| f.as_raw_fd() as u32)
            .unwrap_or(u32::MAX);
        let id = cmd.id();
        let data = match cmd {
            SevCommand::Init2(d) => d as *mut _ as u64,
            SevCommand::SnpLaunchStart(d) => d as *mut _ as u64,
            SevCommand::SnpLaunchUpdate(d) => d as *mut _ as u64,
            SevCommand::SnpLaunchFinish(d) => d as *mut _ as u64,
        };
        let mut raw = kvm_sev_cmd {
            id,
            pad0: 0,
            data,
            error: 0,
            sev_fd,
        };
        Self::encrypt_op_on(&self.vm, &mut raw).map_err(|f| OpFailure {
            errno: f.errno,
            firmware_error: u64::from(raw.error),
        })
    }

    fn tdx_command(&mut self, cmd: TdxCommand<'_>) -> Result<(), OpFailure> {
        match cmd {
            TdxCommand::Capabilities(buf) => Self::tdx_op(
                &self.vm,
                KvmTdxCmdId::Capabilities,
                0,
                buf.as_mut_ptr() as u64,
            ),
            TdxCommand::InitVm(buf) => {
                Self::tdx_op(&self.vm, KvmTdxCmdId::InitVm, 0, buf.as_mut_ptr() as u64)
            }
            TdxCommand::FinalizeVm => Self::tdx_op(&self.vm, KvmTdxCmdId::FinalizeVm, 0, 0),
            TdxCommand::InitVcpu { vcpu, rcx } => {
                Self::tdx_op(self.vcpu(vcpu)?, KvmTdxCmdId::InitVcpu, 0, rcx)
            }
            TdxCommand::InitMemRegion {
                vcpu,
                region,
                measure,
            } => {
                let flags = if measure {
                    KVM_TDX_MEASURE_MEMORY_REGION
                } else {
                    0
                };
                Self::tdx_op(
                    self.vcpu(vcpu)?,
                    KvmTdxCmdId::InitMemRegion,
                    flags,
                    region as *mut _ as u64,
                )
            }
        }
    }
}
