//! Task events the shim publishes to containerd, and the sink they go to.
//!
//! Events are queued in order on one channel and forwarded by one task, so
//! containerd sees TaskCreate before TaskStart before TaskExit even when the
//! calls that cause them race (runc's shim orders them the same way).

use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::well_known_types::wrappers::StringValue;
use containerd_shim_protos::protobuf::MessageDyn;
use containerd_shim_protos::topics;
use tokio::sync::mpsc;

use crate::container::StdioPaths;

/// One task event, before it becomes containerd's protobuf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        stdio: StdioPaths,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    /// `exec_id` empty for the init process.
    Exit {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Oom {
        container_id: String,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Delete {
        container_id: String,
        exec_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: Option<SystemTime>,
    },
    /// A security audit record (exec, spec finding, VM crash, guest panic,
    /// policy denial, attestation failure), as its JSON line in a
    /// `google.protobuf.StringValue` on topic [`SECURITY_TOPIC`]: containerd
    /// has no message of its own for these, and every containerd client
    /// can decode a well-known type (`ctr events` prints it).
    Security {
        record_json: String,
    },
}

/// The topic of [`TaskEvent::Security`].
pub const SECURITY_TOPIC: &str = "/cloister/security";

/// A protobuf timestamp for containerd.
pub fn timestamp(time: SystemTime) -> Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let mut ts = Timestamp::new();
    ts.seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    ts.nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    ts
}

/// A time from the agent's nanoseconds since the epoch (0 = not set: now).
pub fn time_from_ns(ns: u64) -> SystemTime {
    if ns == 0 {
        return SystemTime::now();
    }
    SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(ns)
}

/// runc's shim names the init process by the container id in TaskExit and
/// TaskDelete.
fn process_id(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        container_id.to_owned()
    } else {
        exec_id.to_owned()
    }
}

impl TaskEvent {
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create { .. } => topics::TASK_CREATE_EVENT_TOPIC,
            TaskEvent::Start { .. } => topics::TASK_START_EVENT_TOPIC,
            TaskEvent::Exit { .. } => topics::TASK_EXIT_EVENT_TOPIC,
            TaskEvent::Oom { .. } => topics::TASK_OOM_EVENT_TOPIC,
            TaskEvent::ExecAdded { .. } => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            TaskEvent::ExecStarted { .. } => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            TaskEvent::Paused { .. } => topics::TASK_PAUSED_EVENT_TOPIC,
            TaskEvent::Resumed { .. } => topics::TASK_RESUMED_EVENT_TOPIC,
            TaskEvent::Delete { .. } => topics::TASK_DELETE_EVENT_TOPIC,
            TaskEvent::Security { .. } => SECURITY_TOPIC,
        }
    }

    /// containerd's message for this event.
    pub fn to_message(&self) -> Box<dyn MessageDyn> {
        match self.clone() {
            TaskEvent::Create {
                container_id,
                bundle,
                stdio,
                pid,
            } => Box::new(TaskCreate {
                container_id,
                bundle,
                io: Some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
            TaskEvent::Start { container_id, pid } => Box::new(TaskStart {
                container_id,
                pid,
                ..Default::default()
            }),
            TaskEvent::Exit {
                container_id,
                exec_id,
                pid,
                exit_status,
                exited_at,
            } => Box::new(TaskExit {
                id: process_id(&container_id, &exec_id),
                container_id,
                pid,
                exit_status,
                exited_at: Some(timestamp(exited_at)).into(),
                ..Default::default()
            }),
            TaskEvent::Oom { container_id } => Box::new(TaskOOM {
                container_id,
                ..Default::default()
            }),
            TaskEvent::ExecAdded {
                container_id,
                exec_id,
            } => Box::new(TaskExecAdded {
                container_id,
                exec_id,
                ..Default::default()
            }),
            TaskEvent::ExecStarted {
                container_id,
                exec_id,
                pid,
            } => Box::new(TaskExecStarted {
                container_id,
                exec_id,
                pid,
                ..Default::default()
            }),
            TaskEvent::Paused { container_id } => Box::new(TaskPaused {
                container_id,
                ..Default::default()
            }),
            TaskEvent::Resumed { container_id } => Box::new(TaskResumed {
                container_id,
                ..Default::default()
            }),
            TaskEvent::Delete {
                container_id,
                exec_id,
                pid,
                exit_status,
                exited_at,
            } => Box::new(TaskDelete {
                id: process_id(&container_id, &exec_id),
                container_id,
                pid,
                exit_status,
                exited_at: exited_at.map(timestamp).into(),
                ..Default::default()
            }),
            TaskEvent::Security { record_json } => {
                let mut value = StringValue::new();
                value.value = record_json;
                Box::new(value)
            }
        }
    }
}

/// Where the service sends events: a cloneable handle on the ordered queue.
#[derive(Clone, Debug)]
pub struct EventSender(mpsc::UnboundedSender<TaskEvent>);

impl EventSender {
    /// A sender and the receiving end the forwarder drains.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<TaskEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }

    pub fn send(&self, event: TaskEvent) {
        // The receiver lives as long as the shim; after it is gone nobody
        // listens, and dropping the event is all there is to do.
        if self.0.send(event).is_err() {
            tracing::warn!("event queue closed, event dropped");
        }
    }
}

/// Forwards queued events to containerd, in order, until the queue closes.
pub async fn forward_to_containerd(
    mut events: mpsc::UnboundedReceiver<TaskEvent>,
    publisher: RemotePublisher,
    namespace: String,
) {
    while let Some(event) = events.recv().await {
        let topic = event.topic();
        let result = publisher
            .publish(
                containerd_shim::protos::ttrpc::context::Context::default(),
                topic,
                &namespace,
                event.to_message(),
            )
            .await;
        if let Err(e) = result {
            tracing::error!(topic, "publishing event: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::Message;
    use std::time::Duration;

    fn decode<M: Message>(event: &TaskEvent) -> M {
        let bytes = event.to_message().write_to_bytes_dyn().unwrap();
        M::parse_from_bytes(&bytes).unwrap()
    }

    #[test]
    fn create_event_carries_bundle_io_and_pid() {
        let event = TaskEvent::Create {
            container_id: "c".into(),
            bundle: "/run/b".into(),
            stdio: StdioPaths {
                stdin: "/f/0".into(),
                stdout: "/f/1".into(),
                stderr: String::new(),
                terminal: true,
            },
            pid: 12,
        };
        assert_eq!(event.topic(), "/tasks/create");
        let m: TaskCreate = decode(&event);
        assert_eq!((m.container_id.as_str(), m.pid), ("c", 12));
        assert_eq!(m.bundle, "/run/b");
        assert_eq!(m.io.stdin, "/f/0");
        assert!(m.io.terminal);
    }

    #[test]
    fn exit_of_init_uses_container_id_as_process_id() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let event = TaskEvent::Exit {
            container_id: "c".into(),
            exec_id: String::new(),
            pid: 3,
            exit_status: 137,
            exited_at: at,
        };
        assert_eq!(event.topic(), "/tasks/exit");
        let m: TaskExit = decode(&event);
        assert_eq!((m.id.as_str(), m.exit_status), ("c", 137));
        assert_eq!((m.exited_at.seconds, m.exited_at.nanos), (1_700_000_000, 5));
        let exec = TaskEvent::Exit {
            container_id: "c".into(),
            exec_id: "e".into(),
            pid: 4,
            exit_status: 0,
            exited_at: at,
        };
        let m: TaskExit = decode(&exec);
        assert_eq!(m.id, "e");
    }

    #[test]
    fn every_event_has_containerds_topic() {
        let c = || "c".to_string();
        let cases = [
            (
                TaskEvent::Start {
                    container_id: c(),
                    pid: 1,
                },
                "/tasks/start",
            ),
            (TaskEvent::Oom { container_id: c() }, "/tasks/oom"),
            (
                TaskEvent::ExecAdded {
                    container_id: c(),
                    exec_id: "e".into(),
                },
                "/tasks/exec-added",
            ),
            (
                TaskEvent::ExecStarted {
                    container_id: c(),
                    exec_id: "e".into(),
                    pid: 2,
                },
                "/tasks/exec-started",
            ),
            (TaskEvent::Paused { container_id: c() }, "/tasks/paused"),
            (TaskEvent::Resumed { container_id: c() }, "/tasks/resumed"),
            (
                TaskEvent::Delete {
                    container_id: c(),
                    exec_id: String::new(),
                    pid: 1,
                    exit_status: 0,
                    exited_at: None,
                },
                "/tasks/delete",
            ),
        ];
        for (event, topic) in cases {
            assert_eq!(event.topic(), topic);
            assert!(!event.to_message().write_to_bytes_dyn().unwrap().is_empty());
        }
    }

    #[test]
    fn security_event_is_the_records_json_in_a_well_known_type() {
        let event = TaskEvent::Security {
            record_json: r#"{"operation":"exec"}"#.into(),
        };
        assert_eq!(event.topic(), "/cloister/security");
        let message = event.to_message();
        assert_eq!(
            message.descriptor_dyn().full_name(),
            "google.protobuf.StringValue"
        );
        let m: StringValue = decode(&event);
        assert_eq!(m.value, r#"{"operation":"exec"}"#);
    }

    #[test]
    fn exec_started_and_delete_fields() {
        let m: TaskExecStarted = decode(&TaskEvent::ExecStarted {
            container_id: "c".into(),
            exec_id: "e".into(),
            pid: 9,
        });
        assert_eq!((m.exec_id.as_str(), m.pid), ("e", 9));
        let m: TaskDelete = decode(&TaskEvent::Delete {
            container_id: "c".into(),
            exec_id: String::new(),
            pid: 9,
            exit_status: 2,
            exited_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(5)),
        });
        assert_eq!(
            (m.id.as_str(), m.exit_status, m.exited_at.seconds),
            ("c", 2, 5)
        );
    }

    #[test]
    fn agent_time_zero_means_now() {
        let before = SystemTime::now();
        assert!(time_from_ns(0) >= before);
        assert_eq!(
            time_from_ns(1_500_000_000),
            SystemTime::UNIX_EPOCH + Duration::from_millis(1500)
        );
    }

    #[tokio::test]
    async fn sender_keeps_order() {
        let (tx, mut rx) = EventSender::channel();
        tx.send(TaskEvent::Paused {
            container_id: "a".into(),
        });
        tx.send(TaskEvent::Resumed {
            container_id: "a".into(),
        });
        assert_eq!(rx.recv().await.unwrap().topic(), "/tasks/paused");
        assert_eq!(rx.recv().await.unwrap().topic(), "/tasks/resumed");
    }
}
