//! Name tables of the OCI spec: capabilities, rlimits and mount options.

/// Capability names in kernel number order (CAP_CHOWN = 0 …).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The kernel number of capability `name` (`CAP_` prefix optional).
pub fn capability_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    CAPABILITIES
        .iter()
        .position(|c| *c == full)
        .and_then(|i| u32::try_from(i).ok())
}

const RLIMITS: [&str; 16] = [
    "RLIMIT_CPU",
    "RLIMIT_FSIZE",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_CORE",
    "RLIMIT_RSS",
    "RLIMIT_NPROC",
    "RLIMIT_NOFILE",
    "RLIMIT_MEMLOCK",
    "RLIMIT_AS",
    "RLIMIT_LOCKS",
    "RLIMIT_SIGPENDING",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
];

/// The resource number of rlimit `name`.
pub fn rlimit_number(name: &str) -> Option<u32> {
    RLIMITS
        .iter()
        .position(|r| *r == name)
        .and_then(|i| u32::try_from(i).ok())
}

/// A mount(2) option: a flag to set, a flag to clear, or a propagation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOption {
    Set(u64),
    Clear(u64),
    Propagation(u64),
    Bind { recursive: bool },
}

/// Parses one flag-style mount option; `None` means it is file system data
/// (`mode=755`, `size=64k`, …) passed through to the file system.
pub fn mount_option(option: &str) -> Option<MountOption> {
    use MountOption::*;
    let flag = |f: libc::c_ulong| f;
    Some(match option {
        "defaults" | "rw" => Clear(flag(libc::MS_RDONLY)),
        "ro" => Set(flag(libc::MS_RDONLY)),
        "nosuid" => Set(flag(libc::MS_NOSUID)),
        "suid" => Clear(flag(libc::MS_NOSUID)),
        "nodev" => Set(flag(libc::MS_NODEV)),
        "dev" => Clear(flag(libc::MS_NODEV)),
        "noexec" => Set(flag(libc::MS_NOEXEC)),
        "exec" => Clear(flag(libc::MS_NOEXEC)),
        "sync" => Set(flag(libc::MS_SYNCHRONOUS)),
        "async" => Clear(flag(libc::MS_SYNCHRONOUS)),
        "dirsync" => Set(flag(libc::MS_DIRSYNC)),
        "remount" => Set(flag(libc::MS_REMOUNT)),
        "mand" => Set(flag(libc::MS_MANDLOCK)),
        "nomand" => Clear(flag(libc::MS_MANDLOCK)),
        "atime" => Clear(flag(libc::MS_NOATIME)),
        "noatime" => Set(flag(libc::MS_NOATIME)),
        "diratime" => Clear(flag(libc::MS_NODIRATIME)),
        "nodiratime" => Set(flag(libc::MS_NODIRATIME)),
        "relatime" => Set(flag(libc::MS_RELATIME)),
        "norelatime" => Clear(flag(libc::MS_RELATIME)),
        "strictatime" => Set(flag(libc::MS_STRICTATIME)),
        "nostrictatime" => Clear(flag(libc::MS_STRICTATIME)),
        "silent" => Set(flag(libc::MS_SILENT)),
        "loud" => Clear(flag(libc::MS_SILENT)),
        "lazytime" => Set(flag(libc::MS_LAZYTIME)),
        "nolazytime" => Clear(flag(libc::MS_LAZYTIME)),
        "bind" => Bind { recursive: false },
        "rbind" => Bind { recursive: true },
        "private" => Propagation(flag(libc::MS_PRIVATE)),
        "rprivate" => Propagation(flag(libc::MS_PRIVATE | libc::MS_REC)),
        "shared" => Propagation(flag(libc::MS_SHARED)),
        "rshared" => Propagation(flag(libc::MS_SHARED | libc::MS_REC)),
        "slave" => Propagation(flag(libc::MS_SLAVE)),
        "rslave" => Propagation(flag(libc::MS_SLAVE | libc::MS_REC)),
        "unbindable" => Propagation(flag(libc::MS_UNBINDABLE)),
        "runbindable" => Propagation(flag(libc::MS_UNBINDABLE | libc::MS_REC)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_numbers_match_kernel() {
        assert_eq!(capability_number("CAP_CHOWN"), Some(0));
        assert_eq!(capability_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(capability_number("net_raw"), Some(13));
        assert_eq!(capability_number("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(capability_number("CAP_NOPE"), None);
    }

    #[test]
    fn rlimit_numbers_match_kernel() {
        assert_eq!(rlimit_number("RLIMIT_NOFILE"), Some(libc::RLIMIT_NOFILE));
        assert_eq!(rlimit_number("RLIMIT_RTTIME"), Some(libc::RLIMIT_RTTIME));
        assert_eq!(rlimit_number("RLIMIT_FOO"), None);
    }

    #[test]
    fn mount_options_parse_flags_and_leave_data() {
        assert_eq!(mount_option("ro"), Some(MountOption::Set(libc::MS_RDONLY)));
        assert_eq!(
            mount_option("rbind"),
            Some(MountOption::Bind { recursive: true })
        );
        assert_eq!(mount_option("mode=755"), None);
    }
}
