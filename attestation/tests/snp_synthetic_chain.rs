//! Paths the recorded evidence does not cover — VLEK-signed reports (ASVK
//! chain) and Turin's TCB layout with its FMC SPL and 8-byte hwID — checked
//! with a stand-in AMD hierarchy made by the openssl CLI (RSA-PSS SHA-384,
//! salt 48, AMD's extension OIDs) and reports signed here with P-384.
//!
//! Needs the Debian package `openssl`; without it the tests print SKIP.

use cloister_attestation::certs::Cert;
use cloister_attestation::snp::{
    verify_report, AmdRoots, ChainError, Generation, SnpExpectations, SnpVerifyError,
};
use p384::ecdsa::signature::Signer as _;
use p384::pkcs8::DecodePrivateKey as _;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

const PSS: &[&str] = &[
    "-sha384",
    "-sigopt",
    "rsa_padding_mode:pss",
    "-sigopt",
    "rsa_pss_saltlen:48",
    "-sigopt",
    "rsa_mgf1_md:sha384",
];

fn openssl(dir: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| format!("openssl not runnable (Debian package openssl): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "openssl {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// ARK (self-signed), ASK and ASVK for `gen`, RSA-PSS like AMD's.
fn make_roots(dir: &Path, gen: &str) -> Result<(), String> {
    let mut ark = vec![
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ark.key", "-out", "ark.pem",
        "-days", "3",
    ];
    let subj = format!("/CN=ARK-{gen}");
    ark.extend(["-subj", &subj]);
    ark.extend(PSS);
    openssl(dir, &ark)?;
    for (name, cn) in [
        ("ask", format!("SEV-{gen}")),
        ("asvk", format!("SEV-VLEK-{gen}")),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        openssl(
            dir,
            &[
                "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
                &subj,
            ],
        )?;
        let mut sign = vec![
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ark.pem",
            "-CAkey",
            "ark.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "3",
        ];
        sign.extend(PSS);
        openssl(dir, &sign)?;
    }
    let bundle = ["ask.pem", "ark.pem", "asvk.pem"]
        .iter()
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
        .collect::<String>();
    std::fs::write(dir.join("bundle.pem"), bundle).unwrap();
    Ok(())
}

/// An endorsement key certificate (CN `cn`) signed by `issuer` with the
/// given extension lines; returns (certificate, signing key).
fn make_endorsement(
    dir: &Path,
    cn: &str,
    issuer: &str,
    extensions: &str,
) -> Result<(Cert, p384::ecdsa::SigningKey), String> {
    std::fs::write(dir.join("ek.ext"), extensions).unwrap();
    let subj = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-384",
            "-nodes",
            "-keyout",
            "ek.key",
            "-out",
            "ek.csr",
            "-subj",
            &subj,
        ],
    )?;
    let ca = format!("{issuer}.pem");
    let ca_key = format!("{issuer}.key");
    let mut sign = vec![
        "x509",
        "-req",
        "-in",
        "ek.csr",
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        "ek.pem",
        "-days",
        "3",
        "-extfile",
        "ek.ext",
    ];
    sign.extend(PSS);
    openssl(dir, &sign)?;
    let cert = Cert::from_pem_bundle(&std::fs::read(dir.join("ek.pem")).unwrap())
        .unwrap()
        .remove(0);
    let key_pem = std::fs::read_to_string(dir.join("ek.key")).unwrap();
    let key = p384::ecdsa::SigningKey::from_pkcs8_pem(&key_pem).unwrap();
    Ok((cert, key))
}

/// A report of `version` with the given raw reported TCB, CPUID and chip
/// ID, signed by `key` over bytes 0x000-0x29F (r, s little-endian).
fn signed_report(
    key: &p384::ecdsa::SigningKey,
    version: u32,
    signing_key_field: u32,
    tcb: u64,
    cpuid: (u8, u8),
    chip_id: &[u8],
) -> Vec<u8> {
    let mut r = vec![0u8; 0x4A0];
    r[0..4].copy_from_slice(&version.to_le_bytes());
    r[0x08..0x10].copy_from_slice(&0x3_0000u64.to_le_bytes()); // policy: reserved bit 17 + SMT
    r[0x34..0x38].copy_from_slice(&1u32.to_le_bytes());
    r[0x48..0x4C].copy_from_slice(&(signing_key_field << 2).to_le_bytes());
    r[0x50..0x90].copy_from_slice(&[0xAB; 64]);
    for off in [0x38, 0x180, 0x1E0, 0x1F0] {
        r[off..off + 8].copy_from_slice(&tcb.to_le_bytes());
    }
    r[0x188] = cpuid.0;
    r[0x189] = cpuid.1;
    r[0x1A0..0x1A0 + chip_id.len()].copy_from_slice(chip_id);
    let signature: p384::ecdsa::Signature = key.sign(&r[..0x2A0]);
    let (sig_r, sig_s) = signature.split_bytes();
    for (i, b) in sig_r.iter().rev().enumerate() {
        r[0x2A0 + i] = *b;
    }
    for (i, b) in sig_s.iter().rev().enumerate() {
        r[0x2A0 + 72 + i] = *b;
    }
    r
}

const MILAN_TCB_EXT: &str = "1.3.6.1.4.1.3704.1.3.1=DER:02:01:03
1.3.6.1.4.1.3704.1.3.2=DER:02:01:00
1.3.6.1.4.1.3704.1.3.3=DER:02:01:08
1.3.6.1.4.1.3704.1.3.8=DER:02:02:00:CE
";
/// bl 3, tee 0, snp 8, ucode 0xCE in Milan's layout.
const MILAN_TCB: u64 = 0xCE08_0000_0000_0003;

#[test]
fn vlek_signed_report_verifies_through_the_asvk() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = make_roots(dir.path(), "Milan") {
        eprintln!("SKIP: {reason}");
        return;
    }
    let roots = AmdRoots::from_pem_bundle(
        Generation::Milan,
        &std::fs::read(dir.path().join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let (vlek, key) = make_endorsement(dir.path(), "SEV-VLEK", "asvk", MILAN_TCB_EXT).unwrap();
    let now = SystemTime::now();
    // v3 report naming a Milan CPU (family 19h model 01h), signing_key = 1 (VLEK).
    let report = signed_report(&key, 3, 1, MILAN_TCB, (0x19, 0x01), &[]);
    let expect = SnpExpectations {
        report_data: Some([0xAB; 64]),
        ..Default::default()
    };
    let verified = verify_report(&report, &vlek, &roots, &expect, now).unwrap();
    assert_eq!(verified.reported_tcb.microcode, 0xCE);

    // The same VLEK certificate issued by the ASK instead of the ASVK.
    let (wrong_issuer, key2) =
        make_endorsement(dir.path(), "SEV-VLEK", "ask", MILAN_TCB_EXT).unwrap();
    let report2 = signed_report(&key2, 3, 1, MILAN_TCB, (0x19, 0x01), &[]);
    let err = verify_report(&report2, &wrong_issuer, &roots, &expect, now).unwrap_err();
    assert!(
        matches!(err, SnpVerifyError::Chain(ChainError::Cert(_))),
        "{err}"
    );

    // A report signed by another key.
    let stranger = p384::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let forged = signed_report(&stranger, 3, 1, MILAN_TCB, (0x19, 0x01), &[]);
    assert_eq!(
        verify_report(&forged, &vlek, &roots, &expect, now).unwrap_err(),
        SnpVerifyError::Signature
    );

    // A report claiming another TCB than the VLEK was issued for.
    let newer = signed_report(&key, 3, 1, MILAN_TCB + 1, (0x19, 0x01), &[]);
    assert!(matches!(
        verify_report(&newer, &vlek, &roots, &expect, now).unwrap_err(),
        SnpVerifyError::TcbMismatch {
            field: "bootloader",
            ..
        }
    ));

    // A VLEK report presented with the VLEK called a VCEK (signing_key = 0).
    let as_vcek = signed_report(&key, 3, 0, MILAN_TCB, (0x19, 0x01), &[]);
    assert!(matches!(
        verify_report(&as_vcek, &vlek, &roots, &expect, now).unwrap_err(),
        SnpVerifyError::Chain(ChainError::EndorsementKind { .. })
    ));
}

#[test]
fn turin_report_uses_fmc_layout_and_8_byte_hwid() {
    let dir = tempfile::tempdir().unwrap();
    if let Err(reason) = make_roots(dir.path(), "Turin") {
        eprintln!("SKIP: {reason}");
        return;
    }
    let roots = AmdRoots::from_pem_bundle(
        Generation::Turin,
        &std::fs::read(dir.path().join("bundle.pem")).unwrap(),
    )
    .unwrap();
    let chip = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let ext = "1.3.6.1.4.1.3704.1.3.1=DER:02:01:03
1.3.6.1.4.1.3704.1.3.2=DER:02:01:00
1.3.6.1.4.1.3704.1.3.3=DER:02:01:05
1.3.6.1.4.1.3704.1.3.8=DER:02:01:44
1.3.6.1.4.1.3704.1.3.9=DER:02:01:01
1.3.6.1.4.1.3704.1.4=DER:04:08:01:02:03:04:05:06:07:08
";
    let (vcek, key) = make_endorsement(dir.path(), "SEV-VCEK", "ask", ext).unwrap();
    // Turin layout: fmc 1, bl 3, tee 0, snp 5 in bytes 0-3, ucode 0x44 in byte 7.
    let tcb = u64::from_le_bytes([1, 3, 0, 5, 0, 0, 0, 0x44]);
    let now = SystemTime::now();
    let report = signed_report(&key, 5, 0, tcb, (0x1A, 0x02), &chip);
    let verified = verify_report(&report, &vcek, &roots, &SnpExpectations::default(), now).unwrap();
    assert_eq!(verified.generation, Generation::Turin);
    assert_eq!(verified.reported_tcb.fmc, Some(1));
    assert_eq!(verified.reported_tcb.snp, 5);

    let mut other_chip = chip;
    other_chip[7] ^= 0xFF;
    let moved = signed_report(&key, 5, 0, tcb, (0x1A, 0x02), &other_chip);
    assert!(matches!(
        verify_report(&moved, &vcek, &roots, &SnpExpectations::default(), now).unwrap_err(),
        SnpVerifyError::HwId { .. }
    ));
    let wrong_fmc = u64::from_le_bytes([2, 3, 0, 5, 0, 0, 0, 0x44]);
    let report = signed_report(&key, 5, 0, wrong_fmc, (0x1A, 0x02), &chip);
    assert!(matches!(
        verify_report(&report, &vcek, &roots, &SnpExpectations::default(), now).unwrap_err(),
        SnpVerifyError::TcbMismatch { field: "fmc", .. }
    ));
    // Milan roots for a Turin report.
    let milan = AmdRoots::builtin(Generation::Milan).unwrap();
    let report = signed_report(&key, 5, 0, tcb, (0x1A, 0x02), &chip);
    assert!(matches!(
        verify_report(&report, &vcek, &milan, &SnpExpectations::default(), now).unwrap_err(),
        SnpVerifyError::GenerationMismatch { .. }
    ));
}
