//! vCPU threads: each runs `KVM_RUN` in a loop, hands port and MMIO exits
//! to the buses, and reports how the VM ended.
//!
//! Stopping: the VMM sets `stop` and sends [`vcpu_kick_signal`] to each
//! vCPU thread until it has ended. The signal's handler does nothing; its
//! only effect is that a `KVM_RUN` in progress returns `EINTR`. A kick that
//! lands between the `stop` check and `KVM_RUN` is lost, which is why the
//! VMM repeats it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::devices::bus::Bus;
use crate::exit::{ExitSignal, VmExit};
use crate::metrics::VmmMetrics;
use crate::tee::exits::ConfidentialExits;
use crate::tee::tdx::uapi::{kvm_tdx_exit, KVM_EXIT_TDX};

/// The signal that interrupts `KVM_RUN`.
pub fn vcpu_kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| register_signal_handler(vcpu_kick_signal(), handle_kick))
}

/// What a vCPU needs to run.
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub stop: Arc<AtomicBool>,
    pub metrics: Arc<VmmMetrics>,
    /// Returns from `KVM_RUN` of this vCPU, for [`VcpuNudger`].
    pub runs: Arc<AtomicU64>,
    /// Keeps the guest memory KVM maps for this vCPU alive as long as the
    /// vCPU can run.
    pub guest_memory: vm_memory::GuestMemoryMmap,
    /// An SEV-SNP / TDX guest's page-state, memory-fault and TDVMCALL
    /// exits (`crate::tee::exits`).
    pub confidential: Option<Arc<ConfidentialExits>>,
}

/// Reports a panicking vCPU thread as the VM's exit.
struct ReportPanic {
    vcpu: u8,
    exit: Arc<ExitSignal>,
}

impl Drop for ReportPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.exit.report(VmExit::VcpuError {
                vcpu: self.vcpu,
                message: "vCPU thread panicked".into(),
            });
        }
    }
}

/// What one KVM exit means for the run loop, decided while the exit data
/// (which borrows the vCPU) is alive.
enum Step {
    Continue,
    Exit(VmExit),
    // The fatal exits below need the registers, read once the borrow of
    // the exit data has ended.
    TripleFault,
    FailEntry(u64),
    InternalError,
    /// `KVM_EXIT_TDX`, served from `kvm_run` once the exit is released.
    TdxVmcall,
}

impl Vcpu {
    /// Starts the vCPU's thread.
    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("vcpu{}", self.index))
            .spawn(move || self.run())
    }

    fn run(mut self) {
        crate::jail::seccomp::apply_to_this_thread_or_abort(crate::jail::seccomp::ThreadKind::Vcpu);
        // A vCPU thread that unwinds must still end the VM, or the VMM
        // would wait for an exit nobody reports.
        let _panic_guard = ReportPanic {
            vcpu: self.index,
            exit: self.exit.clone(),
        };
        while !self.stop.load(Ordering::Acquire) {
            let step = self.run_once();
            let exit = match step {
                Step::Continue => continue,
                Step::TdxVmcall => {
                    self.serve_tdx_vmcall();
                    continue;
                }
                Step::Exit(exit) => exit,
                Step::TripleFault => VmExit::TripleFault {
                    vcpu: self.index,
                    registers: self.dump_registers(),
                },
                Step::FailEntry(reason) => VmExit::FailEntry {
                    vcpu: self.index,
                    reason,
                    registers: self.dump_registers(),
                },
                Step::InternalError => {
                    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so
                    // `internal` is the union member the kernel filled.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    VmExit::InternalError {
                        vcpu: self.index,
                        suberror,
                        registers: self.dump_registers(),
                    }
                }
            };
            self.exit.report(exit);
            break;
        }
    }

    fn run_once(&mut self) -> Step {
        let index = self.index;
        let result = self.fd.run();
        self.runs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(exit) => {
                VmmMetrics::add(&self.metrics.vcpu_exits, 1);
                match exit {
                    VcpuExit::IoIn(port, data) => {
                        VmmMetrics::add(&self.metrics.io_exits, 1);
                        if !self.io_bus.read(u64::from(port), data) {
                            unhandled(&self.metrics, "in", u64::from(port));
                            data.fill(0xff);
                        }
                        Step::Continue
                    }
                    VcpuExit::IoOut(port, data) => {
                        VmmMetrics::add(&self.metrics.io_exits, 1);
                        if !self.io_bus.write(u64::from(port), data) {
                            unhandled(&self.metrics, "out", u64::from(port));
                        }
                        Step::Continue
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        VmmMetrics::add(&self.metrics.mmio_exits, 1);
                        if !self.mmio_bus.read(addr, data) {
                            unhandled(&self.metrics, "mmio read", addr);
                            data.fill(0xff);
                        }
                        Step::Continue
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        VmmMetrics::add(&self.metrics.mmio_exits, 1);
                        if !self.mmio_bus.write(addr, data) {
                            unhandled(&self.metrics, "mmio write", addr);
                        }
                        Step::Continue
                    }
                    VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
                    VcpuExit::Shutdown => Step::TripleFault,
                    VcpuExit::SystemEvent(kind, _) => match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => Step::Exit(VmExit::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => Step::Exit(VmExit::Reset),
                        KVM_SYSTEM_EVENT_CRASH => Step::Exit(VmExit::GuestCrash { vcpu: index }),
                        other => Step::Exit(VmExit::VcpuError {
                            vcpu: index,
                            message: format!("unknown KVM system event {other}"),
                        }),
                    },
                    VcpuExit::FailEntry(reason, _cpu) => Step::FailEntry(reason),
                    VcpuExit::InternalError => Step::InternalError,
                    VcpuExit::Hypercall(call) => {
                        match self
                            .confidential
                            .as_ref()
                            .and_then(|c| c.hypercall(call.nr, &call.args))
                        {
                            Some(ret) => {
                                *call.ret = ret;
                                Step::Continue
                            }
                            None => Step::Exit(VmExit::VcpuError {
                                vcpu: index,
                                message: format!("unexpected hypercall {}", call.nr),
                            }),
                        }
                    }
                    VcpuExit::MemoryFault { flags, gpa, size } => match &self.confidential {
                        Some(c) => match c.memory_fault(flags, gpa, size) {
                            Ok(()) => Step::Continue,
                            Err(e) => Step::Exit(VmExit::VcpuError {
                                vcpu: index,
                                message: e.to_string(),
                            }),
                        },
                        None => Step::Exit(VmExit::VcpuError {
                            vcpu: index,
                            message: format!(
                                "memory fault at {gpa:#x} in a VM without private memory"
                            ),
                        }),
                    },
                    VcpuExit::Unsupported(KVM_EXIT_TDX) if self.confidential.is_some() => {
                        Step::TdxVmcall
                    }
                    other => Step::Exit(VmExit::VcpuError {
                        vcpu: index,
                        message: format!("unexpected KVM exit {other:?}"),
                    }),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
            Err(e) => Step::Exit(VmExit::VcpuError {
                vcpu: index,
                message: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    fn serve_tdx_vmcall(&mut self) {
        let Some(exits) = self.confidential.clone() else {
            return;
        };
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_TDX, so the exit union holds
        // the kernel's `tdx` member, which `kvm_tdx_exit` mirrors (64
        // bytes, inside the union's 256, 8-byte aligned like the union).
        let tdx =
            unsafe { &mut *(std::ptr::addr_of_mut!(run.__bindgen_anon_1).cast::<kvm_tdx_exit>()) };
        exits.tdx_vmcall(tdx);
    }

    /// The registers that tell where and in which mode the guest was.
    fn dump_registers(&self) -> String {
        let regs = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#018x} rsp={:#018x} rflags={:#010x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            ),
            Err(e) => format!("registers unavailable: {e}"),
        };
        let sregs = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}(l={} db={})",
                s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.l, s.cs.db
            ),
            Err(e) => format!("segment registers unavailable: {e}"),
        };
        format!("{regs}\n{sregs}")
    }
}

fn unhandled(metrics: &VmmMetrics, kind: &str, addr: u64) {
    VmmMetrics::add(&metrics.unhandled_accesses, 1);
    tracing::trace!("unhandled {kind} at {addr:#x}");
}

/// Stops every vCPU thread: raises `stop`, kicks until each has ended.
pub fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    for thread in threads {
        while !thread.is_finished() {
            // ESRCH here means the thread ended between the check and the
            // kick, which is what we wait for.
            let _ = thread.kill(vcpu_kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

/// Kicks a vCPU out of `KVM_RUN` and back in when it has not left it for
/// a whole interval.
///
/// Needed on nested paravirtualized KVM (`kvm_pvm`): there a Linux guest
/// was seen to stop making progress inside `KVM_RUN` (at the clocksource
/// switch, for minutes) until the vCPU returned to userspace once; with
/// such kicks it boots on. A vCPU that exits by itself (port I/O, MMIO) is
/// left alone. Hardware KVM does not need it and does not get it.
///
/// Dropping it stops and joins its thread, which must happen before the
/// vCPU threads it signals are joined (their ids could be reused after).
pub struct VcpuNudger {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuNudger {
    /// Starts watching `vcpus`: each thread with the counter its `Vcpu`
    /// increments on every return from `KVM_RUN`.
    pub fn start(
        vcpus: &[(&JoinHandle<()>, Arc<AtomicU64>)],
        interval: Duration,
    ) -> std::io::Result<Self> {
        use std::os::unix::thread::JoinHandleExt;
        let mut targets: Vec<(libc::pthread_t, Arc<AtomicU64>, u64)> = vcpus
            .iter()
            .map(|(t, runs)| (t.as_pthread_t(), runs.clone(), u64::MAX))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu-nudger".into())
            .spawn(move || {
                crate::jail::seccomp::apply_to_this_thread_or_abort(
                    crate::jail::seccomp::ThreadKind::Helper,
                );
                while !stop_flag.load(Ordering::Acquire) {
                    std::thread::sleep(interval);
                    for (target, runs, seen) in &mut targets {
                        let now = runs.load(Ordering::Relaxed);
                        if now != *seen {
                            *seen = now;
                            continue;
                        }
                        // SAFETY: the vCPU threads are joined only after
                        // `VcpuNudger::stop` has joined this thread, so every
                        // `target` still names a thread that has not been
                        // joined; a thread that already ended yields ESRCH.
                        unsafe { libc::pthread_kill(*target, vcpu_kick_signal()) };
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for VcpuNudger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the vCPU nudger thread panicked");
            }
        }
    }
}
