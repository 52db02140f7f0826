//! What the shim remembers of each container and process, and which task
//! API calls fit which state.
//!
//! ```text
//!            start              pause
//! Created ─────────> Running <───────> Paused
//!    │                  │     resume     │
//!    └──── exit ────────┴──── exit ──────┴──> Stopped
//! ```
//!
//! The guest agent is the authority on processes; this record exists so the
//! shim answers `State`/`Wait` without a round trip and refuses calls that
//! cannot fit (start twice, exec in a stopped container, delete a running
//! task) with the same errors runc's shim gives, before anything reaches
//! the guest.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::watch;

/// Errors of the container state machine; the service maps each variant to
/// a ttrpc status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("process {exec_id} of container {container_id} not found")]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("process {exec_id} of container {container_id} already exists")]
    ProcessExists {
        container_id: String,
        exec_id: String,
    },
    #[error("{what} of {target}: not allowed while {state}")]
    WrongState {
        what: &'static str,
        target: String,
        state: Status,
    },
    #[error("process {0} already finished")]
    AlreadyFinished(String),
}

/// Lifecycle state, named as containerd's `task.Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// Why a process ended, and so which status containerd sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The agent's report: exit code, or 128 + signal, already as a shell
    /// (and runc's shim) reports it.
    Reported(u32),
    /// The VM or the guest died under the process: it was killed with the
    /// VM, reported as runc reports a SIGKILLed container.
    SandboxGone,
    /// The shim lost track of the process (agent gone mid-wait, recovery
    /// without a record): containerd's status for a process whose fate is
    /// unknown.
    Unknown,
}

/// `128 + SIGKILL`.
pub const EXIT_KILLED: u32 = 137;
/// containerd's exit status for a task whose shim could not say.
pub const EXIT_UNKNOWN: u32 = 255;

impl ExitReason {
    pub fn exit_status(self) -> u32 {
        match self {
            ExitReason::Reported(status) => status,
            ExitReason::SandboxGone => EXIT_KILLED,
            ExitReason::Unknown => EXIT_UNKNOWN,
        }
    }
}

/// Exit status as a shell reports it: a code, or 128 + the signal.
pub fn shell_status(code: Option<i32>, signal: Option<i32>) -> u32 {
    match (code, signal) {
        (_, Some(sig)) => 128 + sig.clamp(0, 127).unsigned_abs(),
        (Some(code), None) => code.clamp(0, 255).unsigned_abs(),
        (None, None) => EXIT_UNKNOWN,
    }
}

/// A finished process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// containerd's FIFO paths (empty = not used).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// One process: a container's init (exec id "") or an exec.
#[derive(Debug)]
pub struct Process {
    pub exec_id: String,
    pub pid: u32,
    pub stdio: StdioPaths,
    status: Status,
    exit: Option<Exit>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths) -> Self {
        let (exit_tx, _) = watch::channel(None);
        Self {
            exec_id: exec_id.to_owned(),
            pid: 0,
            stdio,
            status: Status::Created,
            exit: None,
            exit_tx,
        }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    /// A receiver that yields the exit once it happens (Wait).
    pub fn subscribe_exit(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    fn start(&mut self, target: &str) -> Result<(), ContainerError> {
        if self.status != Status::Created {
            return Err(ContainerError::WrongState {
                what: "start",
                target: target.to_owned(),
                state: self.status,
            });
        }
        self.status = Status::Running;
        Ok(())
    }

    /// Records the exit; the first one wins (an agent event and a VM death
    /// may both report it).
    fn set_exited(&mut self, exit: Exit) -> bool {
        if self.status == Status::Stopped {
            return false;
        }
        self.status = Status::Stopped;
        self.exit = Some(exit);
        self.exit_tx.send_replace(Some(exit));
        true
    }
}

/// Whether a container is the pod's sandbox (pause) container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerKind {
    /// Starts and owns the VM.
    Sandbox,
    /// Runs inside the pod's VM.
    Workload,
}

/// A container and its processes.
#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub kind: ContainerKind,
    pub init: Process,
    execs: HashMap<String, Process>,
}

impl Container {
    pub fn new(id: &str, bundle: PathBuf, kind: ContainerKind, stdio: StdioPaths) -> Self {
        Self {
            id: id.to_owned(),
            bundle,
            kind,
            init: Process::new("", stdio),
            execs: HashMap::new(),
        }
    }

    pub fn status(&self) -> Status {
        self.init.status
    }

    fn target(&self, exec_id: &str) -> String {
        if exec_id.is_empty() {
            format!("container {}", self.id)
        } else {
            format!("process {exec_id} of container {}", self.id)
        }
    }

    /// The process named by `exec_id` ("" = init).
    pub fn process(&self, exec_id: &str) -> Result<&Process, ContainerError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| ContainerError::ProcessNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process, ContainerError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = self.id.clone();
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ContainerError::ProcessNotFound {
                container_id: id,
                exec_id: exec_id.to_owned(),
            })
    }

    /// Status of a process as containerd's `State` reports it: running
    /// execs of a paused container are paused too.
    pub fn process_status(&self, exec_id: &str) -> Result<Status, ContainerError> {
        let status = self.process(exec_id)?.status;
        if status == Status::Running && self.init.status == Status::Paused {
            return Ok(Status::Paused);
        }
        Ok(status)
    }

    pub fn check_start(&self, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.process(exec_id)?;
        if process.status != Status::Created {
            return Err(self.wrong("start", exec_id, process.status));
        }
        if !exec_id.is_empty() && self.init.status != Status::Running {
            return Err(self.wrong("start", exec_id, self.init.status));
        }
        Ok(())
    }

    pub fn mark_started(&mut self, exec_id: &str, pid: u32) -> Result<(), ContainerError> {
        let target = self.target(exec_id);
        let process = self.process_mut(exec_id)?;
        process.start(&target)?;
        if pid != 0 {
            process.pid = pid;
        }
        Ok(())
    }

    /// Records the pid the agent gave a created process.
    pub fn set_pid(&mut self, exec_id: &str, pid: u32) -> Result<(), ContainerError> {
        self.process_mut(exec_id)?.pid = pid;
        Ok(())
    }

    /// An exec may join a running container only.
    pub fn check_exec(&self, exec_id: &str) -> Result<(), ContainerError> {
        if exec_id.is_empty() || self.execs.contains_key(exec_id) {
            return Err(ContainerError::ProcessExists {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            });
        }
        if self.init.status != Status::Running {
            return Err(self.wrong("exec", exec_id, self.init.status));
        }
        Ok(())
    }

    pub fn add_exec(&mut self, exec_id: &str, stdio: StdioPaths) -> Result<(), ContainerError> {
        self.check_exec(exec_id)?;
        self.execs
            .insert(exec_id.to_owned(), Process::new(exec_id, stdio));
        Ok(())
    }

    /// Signals go to live processes; a finished one answers as runc's shim
    /// does ("process already finished", NotFound).
    pub fn check_kill(&self, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.process(exec_id)?;
        if process.status == Status::Stopped {
            return Err(ContainerError::AlreadyFinished(self.target(exec_id)));
        }
        Ok(())
    }

    pub fn check_pause(&self) -> Result<(), ContainerError> {
        match self.init.status {
            Status::Running => Ok(()),
            other => Err(self.wrong("pause", "", other)),
        }
    }

    pub fn mark_paused(&mut self) -> Result<(), ContainerError> {
        self.check_pause()?;
        self.init.status = Status::Paused;
        Ok(())
    }

    pub fn check_resume(&self) -> Result<(), ContainerError> {
        match self.init.status {
            Status::Paused => Ok(()),
            other => Err(self.wrong("resume", "", other)),
        }
    }

    pub fn mark_resumed(&mut self) -> Result<(), ContainerError> {
        self.check_resume()?;
        self.init.status = Status::Running;
        Ok(())
    }

    /// Delete fits a process that never started or has stopped, as in
    /// runc's shim; a running or paused one is refused.
    pub fn check_delete(&self, exec_id: &str) -> Result<(), ContainerError> {
        let process = self.process(exec_id)?;
        match process.status {
            Status::Created | Status::Stopped => Ok(()),
            other => Err(self.wrong("delete", exec_id, other)),
        }
    }

    /// Removes an exec record (after its delete).
    pub fn remove_exec(&mut self, exec_id: &str) -> Result<Process, ContainerError> {
        self.check_delete(exec_id)?;
        self.execs
            .remove(exec_id)
            .ok_or_else(|| ContainerError::ProcessNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_owned(),
            })
    }

    /// Records an exit. Returns false if the process had already exited.
    pub fn record_exit(&mut self, exec_id: &str, exit: Exit) -> Result<bool, ContainerError> {
        let first = self.process_mut(exec_id)?.set_exited(exit);
        Ok(first)
    }

    /// Execs still not stopped (their exits are due when the init exits).
    pub fn live_exec_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .execs
            .values()
            .filter(|p| p.status != Status::Stopped)
            .map(|p| p.exec_id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Every process that has not exited, init first.
    pub fn live_process_ids(&self) -> Vec<String> {
        let mut ids = Vec::new();
        if self.init.status != Status::Stopped {
            ids.push(String::new());
        }
        ids.extend(self.live_exec_ids());
        ids
    }

    fn wrong(&self, what: &'static str, exec_id: &str, state: Status) -> ContainerError {
        ContainerError::WrongState {
            what,
            target: self.target(exec_id),
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container() -> Container {
        Container::new(
            "c1",
            PathBuf::from("/b"),
            ContainerKind::Workload,
            StdioPaths::default(),
        )
    }

    fn exit(status: u32) -> Exit {
        Exit {
            status,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn lifecycle_created_running_paused_stopped() {
        let mut c = container();
        assert_eq!(c.status(), Status::Created);
        c.mark_started("", 42).unwrap();
        assert_eq!((c.status(), c.init.pid), (Status::Running, 42));
        c.mark_paused().unwrap();
        assert_eq!(c.status(), Status::Paused);
        c.mark_resumed().unwrap();
        assert!(c.record_exit("", exit(3)).unwrap());
        assert_eq!(c.status(), Status::Stopped);
        assert_eq!(c.init.exit().unwrap().status, 3);
    }

    #[test]
    fn start_twice_is_refused_naming_state() {
        let mut c = container();
        c.mark_started("", 1).unwrap();
        let err = c.check_start("").unwrap_err();
        assert_eq!(
            err.to_string(),
            "start of container c1: not allowed while running"
        );
        assert!(c.mark_started("", 1).is_err());
    }

    #[test]
    fn pause_and_resume_outside_their_states_are_refused() {
        let mut c = container();
        assert!(matches!(
            c.check_pause(),
            Err(ContainerError::WrongState {
                state: Status::Created,
                ..
            })
        ));
        c.mark_started("", 1).unwrap();
        assert!(c.check_resume().is_err());
        c.mark_paused().unwrap();
        assert!(c.check_pause().is_err());
    }

    #[test]
    fn exec_needs_running_container_and_unique_id() {
        let mut c = container();
        let err = c.check_exec("e1").unwrap_err();
        assert!(err.to_string().contains("while created"), "{err}");
        c.mark_started("", 1).unwrap();
        c.add_exec("e1", StdioPaths::default()).unwrap();
        assert_eq!(
            c.add_exec("e1", StdioPaths::default()).unwrap_err(),
            ContainerError::ProcessExists {
                container_id: "c1".into(),
                exec_id: "e1".into()
            }
        );
        assert!(c.check_exec("").is_err());
        c.mark_started("e1", 7).unwrap();
        assert_eq!(c.process("e1").unwrap().pid, 7);
        c.mark_paused().unwrap();
        assert_eq!(c.process_status("e1").unwrap(), Status::Paused);
        assert!(c.check_exec("e2").is_err());
    }

    #[test]
    fn delete_of_running_process_is_refused_but_created_or_stopped_is_allowed() {
        let mut c = container();
        c.check_delete("").unwrap();
        c.mark_started("", 1).unwrap();
        let err = c.check_delete("").unwrap_err();
        assert!(err.to_string().contains("delete of container c1"), "{err}");
        c.add_exec("e", StdioPaths::default()).unwrap();
        c.remove_exec("e").unwrap();
        assert!(c.process("e").is_err());
        c.record_exit("", exit(0)).unwrap();
        c.check_delete("").unwrap();
    }

    #[test]
    fn kill_of_finished_process_says_already_finished() {
        let mut c = container();
        c.check_kill("").unwrap();
        c.mark_started("", 1).unwrap();
        c.record_exit("", exit(0)).unwrap();
        assert_eq!(
            c.check_kill("").unwrap_err(),
            ContainerError::AlreadyFinished("container c1".into())
        );
        assert!(matches!(
            c.check_kill("nope"),
            Err(ContainerError::ProcessNotFound { .. })
        ));
    }

    #[test]
    fn first_exit_wins_and_wakes_waiters() {
        let mut c = container();
        c.mark_started("", 1).unwrap();
        let mut rx = c.init.subscribe_exit();
        assert!(rx.borrow_and_update().is_none());
        assert!(c.record_exit("", exit(0)).unwrap());
        assert!(!c.record_exit("", exit(137)).unwrap());
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow().unwrap().status, 0);
    }

    #[test]
    fn live_processes_list_init_first_then_running_execs() {
        let mut c = container();
        c.mark_started("", 1).unwrap();
        c.add_exec("b", StdioPaths::default()).unwrap();
        c.add_exec("a", StdioPaths::default()).unwrap();
        c.record_exit("b", exit(0)).unwrap();
        assert_eq!(c.live_process_ids(), vec!["".to_string(), "a".to_string()]);
    }

    #[test]
    fn exit_status_mapping_matches_runc_shim() {
        assert_eq!(ExitReason::Reported(3).exit_status(), 3);
        assert_eq!(ExitReason::SandboxGone.exit_status(), 137);
        assert_eq!(ExitReason::Unknown.exit_status(), 255);
        assert_eq!(shell_status(Some(0), None), 0);
        assert_eq!(shell_status(Some(256 + 7), None), 255);
        assert_eq!(shell_status(None, Some(9)), 137);
        assert_eq!(shell_status(None, Some(15)), 143);
        assert_eq!(shell_status(None, None), 255);
    }
}
