//! TDX structures of the KVM uAPI (`arch/x86/include/uapi/asm/kvm.h` and
//! `include/uapi/linux/kvm.h`, Linux 6.16, where TDX host support landed),
//! which kvm-bindings 0.14 does not generate. Layouts are pinned by tests.

#![allow(non_camel_case_types)]

use kvm_bindings::kvm_cpuid_entry2;

/// `KVM_EXIT_TDX`: a TDVMCALL KVM forwards to the VMM.
pub const KVM_EXIT_TDX: u32 = 40;
/// TDVMCALL leaf `GetQuote` (GHCI 1.5, R11 = 0x10002).
pub const TDVMCALL_GET_QUOTE: u64 = 0x10002;
/// TDVMCALL status codes put in `ret` (GHCI 1.5).
pub const TDVMCALL_STATUS_SUCCESS: u64 = 0;
pub const TDVMCALL_STATUS_RETRY: u64 = 1;
pub const TDVMCALL_STATUS_INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
/// `flags` of `KVM_TDX_INIT_MEM_REGION`: also TDH.MR.EXTEND the pages.
pub const KVM_TDX_MEASURE_MEMORY_REGION: u32 = 1;
/// CPUID entries our buffers hold (KVM's own limit).
pub const TDX_MAX_CPUID_ENTRIES: usize = 256;

/// `enum kvm_tdx_cmd_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum KvmTdxCmdId {
    Capabilities = 0,
    InitVm = 1,
    InitVcpu = 2,
    InitMemRegion = 3,
    FinalizeVm = 4,
    GetCpuid = 5,
}

/// `struct kvm_tdx_cmd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_tdx_cmd {
    pub id: u32,
    pub flags: u32,
    pub data: u64,
    pub hw_error: u64,
}

/// `struct kvm_tdx_capabilities` up to its `struct kvm_cpuid2` header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvm_tdx_capabilities {
    pub supported_attrs: u64,
    pub supported_xfam: u64,
    pub kernel_tdvmcallinfo_1_r11: u64,
    pub user_tdvmcallinfo_1_r11: u64,
    pub kernel_tdvmcallinfo_1_r12: u64,
    pub user_tdvmcallinfo_1_r12: u64,
    pub reserved: [u64; 250],
    /// `cpuid.nent`, `cpuid.padding`.
    pub cpuid_nent: u32,
    pub cpuid_padding: u32,
}

/// `struct kvm_tdx_init_vm` up to its `struct kvm_cpuid2` header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvm_tdx_init_vm {
    pub attributes: u64,
    pub xfam: u64,
    pub mrconfigid: [u64; 6],
    pub mrowner: [u64; 6],
    pub mrownerconfig: [u64; 6],
    pub reserved: [u64; 12],
    pub cpuid_nent: u32,
    pub cpuid_padding: u32,
}

/// `struct kvm_tdx_init_mem_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_tdx_init_mem_region {
    pub source_addr: u64,
    pub gpa: u64,
    pub nr_pages: u64,
}

/// The `tdx` member of `kvm_run`'s exit union (`KVM_EXIT_TDX`), with the
/// `unknown` view of its inner union (`get_quote` is `ret, gpa, size`).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct kvm_tdx_exit {
    pub flags: u64,
    pub nr: u64,
    pub ret: u64,
    pub data: [u64; 5],
}

/// `KVM_TDX_CAPABILITIES`' argument with room for the CPUID entries.
#[repr(C)]
pub struct TdxCapabilitiesBuf {
    pub header: kvm_tdx_capabilities,
    pub entries: [kvm_cpuid_entry2; TDX_MAX_CPUID_ENTRIES],
}

impl std::fmt::Debug for TdxCapabilitiesBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdxCapabilitiesBuf")
            .field("supported_attrs", &self.header.supported_attrs)
            .field("supported_xfam", &self.header.supported_xfam)
            .field("cpuid_nent", &self.header.cpuid_nent)
            .finish()
    }
}

impl TdxCapabilitiesBuf {
    pub fn new() -> Box<Self> {
        Box::new(Self {
            header: kvm_tdx_capabilities {
                supported_attrs: 0,
                supported_xfam: 0,
                kernel_tdvmcallinfo_1_r11: 0,
                user_tdvmcallinfo_1_r11: 0,
                kernel_tdvmcallinfo_1_r12: 0,
                user_tdvmcallinfo_1_r12: 0,
                reserved: [0; 250],
                cpuid_nent: TDX_MAX_CPUID_ENTRIES as u32,
                cpuid_padding: 0,
            },
            entries: [kvm_cpuid_entry2::default(); TDX_MAX_CPUID_ENTRIES],
        })
    }

    pub fn as_mut_ptr(&mut self) -> *mut Self {
        self
    }

    /// The configurable CPUID bits the kernel reported.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        let n = (self.header.cpuid_nent as usize).min(TDX_MAX_CPUID_ENTRIES);
        &self.entries[..n]
    }
}

/// `KVM_TDX_INIT_VM`'s argument with its CPUID entries.
#[repr(C)]
pub struct TdxInitVmBuf {
    pub header: kvm_tdx_init_vm,
    pub entries: [kvm_cpuid_entry2; TDX_MAX_CPUID_ENTRIES],
}

impl std::fmt::Debug for TdxInitVmBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdxInitVmBuf")
            .field("header", &self.header)
            .finish()
    }
}

impl TdxInitVmBuf {
    /// `mr_config_id` goes into MRCONFIGID as 6 little-endian words, i.e.
    /// byte for byte.
    pub fn new(
        attributes: u64,
        xfam: u64,
        mr_config_id: &[u8; 48],
        cpuid: &[kvm_cpuid_entry2],
    ) -> Box<Self> {
        let mut words = [0u64; 6];
        for (word, chunk) in words.iter_mut().zip(mr_config_id.chunks_exact(8)) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            *word = u64::from_le_bytes(bytes);
        }
        let n = cpuid.len().min(TDX_MAX_CPUID_ENTRIES);
        let mut buf = Box::new(Self {
            header: kvm_tdx_init_vm {
                attributes,
                xfam,
                mrconfigid: words,
                mrowner: [0; 6],
                mrownerconfig: [0; 6],
                reserved: [0; 12],
                cpuid_nent: n as u32,
                cpuid_padding: 0,
            },
            entries: [kvm_cpuid_entry2::default(); TDX_MAX_CPUID_ENTRIES],
        });
        buf.entries[..n].copy_from_slice(&cpuid[..n]);
        buf
    }

    pub fn as_mut_ptr(&mut self) -> *mut Self {
        self
    }

    /// MRCONFIGID as bytes.
    pub fn mr_config_id(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        for (chunk, word) in out.chunks_exact_mut(8).zip(self.header.mrconfigid) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn tdx_cmd_layout_matches_uapi() {
        assert_eq!(size_of::<kvm_tdx_cmd>(), 24);
        assert_eq!(offset_of!(kvm_tdx_cmd, flags), 4);
        assert_eq!(offset_of!(kvm_tdx_cmd, data), 8);
        assert_eq!(offset_of!(kvm_tdx_cmd, hw_error), 16);
    }

    #[test]
    fn tdx_capabilities_layout_matches_uapi() {
        // 6 words + reserved[250] = 2048 bytes, then kvm_cpuid2's header.
        assert_eq!(offset_of!(kvm_tdx_capabilities, reserved), 48);
        assert_eq!(offset_of!(kvm_tdx_capabilities, cpuid_nent), 2048);
        assert_eq!(size_of::<kvm_tdx_capabilities>(), 2056);
        assert_eq!(offset_of!(TdxCapabilitiesBuf, entries), 2056);
    }

    #[test]
    fn tdx_init_vm_layout_matches_uapi() {
        // "The total space for TD_PARAMS before the CPUIDs is 256 bytes".
        assert_eq!(offset_of!(kvm_tdx_init_vm, mrconfigid), 16);
        assert_eq!(offset_of!(kvm_tdx_init_vm, mrowner), 64);
        assert_eq!(offset_of!(kvm_tdx_init_vm, mrownerconfig), 112);
        assert_eq!(offset_of!(kvm_tdx_init_vm, reserved), 160);
        assert_eq!(offset_of!(kvm_tdx_init_vm, cpuid_nent), 256);
        assert_eq!(size_of::<kvm_tdx_init_vm>(), 264);
        assert_eq!(offset_of!(TdxInitVmBuf, entries), 264);
        assert_eq!(size_of::<kvm_cpuid_entry2>(), 40);
    }

    #[test]
    fn tdx_mem_region_and_exit_layouts_match_uapi() {
        assert_eq!(size_of::<kvm_tdx_init_mem_region>(), 24);
        assert_eq!(offset_of!(kvm_tdx_init_mem_region, nr_pages), 16);
        assert_eq!(offset_of!(kvm_tdx_exit, ret), 16);
        assert_eq!(offset_of!(kvm_tdx_exit, data), 24);
        assert_eq!(size_of::<kvm_tdx_exit>(), 64);
    }

    #[test]
    fn mr_config_id_roundtrips_byte_for_byte() {
        let id: [u8; 48] = std::array::from_fn(|i| i as u8);
        let buf = TdxInitVmBuf::new(0, 0, &id, &[]);
        assert_eq!(buf.mr_config_id(), id);
        assert_eq!(buf.header.mrconfigid[0], 0x0706_0504_0302_0100);
    }
}
