//! The SEV-SNP launch sequence (Linux `Documentation/virt/kvm/x86/
//! amd-memory-encryption.rst`, 6.11+):
//!
//! 1. `KVM_SEV_INIT2` (`vmsa_features`, `ghcb_version`) on a
//!    `KVM_X86_SNP_VM`;
//! 2. the in-kernel irqchip, then guest RAM as private `guest_memfd`
//!    memory ([`map_private_memory`]);
//! 3. `KVM_CAP_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE`, so page-state
//!    changes come to the VMM;
//! 4. vCPUs: CPUID (leaf 1 EAX = the measured signature) and registers;
//! 5. `KVM_SEV_SNP_LAUNCH_START` with the policy;
//! 6. `KVM_SEV_SNP_LAUNCH_UPDATE` of every page of the list, in order,
//!    each run resumed from the `gfn_start`/`uaddr`/`len` the kernel left
//!    when it returns EAGAIN (or returns early);
//! 7. `KVM_SEV_SNP_LAUNCH_FINISH` with HOST_DATA, no ID block: KVM
//!    measures each vCPU's VMSA here.

use cloister_attestation::measure::snp::{LaunchPage, PageType};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_sev_init, kvm_sev_snp_launch_finish, kvm_sev_snp_launch_start,
    kvm_sev_snp_launch_update, KVM_CAP_EXIT_HYPERCALL,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::cpuid_page::{build_cpuid_page, describe_corrections, CpuidPageError};
use super::direct_boot::SnpDirectBoot;
use super::policy::SnpPolicy;
use super::sev_firmware_error_name;
use crate::tee::exits::KVM_HC_MAP_GPA_RANGE;
use crate::tee::kvm::{OpFailure, SevCommand, TeeKvm};
use crate::tee::memory::{map_private_memory, PrivateMemoryError};

/// The GHCB protocol version the guest may use (2: SNP).
pub const GHCB_VERSION: u16 = 2;
/// EAGAIN answers in a row without progress before we give up.
const MAX_STALLED_RETRIES: u32 = 1000;
/// `SEV_RET_INVALID_PARAM`: for a CPUID page, the firmware corrected it.
const SEV_RET_INVALID_PARAM: u64 = 0x16;

/// The launch parameters besides the page list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpLaunchParams {
    pub policy: SnpPolicy,
    /// HOST_DATA: the init-data digest, fitted to 32 bytes.
    pub host_data: [u8; 32],
}

/// Why the launch failed: the step, the range and the firmware's word.
#[derive(Debug, thiserror::Error)]
pub enum SnpLaunchError {
    #[error("{step} ({what}) failed: {failure}{}", fw_name(.failure))]
    Step {
        step: &'static str,
        what: String,
        failure: OpFailure,
    },
    #[error("KVM_SEV_SNP_LAUNCH_UPDATE of {page_type:?} pages at {gpa:#x} made no progress after {MAX_STALLED_RETRIES} EAGAIN answers")]
    Stalled { gpa: u64, page_type: PageType },
    #[error("the firmware refused the CPUID page ({failure}); it allows: {}", .corrections.join("; "))]
    CpuidRefused {
        failure: OpFailure,
        corrections: Vec<String>,
    },
    #[error(transparent)]
    CpuidPage(#[from] CpuidPageError),
    #[error(transparent)]
    PrivateMemory(#[from] PrivateMemoryError),
    #[error("cannot write launch page at {gpa:#x} into guest memory: {source}")]
    GuestMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn fw_name(f: &OpFailure) -> String {
    match sev_firmware_error_name(f.firmware_error) {
        Some(name) if f.firmware_error != 0 => format!(" {name}"),
        _ => String::new(),
    }
}

fn step(step: &'static str, what: impl Into<String>) -> impl FnOnce(OpFailure) -> SnpLaunchError {
    let what = what.into();
    move |failure| SnpLaunchError::Step {
        step,
        what,
        failure,
    }
}

/// The vCPU CPUID with leaf 1 EAX set to the measured signature.
pub fn cpuid_with_signature(cpuid: &[kvm_cpuid_entry2], signature: u32) -> Vec<kvm_cpuid_entry2> {
    cpuid
        .iter()
        .map(|e| {
            let mut e = *e;
            if e.function == 1 {
                e.eax = signature;
            }
            e
        })
        .collect()
}

/// Launches `boot` into the SNP VM behind `kvm`, whose shared memory is
/// `mem`. `cpuid` is what the vCPUs will report (KVM's supported set
/// through the CPU template).
pub fn launch_snp(
    kvm: &mut dyn TeeKvm,
    mem: &GuestMemoryMmap,
    boot: &SnpDirectBoot,
    cpuid: &[kvm_cpuid_entry2],
    params: &SnpLaunchParams,
) -> Result<(), SnpLaunchError> {
    let mut init = SevCommand::Init2(kvm_sev_init {
        vmsa_features: boot.vmsa_features,
        ghcb_version: GHCB_VERSION,
        ..Default::default()
    });
    kvm.sev_command(&mut init).map_err(step(
        "KVM_SEV_INIT2",
        format!("vmsa_features {:#x}", boot.vmsa_features),
    ))?;
    kvm.create_irqchip(false)
        .map_err(step("KVM_CREATE_IRQCHIP", "in-kernel PIC/IOAPIC/PIT"))?;
    map_private_memory(kvm, mem, 0)?;
    kvm.enable_cap(KVM_CAP_EXIT_HYPERCALL, 1 << KVM_HC_MAP_GPA_RANGE)
        .map_err(step(
            "KVM_ENABLE_CAP",
            "KVM_CAP_EXIT_HYPERCALL for KVM_HC_MAP_GPA_RANGE",
        ))?;

    let cpuid = cpuid_with_signature(cpuid, boot.cpu_signature);
    for (id, state) in (0u8..).zip(&boot.vcpu_states) {
        kvm.create_vcpu(id)
            .map_err(step("KVM_CREATE_VCPU", format!("vCPU {id}")))?;
        kvm.set_cpuid(id, &cpuid)
            .map_err(step("KVM_SET_CPUID2", format!("vCPU {id}")))?;
        kvm.set_boot_state(id, state)
            .map_err(step("KVM_SET_SREGS/KVM_SET_REGS", format!("vCPU {id}")))?;
    }

    let mut start = SevCommand::SnpLaunchStart(kvm_sev_snp_launch_start {
        policy: params.policy.bits(),
        ..Default::default()
    });
    kvm.sev_command(&mut start).map_err(step(
        "KVM_SEV_SNP_LAUNCH_START",
        format!("policy {}", params.policy),
    ))?;

    let cpuid_page = build_cpuid_page(&cpuid)?;
    for page in &boot.pages {
        let (gpa, len, page_type) = match page {
            LaunchPage::Normal { gpa, data } => {
                write(mem, *gpa, data)?;
                (*gpa, data.len() as u64, PageType::Normal)
            }
            LaunchPage::Zero { gpa, len } => (*gpa, *len, PageType::Zero),
            LaunchPage::Unmeasured { gpa, len } => (*gpa, *len, PageType::Unmeasured),
            LaunchPage::Secrets { gpa } => (*gpa, 4096, PageType::Secrets),
            LaunchPage::Cpuid { gpa } => {
                write(mem, *gpa, &cpuid_page)?;
                (*gpa, 4096, PageType::Cpuid)
            }
            // Measured by KVM at LAUNCH_FINISH from the vCPU registers.
            LaunchPage::Vmsa(_) => continue,
        };
        launch_update(kvm, mem, gpa, len, page_type).map_err(|e| match e {
            SnpLaunchError::Step { failure, .. }
                if page_type == PageType::Cpuid
                    && failure.firmware_error == SEV_RET_INVALID_PARAM =>
            {
                // The kernel copied the firmware's corrected page back.
                let mut fixed = [0u8; 4096];
                let corrections = match mem.read_slice(&mut fixed, GuestAddress(gpa)) {
                    Ok(()) => describe_corrections(&cpuid_page, &fixed),
                    Err(_) => Vec::new(),
                };
                SnpLaunchError::CpuidRefused {
                    failure,
                    corrections,
                }
            }
            other => other,
        })?;
    }

    let mut finish = SevCommand::SnpLaunchFinish(kvm_sev_snp_launch_finish {
        host_data: params.host_data,
        ..Default::default()
    });
    kvm.sev_command(&mut finish).map_err(step(
        "KVM_SEV_SNP_LAUNCH_FINISH",
        format!("host_data {}", hex::encode(params.host_data)),
    ))
}

fn write(mem: &GuestMemoryMmap, gpa: u64, data: &[u8]) -> Result<(), SnpLaunchError> {
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|source| SnpLaunchError::GuestMemory { gpa, source })
}

/// One `SNP_LAUNCH_UPDATE` range, resumed until the kernel has done it all.
fn launch_update(
    kvm: &mut dyn TeeKvm,
    mem: &GuestMemoryMmap,
    gpa: u64,
    len: u64,
    page_type: PageType,
) -> Result<(), SnpLaunchError> {
    let uaddr = mem
        .get_host_address(GuestAddress(gpa))
        .map_err(|source| SnpLaunchError::GuestMemory { gpa, source })? as u64;
    let mut update = kvm_sev_snp_launch_update {
        gfn_start: gpa >> 12,
        uaddr,
        len,
        type_: page_type as u8,
        ..Default::default()
    };
    let mut stalled = 0;
    loop {
        let before = update.len;
        let mut cmd = SevCommand::SnpLaunchUpdate(update);
        let result = kvm.sev_command(&mut cmd);
        if let SevCommand::SnpLaunchUpdate(after) = cmd {
            update = after;
        }
        match result {
            Ok(()) if update.len == 0 => return Ok(()),
            Ok(()) => {}
            Err(f) if f.is_eagain() => {}
            Err(failure) => {
                return Err(SnpLaunchError::Step {
                    step: "KVM_SEV_SNP_LAUNCH_UPDATE",
                    what: format!(
                        "{page_type:?} pages at {:#x}, {:#x} bytes left",
                        update.gfn_start << 12,
                        update.len
                    ),
                    failure,
                })
            }
        }
        if update.len == before {
            stalled += 1;
            if stalled >= MAX_STALLED_RETRIES {
                return Err(SnpLaunchError::Stalled { gpa, page_type });
            }
        } else {
            stalled = 0;
        }
    }
}
