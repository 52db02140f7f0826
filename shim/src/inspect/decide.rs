//! What the shim does with a report at create, per `[inspection]`.

use crate::config::{InspectionMode, InspectionSection};

use super::{Finding, InspectionReport};

/// The shim's answer to a container's findings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to say (no findings, or inspection off).
    Allow,
    /// Create goes ahead; these findings go to an event and the audit trail.
    Warn(Vec<Finding>),
    /// Create fails with these findings (those listed in `refuse_on`).
    Refuse(Vec<Finding>),
}

/// `off` allows everything; `warn` warns about every finding; `refuse`
/// refuses when a finding's id is in `refuse_on` (naming only those) and
/// otherwise warns like `warn`.
pub fn decide(report: &InspectionReport, section: &InspectionSection) -> Decision {
    match section.mode {
        InspectionMode::Off => return Decision::Allow,
        InspectionMode::Refuse => {
            let refused: Vec<Finding> = report
                .findings
                .iter()
                .filter(|f| section.refuse_on.contains(&f.id))
                .cloned()
                .collect();
            if !refused.is_empty() {
                return Decision::Refuse(refused);
            }
        }
        InspectionMode::Warn => {}
    }
    if report.findings.is_empty() {
        Decision::Allow
    } else {
        Decision::Warn(report.findings.clone())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::inspect;
    use super::super::FindingId;
    use super::*;

    fn section(mode: InspectionMode, refuse_on: &[FindingId]) -> InspectionSection {
        InspectionSection {
            mode,
            refuse_on: refuse_on.to_vec(),
        }
    }

    fn privileged_report() -> InspectionReport {
        inspect(json!({"process": {"capabilities": {"bounding": ["CAP_SYS_ADMIN"]}}}))
    }

    #[test]
    fn off_allows_even_privileged() {
        let decision = decide(
            &privileged_report(),
            &section(InspectionMode::Off, &[FindingId::Privileged]),
        );
        assert_eq!(decision, Decision::Allow);
    }

    #[test]
    fn warn_passes_every_finding_on() {
        let report = privileged_report();
        let decision = decide(
            &report,
            &section(InspectionMode::Warn, &[FindingId::Privileged]),
        );
        assert_eq!(decision, Decision::Warn(report.findings.clone()));
    }

    #[test]
    fn refuse_names_only_the_listed_findings() {
        let decision = decide(
            &privileged_report(),
            &section(
                InspectionMode::Refuse,
                &[FindingId::Privileged, FindingId::HostNamespace],
            ),
        );
        let Decision::Refuse(findings) = decision else {
            panic!("not refused: {decision:?}");
        };
        // No linux.namespaces at all: five host namespaces, plus privileged.
        assert!(findings.iter().any(|f| f.id == FindingId::Privileged));
        assert_eq!(
            findings
                .iter()
                .filter(|f| f.id == FindingId::HostNamespace)
                .count(),
            5
        );
        assert!(findings
            .iter()
            .all(|f| matches!(f.id, FindingId::Privileged | FindingId::HostNamespace)));
    }

    #[test]
    fn refuse_without_listed_findings_warns() {
        let report = privileged_report();
        let decision = decide(
            &report,
            &section(InspectionMode::Refuse, &[FindingId::HostPathMount]),
        );
        assert_eq!(decision, Decision::Warn(report.findings.clone()));
    }

    #[test]
    fn clean_report_is_allowed_in_every_mode() {
        let clean = InspectionReport::default();
        for mode in [
            InspectionMode::Off,
            InspectionMode::Warn,
            InspectionMode::Refuse,
        ] {
            assert_eq!(
                decide(&clean, &section(mode, &FindingId::ALL)),
                Decision::Allow
            );
        }
    }
}
