//! Annotation keys (`io.cloister.*`) the runtime reads from OCI specs and
//! pod sandbox configs.

/// Prefix of every cloister annotation.
pub const PREFIX: &str = "io.cloister.";

/// Number of vCPUs of the pod's microVM.
pub const VCPUS: &str = "io.cloister.vcpus";

/// Guest memory of the pod's microVM, in MiB.
pub const MEMORY_MIB: &str = "io.cloister.memory-mib";

/// Hypervisor backend: `cloister` or `qemu`.
pub const HYPERVISOR: &str = "io.cloister.hypervisor";

/// Trusted execution environment: `none`, `snp` or `tdx`.
pub const TEE: &str = "io.cloister.tee";

/// Base64 init-data (attestation policy and the secrets the pod asks for).
pub const INIT_DATA: &str = "io.cloister.init-data";

/// [`INIT_DATA`] spelt without the hyphen, as the product spec names it;
/// accepted alike (the same document under both is fine, different ones
/// are refused).
pub const INIT_DATA_UNHYPHENATED: &str = "io.cloister.initdata";

/// Kata Containers' init-data annotation (base64 of gzip'd TOML), accepted
/// as [`INIT_DATA`] so CoCo pod specs work unchanged.
pub const KATA_INIT_DATA: &str = "io.katacontainers.config.hypervisor.cc_init_data";

/// Extra guest kernel command line parameters.
pub const KERNEL_PARAMS: &str = "io.cloister.kernel-params";

/// Log level of the guest agent (`error`, `warn`, `info`, `debug`, `trace`).
pub const AGENT_LOG_LEVEL: &str = "io.cloister.agent-log-level";

/// The pod's agent API policy: base64 of Rego text (`package
/// agent_policy`), installed in the agent before SetupSandbox. Not honoured
/// for confidential pods, whose policy comes from init-data only.
pub const POLICY: &str = "io.cloister.policy";
