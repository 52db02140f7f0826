//! A confidential pod end to end with the `sample` TEE (no SEV/TDX
//! hardware here): `cloister-kbs --insecure-allow-sample-tee` on the host
//! holding one secret, the agent as PID 1 of a QEMU/TCG guest (the
//! `AgentGuest` harness: our vsock back end over vhost-user), and the
//! shim's own code for everything host-side: the init-data annotation
//! (base64 of gzip'd TOML, Kata's format) decoded and checked by
//! `PodConfidential`, its kernel parameters, the SetupSandbox request and
//! the vsock forwarder to the KBS.
//!
//! - attested: a container mounting `cloister-secret://token` and holding
//!   the same secret as a sealed env value prints the secret's SHA-256
//!   (never the secret: stdout reaches the host), its file mode 0400;
//!   afterwards no file, log or socket capture the host side holds (the
//!   harness folder with the vhost-user sockets and logs, the console and
//!   back-end transcript, the forwarder's capture of every KBS byte, the
//!   container's output, the KBS audit log) contains the secret, raw or
//!   base64;
//! - tampered: the host delivers init-data that differs from what the
//!   launch bound: no container is created, the reason names the digest
//!   mismatch, and the KBS never hears from the guest;
//! - refused: the KBS's reference values accept another init-data digest:
//!   no container is created and the reason says the KBS refused evidence.
//!
//! Network: the guest reaches the KBS through host vsock port 1026, which
//! the forwarder joins to the KBS's TCP port (no tap, no route).
//!
//! Skips, with the reason printed, when QEMU, the guest image, the
//! `cloister-vmm` or `cloister-kbs` binary is missing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use cloister_e2e::agent_guest::{
    busybox_spec, connect_agent, create_request, ctx, run_to_exit, shutdown, AgentGuest,
    AgentGuestFixture,
};
use cloister_protocol::agent;
use cloister_protocol::agent_ttrpc::AgentServiceClient;
use cloister_protocol::annotations;
use cloister_shim::confidential::kbs_forward::{KbsForwarder, Transcript};
use cloister_shim::confidential::{ConfidentialSection, PodConfidential, TeeKind};
use sha2::{Digest, Sha256};

const KBS_VSOCK_PORT: u32 = 1026;
const RESOURCE: &str = "test/key/token";

/// `cloister-kbs` beside the test binary (`cargo build -p
/// cloister-attestation --bin cloister-kbs`) or `$CLOISTER_KBS`.
fn find_kbs() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CLOISTER_KBS").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("cloister-kbs"), dir.parent()?.join("cloister-kbs")]
        .into_iter()
        .find(|p| p.is_file())
}

struct Setup {
    fixture: AgentGuestFixture,
    kbs_binary: PathBuf,
}

fn setup() -> Option<Setup> {
    let fixture = match AgentGuestFixture::locate() {
        Ok(f) => f,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return None;
        }
    };
    let Some(kbs_binary) = find_kbs() else {
        eprintln!(
            "SKIP: cloister-kbs binary not found (cargo build -p cloister-attestation --bin cloister-kbs, or set CLOISTER_KBS)"
        );
        return None;
    };
    Some(Setup {
        fixture,
        kbs_binary,
    })
}

/// A running `cloister-kbs`, killed on drop.
struct Kbs {
    child: Child,
    address: String,
    audit: PathBuf,
    /// Policy, resources and audit log (the KBS may hold the secret).
    dir: tempfile::TempDir,
}

impl Kbs {
    /// Serves `secret` as [`RESOURCE`] to sample-TEE guests whose init-data
    /// digest is one of `accepted_digests`.
    fn start(binary: &Path, secret: &[u8], accepted_digests: &[String]) -> Self {
        Self::start_with(binary, secret, accepted_digests, None)
    }

    /// As [`Kbs::start`], serving https with `tls` = (certificate, key).
    fn start_with(
        binary: &Path,
        secret: &[u8],
        accepted_digests: &[String],
        tls: Option<(&Path, &Path)>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let resource = dir.path().join("resources").join(RESOURCE);
        std::fs::create_dir_all(resource.parent().unwrap()).unwrap();
        std::fs::write(&resource, secret).unwrap();
        let digests: Vec<String> = accepted_digests.iter().map(|d| format!("{d:?}")).collect();
        let policy = dir.path().join("kbs.toml");
        std::fs::write(
            &policy,
            format!(
                "[reference.init_data]\nrequired = true\ndigests = [{}]\n\n[[policy]]\nresources = \"test/*/*\"\ntees = [\"sample\"]\n",
                digests.join(", ")
            ),
        )
        .unwrap();
        let audit = dir.path().join("audit.jsonl");
        let mut command = Command::new(binary);
        if let Some((cert, key)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--insecure-allow-sample-tee"])
            .arg("--policy")
            .arg(&policy)
            .arg("--resources")
            .arg(dir.path().join("resources"))
            .arg("--audit-log")
            .arg(&audit)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cloister-kbs");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let address = loop {
            let line = lines
                .next()
                .expect("cloister-kbs exited before listening")
                .unwrap();
            if let Some(addr) = line
                .strip_prefix("cloister-kbs listening on http://")
                .or_else(|| line.strip_prefix("cloister-kbs listening on https://"))
            {
                break addr.trim().to_owned();
            }
        };
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            address,
            audit,
            dir,
        }
    }

    fn audit_log(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }
}

impl Drop for Kbs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pod's init-data. The KBS URL's host only names the KBS (Host
/// header, TLS name): the guest's connections go over host vsock port
/// [`KBS_VSOCK_PORT`], which the shim forwards to the KBS's real address.
const INIT_DATA: &str = "version = \"0.1.0\"
algorithm = \"sha384\"
[data]
\"cloister.toml\" = '''
[kbs]
url = \"http://kbs.cloister.test:8080\"
vsock_port = 1026
[resources]
token = \"test/key/token\"
'''
";

fn digest_of(doc: &str) -> String {
    cloister_shim::confidential::init_data::validate(doc.as_bytes())
        .expect("valid init-data")
        .digest_hex()
}

/// The pod annotation as Kata/CoCo users write it: base64 of gzip'd TOML.
fn annotation(doc: &str) -> HashMap<String, String> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(doc.as_bytes()).unwrap();
    HashMap::from([(
        annotations::INIT_DATA.to_owned(),
        STANDARD.encode(gz.finish().unwrap()),
    )])
}

/// CoCo's sealed-secret form of a reference to a KBS resource.
fn sealed(resource: &str) -> String {
    let payload = format!(
        r#"{{"version":"0.1.0","type":"vault","name":"kbs:///{resource}","provider":"kbs","provider_settings":{{}},"annotations":{{}}}}"#
    );
    format!(
        "sealed.{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    )
}

/// The shim's view of the pod: init-data from the annotation, the
/// forward to the KBS's real address.
fn resolve_pod(kbs: &Kbs) -> PodConfidential {
    let section = ConfidentialSection {
        tee: Some(TeeKind::Sample),
        kbs_url: Some(format!("http://{}", kbs.address)),
        ..Default::default()
    };
    let pod = PodConfidential::resolve(&section, &annotation(INIT_DATA))
        .expect("the shim accepts the pod's init-data")
        .expect("a confidential pod");
    assert_eq!(pod.kbs_forward.as_ref().map(|f| f.0), Some(KBS_VSOCK_PORT));
    pod
}

/// A guest launched with the pod's binding on its command line.
fn launch(fixture: &AgentGuestFixture, pod: &PodConfidential) -> AgentGuest {
    let mut guest = AgentGuest::new(fixture.clone()).expect("prepare the guest");
    let params = pod.kernel_params();
    let qemu = guest.qemu_mut();
    qemu.cmdline.push(' ');
    qemu.cmdline.push_str(&params);
    guest
}

/// The forwarder the shim runs for the pod, on `<vsock uds>_<port>`.
fn forwarder(uds: &Path, pod: &PodConfidential, transcript: &Transcript) -> KbsForwarder {
    let (port, target) = pod
        .kbs_forward
        .clone()
        .expect("init-data asks for a forward");
    let path = PathBuf::from(format!("{}_{port}", uds.display()));
    KbsForwarder::spawn(&path, target, Some(transcript.clone()), None).expect("forwarder")
}

fn setup_request(init_data: &[u8]) -> agent::SetupSandboxRequest {
    let mut request = agent::SetupSandboxRequest::new();
    request.hostname = "confidential".into();
    request.init_data = init_data.to_vec();
    request
}

/// A container that reads the secret file and the sealed env value and
/// prints only their SHA-256 (stdout reaches the host).
fn reader_spec() -> serde_json::Value {
    let mut spec = busybox_spec(&[
        "sh",
        "-c",
        "sha256sum /secrets/token; echo -n \"$SEALED\" | sha256sum; stat -c 'mode=%a' /secrets/token; (echo x > /secrets/token) 2>/dev/null || echo read-only",
    ]);
    spec["process"]["env"]
        .as_array_mut()
        .unwrap()
        .push(format!("SEALED={}", sealed(RESOURCE)).into());
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/secrets/token",
            "source": "cloister-secret://token",
            "type": "bind"
        }));
    spec
}

/// Every file below `dir`, recursively (sockets skipped).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_below(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fresh_secret() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("cloister-e2e-secret-{nanos:032x}-{}", std::process::id())
}

#[test]
fn attested_pod_reads_its_secret_and_the_host_never_sees_it() {
    let Some(setup) = setup() else { return };
    let secret = fresh_secret();
    let kbs = Kbs::start(
        &setup.kbs_binary,
        secret.as_bytes(),
        &[digest_of(INIT_DATA)],
    );
    let pod = resolve_pod(&kbs);
    let guest = launch(&setup.fixture, &pod);
    let harness_dir = guest.dir().to_path_buf();
    let transcript = Transcript::default();
    let needles = [
        secret.as_bytes().to_vec(),
        STANDARD.encode(&secret).into_bytes(),
        URL_SAFE_NO_PAD.encode(&secret).into_bytes(),
    ];
    let stdout = Arc::new(Mutex::new(String::new()));
    let leaks = Arc::new(Mutex::new(Vec::<String>::new()));
    let (stdout_in, leaks_in, needles_in, transcript_in) = (
        stdout.clone(),
        leaks.clone(),
        needles.clone(),
        transcript.clone(),
    );
    let console = guest.run_capturing(move |uds| async move {
        let _forward = forwarder(&uds, &pod, &transcript_in);
        let client = connect_agent(&uds).await.expect("connect to the agent");
        let out = read_secrets_in_a_container(&client, &uds, &pod).await;
        *stdout_in.lock().unwrap() = out;

        // What the host side holds while the guest still runs: the
        // harness folder (vhost-user sockets, back-end logs) and every
        // byte the KBS forwarder carried.
        let mut found = Vec::new();
        let files = files_below(&harness_dir);
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_default();
            if needles_in.iter().any(|n| contains(&bytes, n)) {
                found.push(file.display().to_string());
            }
        }
        println!("searched {} host files for the secret", files.len());
        let captured = transcript_in.lock().unwrap().clone();
        assert!(
            contains(&captured, b"/kbs/v0/attest"),
            "the forwarder did not carry the attestation"
        );
        println!(
            "searched {} bytes of kbs traffic for the secret",
            captured.len()
        );
        if needles_in.iter().any(|n| contains(&captured, n)) {
            found.push("the kbs forwarder's capture".into());
        }
        leaks_in.lock().unwrap().extend(found);
        shutdown(&client).await;
    });

    let stdout = stdout.lock().unwrap().clone();
    let secret_sha = hex_sha256(secret.as_bytes());
    assert!(
        stdout.contains(&format!("{secret_sha}  /secrets/token")),
        "the container did not read the secret file: {stdout}"
    );
    assert!(
        stdout.contains(&format!("{secret_sha}  -")),
        "the sealed env value was not unsealed: {stdout}"
    );
    assert!(stdout.contains("mode=400"), "{stdout}");
    assert!(stdout.contains("read-only"), "{stdout}");
    assert!(console.contains("attestation succeeded"), "{console}");
    let mut leaks = leaks.lock().unwrap().clone();
    let audit = kbs.audit_log();
    assert!(audit.contains("\"allow\""), "kbs audit: {audit}");
    for (what, text) in [
        ("the console and back-end logs", console.as_str()),
        ("the container output", stdout.as_str()),
        ("the kbs audit log", audit.as_str()),
    ] {
        if needles.iter().any(|n| contains(text.as_bytes(), n)) {
            leaks.push(what.into());
        }
    }
    assert!(
        leaks.is_empty(),
        "the secret reached the host in: {leaks:?}"
    );
    // The search finds the secret where it is meant to be: the KBS's store.
    let stored = files_below(kbs.dir.path())
        .iter()
        .filter(|f| contains(&std::fs::read(f).unwrap_or_default(), &needles[0]))
        .count();
    assert_eq!(stored, 1, "positive control: the kbs resource file");
}

/// SetupSandbox with the pod's init-data, then the reader container run to
/// its end; returns its output (it must exit 0).
async fn read_secrets_in_a_container(
    client: &AgentServiceClient,
    uds: &Path,
    pod: &PodConfidential,
) -> String {
    let mut setup_req = setup_request(&[]);
    pod.add_to_setup(&mut setup_req);
    client
        .setup_sandbox(ctx(), &setup_req)
        .await
        .expect("setup sandbox");
    let (out, status) =
        run_to_exit(client, uds, create_request("reader", &reader_spec(), true)).await;
    println!("container output:\n{out}");
    assert_eq!(status, 0, "{out}");
    out
}

/// Boots a guest bound to the pod's init-data, delivers `delivered` as
/// init-data, and returns the CreateContainer error (panics if the
/// container is created).
fn refused_create(setup: &Setup, kbs: &Kbs, delivered: &'static str) -> (String, String, usize) {
    let pod = resolve_pod(kbs);
    let guest = launch(&setup.fixture, &pod);
    refused_create_in(guest, pod, delivered)
}

/// [`refused_create`] in a guest prepared by the caller: returns the
/// CreateContainer error, the console and the bytes the forwarder carried
/// to the KBS.
fn refused_create_in(
    guest: AgentGuest,
    pod: PodConfidential,
    delivered: &'static str,
) -> (String, String, usize) {
    let transcript = Transcript::default();
    let transcript_in = transcript.clone();
    let reason = Arc::new(Mutex::new(String::new()));
    let reason_in = reason.clone();
    let console = guest.run_capturing(move |uds| async move {
        let _forward = forwarder(&uds, &pod, &transcript_in);
        let client = connect_agent(&uds).await.expect("connect to the agent");
        client
            .setup_sandbox(ctx(), &setup_request(delivered.as_bytes()))
            .await
            .expect("setup sandbox");
        let err = client
            .create_container(ctx(), &create_request("reader", &reader_spec(), true))
            .await
            .expect_err("the container must not be created");
        let text = err.to_string();
        println!("create refused: {text}");
        assert!(
            text.contains("FailedPrecondition") || text.contains("FAILED_PRECONDITION"),
            "{text}"
        );
        *reason_in.lock().unwrap() = text;
        // Nothing of it runs.
        let mut wait = agent::WaitProcessRequest::new();
        wait.container_id = "reader".into();
        assert!(client.wait_process(ctx(), &wait).await.is_err());
        shutdown(&client).await;
    });
    let captured = transcript.lock().unwrap().len();
    let reason = reason.lock().unwrap().clone();
    (reason, console, captured)
}

#[test]
fn tampered_init_data_never_starts_a_container() {
    let Some(setup) = setup() else { return };
    let secret = fresh_secret();
    let kbs = Kbs::start(
        &setup.kbs_binary,
        secret.as_bytes(),
        &[digest_of(INIT_DATA)],
    );
    // The launch binds INIT_DATA; the host delivers a document asking for
    // another resource.
    const TAMPERED: &str = "version = \"0.1.0\"
algorithm = \"sha384\"
[data]
\"cloister.toml\" = '''
[kbs]
url = \"http://kbs.cloister.test:8080\"
vsock_port = 1026
[resources]
token = \"test/key/other\"
'''
";
    let (reason, console, kbs_bytes) = refused_create(&setup, &kbs, TAMPERED);
    assert!(reason.contains("attestation failed"), "{reason}");
    assert!(reason.contains("does not match"), "{reason}");
    assert!(reason.contains(&digest_of(TAMPERED)), "{reason}");
    assert!(console.contains("attestation failed"), "{console}");
    assert_eq!(
        kbs_bytes, 0,
        "the guest contacted the kbs with tampered init-data"
    );
    assert!(kbs.audit_log().is_empty(), "{}", kbs.audit_log());
}

#[test]
fn kbs_refusing_the_evidence_never_starts_a_container() {
    let Some(setup) = setup() else { return };
    let secret = fresh_secret();
    // The KBS accepts only some other pod's init-data.
    let other = digest_of(&INIT_DATA.replace("token =", "other ="));
    let kbs = Kbs::start(&setup.kbs_binary, secret.as_bytes(), &[other]);
    let (reason, _console, kbs_bytes) = refused_create(&setup, &kbs, INIT_DATA);
    assert!(reason.contains("attestation failed"), "{reason}");
    assert!(
        reason.contains("kbs at http://kbs.cloister.test:8080 refused evidence"),
        "{reason}"
    );
    assert!(kbs_bytes > 0);
    let audit = kbs.audit_log();
    assert!(audit.contains("\"deny\""), "kbs audit: {audit}");
    assert!(!audit.contains(&secret));
}

/// A guest whose command line says SEV-SNP but which runs without it (the
/// host lied, or lost the hardware): the agent asks the kernel's
/// configfs-tsm for a report (configfs mounted by the agent, sev-guest
/// built in), gets none, and no container starts; the KBS is never asked.
#[test]
fn snp_guest_without_sev_refuses_containers_and_names_configfs_tsm() {
    let Some(setup) = setup() else { return };
    let secret = fresh_secret();
    let kbs = Kbs::start(
        &setup.kbs_binary,
        secret.as_bytes(),
        &[digest_of(INIT_DATA)],
    );
    let pod = resolve_pod(&kbs);
    let mut guest = AgentGuest::new(setup.fixture.clone()).expect("prepare the guest");
    guest.qemu_mut().cmdline.push_str(" cloister.tee=snp");
    let (reason, _console, kbs_bytes) = refused_create_in(guest, pod, INIT_DATA);
    assert!(reason.contains("attestation failed"), "{reason}");
    assert!(reason.contains("snp"), "{reason}");
    // configfs is mounted and configfs-tsm is in the kernel (it refused
    // the entry for want of a TEE driver, rather than missing).
    assert!(
        reason.contains("/sys/kernel/config/tsm/report/"),
        "{reason}"
    );
    assert!(
        reason.contains("no TEE driver registered with configfs-tsm"),
        "{reason}"
    );
    assert_eq!(kbs_bytes, 0, "the kbs was contacted");
    assert!(kbs.audit_log().is_empty(), "{}", kbs.audit_log());
}

/// `containerd-shim-cloister-v2` beside the test binary (`cargo build -p
/// cloister-shim`).
fn find_shim() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let name = cloister_e2e::runtime::SHIM_BINARY;
    [dir.join(name), dir.parent()?.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The whole host path: `ctr run` through a private containerd and our
/// shim, whose runtime config makes the pod confidential (`[confidential]
/// tee = "sample"`, the KBS to forward to, and the rootfs share allowed
/// explicitly: there is no registry here to pull the image inside the
/// guest). The init-data arrives as the Kata-format annotation; the secret
/// comes as a `cloister-secret://` mount. While the container runs, the
/// pod's sandbox folder (`/run/cloister/pods`: VM config, logs, the
/// shared folder), containerd's folder (its log holds the shim's) and the
/// forwarder's capture are searched for the secret.
/// What a pod through containerd needs besides [`Setup`].
struct CtrSetup {
    setup: Setup,
    shim: PathBuf,
    qemu: PathBuf,
    binaries: cloister_e2e::containerd::ContainerdBinaries,
}

fn ctr_setup() -> Option<CtrSetup> {
    let setup = setup()?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP: a private containerd needs root");
        return None;
    }
    let Some(shim) = find_shim() else {
        eprintln!("SKIP: containerd-shim-cloister-v2 not built (cargo build -p cloister-shim)");
        return None;
    };
    let Some(qemu) = cloister_e2e::runtime::find_on_path(cloister_e2e::qemu::QEMU_BINARY) else {
        eprintln!("SKIP: qemu not on PATH");
        return None;
    };
    let Some(binaries) = cloister_e2e::containerd::available_containerds()
        .into_iter()
        .next()
    else {
        eprintln!("SKIP: no containerd");
        return None;
    };
    Some(CtrSetup {
        setup,
        shim,
        qemu,
        binaries,
    })
}

/// A `ctr run --rm` of the reader in a confidential pod, still running.
struct CtrPod {
    containerd: cloister_e2e::containerd::PrivateContainerd,
    child: Child,
    /// Runtime config, rootfs and the shim's audit trail.
    dir: tempfile::TempDir,
}

/// Starts `ctr run` under a private containerd whose runtime config is
/// confidential (`[confidential]` with `confidential_extra` appended).
fn start_ctr_pod(ctr: &CtrSetup, kbs: &Kbs, name: &str, confidential_extra: &str) -> CtrPod {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    cloister_e2e::containerd::busybox_rootfs(Path::new("/bin/busybox"), &rootfs).unwrap();
    let config = dir.path().join("cloister.toml");
    std::fs::write(
        &config,
        format!(
            "{}[audit]\nenabled = true\npath = \"{}\"\n[confidential]\ntee = \"sample\"\nkbs_url = \"http://{}\"\n{confidential_extra}",
            cloister_e2e::runtime::qemu_tcg_toml(&ctr.setup.fixture, 512, &ctr.qemu),
            dir.path().join("audit.jsonl").display(),
            kbs.address
        ),
    )
    .unwrap();
    let containerd = cloister_e2e::containerd::PrivateContainerd::start(
        &ctr.binaries,
        &[("CLOISTER_CONFIG", config.as_path())],
    )
    .unwrap();
    // Unique per test: the pod's sandbox folder is named after it.
    let id = format!("{name}-{}", std::process::id());
    let init_data = format!(
        "{}={}",
        annotations::INIT_DATA,
        annotation(INIT_DATA)[annotations::INIT_DATA]
    );
    let child = containerd
        .ctr_command(&[
            "run",
            "--rm",
            "--runtime",
            &ctr.shim.display().to_string(),
            "--annotation",
            &init_data,
            "--mount",
            "type=bind,src=cloister-secret://token,dst=/secrets/token,options=rbind:ro",
            // A flag, then the folder as the first argument.
            "--rootfs",
            &rootfs.display().to_string(),
            &id,
            "sh",
            "-c",
            "sha256sum /secrets/token; sleep 4",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    CtrPod {
        containerd,
        child,
        dir,
    }
}

impl CtrPod {
    /// Waits for ctr; returns its output and a context for failures.
    fn finish(
        self,
    ) -> (
        std::process::Output,
        String,
        cloister_e2e::containerd::PrivateContainerd,
    ) {
        let output = self.child.wait_with_output().expect("ctr run");
        let context = format!(
            "stdout: {}\nstderr: {}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.containerd.log()
        );
        (output, context, self.containerd)
    }

    /// The shim's audit trail so far.
    fn audit(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default()
    }
}

/// The whole host path: `ctr run` through a private containerd and our
/// shim, whose runtime config makes the pod confidential (`[confidential]
/// tee = "sample"`, the KBS to forward to, and the rootfs share allowed
/// explicitly: there is no registry here to pull the image inside the
/// guest). The init-data arrives as the Kata-format annotation; the secret
/// comes as a `cloister-secret://` mount. While the container runs, the
/// pod's sandbox folder (`/run/cloister/pods`: VM config, logs, the
/// shared folder) and containerd's folder (its log holds the shim's) are
/// searched for the secret.
#[test]
fn ctr_run_of_a_confidential_pod_through_the_shim() {
    let Some(ctr) = ctr_setup() else { return };
    let secret = fresh_secret();
    let kbs = Kbs::start(
        &ctr.setup.kbs_binary,
        secret.as_bytes(),
        &[digest_of(INIT_DATA)],
    );
    let mut pod = start_ctr_pod(
        &ctr,
        &kbs,
        "confidential",
        "allow_host_shares = [\"rootfs\"]\n",
    );
    // Search while the pod is up: poll until the guest has attested
    // (the KBS audit shows the release), then look.
    let started = std::time::Instant::now();
    while !kbs.audit_log().contains("\"resource\"")
        && started.elapsed() < std::time::Duration::from_secs(180)
        && pod.child.try_wait().ok().flatten().is_none()
    {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let needles = [
        secret.as_bytes().to_vec(),
        STANDARD.encode(&secret).into_bytes(),
    ];
    let mut searched = 0;
    let mut leaks = Vec::new();
    for folder in [Path::new("/run/cloister/pods"), pod.containerd.dir()] {
        for file in files_below(folder) {
            searched += 1;
            let bytes = std::fs::read(&file).unwrap_or_default();
            if needles.iter().any(|n| contains(&bytes, n)) {
                leaks.push(file.display().to_string());
            }
        }
    }
    let (output, context, containerd) = pod.finish();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{context}");
    assert!(
        stdout.contains(&format!(
            "{}  /secrets/token",
            hex_sha256(secret.as_bytes())
        )),
        "{context}"
    );
    println!("searched {searched} files of the pod and containerd for the secret");
    assert!(searched > 0);
    for (what, text) in [
        ("ctr's output", stdout.as_str()),
        (
            "containerd's log (with the shim's)",
            containerd.log().as_str(),
        ),
    ] {
        if needles.iter().any(|n| contains(text.as_bytes(), n)) {
            leaks.push(what.into());
        }
    }
    assert!(
        leaks.is_empty(),
        "the secret reached the host in: {leaks:?}"
    );
}

/// A KBS that refuses the pod: `ctr run` fails with the agent's reason,
/// carried through the shim and containerd.
#[test]
fn ctr_run_refused_by_the_kbs_reports_why() {
    let Some(ctr) = ctr_setup() else { return };
    let secret = fresh_secret();
    let other = digest_of(&INIT_DATA.replace("token =", "other ="));
    let kbs = Kbs::start(&ctr.setup.kbs_binary, secret.as_bytes(), &[other]);
    let mut pod = start_ctr_pod(&ctr, &kbs, "refused", "allow_host_shares = [\"rootfs\"]\n");
    let _ = pod.child.wait();
    let audit = pod.audit();
    let (output, context, _containerd) = pod.finish();
    assert!(audit.contains("attestation-failed"), "shim audit: {audit}");
    assert!(audit.contains("refused evidence"), "shim audit: {audit}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("ctr: {stderr}");
    assert!(!output.status.success(), "{context}");
    assert!(stderr.contains("attestation failed"), "{context}");
    assert!(stderr.contains("refused evidence"), "{context}");
    assert!(output.stdout.is_empty(), "{context}");
}

/// Without `allow_host_shares`, a confidential pod cannot take its rootfs
/// from the host: `ctr run` fails naming the share and the setting.
#[test]
fn ctr_run_without_an_allowed_rootfs_share_is_refused() {
    let Some(ctr) = ctr_setup() else { return };
    let kbs = Kbs::start(
        &ctr.setup.kbs_binary,
        fresh_secret().as_bytes(),
        &[digest_of(INIT_DATA)],
    );
    let pod = start_ctr_pod(&ctr, &kbs, "no-share", "");
    let (output, context, _containerd) = pod.finish();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("ctr: {stderr}");
    assert!(!output.status.success(), "{context}");
    assert!(stderr.contains("allow_host_shares"), "{context}");
    assert!(stderr.contains("rootfs"), "{context}");
}

/// A CA and a KBS certificate for `kbs.cloister.test` (openssl CLI, P-256):
/// (CA PEM text, certificate path, key path).
fn kbs_tls_material(dir: &Path) -> Result<(String, PathBuf, PathBuf), String> {
    let openssl = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .map_err(|e| format!("openssl not runnable (Debian package openssl): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cloister e2e ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        ]
        .concat(),
    )?;
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "kbs.key",
                "-out",
                "kbs.csr",
                "-subj",
                "/CN=kbs.cloister.test",
            ],
        ]
        .concat(),
    )?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:kbs.cloister.test\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| e.to_string())?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "kbs.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "kbs.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])?;
    let ca = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| e.to_string())?;
    Ok((ca, dir.join("kbs.pem"), dir.join("kbs.key")))
}

/// The same pod with an https KBS: the init-data carries the KBS's CA, the
/// guest's TLS runs to `kbs.cloister.test` through the vsock forwarder, and
/// the forwarder (the host) carries only ciphertext: not even the
/// protocol's paths, let alone the secret, appear in its capture.
#[test]
fn attested_pod_over_tls_leaves_the_host_only_ciphertext() {
    let Some(setup) = setup() else { return };
    let tls_dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = match kbs_tls_material(tls_dir.path()) {
        Ok(m) => m,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return;
        }
    };
    let doc = INIT_DATA.replace(
        "url = \"http://kbs.cloister.test:8080\"",
        &format!("url = \"https://kbs.cloister.test:8443\"\ncert = \"\"\"\n{ca}\"\"\""),
    );
    let secret = fresh_secret();
    let kbs = Kbs::start_with(
        &setup.kbs_binary,
        secret.as_bytes(),
        &[digest_of(&doc)],
        Some((&cert, &key)),
    );
    let section = ConfidentialSection {
        tee: Some(TeeKind::Sample),
        kbs_url: Some(format!("https://{}", kbs.address)),
        ..Default::default()
    };
    let pod = PodConfidential::resolve(&section, &annotation(&doc))
        .expect("the shim accepts the pod's init-data")
        .expect("a confidential pod");
    let guest = launch(&setup.fixture, &pod);
    let transcript = Transcript::default();
    let transcript_in = transcript.clone();
    let stdout = Arc::new(Mutex::new(String::new()));
    let stdout_in = stdout.clone();
    let console = guest.run_capturing(move |uds| async move {
        let _forward = forwarder(&uds, &pod, &transcript_in);
        let client = connect_agent(&uds).await.expect("connect to the agent");
        let out = read_secrets_in_a_container(&client, &uds, &pod).await;
        *stdout_in.lock().unwrap() = out;
        shutdown(&client).await;
    });
    let stdout = stdout.lock().unwrap().clone();
    let secret_sha = hex_sha256(secret.as_bytes());
    assert!(
        stdout.contains(&format!("{secret_sha}  /secrets/token")),
        "{stdout}\n{console}"
    );
    assert!(stdout.contains(&format!("{secret_sha}  -")), "{stdout}");
    let captured = transcript.lock().unwrap().clone();
    println!("the forwarder carried {} bytes", captured.len());
    assert!(
        captured.len() > 1000,
        "no tls traffic went through the forwarder"
    );
    for clear in [&b"/kbs/v0/"[..], b"kbs-session-id", secret.as_bytes()] {
        assert!(
            !contains(&captured, clear),
            "{:?} crossed the host in clear",
            String::from_utf8_lossy(clear)
        );
    }
    assert!(!console.contains(&secret));
}
