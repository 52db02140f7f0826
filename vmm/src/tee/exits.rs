//! The exits a confidential guest's vCPU brings to the VMM on Linux 6.12+
//! (SNP) and 6.16+ (TDX), and what the VMM does with them:
//!
//! | exit | when | VMM action |
//! |---|---|---|
//! | `KVM_EXIT_HYPERCALL`, nr `KVM_HC_MAP_GPA_RANGE` | SNP guest's page-state change (GHCB PSC / MSR protocol), TDX `MapGPA` — only if `KVM_CAP_EXIT_HYPERCALL` enabled it | [`handle_map_gpa_range`]: private ↔ shared via `KVM_SET_MEMORY_ATTRIBUTES`, result to the guest in `ret` |
//! | `KVM_EXIT_MEMORY_FAULT` (`ioctl` returns -1/EFAULT) | implicit conversion: the guest touched a page whose attribute disagrees with the access | [`handle_memory_fault`]: set the attribute the access asked for, re-enter |
//! | `KVM_EXIT_TDX`, nr `TDVMCALL_GET_QUOTE` | TDX guest asks for a quote | [`super::tdx::quote`]: forward to the quote service |
//! | `KVM_EXIT_SYSTEM_EVENT` `SEV_TERM` / `TDX_FATAL` | guest requested termination | the VM ends (guest failure) |
//!
//! SNP guest requests (attestation reports, `MSG_REPORT_REQ` through
//! `SNP_GUEST_REQUEST`) are completed by KVM with the firmware and never
//! reach the VMM on 6.12; extended requests get no certificates from KVM
//! there (the guest fetches its VCEK from the KBS's chain instead). Newer
//! kernels add `KVM_EXIT_SNP_REQ_CERTS` for a VMM that supplies them —
//! not handled here.
//!
//! Every value comes from the guest: ranges outside guest RAM are refused,
//! never acted on.

use std::sync::Mutex;

use vm_memory::GuestMemoryMmap;

use super::kvm::{OpFailure, TeeKvm};
use super::tdx::quote::{handle_get_quote, QuoteService};
use super::tdx::uapi::{kvm_tdx_exit, TDVMCALL_GET_QUOTE};

/// `KVM_HC_MAP_GPA_RANGE`.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` in the hypercall's attributes.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// `KVM_MEMORY_EXIT_FLAG_PRIVATE`.
pub const KVM_MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
const PAGE: u64 = 4096;

/// A conversion request the VMM refuses or could not carry out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExitError {
    #[error("guest asked to convert {gpa:#x}+{size:#x}, which is not guest RAM")]
    OutsideRam { gpa: u64, size: u64 },
    #[error("guest asked to convert an unaligned range {gpa:#x}+{size:#x}")]
    Unaligned { gpa: u64, size: u64 },
    #[error("KVM_SET_MEMORY_ATTRIBUTES {gpa:#x}+{size:#x} failed: {failure}")]
    Attributes {
        gpa: u64,
        size: u64,
        failure: OpFailure,
    },
}

fn convert(
    kvm: &mut dyn TeeKvm,
    ram: &[(u64, u64)],
    gpa: u64,
    size: u64,
    private: bool,
) -> Result<(), ExitError> {
    if !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) || size == 0 {
        return Err(ExitError::Unaligned { gpa, size });
    }
    let end = gpa
        .checked_add(size)
        .ok_or(ExitError::OutsideRam { gpa, size })?;
    if !ram.iter().any(|&(s, l)| gpa >= s && end <= s + l) {
        return Err(ExitError::OutsideRam { gpa, size });
    }
    kvm.set_memory_attributes(gpa, size, private)
        .map_err(|failure| ExitError::Attributes { gpa, size, failure })?;
    // The conversion stands even if the old side cannot be freed. Freeing
    // never unmaps: to private, the shared mapping's pages are dropped
    // (MADV_DONTNEED on a private anonymous mapping: still mapped, zeros
    // until written); to shared, only guest_memfd loses the pages (hole
    // punched). So the shared mapping the virtio devices read through
    // (`super::run::attach_confidential_devices`) stays valid, and it is
    // where every page the guest shares (rings, swiotlb bounce buffers)
    // lives from the conversion on.
    if let Err(failure) = kvm.discard(gpa, size, private) {
        tracing::warn!("cannot free the old backing of {gpa:#x}+{size:#x}: {failure}");
    }
    Ok(())
}

/// `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`: args = gpa, number of
/// 4 KiB pages, attributes. Returns the value for the exit's `ret` (0, or
/// a negative errno the guest sees as a failed page-state change).
pub fn handle_map_gpa_range(kvm: &mut dyn TeeKvm, ram: &[(u64, u64)], args: &[u64; 6]) -> u64 {
    let (gpa, npages, attrs) = (args[0], args[1], args[2]);
    let private = attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0;
    let result = npages
        .checked_mul(PAGE)
        .ok_or(ExitError::OutsideRam {
            gpa,
            size: u64::MAX,
        })
        .and_then(|size| convert(kvm, ram, gpa, size, private));
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::warn!("refused guest page-state change: {e}");
            (-(libc::EINVAL as i64)) as u64
        }
    }
}

/// `KVM_EXIT_MEMORY_FAULT`: make the range what the access wanted.
pub fn handle_memory_fault(
    kvm: &mut dyn TeeKvm,
    ram: &[(u64, u64)],
    flags: u64,
    gpa: u64,
    size: u64,
) -> Result<(), ExitError> {
    // KVM reports the faulting page; round out to whole pages. The values
    // are the guest's access: a range that wraps is no RAM.
    let start = gpa & !(PAGE - 1);
    let end = gpa
        .checked_add(size.max(1))
        .and_then(|end| end.checked_next_multiple_of(PAGE))
        .ok_or(ExitError::OutsideRam { gpa, size })?;
    convert(
        kvm,
        ram,
        start,
        end - start,
        flags & KVM_MEMORY_EXIT_FLAG_PRIVATE != 0,
    )
}

/// What the vCPU threads of a confidential VM share to serve its exits
/// (`crate::vstate::vcpu::Vcpu::confidential`).
pub struct ConfidentialExits {
    kvm: Mutex<Box<dyn TeeKvm + Send>>,
    ram: Vec<(u64, u64)>,
    memory: GuestMemoryMmap,
    quote: Mutex<Option<Box<dyn QuoteService + Send>>>,
}

impl std::fmt::Debug for ConfidentialExits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfidentialExits")
            .field("ram", &self.ram)
            .finish()
    }
}

impl ConfidentialExits {
    /// `kvm` sets memory attributes on the VM; `ram` bounds what the guest
    /// may convert; `memory` is the shared mapping (GetQuote buffers).
    pub fn new(
        kvm: Box<dyn TeeKvm + Send>,
        ram: Vec<(u64, u64)>,
        memory: GuestMemoryMmap,
        quote: Option<Box<dyn QuoteService + Send>>,
    ) -> Self {
        Self {
            kvm: Mutex::new(kvm),
            ram,
            memory,
            quote: Mutex::new(quote),
        }
    }

    fn kvm(&self) -> std::sync::MutexGuard<'_, Box<dyn TeeKvm + Send>> {
        // A panicking vCPU ends the VM anyway; the VM fd stays usable.
        self.kvm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `KVM_EXIT_HYPERCALL`: the value for `ret`.
    pub fn hypercall(&self, nr: u64, args: &[u64; 6]) -> Option<u64> {
        (nr == KVM_HC_MAP_GPA_RANGE)
            .then(|| handle_map_gpa_range(self.kvm().as_mut(), &self.ram, args))
    }

    /// `KVM_EXIT_MEMORY_FAULT`.
    pub fn memory_fault(&self, flags: u64, gpa: u64, size: u64) -> Result<(), ExitError> {
        handle_memory_fault(self.kvm().as_mut(), &self.ram, flags, gpa, size)
    }

    /// `KVM_EXIT_TDX`: serves GetQuote, leaves the status KVM put in
    /// `ret` for every other TDVMCALL.
    pub fn tdx_vmcall(&self, exit: &mut kvm_tdx_exit) {
        if exit.nr == TDVMCALL_GET_QUOTE {
            let mut quote = self.quote.lock().unwrap_or_else(|e| e.into_inner());
            let service = quote.as_mut().map(|s| s.as_mut() as &mut dyn QuoteService);
            exit.ret =
                handle_get_quote(&self.memory, &self.ram, exit.data[0], exit.data[1], service);
        } else {
            tracing::warn!("TDVMCALL {:#x} forwarded by KVM is not served", exit.nr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tee::fake::{Call, RecordingKvm};

    const RAM: &[(u64, u64)] = &[(0, 64 << 20)];

    #[test]
    fn memory_fault_with_a_wrapping_range_is_refused_not_a_panic() {
        let mut kvm = RecordingKvm::new();

        let err = handle_memory_fault(&mut kvm, RAM, 0, u64::MAX - 0x10, 0x100).unwrap_err();

        assert!(matches!(err, ExitError::OutsideRam { .. }), "{err}");
        let err = handle_memory_fault(&mut kvm, RAM, 0, u64::MAX - 0x10, 1).unwrap_err();
        assert!(matches!(err, ExitError::OutsideRam { .. }), "{err}");
    }

    #[test]
    fn map_gpa_range_to_shared_and_back() {
        let mut kvm = RecordingKvm::new();
        assert_eq!(
            handle_map_gpa_range(&mut kvm, RAM, &[0x20_0000, 16, 0, 0, 0, 0]),
            0
        );
        assert_eq!(
            handle_map_gpa_range(
                &mut kvm,
                RAM,
                &[0x20_0000, 1, KVM_MAP_GPA_RANGE_ENCRYPTED, 0, 0, 0]
            ),
            0
        );
        assert_eq!(
            kvm.calls,
            [
                Call::SetMemoryAttributes {
                    gpa: 0x20_0000,
                    size: 0x10000,
                    private: false
                },
                Call::Discard {
                    gpa: 0x20_0000,
                    size: 0x10000,
                    now_private: false
                },
                Call::SetMemoryAttributes {
                    gpa: 0x20_0000,
                    size: 0x1000,
                    private: true
                },
                Call::Discard {
                    gpa: 0x20_0000,
                    size: 0x1000,
                    now_private: true
                }
            ]
        );
    }

    #[test]
    fn map_gpa_range_outside_ram_or_overflowing_is_refused_without_ioctl() {
        let mut kvm = RecordingKvm::new();
        let einval = (-(libc::EINVAL as i64)) as u64;
        assert_eq!(
            handle_map_gpa_range(&mut kvm, RAM, &[64 << 20, 1, 0, 0, 0, 0]),
            einval
        );
        assert_eq!(
            handle_map_gpa_range(&mut kvm, RAM, &[0, u64::MAX, 0, 0, 0, 0]),
            einval
        );
        assert_eq!(
            handle_map_gpa_range(&mut kvm, RAM, &[0x1001, 1, 0, 0, 0, 0]),
            einval
        );
        assert!(kvm.calls.is_empty());
    }

    #[test]
    fn shared_exit_handler_serves_map_gpa_range_and_get_quote() {
        let mem = crate::vstate::memory::create_guest_memory(64, false).unwrap();
        let exits = ConfidentialExits::new(Box::new(RecordingKvm::new()), RAM.to_vec(), mem, None);
        assert_eq!(
            exits.hypercall(KVM_HC_MAP_GPA_RANGE, &[0x1000, 1, 0, 0, 0, 0]),
            Some(0)
        );
        assert_eq!(exits.hypercall(11, &[0; 6]), None);
        exits
            .memory_fault(KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x1000, 0x1000)
            .unwrap();
        // GetQuote without a service: INVALID_OPERAND for a bad buffer.
        let mut exit = kvm_tdx_exit {
            nr: TDVMCALL_GET_QUOTE,
            data: [0x123, 0x1000, 0, 0, 0],
            ..Default::default()
        };
        exits.tdx_vmcall(&mut exit);
        assert_eq!(
            exit.ret,
            crate::tee::tdx::uapi::TDVMCALL_STATUS_INVALID_OPERAND
        );
    }

    #[test]
    fn a_failed_discard_does_not_fail_the_conversion() {
        let mut kvm = RecordingKvm::new();
        kvm.inject(
            "discard",
            crate::tee::fake::Injected::Fail(OpFailure::errno(libc::EINVAL)),
        );
        assert_eq!(
            handle_map_gpa_range(&mut kvm, RAM, &[0x1000, 1, 0, 0, 0, 0]),
            0
        );
    }

    #[test]
    fn memory_fault_sets_the_attribute_the_access_wanted() {
        let mut kvm = RecordingKvm::new();
        handle_memory_fault(&mut kvm, RAM, KVM_MEMORY_EXIT_FLAG_PRIVATE, 0x3000, 0x1000).unwrap();
        handle_memory_fault(&mut kvm, RAM, 0, 0x5010, 8).unwrap();
        assert_eq!(
            kvm.calls,
            [
                Call::SetMemoryAttributes {
                    gpa: 0x3000,
                    size: 0x1000,
                    private: true
                },
                Call::Discard {
                    gpa: 0x3000,
                    size: 0x1000,
                    now_private: true
                },
                Call::SetMemoryAttributes {
                    gpa: 0x5000,
                    size: 0x1000,
                    private: false
                },
                Call::Discard {
                    gpa: 0x5000,
                    size: 0x1000,
                    now_private: false
                }
            ]
        );
        let err = handle_memory_fault(&mut kvm, RAM, 0, 1 << 40, 0x1000).unwrap_err();
        assert!(err.to_string().contains("not guest RAM"), "{err}");
    }
}
