//! The SNP launch sequence against the recording fake.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CAP_EXIT_HYPERCALL, KVM_MEM_GUEST_MEMFD};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use super::direct_boot::{snp_direct_boot, SnpBootInputs, SnpDirectBoot, CPUID_PAGE_GPA};
use super::launch::{launch_snp, SnpLaunchError, SnpLaunchParams};
use super::policy::SnpPolicy;
use crate::tee::boot_image::tests::fake_bzimage;
use crate::tee::fake::{Call, Injected, RecordingKvm};
use crate::tee::kvm::OpFailure;
use crate::vstate::memory::create_guest_memory;

const MEMORY_MIB: u32 = 32;
const SIGNATURE: u32 = 0x00A0_0F11;

struct Setup {
    mem: GuestMemoryMmap,
    boot: SnpDirectBoot,
    cpuid: Vec<kvm_cpuid_entry2>,
    params: SnpLaunchParams,
}

fn setup(vcpus: u8) -> Setup {
    let kernel = fake_bzimage(5 * 4096 + 123);
    let initrd = vec![0x5a; 3 * 4096 + 7];
    let boot = snp_direct_boot(&SnpBootInputs {
        kernel: &kernel,
        initrd: Some(&initrd),
        cmdline: "console=hvc0 quiet",
        memory_mib: MEMORY_MIB,
        vcpus,
        virtio_devices: &[],
        cpu_signature: SIGNATURE,
        vmsa_features: 0,
    })
    .unwrap();
    let cpuid = vec![
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x10,
            ..Default::default()
        },
        kvm_cpuid_entry2 {
            function: 1,
            eax: 0x1234,
            ..Default::default()
        },
    ];
    Setup {
        mem: create_guest_memory(MEMORY_MIB, false).unwrap(),
        boot,
        cpuid,
        params: SnpLaunchParams {
            policy: SnpPolicy::default(),
            host_data: [0xAB; 32],
        },
    }
}

fn launch(s: &Setup, kvm: &mut RecordingKvm) -> Result<(), SnpLaunchError> {
    launch_snp(kvm, &s.mem, &s.boot, &s.cpuid, &s.params)
}

#[test]
fn launch_issues_the_sequence_in_order_with_its_arguments() {
    let s = setup(2);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());

    launch(&s, &mut kvm).unwrap();

    let names = kvm.call_names();
    let updates = names
        .iter()
        .filter(|n| **n == "KVM_SEV_SNP_LAUNCH_UPDATE")
        .count();
    let mut expected = vec![
        "KVM_SEV_INIT2",
        "KVM_CREATE_IRQCHIP",
        "KVM_CREATE_GUEST_MEMFD",
        "KVM_SET_USER_MEMORY_REGION2",
        "KVM_SET_MEMORY_ATTRIBUTES",
        "KVM_ENABLE_CAP",
        "KVM_CREATE_VCPU",
        "KVM_SET_CPUID2",
        "KVM_SET_SREGS+REGS",
        "KVM_CREATE_VCPU",
        "KVM_SET_CPUID2",
        "KVM_SET_SREGS+REGS",
        "KVM_SEV_SNP_LAUNCH_START",
    ];
    expected.extend(std::iter::repeat_n("KVM_SEV_SNP_LAUNCH_UPDATE", updates));
    expected.push("KVM_SEV_SNP_LAUNCH_FINISH");
    assert_eq!(names, expected);
    // Every non-VMSA entry of the page list became one update.
    assert_eq!(updates, s.boot.pages.len() - 2);

    assert_eq!(
        kvm.calls[0],
        Call::SevInit2 {
            vmsa_features: 0,
            flags: 0,
            ghcb_version: 2
        }
    );
    let host = s.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    assert_eq!(
        kvm.calls[3],
        Call::SetUserMemoryRegion2 {
            slot: 0,
            flags: KVM_MEM_GUEST_MEMFD,
            gpa: 0,
            size: u64::from(MEMORY_MIB) << 20,
            userspace_addr: host,
            guest_memfd: 101,
            guest_memfd_offset: 0,
        }
    );
    assert_eq!(
        kvm.calls[4],
        Call::SetMemoryAttributes {
            gpa: 0,
            size: u64::from(MEMORY_MIB) << 20,
            private: true
        }
    );
    assert_eq!(
        kvm.calls[5],
        Call::EnableCap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            arg0: 1 << 12
        }
    );
    // CPUID leaf 1 reports the measured signature.
    match &kvm.calls[7] {
        Call::SetCpuid { entries, .. } => assert_eq!(entries[1].eax, SIGNATURE),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        kvm.calls[12],
        Call::SnpLaunchStart {
            policy: 0x30000,
            flags: 0
        }
    );
    // The CPUID page went in with its type, sourced from its own GPA.
    assert!(kvm.calls.contains(&Call::SnpLaunchUpdate {
        gfn_start: CPUID_PAGE_GPA >> 12,
        uaddr: host + CPUID_PAGE_GPA,
        len: 4096,
        page_type: 6
    }));
    assert_eq!(
        kvm.calls.last(),
        Some(&Call::SnpLaunchFinish {
            host_data: [0xAB; 32],
            id_block_en: 0,
            auth_key_en: 0
        })
    );
}

/// What was loaded measures to what `--print-launch-digest` prints.
#[test]
fn recorded_launch_measures_to_the_page_list_digest() {
    for vcpus in [1, 3] {
        let s = setup(vcpus);
        let mut kvm = RecordingKvm::with_memory(s.mem.clone());
        launch(&s, &mut kvm).unwrap();
        assert_eq!(
            kvm.snp_measurement(),
            Some(s.boot.launch_digest()),
            "{vcpus} vCPUs"
        );
    }
}

#[test]
fn eagain_resumes_at_the_gfn_the_kernel_reached() {
    let s = setup(1);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());
    // First update: 2 pages done, then EAGAIN; then an EAGAIN with no
    // progress at all; then everything.
    kvm.inject("KVM_SEV_SNP_LAUNCH_UPDATE", Injected::EagainAfterPages(2));
    kvm.inject("KVM_SEV_SNP_LAUNCH_UPDATE", Injected::EagainAfterPages(0));

    launch(&s, &mut kvm).unwrap();

    let updates: Vec<&Call> = kvm
        .calls
        .iter()
        .filter(|c| matches!(c, Call::SnpLaunchUpdate { .. }))
        .collect();
    let (gfn, uaddr, len, ty) = match updates[0] {
        Call::SnpLaunchUpdate {
            gfn_start,
            uaddr,
            len,
            page_type,
        } => (*gfn_start, *uaddr, *len, *page_type),
        _ => unreachable!(),
    };
    assert!(len > 2 * 4096, "first range must span more than 2 pages");
    let resumed = Call::SnpLaunchUpdate {
        gfn_start: gfn + 2,
        uaddr: if ty == 3 { uaddr } else { uaddr + 2 * 4096 },
        len: len - 2 * 4096,
        page_type: ty,
    };
    assert_eq!(updates[1], &resumed);
    assert_eq!(updates[2], &resumed);
    // And the result is still the measured digest.
    assert_eq!(kvm.snp_measurement(), Some(s.boot.launch_digest()));
}

#[test]
fn failed_finish_names_the_step_and_the_firmware_error() {
    let s = setup(1);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());
    kvm.inject(
        "KVM_SEV_SNP_LAUNCH_FINISH",
        Injected::Fail(OpFailure {
            errno: libc::EIO,
            firmware_error: 0x7,
        }),
    );

    let err = launch(&s, &mut kvm).unwrap_err().to_string();

    assert!(err.starts_with("KVM_SEV_SNP_LAUNCH_FINISH"), "{err}");
    assert!(
        err.contains("firmware error 0x7") && err.contains("POLICY_FAILURE"),
        "{err}"
    );
    assert!(err.contains(&"ab".repeat(32)), "{err}");
}

#[test]
fn failed_update_names_the_range_and_stops_there() {
    let s = setup(1);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());
    kvm.inject(
        "KVM_SEV_SNP_LAUNCH_UPDATE",
        Injected::Fail(OpFailure {
            errno: libc::EIO,
            firmware_error: 0x1A,
        }),
    );

    let err = launch(&s, &mut kvm).unwrap_err().to_string();

    assert!(
        err.contains("KVM_SEV_SNP_LAUNCH_UPDATE (Zero pages at 0x0"),
        "{err}"
    );
    assert!(err.contains("INVALID_PAGE_STATE"), "{err}");
    assert_eq!(kvm.call_names().last(), Some(&"KVM_SEV_SNP_LAUNCH_UPDATE"));
}

#[test]
fn refused_cpuid_page_reports_the_firmware_refusal() {
    let s = setup(1);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());
    // Zero range below the setup data, the setup-data page, then CPUID.
    kvm.inject(
        "KVM_SEV_SNP_LAUNCH_UPDATE",
        Injected::EagainAfterPages(u64::MAX),
    );
    kvm.inject(
        "KVM_SEV_SNP_LAUNCH_UPDATE",
        Injected::EagainAfterPages(u64::MAX),
    );
    kvm.inject(
        "KVM_SEV_SNP_LAUNCH_UPDATE",
        Injected::Fail(OpFailure {
            errno: libc::EIO,
            firmware_error: 0x16,
        }),
    );

    let err = launch(&s, &mut kvm).unwrap_err();

    assert!(matches!(err, SnpLaunchError::CpuidRefused { .. }), "{err}");
    assert!(err.to_string().contains("refused the CPUID page"), "{err}");
}

#[test]
fn memory_setup_failure_names_the_ioctl_and_range() {
    let s = setup(1);
    let mut kvm = RecordingKvm::with_memory(s.mem.clone());
    kvm.inject(
        "KVM_SET_MEMORY_ATTRIBUTES",
        Injected::Fail(OpFailure::errno(libc::EINVAL)),
    );
    let err = launch(&s, &mut kvm).unwrap_err().to_string();
    assert!(
        err.starts_with("KVM_SET_MEMORY_ATTRIBUTES for guest memory at 0x0"),
        "{err}"
    );
    assert!(!kvm.call_names().contains(&"KVM_SEV_SNP_LAUNCH_START"));
}
