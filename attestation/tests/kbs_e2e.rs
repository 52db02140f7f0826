//! End to end: the `cloister-kbs` binary on 127.0.0.1 and our client through
//! the whole RCAR flow with the sample TEE, plus the refusals (REPORT_DATA
//! mismatch, sample TEE without the insecure flag, replayed attestation,
//! policy denial), each checked in the audit log.

use cloister_attestation::initdata::InitData;
use cloister_attestation::kbs::attester::{Attester, AttesterError, SampleAttester};
use cloister_attestation::kbs::client::{KbsClient, KbsClientError};
use cloister_attestation::kbs::protocol::{
    report_data, Tee, TeeKeyPair, PROTOCOL_VERSION, SESSION_COOKIE,
};
use cloister_attestation::kbs::tls::install_ring_provider;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

const INIT_DATA: &str = r#"version = "0.1.0"
algorithm = "sha384"
[data]
"aa.toml" = '''
[token_configs.kbs]
url = "http://127.0.0.1"
'''
"#;

struct KbsProcess {
    child: Child,
    url: String,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for KbsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl KbsProcess {
    fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn start_kbs(allow_sample: bool) -> KbsProcess {
    start_kbs_with(allow_sample, &[])
}

fn start_kbs_with(allow_sample: bool, extra: &[&str]) -> KbsProcess {
    let dir = tempfile::tempdir().unwrap();
    let resources = dir.path().join("resources");
    std::fs::create_dir_all(resources.join("default/key")).unwrap();
    std::fs::write(
        resources.join("default/key/disk"),
        b"0123456789abcdef disk key",
    )
    .unwrap();
    std::fs::create_dir_all(resources.join("secret/key")).unwrap();
    std::fs::write(resources.join("secret/key/root"), b"never for sample").unwrap();
    let digest = InitData::parse(INIT_DATA.as_bytes()).unwrap().digest();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
[reference.init_data]
digests = ["{}"]

[[policy]]
resources = "default/key/*"
tees = ["sample", "snp", "tdx"]

[[policy]]
resources = "secret/*/*"
tees = ["snp", "tdx"]
"#,
            hex::encode(digest)
        ),
    )
    .unwrap();
    let audit = dir.path().join("audit.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloister-kbs"));
    cmd.args(["--listen", "127.0.0.1:0", "--policy"])
        .arg(&policy)
        .arg("--resources")
        .arg(&resources)
        .arg("--audit-log")
        .arg(&audit)
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    if allow_sample {
        cmd.arg("--insecure-allow-sample-tee");
    }
    cmd.args(extra);
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut url = String::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("cloister-kbs listening on ") {
            url = rest.trim().to_owned();
            break;
        }
    }
    // Keep draining so later log lines never hit a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    assert!(!url.is_empty(), "cloister-kbs did not report its address");
    KbsProcess {
        child,
        url,
        audit,
        _dir: dir,
    }
}

/// An attester that signs the wrong REPORT_DATA (as a guest replaying old
/// evidence or binding another key would).
struct WrongReportData;

impl Attester for WrongReportData {
    fn tee(&self) -> Tee {
        Tee::Sample
    }
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Value, AttesterError> {
        let mut rd = *report_data;
        rd[0] ^= 0xFF;
        SampleAttester::default().evidence(&rd)
    }
}

fn sample_attester() -> SampleAttester {
    SampleAttester {
        init_data_digest: Some(hex::encode(
            InitData::parse(INIT_DATA.as_bytes()).unwrap().digest(),
        )),
    }
}

#[tokio::test]
async fn sample_tee_gets_resource_decrypted_with_ec_and_rsa_keys() {
    let kbs = start_kbs(true);
    let mut client = KbsClient::new(&kbs.url);
    let token = client
        .attest(&sample_attester(), Some(INIT_DATA))
        .await
        .unwrap();
    assert_eq!(token.split('.').count(), 3);
    assert_eq!(
        client.get_resource("default/key/disk").await.unwrap(),
        b"0123456789abcdef disk key"
    );

    let mut rsa_client = KbsClient::new(&kbs.url);
    rsa_client
        .attest_with_key(
            &sample_attester(),
            Some(INIT_DATA),
            TeeKeyPair::generate_rsa().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        rsa_client.get_resource("default/key/disk").await.unwrap(),
        b"0123456789abcdef disk key"
    );

    // The policy keeps `secret/` for hardware TEEs.
    let err = client.get_resource("secret/key/root").await.unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 403, ref detail, .. } if detail.contains("does not allow tee sample")),
        "{err}"
    );
    let err = client.get_resource("default/key/absent").await.unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 404, .. }),
        "{err}"
    );

    let audit = kbs.audit_lines();
    let allowed: Vec<&Value> = audit
        .iter()
        .filter(|l| l["action"] == "resource" && l["decision"] == "allow")
        .collect();
    assert_eq!(allowed.len(), 2);
    assert_eq!(allowed[0]["target"], "default/key/disk");
    assert!(audit.iter().any(|l| l["action"] == "resource"
        && l["decision"] == "deny"
        && l["target"] == "secret/key/root"));
}

#[tokio::test]
async fn report_data_mismatch_is_refused_and_audited() {
    let kbs = start_kbs(true);
    let mut client = KbsClient::new(&kbs.url);
    let err = client.attest(&WrongReportData, None).await.unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 401, ref detail, .. } if detail.contains("report_data")),
        "{err}"
    );
    assert!(matches!(
        client.get_resource("default/key/disk").await.unwrap_err(),
        KbsClientError::NotAttested
    ));
    let audit = kbs.audit_lines();
    let line = audit
        .iter()
        .find(|l| l["action"] == "attest")
        .expect("attest decision audited");
    assert_eq!(line["decision"], "deny");
    assert!(line["reason"].as_str().unwrap().contains("report_data"));
}

#[tokio::test]
async fn unlisted_init_data_is_refused() {
    let kbs = start_kbs(true);
    let other = INIT_DATA.replace("127.0.0.1", "10.0.0.1");
    let attester = SampleAttester {
        init_data_digest: Some(hex::encode(
            InitData::parse(other.as_bytes()).unwrap().digest(),
        )),
    };
    let err = KbsClient::new(&kbs.url)
        .attest(&attester, Some(&other))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 401, ref detail, .. } if detail.contains("init-data digest")),
        "{err}"
    );
}

#[tokio::test]
async fn sample_tee_is_refused_without_insecure_flag() {
    let kbs = start_kbs(false);
    let err = KbsClient::new(&kbs.url)
        .attest(&sample_attester(), Some(INIT_DATA))
        .await
        .unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 401, ref detail, .. } if detail.contains("sample tee refused")),
        "{err}"
    );
    let audit = kbs.audit_lines();
    assert_eq!(audit[0]["action"], "auth");
    assert_eq!(audit[0]["decision"], "deny");
}

fn cookie_of(resp: &reqwest::Response) -> String {
    let v = resp.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap();
    v.split(';').next().unwrap().to_owned()
}

#[tokio::test]
async fn replayed_attestation_and_malformed_requests_are_refused() {
    install_ring_provider();
    let kbs = start_kbs(true);
    let http = reqwest::Client::new();
    let auth = |body: String| {
        http.post(format!("{}/kbs/v0/auth", kbs.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    // Malformed JSON and wrong version.
    let r = auth("{not json".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = auth(json!({"version": "0.1.0", "tee": "sample", "extra-params": ""}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r =
        auth(json!({"version": PROTOCOL_VERSION, "tee": "sample", "extra-params": ""}).to_string())
            .await
            .unwrap();
    assert_eq!(r.status(), 200);
    let cookie = cookie_of(&r);
    assert!(cookie.starts_with(SESSION_COOKIE));
    let challenge: Value = r.json().await.unwrap();
    let nonce = challenge["nonce"].as_str().unwrap();

    let key = TeeKeyPair::generate_ec();
    let jwk = key.public_jwk();
    let rd = report_data(nonce, &jwk, "").unwrap();
    let attestation = json!({
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": SampleAttester::default().evidence(&rd).unwrap(),
                          "additional_evidence": ""},
    });
    let attest = |body: String| {
        http.post(format!("{}/kbs/v0/attest", kbs.url))
            .header("content-type", "application/json")
            .header("cookie", cookie.clone())
            .body(body)
            .send()
    };
    // Malformed JWK: refused, and the challenge is spent.
    let mut bad_key = attestation.clone();
    bad_key["runtime-data"]["tee-pubkey"]["x"] = "!!".into();
    let r = attest(bad_key.to_string()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = attest(attestation.to_string()).await.unwrap();
    assert_eq!(r.status(), 401, "challenge must be single use");

    // A fresh session: the genuine attestation passes once, a replay fails.
    let r =
        auth(json!({"version": PROTOCOL_VERSION, "tee": "sample", "extra-params": ""}).to_string())
            .await
            .unwrap();
    let cookie2 = cookie_of(&r);
    let nonce2 = r.json::<Value>().await.unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let rd2 = report_data(&nonce2, &jwk, "").unwrap();
    let attestation2 = json!({
        "runtime-data": {"nonce": nonce2, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": SampleAttester::default().evidence(&rd2).unwrap(),
                          "additional_evidence": ""},
    });
    let send2 = || {
        http.post(format!("{}/kbs/v0/attest", kbs.url))
            .header("content-type", "application/json")
            .header("cookie", cookie2.clone())
            .body(attestation2.to_string())
            .send()
    };
    assert_eq!(send2().await.unwrap().status(), 200);
    let replay = send2().await.unwrap();
    assert_eq!(replay.status(), 401);
    let detail: Value = replay.json().await.unwrap();
    assert!(detail["detail"].as_str().unwrap().contains("replayed"));

    // Unknown cookie and no cookie at all.
    let r = http
        .get(format!("{}/kbs/v0/resource/default/key/disk", kbs.url))
        .header("cookie", format!("{SESSION_COOKIE}=deadbeef"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .get(format!("{}/kbs/v0/resource/default/key/disk", kbs.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn expired_session_is_refused_and_token_works_until_expiry() {
    install_ring_provider();
    let kbs = start_kbs_with(true, &["--session-ttl-secs", "2"]);
    let mut client = KbsClient::new(&kbs.url);
    let token = client
        .attest(&sample_attester(), Some(INIT_DATA))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/kbs/v0/resource/default/key/disk", kbs.url);
    // The token stands in for the cookie.
    let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let forged = format!("{}x", token);
    let r = http.get(&url).bearer_auth(&forged).send().await.unwrap();
    assert_eq!(r.status(), 401);

    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let err = client.get_resource("default/key/disk").await.unwrap_err();
    assert!(
        matches!(err, KbsClientError::Refused { status: 401, ref detail, .. } if detail.contains("expired")),
        "{err}"
    );
    let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let detail: Value = r.json().await.unwrap();
    assert!(
        detail["detail"].as_str().unwrap().contains("expired"),
        "{detail}"
    );
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &std::path::Path) -> Result<(), String> {
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let steps: [&[&str]; 3] = [
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cloister test ca",
        ],
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| format!("openssl not runnable (Debian package openssl): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "openssl {} failed: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

#[tokio::test]
async fn https_with_rustls_serves_the_whole_flow() {
    let certs = tempfile::tempdir().unwrap();
    if let Err(reason) = make_certs(certs.path()) {
        eprintln!("SKIP: {reason}");
        return;
    }
    let cert = certs.path().join("srv.pem");
    let key = certs.path().join("srv.key");
    let kbs = start_kbs_with(
        true,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(kbs.url.starts_with("https://"), "{}", kbs.url);
    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    let mut client = KbsClient::with_ca(&kbs.url, &ca).unwrap();
    client
        .attest(&sample_attester(), Some(INIT_DATA))
        .await
        .unwrap();
    assert_eq!(
        client.get_resource("default/key/disk").await.unwrap(),
        b"0123456789abcdef disk key"
    );

    // A client trusting another CA must not talk to this server.
    let other = tempfile::tempdir().unwrap();
    make_certs(other.path()).unwrap();
    let other_ca = std::fs::read(other.path().join("ca.pem")).unwrap();
    let err = KbsClient::with_ca(&kbs.url, &other_ca)
        .unwrap()
        .attest(&sample_attester(), Some(INIT_DATA))
        .await
        .unwrap_err();
    assert!(matches!(err, KbsClientError::Http { .. }), "{err}");
    // Nor may it fall back to plain http.
    assert!(KbsClient::with_ca(&kbs.url.replace("https", "http"), &ca)
        .unwrap()
        .attest(&sample_attester(), None)
        .await
        .is_err());
}

#[test]
fn init_data_digest_tool_prints_the_binding_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("init.toml");
    std::fs::write(&file, INIT_DATA).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloister-kbs"))
        .arg("init-data-digest")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let init = InitData::parse(INIT_DATA.as_bytes()).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("digest {}", hex::encode(init.digest()))));
    assert!(text.contains(&format!(
        "snp_host_data {}",
        hex::encode(init.snp_host_data())
    )));
    // Serving without --policy is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_cloister-kbs"))
        .args(["--resources", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy"));
}

#[test]
fn binary_refuses_plain_http_on_non_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.toml");
    std::fs::write(&policy, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cloister-kbs"))
        .args([
            "--listen",
            "0.0.0.0:0",
            "--resources",
            "/nonexistent",
            "--policy",
        ])
        .arg(&policy)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing plain http"));
}
