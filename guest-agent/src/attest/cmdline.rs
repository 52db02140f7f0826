//! Which TEE the guest runs in, from the kernel command line
//! (`cloister.tee=snp|tdx|sample`). In a real TEE launch the command line
//! is part of the measurement, so the host cannot quietly turn a
//! confidential pod into an ordinary one without the KBS noticing.

use cloister_protocol::confidential::{SAMPLE_HOST_DATA_PARAM, TEE_PARAM};

use super::AttestError;

/// The guest's TEE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestTee {
    /// AMD SEV-SNP: init-data bound in the report's HOST_DATA.
    Snp,
    /// Intel TDX: init-data bound in MRCONFIGID.
    Tdx,
    /// No hardware (tests only): the "bound" init-data digest is the hex
    /// value the host wrote on the command line, which proves nothing.
    Sample { bound_digest: Option<Vec<u8>> },
}

impl GuestTee {
    /// The TEE named on `cmdline`, or `None` for an ordinary guest.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, AttestError> {
        let mut tee = None;
        let mut sample_digest = None;
        for word in cmdline.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            if key == TEE_PARAM {
                tee = Some(value.to_owned());
            } else if key == SAMPLE_HOST_DATA_PARAM {
                let bytes = hex::decode(value).map_err(|_| AttestError::Cmdline {
                    param: SAMPLE_HOST_DATA_PARAM,
                    value: value.to_owned(),
                    reason: "not hex",
                })?;
                sample_digest = Some(bytes);
            }
        }
        match tee.as_deref() {
            None => {
                if let Some(digest) = sample_digest {
                    return Err(AttestError::Cmdline {
                        param: SAMPLE_HOST_DATA_PARAM,
                        value: hex::encode(digest),
                        reason: "given without cloister.tee=sample",
                    });
                }
                Ok(None)
            }
            Some("snp") | Some("tdx") if sample_digest.is_some() => Err(AttestError::Cmdline {
                param: SAMPLE_HOST_DATA_PARAM,
                value: hex::encode(sample_digest.unwrap_or_default()),
                reason: "only the sample tee takes its binding from the command line",
            }),
            Some("snp") => Ok(Some(Self::Snp)),
            Some("tdx") => Ok(Some(Self::Tdx)),
            Some("sample") => Ok(Some(Self::Sample {
                bound_digest: sample_digest,
            })),
            Some(other) => Err(AttestError::Cmdline {
                param: TEE_PARAM,
                value: other.to_owned(),
                reason: "expected snp, tdx or sample",
            }),
        }
    }

    /// Name as the KBS protocol spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Snp => "snp",
            Self::Tdx => "tdx",
            Self::Sample { .. } => "sample",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_guest_has_no_tee() {
        assert_eq!(
            GuestTee::from_cmdline("console=ttyS0 agent.log=debug").unwrap(),
            None
        );
    }

    #[test]
    fn tees_are_read() {
        assert_eq!(
            GuestTee::from_cmdline("quiet cloister.tee=snp").unwrap(),
            Some(GuestTee::Snp)
        );
        assert_eq!(
            GuestTee::from_cmdline("cloister.tee=tdx").unwrap(),
            Some(GuestTee::Tdx)
        );
        assert_eq!(
            GuestTee::from_cmdline("cloister.tee=sample cloister.sample_host_data=0aff").unwrap(),
            Some(GuestTee::Sample {
                bound_digest: Some(vec![0x0a, 0xff])
            })
        );
        assert_eq!(
            GuestTee::from_cmdline("cloister.tee=sample").unwrap(),
            Some(GuestTee::Sample { bound_digest: None })
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        for (cmdline, named) in [
            ("cloister.tee=sev", "cloister.tee"),
            (
                "cloister.tee=sample cloister.sample_host_data=xyz",
                "not hex",
            ),
            ("cloister.sample_host_data=00", "without cloister.tee"),
            (
                "cloister.tee=snp cloister.sample_host_data=00",
                "only the sample",
            ),
        ] {
            let err = GuestTee::from_cmdline(cmdline).unwrap_err().to_string();
            assert!(err.contains(named), "{cmdline}: {err}");
        }
    }
}
