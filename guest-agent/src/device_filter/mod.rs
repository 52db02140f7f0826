//! The cgroup v2 device controller: a container's device rules become a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to its cgroup.
//!
//! cgroup v2 has no `devices.allow` file. The kernel instead runs every eBPF
//! program attached (type `BPF_CGROUP_DEVICE`) to the cgroup of a task that
//! opens or mknods a device node, and refuses with EPERM unless all of them
//! return 1. The program sees `struct bpf_cgroup_dev_ctx`:
//!
//! ```text
//! offset 0  u32 access_type   (BPF_DEVCG_ACC_{MKNOD=1,READ=2,WRITE=4} << 16)
//!                             | BPF_DEVCG_DEV_{BLOCK=1,CHAR=2}
//! offset 4  u32 major
//! offset 8  u32 minor
//! ```
//!
//! Rule semantics ([`DeviceRules::allows`], the reference the generated
//! program is tested against): each requested access bit (an open for
//! read-write asks for two) is decided on its own by the last rule that
//! matches the device and grants or refuses that bit; with no such rule the
//! default decides. A request is allowed only when every bit is. This is
//! runc's "last matching rule wins" made exact for partial access lists
//! (`allow c 1:3 r` then `deny c 1:3 w` refuses an O_RDWR open, and
//! `allow r` + `allow w` grant it, as cgroup v1 does).
//!
//! - `program` turns [`DeviceRules`] into raw eBPF instructions.
//! - `kernel` loads them with bpf(2) and attaches them to a cgroup.

pub mod kernel;
pub mod program;

/// Access bits, the kernel's `BPF_DEVCG_ACC_*` values.
pub const ACCESS_MKNOD: u8 = 1;
pub const ACCESS_READ: u8 = 2;
pub const ACCESS_WRITE: u8 = 4;
pub const ACCESS_ALL: u8 = ACCESS_MKNOD | ACCESS_READ | ACCESS_WRITE;

/// The largest major and minor numbers Linux has (12 and 20 bits).
pub const MAX_MAJOR: u32 = (1 << 12) - 1;
pub const MAX_MINOR: u32 = (1 << 20) - 1;

/// A device node type, as the kernel reports it to the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

impl DeviceKind {
    /// The kernel's `BPF_DEVCG_DEV_*` value.
    pub fn bpf_type(self) -> u8 {
        match self {
            DeviceKind::Block => 1,
            DeviceKind::Char => 2,
        }
    }
}

/// One allow or deny rule; `None` fields match anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceRule {
    pub allow: bool,
    pub kind: Option<DeviceKind>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACCESS_*` bits this rule grants or refuses.
    pub access: u8,
}

impl DeviceRule {
    /// An allow rule for one character device, all access.
    pub const fn char_device(major: u32, minor: Option<u32>) -> DeviceRule {
        DeviceRule {
            allow: true,
            kind: Some(DeviceKind::Char),
            major: Some(major),
            minor,
            access: ACCESS_ALL,
        }
    }

    /// Whether the rule names this device (access not considered).
    pub fn matches_device(&self, kind: DeviceKind, major: u32, minor: u32) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor)
    }

    /// Matches every device and every access: the rule decides everything
    /// and makes all rules before it irrelevant.
    pub fn is_catch_all(&self) -> bool {
        self.kind.is_none()
            && self.major.is_none()
            && self.minor.is_none()
            && self.access == ACCESS_ALL
    }
}

/// A container's device rules in order, and what applies when none matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRules {
    pub default_allow: bool,
    pub rules: Vec<DeviceRule>,
}

impl DeviceRules {
    /// Deny by default (runc's starting point) and no rules yet.
    pub fn deny_all() -> DeviceRules {
        DeviceRules {
            default_allow: false,
            rules: Vec::new(),
        }
    }

    /// Appends a rule. A catch-all rule drops the rules before it and
    /// becomes the default (it would shadow them anyway), so `a *:* rwm`
    /// resets the list the way cgroup v1's `devices.deny` of `a` does.
    pub fn push(&mut self, rule: DeviceRule) {
        if rule.is_catch_all() {
            self.rules.clear();
            self.default_allow = rule.allow;
        } else if rule.access != 0 {
            self.rules.push(rule);
        }
    }

    /// The decision for one request (`access` is a set of `ACCESS_*` bits).
    pub fn allows(&self, kind: DeviceKind, major: u32, minor: u32, access: u8) -> bool {
        [ACCESS_MKNOD, ACCESS_READ, ACCESS_WRITE]
            .into_iter()
            .filter(|bit| access & bit != 0)
            .all(|bit| {
                self.rules
                    .iter()
                    .rev()
                    .find(|r| r.access & bit != 0 && r.matches_device(kind, major, minor))
                    .map_or(self.default_allow, |r| r.allow)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NULL: (DeviceKind, u32, u32) = (DeviceKind::Char, 1, 3);

    fn rule(allow: bool, kind: Option<DeviceKind>, major: Option<u32>, access: u8) -> DeviceRule {
        DeviceRule {
            allow,
            kind,
            major,
            minor: None,
            access,
        }
    }

    #[test]
    fn catch_all_rule_resets_list_and_default() {
        let mut rules = DeviceRules::deny_all();
        rules.push(DeviceRule::char_device(1, Some(3)));
        rules.push(rule(true, None, None, ACCESS_ALL));
        assert_eq!(rules.rules, Vec::new());
        assert!(rules.default_allow);
        rules.push(rule(false, None, None, ACCESS_ALL));
        assert!(!rules.default_allow);
    }

    #[test]
    fn partial_access_rules_combine_per_bit() {
        let (kind, major, minor) = NULL;
        let mut rules = DeviceRules::deny_all();
        rules.push(DeviceRule {
            access: ACCESS_READ,
            ..DeviceRule::char_device(1, Some(3))
        });
        assert!(rules.allows(kind, major, minor, ACCESS_READ));
        assert!(!rules.allows(kind, major, minor, ACCESS_READ | ACCESS_WRITE));
        rules.push(DeviceRule {
            access: ACCESS_WRITE,
            ..DeviceRule::char_device(1, Some(3))
        });
        assert!(rules.allows(kind, major, minor, ACCESS_READ | ACCESS_WRITE));
        assert!(!rules.allows(kind, major, minor, ACCESS_MKNOD));
    }

    #[test]
    fn later_deny_of_one_bit_refuses_requests_containing_it() {
        let (kind, major, minor) = NULL;
        let mut rules = DeviceRules::deny_all();
        rules.push(DeviceRule::char_device(1, None));
        rules.push(DeviceRule {
            allow: false,
            access: ACCESS_WRITE,
            ..DeviceRule::char_device(1, Some(3))
        });
        assert!(rules.allows(kind, major, minor, ACCESS_READ | ACCESS_MKNOD));
        assert!(!rules.allows(kind, major, minor, ACCESS_READ | ACCESS_WRITE));
        assert!(rules.allows(kind, major, 5, ACCESS_READ | ACCESS_WRITE));
        assert!(!rules.allows(DeviceKind::Block, major, minor, ACCESS_READ));
    }

    #[test]
    fn empty_access_request_is_allowed_even_by_deny_all() {
        assert!(DeviceRules::deny_all().allows(DeviceKind::Char, 1, 3, 0));
    }
}
