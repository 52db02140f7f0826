//! The policy in force in this agent, and the rules for replacing it.
//!
//! The agent starts with the built-in default policy. The host may replace
//! it with `SetPolicy` when the policy in force allows that
//! (`SetPolicyRequest` rule): the default allows it, generated policies do
//! not, so in practice a pod's policy is set once, right after the agent
//! comes up and before `SetupSandbox`. A policy installed from init-data
//! (confidential pods) is locked: every later `SetPolicy` is refused,
//! whatever the rules say, because the host is not trusted there.
//!
//! It also remembers, for each container it let the agent create, the
//! input that creation was decided on: exec and update rules read it as
//! `input.container` (see [`super::input`]), whichever policy is in force,
//! and its init pid: a CreateContainer input's `namespace_owners` says
//! which of these containers each joined `/proc/<pid>/ns/...` path names
//! (see [`super::namespaces`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use cloister_protocol::agent;
use serde_json::Value;

use super::engine::{PolicyCompileError, PolicyDenial, PolicyEngine};
use super::input::{PolicyRequest, StreamRequest};
use super::namespaces::{namespace_owners, KnownContainer};

/// The built-in default policy.
pub const DEFAULT_POLICY: &str = include_str!("default.rego");

/// Where the policy in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyOrigin {
    /// `default.rego`, compiled into the agent.
    BuiltIn,
    /// A `SetPolicy` request from the host.
    Host,
    /// The pod's init-data (measured and attested): locked.
    InitData,
}

impl PolicyOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyOrigin::BuiltIn => "the built-in default",
            PolicyOrigin::Host => "the host",
            PolicyOrigin::InitData => "init-data",
        }
    }
}

/// Why `SetPolicy` failed.
#[derive(Debug, thiserror::Error)]
pub enum SetPolicyError {
    #[error(transparent)]
    Denied(#[from] PolicyDenial),
    #[error("new policy refused: {0}")]
    Compile(#[from] PolicyCompileError),
}

/// What the agent remembers of a container it created.
struct Created {
    /// The `CreateContainerRequest` input the policy allowed it with.
    input: Value,
    /// Its init process's pid in the agent's pid namespace; None once
    /// that process has exited (the pid may then be another process's).
    init_pid: Option<i32>,
}

struct Installed {
    engine: Arc<PolicyEngine>,
    origin: PolicyOrigin,
}

/// The agent's policy, shared by the ttrpc service and the stdio listener.
pub struct AgentPolicy {
    installed: RwLock<Installed>,
    /// Each live container's creation input and init pid, by id.
    created: Mutex<HashMap<String, Created>>,
}

impl std::fmt::Debug for AgentPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentPolicy")
            .field("origin", &self.origin())
            .finish()
    }
}

impl AgentPolicy {
    pub fn new(engine: PolicyEngine, origin: PolicyOrigin) -> AgentPolicy {
        AgentPolicy {
            installed: RwLock::new(Installed {
                engine: Arc::new(engine),
                origin,
            }),
            created: Mutex::new(HashMap::new()),
        }
    }

    /// The agent's starting point: the built-in default policy.
    pub fn built_in() -> Result<AgentPolicy, PolicyCompileError> {
        Ok(AgentPolicy::new(
            PolicyEngine::from_rego(DEFAULT_POLICY)?,
            PolicyOrigin::BuiltIn,
        ))
    }

    fn current(&self) -> Arc<PolicyEngine> {
        // A panic while holding the lock cannot leave `Installed` half
        // written (it is replaced whole), so a poisoned lock is still sound.
        self.installed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .engine
            .clone()
    }

    pub fn origin(&self) -> PolicyOrigin {
        self.installed
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .origin
    }

    /// The source text of the policy in force.
    pub fn rego(&self) -> String {
        self.current().rego().to_owned()
    }

    /// Decides one RPC request.
    pub fn check<R: PolicyRequest>(&self, request: &R) -> Result<(), PolicyDenial> {
        self.decide(request).map(drop)
    }

    /// Decides a CreateContainer request; on success returns the input it
    /// was decided on, which [`AgentPolicy::remember_created`] keeps once
    /// the container exists.
    pub fn check_create(
        &self,
        request: &agent::CreateContainerRequest,
    ) -> Result<Value, PolicyDenial> {
        self.decide(request)
    }

    /// The input of a request, with the named container's creation input
    /// as `container` when its rules read it, decided by the policy in
    /// force.
    fn decide<R: PolicyRequest>(&self, request: &R) -> Result<Value, PolicyDenial> {
        let mut input = request.policy_input().map_err(|e| PolicyDenial::Input {
            request: R::RULE,
            error: e.to_string(),
        })?;
        // Fields the agent adds: computed here, after the host's request
        // is parsed, from what only the agent knows; the host's bytes all
        // sit under other names (`oci`, `process`, …), so they cannot
        // supply or shadow these.
        let created = self.created.lock().unwrap_or_else(PoisonError::into_inner);
        let mut added = Vec::new();
        if let Some(id) = request.created_container() {
            let container = created.get(id).map_or(Value::Null, |c| c.input.clone());
            added.push(("container", container));
        }
        if request.joins_namespaces() {
            let known = created.iter().filter_map(|(id, c)| {
                Some(KnownContainer {
                    id,
                    init_pid: c.init_pid?,
                    create_input: &c.input,
                })
            });
            let oci = input.get("oci").unwrap_or(&Value::Null);
            added.push(("namespace_owners", namespace_owners(oci, known)));
        }
        drop(created);
        if let Value::Object(fields) = &mut input {
            for (name, value) in added {
                fields.insert(name.to_owned(), value);
            }
        }
        self.current().decide(R::RULE, &input)?;
        Ok(input)
    }

    /// Keeps what container `id` was created with, for the rules of later
    /// requests that name it, and its init pid, for the `namespace_owners`
    /// of later containers that join its namespaces. It stays an owner
    /// until [`AgentPolicy::retire_exited_inits`] sees its init gone or
    /// [`AgentPolicy::forget_created`].
    pub fn remember_created(&self, id: &str, create_input: Value, init_pid: i32) {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_owned(),
                Created {
                    input: create_input,
                    init_pid: Some(init_pid),
                },
            );
    }

    /// Containers whose init `exited` says has exited (and was reaped) no
    /// longer own a pid: a later process may have it. Their creation input
    /// stays for the exec and update rules. Called before each
    /// CreateContainer decision.
    pub fn retire_exited_inits(&self, exited: impl Fn(&str) -> bool) {
        let mut created = self.created.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, container) in created.iter_mut() {
            if container.init_pid.is_some() && exited(id) {
                container.init_pid = None;
            }
        }
    }

    /// Container `id` is gone: a later one may reuse its id.
    pub fn forget_created(&self, id: &str) {
        self.created
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Decides the opening of a stdio stream.
    pub fn check_stream(&self, request: &StreamRequest) -> Result<(), PolicyDenial> {
        self.current()
            .decide(request.rule(), &request.policy_input())
    }

    /// The host's `SetPolicy`: allowed by the policy in force, never over a
    /// locked one; the new text must compile.
    pub fn set_from_host(&self, request: &agent::SetPolicyRequest) -> Result<(), SetPolicyError> {
        let mut installed = self
            .installed
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if installed.origin == PolicyOrigin::InitData {
            return Err(PolicyDenial::Locked {
                request: <agent::SetPolicyRequest as PolicyRequest>::RULE,
                origin: PolicyOrigin::InitData.as_str(),
            }
            .into());
        }
        let input = request.policy_input().map_err(|e| PolicyDenial::Input {
            request: <agent::SetPolicyRequest as PolicyRequest>::RULE,
            error: e.to_string(),
        })?;
        installed
            .engine
            .decide(<agent::SetPolicyRequest as PolicyRequest>::RULE, &input)?;
        let engine = PolicyEngine::from_rego(&request.policy)?;
        *installed = Installed {
            engine: Arc::new(engine),
            origin: PolicyOrigin::Host,
        };
        Ok(())
    }

    /// Installs the policy carried by the pod's init-data and locks it: the
    /// host can no longer change it. For the attestation flow, which calls
    /// it before the agent serves the host (or, at the latest, before the
    /// first container), with the text init-data's digest covers.
    pub fn install_from_init_data(&self, rego: &str) -> Result<(), PolicyCompileError> {
        let engine = PolicyEngine::from_rego(rego)?;
        *self
            .installed
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Installed {
            engine: Arc::new(engine),
            origin: PolicyOrigin::InitData,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DENY_ALL_BUT_SET: &str = r#"
package agent_policy
default StartContainerRequest := false
default SetPolicyRequest := false
"#;

    fn set_request(rego: &str) -> agent::SetPolicyRequest {
        let mut request = agent::SetPolicyRequest::new();
        request.policy = rego.into();
        request
    }

    #[test]
    fn built_in_policy_compiles_and_allows_set_policy_once_replaced_rules_decide() {
        let policy = AgentPolicy::built_in().unwrap();
        assert_eq!(policy.origin(), PolicyOrigin::BuiltIn);

        policy
            .set_from_host(&set_request(DENY_ALL_BUT_SET))
            .unwrap();

        assert_eq!(policy.origin(), PolicyOrigin::Host);
        let again = policy
            .set_from_host(&set_request(DEFAULT_POLICY))
            .unwrap_err();
        assert!(
            again.to_string().starts_with(
                "SetPolicyRequest denied by policy rule data.agent_policy.SetPolicyRequest"
            ),
            "{again}"
        );
        let mut start = agent::StartContainerRequest::new();
        start.container_id = "c".into();
        assert!(policy.check(&start).is_err());
    }

    #[test]
    fn set_policy_with_bad_text_keeps_the_old_policy() {
        let policy = AgentPolicy::built_in().unwrap();

        let err = policy
            .set_from_host(&set_request("package agent_policy\nx := \n"))
            .unwrap_err();

        assert!(matches!(err, SetPolicyError::Compile(_)), "{err}");
        assert_eq!(policy.origin(), PolicyOrigin::BuiltIn);
        assert_eq!(policy.rego(), DEFAULT_POLICY);
    }

    /// Allows exec only into a container created with `sleep`, and says
    /// what it saw as `input.container`.
    const EXEC_INTO_SLEEP: &str = r#"
package agent_policy
default CreateContainerRequest := true
default RemoveContainerRequest := true
default ExecProcessRequest := false
ExecProcessRequest if input.container.oci.process.args[0] == "sleep"
deny_reasons contains sprintf("container is %v", [input.container])
"#;

    fn create_request(id: &str, args: &[&str]) -> agent::CreateContainerRequest {
        let mut request = agent::CreateContainerRequest::new();
        request.container_id = id.into();
        request.oci_spec_json =
            serde_json::to_vec(&serde_json::json!({"process": {"args": args}})).unwrap();
        request
    }

    fn exec_request(id: &str) -> agent::ExecProcessRequest {
        let mut request = agent::ExecProcessRequest::new();
        request.container_id = id.into();
        request.process_json = br#"{"args":["ls"]}"#.to_vec();
        request
    }

    #[test]
    fn exec_input_carries_the_named_containers_creation_until_it_is_forgotten() {
        let policy = AgentPolicy::built_in().unwrap();
        policy.set_from_host(&set_request(EXEC_INTO_SLEEP)).unwrap();
        let sleeper = create_request("s", &["sleep", "9"]);
        let created = policy.check_create(&sleeper).unwrap();
        policy.remember_created("s", created.clone(), 10);
        let other = create_request("o", &["sh"]);
        policy.remember_created("o", policy.check_create(&other).unwrap(), 11);

        let into_sleeper = policy.check(&exec_request("s"));
        let into_other = policy.check(&exec_request("o")).unwrap_err();
        policy.forget_created("s");
        let after_removal = policy.check(&exec_request("s")).unwrap_err();

        assert_eq!(into_sleeper, Ok(()));
        assert_eq!(created["oci"]["process"]["args"][0], "sleep");
        assert!(
            into_other
                .to_string()
                .starts_with("ExecProcessRequest denied by policy rule"),
            "{into_other}"
        );
        assert!(
            after_removal.to_string().ends_with(": container is null"),
            "{after_removal}"
        );
    }

    /// Allows joining an ipc namespace only when the agent resolved its
    /// path to CRI's sandbox container.
    const JOIN_SANDBOX_IPC: &str = r#"
package agent_policy
default CreateContainerRequest := false
CreateContainerRequest if {
	every ns in input.oci.linux.namespaces {
		input.namespace_owners[ns.path].sandbox == true
	}
}
deny_reasons contains sprintf("owners %v", [input.namespace_owners])
"#;

    fn joining(id: &str, path: &str, container_type: &str) -> agent::CreateContainerRequest {
        let mut request = agent::CreateContainerRequest::new();
        request.container_id = id.into();
        request.oci_spec_json = serde_json::to_vec(&serde_json::json!({
            "annotations": {"io.kubernetes.cri.container-type": container_type},
            "linux": {"namespaces": [{"type": "ipc", "path": path}]}
        }))
        .unwrap();
        request
    }

    #[test]
    fn create_input_names_the_container_owning_each_joined_namespace() {
        let policy = AgentPolicy::built_in().unwrap();
        // Created under the default policy, which allows anything.
        let pause = joining("pause", "", "sandbox");
        policy.remember_created("pause", policy.check_create(&pause).unwrap(), 42);
        let app = joining("app", "/proc/42/ns/ipc", "container");
        let app_input = policy.check_create(&app).unwrap();
        policy.remember_created("app", app_input.clone(), 43);
        policy
            .set_from_host(&set_request(JOIN_SANDBOX_IPC))
            .unwrap();

        let sandboxes = policy.check(&joining("b", "/proc/42/ns/ipc", "container"));
        let guests = policy
            .check(&joining("c", "/proc/1/ns/ipc", "container"))
            .unwrap_err();
        let apps = policy
            .check(&joining("d", "/proc/43/ns/ipc", "container"))
            .unwrap_err();
        policy.retire_exited_inits(|id| id == "pause");
        let after_exit = policy
            .check(&joining("e", "/proc/42/ns/ipc", "container"))
            .unwrap_err();
        let apps_after_exit = policy
            .check(&joining("f", "/proc/43/ns/ipc", "container"))
            .unwrap_err();

        assert_eq!(
            app_input["namespace_owners"],
            serde_json::json!({"/proc/42/ns/ipc": {"container_id": "pause", "sandbox": true}})
        );
        assert_eq!(sandboxes, Ok(()));
        assert!(
            guests
                .to_string()
                .ends_with(r#": owners {"/proc/1/ns/ipc": null}"#),
            "{guests}"
        );
        assert!(
            apps.to_string().ends_with(
                r#": owners {"/proc/43/ns/ipc": {"container_id": "app", "sandbox": false}}"#
            ),
            "{apps}"
        );
        assert!(
            after_exit
                .to_string()
                .ends_with(r#": owners {"/proc/42/ns/ipc": null}"#),
            "{after_exit}"
        );
        assert!(
            apps_after_exit.to_string().ends_with(
                r#": owners {"/proc/43/ns/ipc": {"container_id": "app", "sandbox": false}}"#
            ),
            "{apps_after_exit}"
        );
    }

    #[test]
    fn init_data_policy_is_locked_against_the_host() {
        let permissive = "package agent_policy\nSetPolicyRequest := true\n";
        let policy = AgentPolicy::built_in().unwrap();
        policy.install_from_init_data(permissive).unwrap();

        let err = policy
            .set_from_host(&set_request(DEFAULT_POLICY))
            .unwrap_err();

        assert_eq!(
            err.to_string(),
            "SetPolicyRequest denied: the policy was installed from init-data and is locked"
        );
        assert_eq!(policy.origin(), PolicyOrigin::InitData);
        assert_eq!(policy.rego(), permissive);
    }
}
