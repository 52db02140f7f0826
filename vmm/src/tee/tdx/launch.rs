//! The TDX launch sequence (Linux `Documentation/virt/kvm/x86/
//! intel-tdx.rst`, 6.16+), on a `KVM_X86_TDX_VM`:
//!
//! 1. `KVM_TDX_CAPABILITIES`: the attributes and XFAM must be a subset of
//!    what the TDX module supports;
//! 2. the split irqchip (TDX has no in-kernel IOAPIC), `KVM_TDX_INIT_VM` (attributes, XFAM, MRCONFIGID = init-data digest,
//!    CPUID);
//! 3. guest RAM and the reset page as private `guest_memfd` memory;
//! 4. the vCPU: `KVM_CREATE_VCPU`, `KVM_TDX_INIT_VCPU`, `KVM_SET_CPUID2`;
//! 5. `KVM_TDX_INIT_MEM_REGION` of every region in order (measured ones
//!    with `KVM_TDX_MEASURE_MEMORY_REGION`), resumed where the kernel
//!    stopped on EINTR/EAGAIN;
//! 6. `KVM_TDX_FINALIZE_VM`.

use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use super::direct_boot::{TdxDirectBoot, RESET_PAGE_GPA};
use super::uapi::{kvm_tdx_init_mem_region, TdxCapabilitiesBuf, TdxInitVmBuf};
use crate::tee::boot_image::{guest_ram, PAGE};
use crate::tee::kvm::{OpFailure, TdxCommand, TeeKvm};
use crate::tee::memory::{map_private_memory, PrivateMemoryError};

const MAX_STALLED_RETRIES: u32 = 1000;

/// TD parameters besides the regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdxLaunchParams {
    pub attributes: u64,
    pub xfam: u64,
    pub mr_config_id: [u8; 48],
}

/// Why the TD could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TdxLaunchError {
    #[error("{step} ({what}) failed: {failure}")]
    Step {
        step: &'static str,
        what: String,
        failure: OpFailure,
    },
    #[error("tee.{field} = {requested:#x} asks for bits {unsupported:#x} this TDX module does not support (supported {supported:#x})")]
    Unsupported {
        field: &'static str,
        requested: u64,
        supported: u64,
        unsupported: u64,
    },
    #[error(
        "vcpus = {0}: a firmware-less TD boots one vCPU (APs need TDVF's ACPI MP wakeup mailbox)"
    )]
    TooManyVcpus(u8),
    #[error(
        "KVM_TDX_INIT_MEM_REGION at {gpa:#x} made no progress after {MAX_STALLED_RETRIES} retries"
    )]
    Stalled { gpa: u64 },
    #[error(transparent)]
    PrivateMemory(#[from] PrivateMemoryError),
    #[error("cannot write region at {gpa:#x} into guest memory: {source}")]
    GuestMemory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn step(step: &'static str, what: impl Into<String>) -> impl FnOnce(OpFailure) -> TdxLaunchError {
    let what = what.into();
    move |failure| TdxLaunchError::Step {
        step,
        what,
        failure,
    }
}

/// The TD's CPUID for `KVM_TDX_INIT_VM`: only the leaves the TDX module
/// lets the VMM configure, each limited to the configurable bits (KVM
/// refuses anything else); the module fixes or virtualizes the rest.
pub fn configurable_cpuid(
    vcpu: &[kvm_cpuid_entry2],
    configurable: &[kvm_cpuid_entry2],
) -> Vec<kvm_cpuid_entry2> {
    configurable
        .iter()
        .filter_map(|c| {
            let v = vcpu
                .iter()
                .find(|v| v.function == c.function && v.index == c.index)?;
            Some(kvm_cpuid_entry2 {
                eax: v.eax & c.eax,
                ebx: v.ebx & c.ebx,
                ecx: v.ecx & c.ecx,
                edx: v.edx & c.edx,
                ..*c
            })
        })
        .collect()
}

/// Guest memory of a TD: RAM plus the reset page below 4 GiB.
pub fn tdx_guest_memory(
    memory_mib: u32,
) -> Result<GuestMemoryMmap, vm_memory::mmap::FromRangesError> {
    let mut ranges: Vec<(GuestAddress, usize)> = guest_ram(memory_mib)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    ranges.push((GuestAddress(RESET_PAGE_GPA), PAGE as usize));
    ranges.sort_by_key(|r| r.0);
    GuestMemoryMmap::from_ranges(&ranges)
}

/// Builds the TD behind `kvm` from `boot`; `mem` is
/// [`tdx_guest_memory`].
pub fn launch_tdx(
    kvm: &mut dyn TeeKvm,
    mem: &GuestMemoryMmap,
    boot: &TdxDirectBoot,
    vcpus: u8,
    cpuid: &[kvm_cpuid_entry2],
    params: &TdxLaunchParams,
) -> Result<(), TdxLaunchError> {
    if vcpus != 1 {
        return Err(TdxLaunchError::TooManyVcpus(vcpus));
    }
    let mut caps = TdxCapabilitiesBuf::new();
    kvm.tdx_command(TdxCommand::Capabilities(&mut caps))
        .map_err(step("KVM_TDX_CAPABILITIES", "query"))?;
    for (field, requested, supported) in [
        ("attributes", params.attributes, caps.header.supported_attrs),
        ("xfam", params.xfam, caps.header.supported_xfam),
    ] {
        if requested & !supported != 0 {
            return Err(TdxLaunchError::Unsupported {
                field,
                requested,
                supported,
                unsupported: requested & !supported,
            });
        }
    }
    kvm.create_irqchip(true)
        .map_err(step("KVM_ENABLE_CAP", "KVM_CAP_SPLIT_IRQCHIP"))?;
    let td_cpuid = configurable_cpuid(cpuid, caps.cpuid());
    let mut init = TdxInitVmBuf::new(
        params.attributes,
        params.xfam,
        &params.mr_config_id,
        &td_cpuid,
    );
    kvm.tdx_command(TdxCommand::InitVm(&mut init))
        .map_err(step(
            "KVM_TDX_INIT_VM",
            format!(
                "attributes {:#x}, xfam {:#x}, mrconfigid {}",
                params.attributes,
                params.xfam,
                hex::encode(params.mr_config_id)
            ),
        ))?;
    map_private_memory(kvm, mem, 0)?;
    kvm.create_vcpu(0)
        .map_err(step("KVM_CREATE_VCPU", "vCPU 0"))?;
    kvm.tdx_command(TdxCommand::InitVcpu { vcpu: 0, rcx: 0 })
        .map_err(step("KVM_TDX_INIT_VCPU", "vCPU 0"))?;
    kvm.set_cpuid(0, cpuid)
        .map_err(step("KVM_SET_CPUID2", "vCPU 0"))?;

    for r in &boot.regions {
        if let Some(data) = &r.data {
            mem.write_slice(data, GuestAddress(r.gpa))
                .map_err(|source| TdxLaunchError::GuestMemory { gpa: r.gpa, source })?;
        }
        let source_addr = mem
            .get_host_address(GuestAddress(r.gpa))
            .map_err(|source| TdxLaunchError::GuestMemory { gpa: r.gpa, source })?
            as u64;
        let mut region = kvm_tdx_init_mem_region {
            source_addr,
            gpa: r.gpa,
            nr_pages: r.len / PAGE,
        };
        let mut stalled = 0;
        loop {
            let before = region.nr_pages;
            let result = kvm.tdx_command(TdxCommand::InitMemRegion {
                vcpu: 0,
                region: &mut region,
                measure: r.measure,
            });
            match result {
                Ok(()) => break,
                Err(f) if f.errno == libc::EINTR || f.errno == libc::EAGAIN => {}
                Err(failure) => {
                    return Err(TdxLaunchError::Step {
                        step: "KVM_TDX_INIT_MEM_REGION",
                        what: format!(
                            "{} pages at {:#x}{}",
                            region.nr_pages,
                            region.gpa,
                            if r.measure { ", measured" } else { "" }
                        ),
                        failure,
                    })
                }
            }
            if region.nr_pages == 0 {
                break;
            }
            stalled = if region.nr_pages == before {
                stalled + 1
            } else {
                0
            };
            if stalled >= MAX_STALLED_RETRIES {
                return Err(TdxLaunchError::Stalled { gpa: region.gpa });
            }
        }
    }
    kvm.tdx_command(TdxCommand::FinalizeVm)
        .map_err(step("KVM_TDX_FINALIZE_VM", "finalize"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::boot_image::tests::fake_bzimage;
    use crate::tee::fake::{Call, Injected, RecordingKvm};
    use crate::tee::tdx::direct_boot::tdx_direct_boot;

    const PARAMS: TdxLaunchParams = TdxLaunchParams {
        attributes: 1 << 28,
        xfam: 0xE7,
        mr_config_id: [0x42; 48],
    };

    fn setup() -> (GuestMemoryMmap, TdxDirectBoot) {
        let kernel = fake_bzimage(3 * 4096);
        let boot = tdx_direct_boot(&kernel, Some(&[9u8; 5000]), "console=hvc0", 16).unwrap();
        (tdx_guest_memory(16).unwrap(), boot)
    }

    #[test]
    fn launch_issues_the_tdx_sequence_and_measures_the_mrtd_we_compute() {
        let (mem, boot) = setup();
        let mut kvm = RecordingKvm::with_memory(mem.clone());

        launch_tdx(&mut kvm, &mem, &boot, 1, &[], &PARAMS).unwrap();

        let names = kvm.call_names();
        let regions = names
            .iter()
            .filter(|n| **n == "KVM_TDX_INIT_MEM_REGION")
            .count();
        assert_eq!(regions, boot.regions.len());
        let mut expected = vec![
            "KVM_TDX_CAPABILITIES",
            "KVM_CAP_SPLIT_IRQCHIP",
            "KVM_TDX_INIT_VM",
        ];
        // RAM and the reset page: one slot each.
        expected.extend(
            [
                "KVM_CREATE_GUEST_MEMFD",
                "KVM_SET_USER_MEMORY_REGION2",
                "KVM_SET_MEMORY_ATTRIBUTES",
            ]
            .repeat(2),
        );
        expected.extend(["KVM_CREATE_VCPU", "KVM_TDX_INIT_VCPU", "KVM_SET_CPUID2"]);
        expected.extend(std::iter::repeat_n("KVM_TDX_INIT_MEM_REGION", regions));
        expected.push("KVM_TDX_FINALIZE_VM");
        assert_eq!(names, expected);
        assert_eq!(
            kvm.calls[2],
            Call::TdxInitVm {
                attributes: 1 << 28,
                xfam: 0xE7,
                mr_config_id: [0x42; 48],
                cpuid: vec![]
            }
        );
        assert!(kvm.calls.contains(&Call::SetMemoryAttributes {
            gpa: RESET_PAGE_GPA,
            size: 4096,
            private: true
        }));
        assert_eq!(kvm.mrtd(), Some(boot.mrtd()));
    }

    #[test]
    fn init_vm_gets_only_the_configurable_cpuid_bits() {
        let (mem, boot) = setup();
        let mut kvm = RecordingKvm::with_memory(mem.clone());
        let leaf = |function, index, bits| kvm_cpuid_entry2 {
            function,
            index,
            eax: bits,
            ebx: bits,
            ecx: bits,
            edx: bits,
            ..Default::default()
        };
        kvm.tdx_cpuid = vec![leaf(7, 0, 0x0000_FFFF), leaf(0x8000_0008, 0, 0xFF)];
        let vcpu = [leaf(1, 0, u32::MAX), leaf(7, 0, 0x1234_5678)];

        launch_tdx(&mut kvm, &mem, &boot, 1, &vcpu, &PARAMS).unwrap();

        let Call::TdxInitVm { cpuid, .. } = &kvm.calls[2] else {
            panic!("{:?}", kvm.calls[2]);
        };
        // Leaf 1 is not configurable, 0x80000008 not in the vCPU's set.
        assert_eq!(cpuid, &vec![leaf(7, 0, 0x5678)]);
    }

    #[test]
    fn interrupted_region_resumes_where_the_kernel_stopped() {
        let (mem, boot) = setup();
        let mut kvm = RecordingKvm::with_memory(mem.clone());
        kvm.inject("KVM_TDX_INIT_MEM_REGION", Injected::EagainAfterPages(2));

        launch_tdx(&mut kvm, &mem, &boot, 1, &[], &PARAMS).unwrap();

        let calls: Vec<&Call> = kvm
            .calls
            .iter()
            .filter(|c| matches!(c, Call::TdxInitMemRegion { .. }))
            .collect();
        match (calls[0], calls[1]) {
            (
                Call::TdxInitMemRegion {
                    gpa: g0,
                    nr_pages: n0,
                    source_addr: s0,
                    ..
                },
                Call::TdxInitMemRegion {
                    gpa: g1,
                    nr_pages: n1,
                    source_addr: s1,
                    ..
                },
            ) => {
                assert_eq!((*g1, *n1, *s1), (g0 + 0x2000, n0 - 2, s0 + 0x2000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(kvm.mrtd(), Some(boot.mrtd()));
    }

    #[test]
    fn unsupported_attributes_are_refused_before_init_vm() {
        let (mem, boot) = setup();
        let mut kvm = RecordingKvm::with_memory(mem.clone());
        kvm.tdx_supported_attrs = 0;

        let err = launch_tdx(&mut kvm, &mem, &boot, 1, &[], &PARAMS)
            .unwrap_err()
            .to_string();

        assert!(err.contains("tee.attributes = 0x10000000"), "{err}");
        assert_eq!(kvm.call_names(), ["KVM_TDX_CAPABILITIES"]);
    }

    #[test]
    fn failed_finalize_names_the_step_and_the_tdx_module_error() {
        let (mem, boot) = setup();
        let mut kvm = RecordingKvm::with_memory(mem.clone());
        kvm.inject(
            "KVM_TDX_FINALIZE_VM",
            Injected::Fail(OpFailure {
                errno: libc::EIO,
                firmware_error: 0xC000_0B0A_0000_0000,
            }),
        );
        let err = launch_tdx(&mut kvm, &mem, &boot, 1, &[], &PARAMS)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("KVM_TDX_FINALIZE_VM"), "{err}");
        assert!(err.contains("firmware error 0xc0000b0a00000000"), "{err}");
        assert!(
            launch_tdx(&mut RecordingKvm::new(), &mem, &boot, 2, &[], &PARAMS)
                .unwrap_err()
                .to_string()
                .contains("vcpus = 2")
        );
    }
}
