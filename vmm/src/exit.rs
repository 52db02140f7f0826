//! How a VM ends, and how the thread that noticed tells the others.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::lock;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest reset itself through the i8042 (Linux `reboot=k`) or a
    /// KVM reset event: a clean end, as in Firecracker.
    Reset,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
    /// A vCPU triple-faulted.
    TripleFault { vcpu: u8, registers: String },
    /// KVM could not emulate an instruction or hit an internal error.
    InternalError {
        vcpu: u8,
        suberror: u32,
        registers: String,
    },
    /// VM entry failed (invalid guest state).
    FailEntry {
        vcpu: u8,
        reason: u64,
        registers: String,
    },
    /// The guest kernel reported a crash (KVM crash system event).
    GuestCrash { vcpu: u8 },
    /// An exit reason we do not handle, or a failing ioctl.
    VcpuError { vcpu: u8, message: String },
    /// The VMM could not wait for an exit (reading the exit eventfd failed).
    WaitFailed(String),
    /// The host asked the VMM to stop (SIGTERM, SIGINT or SIGHUP): the VM
    /// is torn down like after a guest exit, so metrics are reported and
    /// device sockets removed.
    Terminated { signal: i32 },
}

impl VmExit {
    /// Whether the guest ended the way a healthy guest does.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::PowerOff)
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::TripleFault { vcpu, registers } => {
                write!(
                    f,
                    "vCPU {vcpu} triple fault (KVM_EXIT_SHUTDOWN)\n{registers}"
                )
            }
            VmExit::InternalError {
                vcpu,
                suberror,
                registers,
            } => {
                let kind = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exception",
                    3 => "delivery event",
                    _ => "internal error",
                };
                write!(
                    f,
                    "vCPU {vcpu} KVM internal error, suberror {suberror} ({kind})\n{registers}"
                )
            }
            VmExit::FailEntry {
                vcpu,
                reason,
                registers,
            } => write!(
                f,
                "vCPU {vcpu} VM entry failed, hardware reason {reason:#x}\n{registers}"
            ),
            VmExit::GuestCrash { vcpu } => write!(f, "vCPU {vcpu} reported a guest crash"),
            VmExit::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu}: {message}"),
            VmExit::WaitFailed(message) => write!(f, "cannot wait for VM exit: {message}"),
            VmExit::Terminated { signal } => write!(f, "stopped by signal {signal}"),
        }
    }
}

/// The first reported exit wins; later ones (other vCPUs noticing the
/// same end) are dropped.
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(0)?,
        })
    }

    pub fn report(&self, exit: VmExit) {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        drop(reason);
        // A failed write can only mean the counter overflowed, which needs
        // 2^64 reports: the reason above is recorded either way.
        let _ = self.evt.write(1);
    }

    pub fn has_exited(&self) -> bool {
        lock(&self.reason).is_some()
    }

    /// Blocks until some thread reported an exit.
    pub fn wait(&self) -> VmExit {
        loop {
            if let Some(exit) = lock(&self.reason).clone() {
                return exit;
            }
            if let Err(e) = self.evt.read() {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return VmExit::WaitFailed(e.to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn exit_signal_keeps_first_report() {
        let sig = Arc::new(ExitSignal::new().unwrap());
        let s2 = sig.clone();
        std::thread::spawn(move || {
            s2.report(VmExit::Reset);
            s2.report(VmExit::PowerOff);
        })
        .join()
        .unwrap();
        assert_eq!(sig.wait(), VmExit::Reset);
        assert!(sig.has_exited());
    }

    #[test]
    fn only_reset_and_poweroff_are_clean() {
        assert!(VmExit::Reset.is_clean());
        assert!(VmExit::PowerOff.is_clean());
        assert!(!VmExit::GuestCrash { vcpu: 0 }.is_clean());
        let tf = VmExit::TripleFault {
            vcpu: 1,
            registers: "rip=0".into(),
        };
        assert!(!tf.is_clean());
        assert!(tf.to_string().contains("triple fault"));
    }
}
