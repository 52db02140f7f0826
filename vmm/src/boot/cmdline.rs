//! The kernel command line: validated, within Linux's size limit.

use linux_loader::cmdline::Cmdline;

use super::layout::CMDLINE_MAX_SIZE;

/// What a guest gets when the config names no command line: serial
/// console, reboot through the i8042 (which ends the VMM cleanly), and a
/// kernel panic that reboots at once instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// The argument that announces a virtio-mmio device to Linux
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): `virtio_mmio.device=4K@0xd0000000:5`.
pub fn virtio_mmio_device_arg(base: u64, window: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{base:#x}:{irq}", window >> 10)
}

/// Why a command line was refused.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error(
        "kernel command line is {len} bytes, at most {} fit (Linux COMMAND_LINE_SIZE {CMDLINE_MAX_SIZE} counts the NUL)",
        CMDLINE_MAX_SIZE - 1
    )]
    TooLong { len: usize },
    #[error("kernel command line {value:?} is invalid: {reason}")]
    Invalid { value: String, reason: String },
}

/// Parameters whose value is a comma-separated list that Linux reads from
/// one occurrence only: extra values are merged into the user's.
const LIST_PARAMS: &[&str] = &["clearcpuid"];

/// Adds `arg` to the command line `text`: skipped when present, merged
/// into the user's value for [`LIST_PARAMS`], appended otherwise. The
/// user's text is otherwise kept byte for byte (quoted values may hold
/// spaces).
fn add_arg(text: &mut String, arg: &str) {
    if text.split_whitespace().any(|a| a == arg) {
        return;
    }
    if let Some((key, values)) = arg.split_once('=') {
        let prefix = format!("{key}=");
        let existing = text.split_whitespace().find(|a| a.starts_with(&prefix));
        if let (true, Some(existing)) = (LIST_PARAMS.contains(&key), existing) {
            let start = existing.as_ptr() as usize - text.as_ptr() as usize;
            let mut merged = existing.to_string();
            for value in values.split(',') {
                if !existing[prefix.len()..].split(',').any(|v| v == value) {
                    merged.push(',');
                    merged.push_str(value);
                }
            }
            text.replace_range(start..start + existing.len(), &merged);
            return;
        }
    }
    if !text.is_empty() {
        text.push(' ');
    }
    text.push_str(arg);
}

/// Joins the user's command line and extra arguments (from the CPU
/// template) into one validated `Cmdline`.
pub fn build_cmdline(base: &str, extra: &[&str]) -> Result<Cmdline, CmdlineError> {
    let mut text = base.trim().to_string();
    for arg in extra {
        add_arg(&mut text, arg);
    }
    // Cmdline's capacity counts the terminating NUL.
    if text.len() >= CMDLINE_MAX_SIZE {
        return Err(CmdlineError::TooLong { len: text.len() });
    }
    if let Some(bad) = text.chars().find(|c| !c.is_ascii() || c.is_ascii_control()) {
        return Err(CmdlineError::Invalid {
            value: text.clone(),
            reason: format!("character {bad:?} is not printable ASCII"),
        });
    }
    Cmdline::try_from(&text, CMDLINE_MAX_SIZE).map_err(|e| CmdlineError::Invalid {
        value: text,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_mmio_device_arg_names_size_base_and_irq() {
        assert_eq!(
            virtio_mmio_device_arg(0xd000_1000, 0x1000, 6),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn build_cmdline_appends_extras_once() {
        let cl = build_cmdline("console=ttyS0 noxsave", &["noxsave", "clearcpuid=smap"]).unwrap();
        assert_eq!(
            cl.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 noxsave clearcpuid=smap"
        );
    }

    #[test]
    fn build_cmdline_merges_clearcpuid_lists() {
        let cl = build_cmdline(
            "console=ttyS0 clearcpuid=xsave,popcnt quiet",
            &["clearcpuid=xsave,smap,smep,popcnt"],
        )
        .unwrap();
        assert_eq!(
            cl.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 clearcpuid=xsave,popcnt,smap,smep quiet"
        );
    }

    #[test]
    fn build_cmdline_keeps_user_text_as_written() {
        let cl = build_cmdline("init=/x  foo=\"a  b\"", &["clearcpuid=smap"]).unwrap();
        assert_eq!(
            cl.as_cstring().unwrap().to_str().unwrap(),
            "init=/x  foo=\"a  b\" clearcpuid=smap"
        );
    }

    #[test]
    fn build_cmdline_at_limit_is_accepted() {
        let text = "a".repeat(CMDLINE_MAX_SIZE - 1);
        assert!(build_cmdline(&text, &[]).is_ok());
    }

    #[test]
    fn build_cmdline_over_limit_names_length() {
        let text = "a".repeat(CMDLINE_MAX_SIZE);
        let err = build_cmdline(&text, &[]).unwrap_err();
        assert!(matches!(err, CmdlineError::TooLong { len } if len == CMDLINE_MAX_SIZE));
        assert!(err.to_string().contains("2048 bytes"));
    }

    #[test]
    fn build_cmdline_with_extras_over_limit_is_refused() {
        let text = "a".repeat(CMDLINE_MAX_SIZE - 3);
        assert!(matches!(
            build_cmdline(&text, &["noxsave"]),
            Err(CmdlineError::TooLong { .. })
        ));
    }

    #[test]
    fn build_cmdline_with_control_character_is_refused() {
        let err = build_cmdline("console=ttyS0\n", &["x\u{0}"]).unwrap_err();
        assert!(matches!(err, CmdlineError::Invalid { .. }));
    }
}
