//! The container lifecycle state machine.
//!
//! ```text
//!            start            pause
//! Created ─────────► Running ──────► Paused
//!    │                 │  ▲ resume     │
//!    │ init exits      │  └────────────┘
//!    ▼                 ▼ init exits    │ init exits (killed while frozen)
//! Stopped ◄────────────┴───────────────┘
//! ```
//! Remove is allowed from Created and Stopped, and from any state when forced.

use std::fmt;

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Paused,
    Stopped,
}

impl fmt::Display for ContainerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContainerState::Created => "created",
            ContainerState::Running => "running",
            ContainerState::Paused => "paused",
            ContainerState::Stopped => "stopped",
        })
    }
}

/// Something asked of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Start,
    Pause,
    Resume,
    Exec,
    Remove { force: bool },
    InitExited,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Start => "start",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Exec => "exec",
            Operation::Remove { .. } => "remove",
            Operation::InitExited => "init exit",
        })
    }
}

/// An operation the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {operation} container in state {state}")]
pub struct TransitionError {
    pub operation: String,
    pub state: ContainerState,
}

impl ContainerState {
    /// The state after `op`, or why `op` is refused.
    pub fn apply(self, op: Operation) -> Result<ContainerState, TransitionError> {
        use ContainerState::*;
        let next = match (self, op) {
            (Created, Operation::Start) => Some(Running),
            (Running, Operation::Pause) => Some(Paused),
            (Paused, Operation::Resume) => Some(Running),
            (Running, Operation::Exec) => Some(Running),
            (Created | Running | Paused, Operation::InitExited) => Some(Stopped),
            (Created | Stopped, Operation::Remove { .. }) => Some(Stopped),
            (Running | Paused, Operation::Remove { force: true }) => Some(Stopped),
            _ => None,
        };
        next.ok_or_else(|| TransitionError {
            operation: op.to_string(),
            state: self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::ContainerState::*;
    use super::*;

    #[test]
    fn normal_lifecycle_walks_created_running_paused_running_stopped() {
        let s = Created.apply(Operation::Start).unwrap();
        assert_eq!(s, Running);
        let s = s.apply(Operation::Pause).unwrap();
        assert_eq!(s, Paused);
        let s = s.apply(Operation::Resume).unwrap();
        assert_eq!(s, Running);
        let s = s.apply(Operation::InitExited).unwrap();
        assert_eq!(s, Stopped);
        assert_eq!(
            s.apply(Operation::Remove { force: false }).unwrap(),
            Stopped
        );
    }

    #[test]
    fn start_twice_returns_error_naming_state() {
        let err = Running.apply(Operation::Start).unwrap_err();
        assert_eq!(err.to_string(), "cannot start container in state running");
    }

    #[test]
    fn exec_requires_running() {
        for state in [Created, Paused, Stopped] {
            assert!(state.apply(Operation::Exec).is_err(), "{state}");
        }
        assert_eq!(Running.apply(Operation::Exec).unwrap(), Running);
    }

    #[test]
    fn pause_and_resume_only_from_matching_state() {
        assert!(Created.apply(Operation::Pause).is_err());
        assert!(Paused.apply(Operation::Pause).is_err());
        assert!(Running.apply(Operation::Resume).is_err());
        assert!(Stopped.apply(Operation::Resume).is_err());
    }

    #[test]
    fn remove_of_running_container_needs_force() {
        assert!(Running.apply(Operation::Remove { force: false }).is_err());
        assert!(Paused.apply(Operation::Remove { force: false }).is_err());
        assert_eq!(
            Running.apply(Operation::Remove { force: true }).unwrap(),
            Stopped
        );
    }

    #[test]
    fn start_after_stop_returns_error() {
        assert!(Stopped.apply(Operation::Start).is_err());
    }
}
