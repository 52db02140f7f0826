//! A recording [`TeeKvm`]: logs every call with its arguments, plays the
//! kernel's part where the launch depends on it (LAUNCH_UPDATE advancing
//! `gfn_start`/`uaddr`/`len`, FINISH measuring one VMSA per vCPU, TDX
//! INIT_MEM_REGION extending MRTD), and fails the calls a test asks it to.
//!
//! It measures what it is given as the firmware / TDX module would, so a
//! test can compare the digest of what was *loaded* with the digest the
//! attestation crate computes for the page list.

use std::collections::{HashMap, VecDeque};

use cloister_attestation::measure::snp::{PageType, SnpLaunchDigest, VMSA_GPA};
use cloister_attestation::measure::tdx::MrtdCalculator;
use kvm_bindings::{kvm_cpuid_entry2, kvm_userspace_memory_region2};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::kvm::{OpFailure, SevCommand, TdxCommand, TeeKvm, VcpuBootState};
use super::snp::vmsa::{vmsa_from_state, SEV_FEATURE_SNP_ACTIVE};

/// One recorded call.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    CreateGuestMemfd {
        size: u64,
    },
    SetUserMemoryRegion2 {
        slot: u32,
        flags: u32,
        gpa: u64,
        size: u64,
        userspace_addr: u64,
        guest_memfd: u32,
        guest_memfd_offset: u64,
    },
    SetMemoryAttributes {
        gpa: u64,
        size: u64,
        private: bool,
    },
    EnableCap {
        cap: u32,
        arg0: u64,
    },
    CreateIrqchip {
        split: bool,
    },
    Discard {
        gpa: u64,
        size: u64,
        now_private: bool,
    },
    CreateVcpu {
        id: u8,
    },
    SetCpuid {
        vcpu: u8,
        entries: Vec<kvm_cpuid_entry2>,
    },
    SetBootState {
        vcpu: u8,
        state: Box<VcpuBootState>,
    },
    SevInit2 {
        vmsa_features: u64,
        flags: u32,
        ghcb_version: u16,
    },
    SnpLaunchStart {
        policy: u64,
        flags: u16,
    },
    /// As issued (before the kernel advanced it).
    SnpLaunchUpdate {
        gfn_start: u64,
        uaddr: u64,
        len: u64,
        page_type: u8,
    },
    SnpLaunchFinish {
        host_data: [u8; 32],
        id_block_en: u8,
        auth_key_en: u8,
    },
    TdxCapabilities,
    TdxInitVm {
        attributes: u64,
        xfam: u64,
        mr_config_id: [u8; 48],
        cpuid: Vec<kvm_cpuid_entry2>,
    },
    TdxInitVcpu {
        vcpu: u8,
        rcx: u64,
    },
    TdxInitMemRegion {
        vcpu: u8,
        source_addr: u64,
        gpa: u64,
        nr_pages: u64,
        measure: bool,
    },
    TdxFinalizeVm,
}

/// What a test asks the next call of an operation to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Fail with this errno / firmware status, doing nothing.
    Fail(OpFailure),
    /// LAUNCH_UPDATE only: process this many pages, advance the
    /// arguments, then return EAGAIN as the kernel does when it must
    /// reschedule.
    EagainAfterPages(u64),
}

/// The recording fake.
#[derive(Debug, Default)]
pub struct RecordingKvm {
    pub calls: Vec<Call>,
    injected: HashMap<&'static str, VecDeque<Injected>>,
    /// Guest memory the VMM passes host addresses into.
    memory: Option<GuestMemoryMmap>,
    vcpu_states: Vec<Option<VcpuBootState>>,
    vmsa_features: u64,
    snp: SnpLaunchDigest,
    mrtd: MrtdCalculator,
    finished: bool,
    /// What KVM_TDX_CAPABILITIES reports.
    pub tdx_supported_attrs: u64,
    pub tdx_supported_xfam: u64,
    /// The configurable CPUID bits KVM_TDX_CAPABILITIES reports.
    pub tdx_cpuid: Vec<kvm_cpuid_entry2>,
    next_fd: i32,
}

impl RecordingKvm {
    pub fn new() -> Self {
        Self {
            next_fd: 100,
            tdx_supported_attrs: u64::MAX,
            tdx_supported_xfam: u64::MAX,
            ..Default::default()
        }
    }

    /// A fake that reads the pages the VMM hands to LAUNCH_UPDATE /
    /// INIT_MEM_REGION from `memory` (they must be its host addresses).
    pub fn with_memory(memory: GuestMemoryMmap) -> Self {
        Self {
            memory: Some(memory),
            ..Self::new()
        }
    }

    /// The next call named `op` (e.g. "KVM_SEV_SNP_LAUNCH_UPDATE") does
    /// `what`; several injections for one op apply in order.
    pub fn inject(&mut self, op: &'static str, what: Injected) {
        self.injected.entry(op).or_default().push_back(what);
    }

    fn take(&mut self, op: &'static str) -> Option<Injected> {
        self.injected.get_mut(op).and_then(VecDeque::pop_front)
    }

    fn fail_if_injected(&mut self, op: &'static str) -> Result<(), OpFailure> {
        match self.take(op) {
            Some(Injected::Fail(f)) => Err(f),
            _ => Ok(()),
        }
    }

    /// The SNP launch digest of everything measured so far (after FINISH:
    /// the guest's `MEASUREMENT`).
    pub fn snp_measurement(&self) -> Option<[u8; 48]> {
        self.finished.then(|| self.snp.digest())
    }

    /// MRTD after FINALIZE_VM.
    pub fn mrtd(&self) -> Option<[u8; 48]> {
        self.finished.then(|| self.mrtd.clone().finalize())
    }

    /// The recorded calls' names in order, for sequence assertions.
    pub fn call_names(&self) -> Vec<&'static str> {
        self.calls.iter().map(call_name).collect()
    }

    fn page_at_host_addr(&self, uaddr: u64, gpa: u64) -> Result<[u8; 4096], OpFailure> {
        let mem = self.memory.as_ref().ok_or(OpFailure::errno(libc::EFAULT))?;
        // The VMM must source each page from its own shared mapping of
        // that GPA; anything else would load bytes the VMM never wrote.
        let expected = mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| OpFailure::errno(libc::EFAULT))? as u64;
        if expected != uaddr {
            return Err(OpFailure::errno(libc::EFAULT));
        }
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(gpa))
            .map_err(|_| OpFailure::errno(libc::EFAULT))?;
        Ok(page)
    }

    fn snp_launch_update(
        &mut self,
        u: &mut kvm_bindings::kvm_sev_snp_launch_update,
    ) -> Result<(), OpFailure> {
        let limit = match self.take("KVM_SEV_SNP_LAUNCH_UPDATE") {
            Some(Injected::Fail(f)) => return Err(f),
            Some(Injected::EagainAfterPages(n)) => Some(n),
            None => None,
        };
        if u.len == 0 || !u.len.is_multiple_of(4096) {
            return Err(OpFailure::errno(libc::EINVAL));
        }
        let page_type = match u.type_ {
            1 => PageType::Normal,
            3 => PageType::Zero,
            4 => PageType::Unmeasured,
            5 => PageType::Secrets,
            6 => PageType::Cpuid,
            _ => return Err(OpFailure::errno(libc::EINVAL)),
        };
        let pages = u.len / 4096;
        let todo = limit.map_or(pages, |n| n.min(pages));
        for _ in 0..todo {
            let gpa = u.gfn_start << 12;
            match page_type {
                PageType::Normal => {
                    let page = self.page_at_host_addr(u.uaddr, gpa)?;
                    self.snp.add_normal(gpa, &page);
                }
                // Zero pages take no source; unmeasured, secrets and CPUID
                // pages are measured with zero contents.
                other => self.snp.update(other, gpa, &[0u8; 48]),
            }
            u.gfn_start += 1;
            if page_type != PageType::Zero {
                u.uaddr += 4096;
            }
            u.len -= 4096;
        }
        if u.len != 0 {
            return Err(OpFailure::errno(libc::EAGAIN));
        }
        Ok(())
    }
}

fn call_name(call: &Call) -> &'static str {
    match call {
        Call::CreateGuestMemfd { .. } => "KVM_CREATE_GUEST_MEMFD",
        Call::SetUserMemoryRegion2 { .. } => "KVM_SET_USER_MEMORY_REGION2",
        Call::SetMemoryAttributes { .. } => "KVM_SET_MEMORY_ATTRIBUTES",
        Call::EnableCap { .. } => "KVM_ENABLE_CAP",
        Call::CreateIrqchip { split: false } => "KVM_CREATE_IRQCHIP",
        Call::CreateIrqchip { split: true } => "KVM_CAP_SPLIT_IRQCHIP",
        Call::Discard { .. } => "discard",
        Call::CreateVcpu { .. } => "KVM_CREATE_VCPU",
        Call::SetCpuid { .. } => "KVM_SET_CPUID2",
        Call::SetBootState { .. } => "KVM_SET_SREGS+REGS",
        Call::SevInit2 { .. } => "KVM_SEV_INIT2",
        Call::SnpLaunchStart { .. } => "KVM_SEV_SNP_LAUNCH_START",
        Call::SnpLaunchUpdate { .. } => "KVM_SEV_SNP_LAUNCH_UPDATE",
        Call::SnpLaunchFinish { .. } => "KVM_SEV_SNP_LAUNCH_FINISH",
        Call::TdxCapabilities => "KVM_TDX_CAPABILITIES",
        Call::TdxInitVm { .. } => "KVM_TDX_INIT_VM",
        Call::TdxInitVcpu { .. } => "KVM_TDX_INIT_VCPU",
        Call::TdxInitMemRegion { .. } => "KVM_TDX_INIT_MEM_REGION",
        Call::TdxFinalizeVm => "KVM_TDX_FINALIZE_VM",
    }
}

impl TeeKvm for RecordingKvm {
    fn create_guest_memfd(&mut self, size: u64) -> Result<i32, OpFailure> {
        self.calls.push(Call::CreateGuestMemfd { size });
        self.fail_if_injected("KVM_CREATE_GUEST_MEMFD")?;
        self.next_fd += 1;
        Ok(self.next_fd)
    }

    fn set_user_memory_region2(
        &mut self,
        r: &kvm_userspace_memory_region2,
    ) -> Result<(), OpFailure> {
        self.calls.push(Call::SetUserMemoryRegion2 {
            slot: r.slot,
            flags: r.flags,
            gpa: r.guest_phys_addr,
            size: r.memory_size,
            userspace_addr: r.userspace_addr,
            guest_memfd: r.guest_memfd,
            guest_memfd_offset: r.guest_memfd_offset,
        });
        self.fail_if_injected("KVM_SET_USER_MEMORY_REGION2")
    }

    fn set_memory_attributes(
        &mut self,
        gpa: u64,
        size: u64,
        private: bool,
    ) -> Result<(), OpFailure> {
        self.calls
            .push(Call::SetMemoryAttributes { gpa, size, private });
        self.fail_if_injected("KVM_SET_MEMORY_ATTRIBUTES")
    }

    fn enable_cap(&mut self, cap: u32, arg0: u64) -> Result<(), OpFailure> {
        self.calls.push(Call::EnableCap { cap, arg0 });
        self.fail_if_injected("KVM_ENABLE_CAP")
    }

    fn discard(&mut self, gpa: u64, size: u64, now_private: bool) -> Result<(), OpFailure> {
        self.calls.push(Call::Discard {
            gpa,
            size,
            now_private,
        });
        self.fail_if_injected("discard")
    }

    fn create_irqchip(&mut self, split: bool) -> Result<(), OpFailure> {
        self.calls.push(Call::CreateIrqchip { split });
        self.fail_if_injected("KVM_CREATE_IRQCHIP")
    }

    fn create_vcpu(&mut self, id: u8) -> Result<(), OpFailure> {
        self.calls.push(Call::CreateVcpu { id });
        self.fail_if_injected("KVM_CREATE_VCPU")?;
        self.vcpu_states.push(None);
        Ok(())
    }

    fn set_cpuid(&mut self, vcpu: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), OpFailure> {
        self.calls.push(Call::SetCpuid {
            vcpu,
            entries: entries.to_vec(),
        });
        self.fail_if_injected("KVM_SET_CPUID2")
    }

    fn set_boot_state(&mut self, vcpu: u8, state: &VcpuBootState) -> Result<(), OpFailure> {
        self.calls.push(Call::SetBootState {
            vcpu,
            state: Box::new(*state),
        });
        self.fail_if_injected("KVM_SET_SREGS+REGS")?;
        let slot = self
            .vcpu_states
            .get_mut(usize::from(vcpu))
            .ok_or(OpFailure::errno(libc::ENOENT))?;
        *slot = Some(*state);
        Ok(())
    }

    fn sev_command(&mut self, cmd: &mut SevCommand) -> Result<(), OpFailure> {
        match cmd {
            SevCommand::Init2(init) => {
                self.calls.push(Call::SevInit2 {
                    vmsa_features: init.vmsa_features,
                    flags: init.flags,
                    ghcb_version: init.ghcb_version,
                });
                self.fail_if_injected("KVM_SEV_INIT2")?;
                self.vmsa_features = init.vmsa_features;
                Ok(())
            }
            SevCommand::SnpLaunchStart(start) => {
                self.calls.push(Call::SnpLaunchStart {
                    policy: start.policy,
                    flags: start.flags,
                });
                self.fail_if_injected("KVM_SEV_SNP_LAUNCH_START")
            }
            SevCommand::SnpLaunchUpdate(update) => {
                self.calls.push(Call::SnpLaunchUpdate {
                    gfn_start: update.gfn_start,
                    uaddr: update.uaddr,
                    len: update.len,
                    page_type: update.type_,
                });
                self.snp_launch_update(update)
            }
            SevCommand::SnpLaunchFinish(finish) => {
                self.calls.push(Call::SnpLaunchFinish {
                    host_data: finish.host_data,
                    id_block_en: finish.id_block_en,
                    auth_key_en: finish.auth_key_en,
                });
                self.fail_if_injected("KVM_SEV_SNP_LAUNCH_FINISH")?;
                // KVM measures each vCPU's VMSA, synced from its
                // registers, in vCPU order.
                let features = self.vmsa_features | SEV_FEATURE_SNP_ACTIVE;
                for state in &self.vcpu_states {
                    let state = state.unwrap_or(VcpuBootState {
                        regs: Default::default(),
                        sregs: Default::default(),
                    });
                    let vmsa = vmsa_from_state(&state, features);
                    let digest: [u8; 48] = sha384(&vmsa[..]);
                    self.snp.update(PageType::Vmsa, VMSA_GPA, &digest);
                }
                self.finished = true;
                Ok(())
            }
        }
    }

    fn tdx_command(&mut self, cmd: TdxCommand<'_>) -> Result<(), OpFailure> {
        let name = cmd.name();
        match cmd {
            TdxCommand::Capabilities(buf) => {
                self.calls.push(Call::TdxCapabilities);
                self.fail_if_injected(name)?;
                buf.header.supported_attrs = self.tdx_supported_attrs;
                buf.header.supported_xfam = self.tdx_supported_xfam;
                let n = self.tdx_cpuid.len().min(buf.entries.len());
                buf.entries[..n].copy_from_slice(&self.tdx_cpuid[..n]);
                buf.header.cpuid_nent = n as u32;
                Ok(())
            }
            TdxCommand::InitVm(buf) => {
                self.calls.push(Call::TdxInitVm {
                    attributes: buf.header.attributes,
                    xfam: buf.header.xfam,
                    mr_config_id: buf.mr_config_id(),
                    cpuid: buf.entries[..(buf.header.cpuid_nent as usize).min(buf.entries.len())]
                        .to_vec(),
                });
                self.fail_if_injected(name)
            }
            TdxCommand::InitVcpu { vcpu, rcx } => {
                self.calls.push(Call::TdxInitVcpu { vcpu, rcx });
                self.fail_if_injected(name)
            }
            TdxCommand::InitMemRegion {
                vcpu,
                region,
                measure,
            } => {
                self.calls.push(Call::TdxInitMemRegion {
                    vcpu,
                    source_addr: region.source_addr,
                    gpa: region.gpa,
                    nr_pages: region.nr_pages,
                    measure,
                });
                let limit = match self.take(name) {
                    Some(Injected::Fail(f)) => return Err(f),
                    Some(Injected::EagainAfterPages(n)) => Some(n),
                    None => None,
                };
                let todo = limit.map_or(region.nr_pages, |n| n.min(region.nr_pages));
                for _ in 0..todo {
                    let page = self.page_at_host_addr(region.source_addr, region.gpa)?;
                    self.mrtd.add_region(region.gpa, &page, measure);
                    region.gpa += 4096;
                    region.source_addr += 4096;
                    region.nr_pages -= 1;
                }
                if region.nr_pages != 0 {
                    return Err(OpFailure::errno(libc::EINTR));
                }
                Ok(())
            }
            TdxCommand::FinalizeVm => {
                self.calls.push(Call::TdxFinalizeVm);
                self.fail_if_injected(name)?;
                self.finished = true;
                Ok(())
            }
        }
    }
}

fn sha384(data: &[u8]) -> [u8; 48] {
    use sha2::{Digest, Sha384};
    Sha384::digest(data).into()
}
