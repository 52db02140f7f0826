//! bpf(2) for cgroup device programs: load (with the verifier's log when
//! the kernel refuses), attach to or replace on a cgroup directory, detach,
//! and list what is attached.
//!
//! The attribute structs are the leading fields of the kernel's `union
//! bpf_attr` for each command; the kernel zero-fills the fields we do not
//! pass.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::program::Insn;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 1 << 1;
const BPF_F_REPLACE: u32 = 1 << 2;

/// No GPL-only helper is called, so our own licence is accepted.
const LICENSE: &[u8] = b"Apache-2.0\0";
/// Shown by `bpftool prog` (at most 15 bytes).
const PROGRAM_NAME: &[u8] = b"cloister_dev";
/// Enough for the verifier's level-1 log of our largest programs' failure
/// point; the kernel truncates longer logs.
const LOG_SIZE: usize = 256 * 1024;
/// How much of the log's end goes into an error (the refusal is at the end).
const LOG_TAIL: usize = 2048;

/// Errors from bpf(2).
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpf(BPF_PROG_LOAD) of a {instructions}-instruction cgroup device program: {source}{}", verifier_suffix(.log))]
    Load {
        instructions: usize,
        #[source]
        source: io::Error,
        log: String,
    },
    #[error("bpf(BPF_PROG_ATTACH) of the device program to cgroup fd {cgroup}: {source}")]
    Attach {
        cgroup: i32,
        #[source]
        source: io::Error,
    },
    #[error("bpf(BPF_PROG_DETACH) of the old device program from cgroup fd {cgroup}: {source}")]
    Detach {
        cgroup: i32,
        #[source]
        source: io::Error,
    },
    #[error("bpf(BPF_PROG_QUERY) of cgroup fd {cgroup}: {source}")]
    Query {
        cgroup: i32,
        #[source]
        source: io::Error,
    },
    #[error("device program of {0} instructions is too long for bpf(2)")]
    TooLong(usize),
}

fn verifier_suffix(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; verifier log: {log}")
    }
}

#[repr(C)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

#[repr(C)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// bpf(cmd, attr, sizeof attr).
///
/// # Safety
///
/// `attr` must be the attribute struct `cmd` expects, and every pointer in
/// it valid for what the kernel does with it during the call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let size = std::mem::size_of::<T>();
    // SAFETY: the caller vouches for `attr`; `size` is its exact size.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_arg(fd: BorrowedFd<'_>) -> u32 {
    // Open descriptors are never negative.
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

fn load_attempt(insns: &[Insn], log: Option<&mut [u8]>) -> io::Result<OwnedFd> {
    let insn_cnt =
        u32::try_from(insns.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut prog_name = [0u8; 16];
    prog_name[..PROGRAM_NAME.len()].copy_from_slice(PROGRAM_NAME);
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (
            1,
            u32::try_from(buf.len()).unwrap_or(0),
            buf.as_mut_ptr() as u64,
        ),
        None => (0, 0, 0),
    };
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: BPF_CGROUP_DEVICE,
    };
    // SAFETY: a BPF_PROG_LOAD attribute; `insns` (8-byte `struct bpf_insn`
    // each, `Insn` is repr(C) with that layout), the NUL-terminated licence
    // and the log buffer of `log_size` bytes outlive the call.
    let fd = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads a `BPF_PROG_TYPE_CGROUP_DEVICE` program. On refusal the load is
/// repeated with the verifier's log, whose end goes into the error.
pub fn load_device_program(insns: &[Insn]) -> Result<OwnedFd, BpfError> {
    if u32::try_from(insns.len()).is_err() {
        return Err(BpfError::TooLong(insns.len()));
    }
    let source = match load_attempt(insns, None) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let mut buf = vec![0u8; LOG_SIZE];
    let log = match load_attempt(insns, Some(&mut buf)) {
        // Loaded the second time (a transient failure such as EAGAIN).
        Ok(fd) => return Ok(fd),
        Err(_) => {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            let text = String::from_utf8_lossy(&buf[..end]);
            let text = text.trim();
            let start = text
                .char_indices()
                .map(|(i, _)| i)
                .find(|&i| text.len() - i <= LOG_TAIL)
                .unwrap_or(0);
            text[start..].to_owned()
        }
    };
    Err(BpfError::Load {
        instructions: insns.len(),
        source,
        log,
    })
}

fn attach_attr(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    flags: u32,
    replace: u32,
) -> ProgAttachAttr {
    ProgAttachAttr {
        target_fd: fd_arg(cgroup),
        attach_bpf_fd: fd_arg(program),
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: flags,
        replace_bpf_fd: replace,
    }
}

/// Attaches `program` to the cgroup directory `cgroup` next to whatever
/// else is attached there (BPF_F_ALLOW_MULTI: all programs must allow).
/// With `replace`, that previously attached program is swapped for the new
/// one atomically (BPF_F_REPLACE); kernels before 5.6 lack it, so there the
/// new program is attached first and the old one detached after, which is
/// never more permissive than either program alone.
pub fn attach_device_program(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    replace: Option<BorrowedFd<'_>>,
) -> Result<(), BpfError> {
    let attach_error = |source| BpfError::Attach {
        cgroup: cgroup.as_raw_fd(),
        source,
    };
    if let Some(old) = replace {
        let mut attr = attach_attr(
            cgroup,
            program,
            BPF_F_ALLOW_MULTI | BPF_F_REPLACE,
            fd_arg(old),
        );
        // SAFETY: a BPF_PROG_ATTACH attribute holding only descriptors.
        match unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) } {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(attach_error(e)),
        }
    }
    let mut attr = attach_attr(cgroup, program, BPF_F_ALLOW_MULTI, 0);
    // SAFETY: a BPF_PROG_ATTACH attribute holding only descriptors.
    unsafe { sys_bpf(BPF_PROG_ATTACH, &mut attr) }.map_err(attach_error)?;
    if let Some(old) = replace {
        detach_device_program(cgroup, old)?;
    }
    Ok(())
}

/// Detaches one program from the cgroup directory `cgroup`.
pub fn detach_device_program(
    cgroup: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
) -> Result<(), BpfError> {
    let mut attr = attach_attr(cgroup, program, 0, 0);
    // SAFETY: a BPF_PROG_DETACH attribute holding only descriptors.
    unsafe { sys_bpf(BPF_PROG_DETACH, &mut attr) }.map_err(|source| BpfError::Detach {
        cgroup: cgroup.as_raw_fd(),
        source,
    })?;
    Ok(())
}

/// Ids of the device programs attached to the cgroup directory itself
/// (not inherited ones), at most 64.
pub fn attached_device_programs(cgroup: BorrowedFd<'_>) -> Result<Vec<u32>, BpfError> {
    let mut ids = [0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: fd_arg(cgroup),
        attach_type: BPF_CGROUP_DEVICE,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: 64,
        _pad: 0,
    };
    // SAFETY: a BPF_PROG_QUERY attribute; `prog_ids` points to `prog_cnt`
    // writable u32s that outlive the call.
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }.map_err(|source| BpfError::Query {
        cgroup: cgroup.as_raw_fd(),
        source,
    })?;
    let count = usize::try_from(attr.prog_cnt).unwrap_or(0).min(ids.len());
    Ok(ids[..count].to_vec())
}

/// Whether this kernel and our privileges allow loading a device program
/// (for tests and diagnostics): None if so, else why not.
pub fn probe() -> Option<String> {
    let allow = [
        Insn {
            code: super::program::opcode::ALU32_MOV_K,
            regs: 0,
            off: 0,
            imm: 1,
        },
        Insn {
            code: super::program::opcode::EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    load_device_program(&allow).err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn attribute_structs_have_kernel_layout() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(std::mem::size_of::<ProgAttachAttr>(), 20);
        assert_eq!(std::mem::offset_of!(ProgQueryAttr, prog_cnt), 24);
    }

    #[test]
    fn generated_programs_pass_the_verifier() {
        use crate::device_filter::{program, DeviceKind, DeviceRule, DeviceRules, ACCESS_READ};
        if let Some(reason) = probe() {
            eprintln!("SKIP: cannot load cgroup device programs here: {reason}");
            return;
        }
        let read_any = DeviceRule {
            allow: false,
            kind: None,
            major: None,
            minor: None,
            access: ACCESS_READ,
        };
        let block_8 = DeviceRule {
            allow: true,
            kind: Some(DeviceKind::Block),
            major: Some(8),
            minor: None,
            access: crate::device_filter::ACCESS_ALL,
        };
        let shapes = [
            (
                false,
                crate::container::device_rules::DEFAULT_ALLOWED.to_vec(),
            ),
            (false, vec![]),
            (true, vec![]),
            (false, vec![DeviceRule::char_device(1, Some(3))]),
            (
                true,
                vec![DeviceRule {
                    allow: false,
                    ..block_8
                }],
            ),
            (
                false,
                vec![block_8, read_any, DeviceRule::char_device(136, None)],
            ),
            (
                true,
                vec![
                    read_any,
                    DeviceRule {
                        allow: true,
                        ..read_any
                    },
                ],
            ),
        ];
        for (default_allow, list) in shapes {
            let mut rules = DeviceRules {
                default_allow,
                rules: Vec::new(),
            };
            list.into_iter().for_each(|r| rules.push(r));
            let insns = program::generate(&rules).unwrap();
            if let Err(e) = load_device_program(&insns) {
                panic!("{rules:?}: {e}");
            }
        }
    }

    /// The primitives behind both update paths (BPF_F_REPLACE, and
    /// attach-then-detach on kernels without it) on a scratch cgroup.
    #[test]
    fn attach_replace_and_detach_on_a_cgroup() {
        if let Some(reason) = probe() {
            eprintln!("SKIP: cannot load cgroup device programs here: {reason}");
            return;
        }
        let Some(root) = crate::cgroups::detect_root() else {
            eprintln!("SKIP: no cgroup v2 hierarchy at /sys/fs/cgroup[/unified]");
            return;
        };
        /// Removes the scratch cgroup even when an assertion fails.
        struct ScratchCgroup(std::path::PathBuf);
        impl Drop for ScratchCgroup {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir(&self.0);
            }
        }
        let dir = ScratchCgroup(root.join(format!("cloister-bpf-test-{}", std::process::id())));
        std::fs::create_dir(&dir.0).unwrap();
        let cgroup = std::fs::File::open(&dir.0).unwrap();
        let allow = |verdict| {
            load_device_program(&[
                Insn {
                    code: super::super::program::opcode::ALU32_MOV_K,
                    regs: 0,
                    off: 0,
                    imm: verdict,
                },
                Insn {
                    code: super::super::program::opcode::EXIT,
                    regs: 0,
                    off: 0,
                    imm: 0,
                },
            ])
            .unwrap()
        };
        let (first, second, third) = (allow(1), allow(0), allow(1));
        let count = || attached_device_programs(cgroup.as_fd()).unwrap().len();

        attach_device_program(cgroup.as_fd(), first.as_fd(), None).unwrap();
        assert_eq!(count(), 1);
        attach_device_program(cgroup.as_fd(), second.as_fd(), Some(first.as_fd())).unwrap();
        assert_eq!(count(), 1, "replace left the old program attached");
        // The fallback's two steps: both attached, then the old one gone.
        attach_device_program(cgroup.as_fd(), third.as_fd(), None).unwrap();
        assert_eq!(count(), 2);
        detach_device_program(cgroup.as_fd(), second.as_fd()).unwrap();
        assert_eq!(count(), 1);
        let err = detach_device_program(cgroup.as_fd(), second.as_fd()).unwrap_err();
        assert!(err.to_string().contains("BPF_PROG_DETACH"), "{err}");

        drop(cgroup);
        drop(dir);
    }

    /// The verifier walks every branch; the longest rule list a spec may
    /// have must stay within its complexity limit.
    #[test]
    fn largest_rule_list_passes_the_verifier() {
        use crate::container::device_rules::{DEFAULT_ALLOWED, MAX_RULES};
        use crate::device_filter::{program, DeviceKind, DeviceRule, DeviceRules};
        if let Some(reason) = probe() {
            eprintln!("SKIP: cannot load cgroup device programs here: {reason}");
            return;
        }
        let mut rules = DeviceRules::deny_all();
        for i in 0..u32::try_from(MAX_RULES).unwrap() {
            // Every rule conditional and deciding every access bit: the
            // longest program, with a branch per check.
            rules.push(DeviceRule {
                allow: i % 2 == 0,
                kind: [None, Some(DeviceKind::Char), Some(DeviceKind::Block)][(i % 3) as usize],
                major: Some(i % 4096),
                minor: (i % 5 != 0).then_some(i),
                access: crate::device_filter::ACCESS_ALL,
            });
        }
        DEFAULT_ALLOWED.into_iter().for_each(|r| rules.push(r));
        let insns = program::generate(&rules).unwrap();
        let started = std::time::Instant::now();
        if let Err(e) = load_device_program(&insns) {
            panic!("{} instructions: {e}", insns.len());
        }
        eprintln!(
            "{} rules, {} instructions, verified in {:?}",
            rules.rules.len(),
            insns.len(),
            started.elapsed()
        );
    }

    #[test]
    fn verifier_refusal_returns_log_in_error() {
        if let Some(reason) = probe() {
            eprintln!("SKIP: cannot load cgroup device programs here: {reason}");
            return;
        }
        // Returns without setting r0: the verifier refuses "R0 !read_ok".
        let bad = [Insn {
            code: super::super::program::opcode::EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        }];
        let err = load_device_program(&bad).unwrap_err().to_string();
        assert!(err.contains("verifier log"), "{err}");
        assert!(err.contains("R0"), "{err}");
    }
}
