//! SEV-SNP launch of a firmware-less direct boot: the page list
//! ([`direct_boot`]), the policy, the CPUID page, the VMSA model and the
//! ioctl sequence ([`launch`]).

pub mod cpuid_page;
pub mod direct_boot;
pub mod launch;
pub mod policy;
pub mod vmsa;

#[cfg(test)]
mod tests;

/// Names of SEV firmware status codes (`enum sev_ret_code`,
/// `include/uapi/linux/psp-sev.h`) that a launch can meet.
pub fn sev_firmware_error_name(code: u64) -> Option<&'static str> {
    Some(match code {
        0x01 => "INVALID_PLATFORM_STATE",
        0x02 => "INVALID_GUEST_STATE",
        0x03 => "INVALID_CONFIG",
        0x04 => "INVALID_LENGTH",
        0x07 => "POLICY_FAILURE",
        0x08 => "INACTIVE",
        0x09 => "INVALID_ADDRESS",
        0x0A => "BAD_SIGNATURE",
        0x0B => "BAD_MEASUREMENT",
        0x10 => "INVALID_GUEST",
        0x11 => "INVALID_COMMAND",
        0x13 => "HWERROR_PLATFORM",
        0x14 => "HWERROR_UNSAFE",
        0x15 => "UNSUPPORTED",
        0x16 => "INVALID_PARAM",
        0x17 => "RESOURCE_LIMIT",
        0x18 => "SECURE_DATA_INVALID",
        0x19 => "INVALID_PAGE_SIZE",
        0x1A => "INVALID_PAGE_STATE",
        0x1B => "INVALID_MDATA_ENTRY",
        0x1C => "INVALID_PAGE_OWNER",
        0x1F => "RMP_INIT_REQUIRED",
        _ => return None,
    })
}
