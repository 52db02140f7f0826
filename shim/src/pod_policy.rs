//! A pod's own agent policy: the `io.cloister.policy` annotation (base64
//! of the Rego text, as `cloister policy generate --base64` prints it),
//! sent to the agent with `SetPolicy` before `SetupSandbox`, so every
//! request of the pod is decided by it. The agent checks the text compiles
//! and that the policy in force lets it be replaced.

use std::collections::HashMap;

use base64::Engine as _;
use cloister_protocol::annotations::POLICY;

/// A policy annotation that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PodPolicyError {
    #[error("annotation {POLICY} is not base64: {0}")]
    Base64(base64::DecodeError),
    #[error("annotation {POLICY} does not decode to UTF-8 text")]
    NotText,
}

/// The pod's policy text, if its annotations carry one.
pub fn policy_from_annotations(
    annotations: &HashMap<String, String>,
) -> Result<Option<String>, PodPolicyError> {
    let Some(encoded) = annotations.get(POLICY) else {
        return Ok(None);
    };
    // Whitespace from line-wrapped base64 (`base64` without -w0).
    let compact: String = encoded.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(PodPolicyError::Base64)?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| PodPolicyError::NotText)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(value: &str) -> HashMap<String, String> {
        HashMap::from([(POLICY.to_owned(), value.to_owned())])
    }

    #[test]
    fn policy_is_decoded_even_when_line_wrapped() {
        let text = "package agent_policy\ndefault ExecProcessRequest := false\n";
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        let wrapped = format!("{}\n{}", &encoded[..20], &encoded[20..]);

        assert_eq!(
            policy_from_annotations(&annotations(&wrapped)).unwrap(),
            Some(text.to_owned())
        );
        assert_eq!(policy_from_annotations(&HashMap::new()).unwrap(), None);
    }

    #[test]
    fn bad_base64_names_the_annotation() {
        let err = policy_from_annotations(&annotations("not base64!")).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("annotation io.cloister.policy is not base64"));
    }
}
