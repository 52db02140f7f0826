# cloister's built-in agent policy: in force from the agent's start until
# the host (annotation io.cloister.policy -> SetPolicy) or init-data
# installs the pod's own.
#
# It allows everything a normal pod needs, so it names every decision point
# the agent has: one boolean rule per request, named after the request's
# proto message. A stricter policy keeps these names (any rule it leaves
# out denies its request) and may add a `deny_reasons` set of strings that
# explains a denial; see `cloister policy generate` for one derived from a
# pod manifest, and guest-agent/src/policy/input.rs for each rule's input.

package agent_policy

# Sandbox set-up and networking (from the shim, before any container).
default SetupSandboxRequest := true
default UpdateInterfacesRequest := true
default UpdateRoutesRequest := true

# Containers.
default CreateContainerRequest := true
default StartContainerRequest := true
default RemoveContainerRequest := true
default PauseContainerRequest := true
default ResumeContainerRequest := true
default UpdateContainerRequest := true
default StatsContainerRequest := true
default ListProcessesRequest := true

# Processes.
default ExecProcessRequest := true
default SignalProcessRequest := true
default WaitProcessRequest := true
default ResizeTtyRequest := true
default CloseStdinRequest := true

# Stdio streams (vsock port 1025): the host reads stdout/stderr, writes stdin.
default ReadStreamRequest := true
default WriteStreamRequest := true

# Agent.
default EventsRequest := true
default GuestDetailsRequest := true
default HealthCheckRequest := true
default ShutdownRequest := true

# Replacing this policy. Allowed while the default is in force: the
# replacement's own SetPolicyRequest rule then decides (policies from
# `cloister policy generate` say false, so the pod's policy is final), and
# a policy from init-data is locked whatever its rules say.
default SetPolicyRequest := true
