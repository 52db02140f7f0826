//! The SEV-SNP guest policy (SEV-SNP ABI spec 1.55, "Guest Policy"): the
//! 64-bit value given to `SNP_LAUNCH_START` and reported in every
//! attestation report.

use std::fmt;

/// Bit 16: the guest may run with SMT enabled on the host.
pub const POLICY_SMT: u64 = 1 << 16;
/// Bit 17: reserved, must be one.
pub const POLICY_RESERVED_MBO: u64 = 1 << 17;
/// Bit 18: a migration agent may be associated.
pub const POLICY_MIGRATE_MA: u64 = 1 << 18;
/// Bit 19: the host may debug the guest (decrypt its memory).
pub const POLICY_DEBUG: u64 = 1 << 19;
/// Bit 20: the guest may run on a single socket only.
pub const POLICY_SINGLE_SOCKET: u64 = 1 << 20;
/// Bits 26..63 are reserved and must be zero (up to bit 25 are defined:
/// CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS, CIPHERTEXT_HIDING, PAGE_SWAP_DISABLE).
pub const POLICY_RESERVED_MBZ: u64 = !((1 << 26) - 1);

/// What cloister launches by default: SMT allowed, ABI 0.0, no debug, no
/// migration agent.
pub const DEFAULT_POLICY: u64 = POLICY_SMT | POLICY_RESERVED_MBO;

/// A policy that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnpPolicyError {
    #[error("tee.policy = {0:#x}: reserved bit 17 must be set (try {fixed:#x})", fixed = .0 | POLICY_RESERVED_MBO)]
    MissingMbo(u64),
    #[error("tee.policy = {0:#x}: reserved bits {1:#x} must be zero")]
    ReservedBits(u64, u64),
}

/// A validated SNP guest policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpPolicy(u64);

impl SnpPolicy {
    pub fn new(bits: u64) -> Result<Self, SnpPolicyError> {
        if bits & POLICY_RESERVED_MBO == 0 {
            return Err(SnpPolicyError::MissingMbo(bits));
        }
        if bits & POLICY_RESERVED_MBZ != 0 {
            return Err(SnpPolicyError::ReservedBits(
                bits,
                bits & POLICY_RESERVED_MBZ,
            ));
        }
        Ok(Self(bits))
    }

    pub fn bits(self) -> u64 {
        self.0
    }
    pub fn abi_major(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn abi_minor(self) -> u8 {
        self.0 as u8
    }
    pub fn smt_allowed(self) -> bool {
        self.0 & POLICY_SMT != 0
    }
    pub fn debug_allowed(self) -> bool {
        self.0 & POLICY_DEBUG != 0
    }
    pub fn migration_agent_allowed(self) -> bool {
        self.0 & POLICY_MIGRATE_MA != 0
    }
    pub fn single_socket(self) -> bool {
        self.0 & POLICY_SINGLE_SOCKET != 0
    }
}

impl Default for SnpPolicy {
    fn default() -> Self {
        Self(DEFAULT_POLICY)
    }
}

impl fmt::Display for SnpPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} (abi >= {}.{}, smt {}, debug {}, migration agent {}, single socket {})",
            self.0,
            self.abi_major(),
            self.abi_minor(),
            yes_no(self.smt_allowed()),
            yes_no(self.debug_allowed()),
            yes_no(self.migration_agent_allowed()),
            yes_no(self.single_socket()),
        )
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "allowed"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_allows_smt_and_nothing_else() {
        let p = SnpPolicy::new(0x30000).unwrap();
        assert_eq!(p, SnpPolicy::default());
        assert!(p.smt_allowed() && !p.debug_allowed() && !p.migration_agent_allowed());
        assert!(p.to_string().contains("debug no"), "{p}");
    }

    #[test]
    fn policy_without_bit_17_is_refused_with_the_fix() {
        let err = SnpPolicy::new(0x10000).unwrap_err().to_string();
        assert!(err.contains("tee.policy = 0x10000"), "{err}");
        assert!(err.contains("bit 17") && err.contains("0x30000"), "{err}");
    }

    #[test]
    fn policy_with_reserved_high_bits_names_them() {
        let err = SnpPolicy::new(0x30000 | 1 << 40).unwrap_err().to_string();
        assert!(err.contains("0x10000000000"), "{err}");
    }

    #[test]
    fn debug_policy_is_valid_but_reported() {
        let p = SnpPolicy::new(0x30000 | POLICY_DEBUG).unwrap();
        assert!(p.debug_allowed());
        assert!(p.to_string().contains("debug allowed"), "{p}");
    }
}
