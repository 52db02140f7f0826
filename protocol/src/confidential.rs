//! Names the shim and the agent share about confidential pods.

/// Kernel parameter naming the guest's TEE: `snp`, `tdx` or `sample`. The
/// command line is measured in a real TEE launch, so the agent may trust
/// it there; its presence makes every container wait for attestation.
pub const TEE_PARAM: &str = "cloister.tee";

/// Kernel parameter with the init-data binding (hex) for the `sample` TEE.
/// INSECURE, tests only: the host writes it, so it proves nothing. Real
/// TEEs take the value from the hardware report (SNP `HOST_DATA`, TDX
/// `MRCONFIGID`).
pub const SAMPLE_HOST_DATA_PARAM: &str = "cloister.sample_host_data";

/// Source scheme of a spec mount that asks for an attested secret:
/// `{"source": "cloister-secret://<name>", "type": "bind", ...}` mounts the
/// guest file holding init-data resource `<name>`, read-only. The shim
/// passes such mounts through untouched (nothing is shared from the host).
pub const SECRET_MOUNT_SCHEME: &str = "cloister-secret://";

/// Guest tmpfs holding fetched secrets, one file per resource (mode 0400).
pub const GUEST_SECRETS_DIR: &str = "/run/cloister/secrets";
