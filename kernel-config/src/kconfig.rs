//! Kconfig files: the guest fragment (`guest.config`) and a kernel's `.config`.
//!
//! Both use the same line format: `CONFIG_NAME=value` sets an option and
//! `# CONFIG_NAME is not set` turns it off; any other `#` line is a comment.
//! An option absent from a `.config` is off as well (Kconfig leaves out
//! options whose dependencies are not met), so "not set" and "absent" both
//! read as `n` here.

use std::collections::BTreeMap;
use std::fmt;

/// The value an option has when it is off.
pub const OFF: &str = "n";

/// Errors reading a Kconfig file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KconfigError {
    #[error("line {line}: '{text}' is neither CONFIG_NAME=value, '# CONFIG_NAME is not set' nor a comment")]
    MalformedLine { line: usize, text: String },
    #[error("line {line}: option {name} is set a second time (first on line {first_line})")]
    DuplicateOption {
        name: String,
        line: usize,
        first_line: usize,
    },
}

/// The options a Kconfig file sets, by name (`CONFIG_` prefix included), in
/// name order. Off options have the value [`OFF`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kconfig {
    options: BTreeMap<String, Setting>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    value: String,
    line: usize,
}

impl Kconfig {
    /// Parses the text of a fragment or `.config`.
    pub fn parse(text: &str) -> Result<Self, KconfigError> {
        let mut options: BTreeMap<String, Setting> = BTreeMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let Some((name, value)) =
                parse_line(raw.trim()).map_err(|()| KconfigError::MalformedLine {
                    line,
                    text: raw.to_string(),
                })?
            else {
                continue;
            };
            if let Some(first) = options.get(name) {
                return Err(KconfigError::DuplicateOption {
                    name: name.to_string(),
                    line,
                    first_line: first.line,
                });
            }
            options.insert(
                name.to_string(),
                Setting {
                    value: value.to_string(),
                    line,
                },
            );
        }
        Ok(Self { options })
    }

    /// The value of `name` (e.g. `CONFIG_SMP`): `y`, a number, a quoted
    /// string, or [`OFF`] both when it is "not set" and when it is absent.
    pub fn value(&self, name: &str) -> &str {
        self.options.get(name).map_or(OFF, |s| s.value.as_str())
    }

    /// Whether the file mentions `name` at all (set or "is not set").
    pub fn mentions(&self, name: &str) -> bool {
        self.options.contains_key(name)
    }

    /// All options in name order with their values.
    pub fn options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options
            .iter()
            .map(|(name, s)| (name.as_str(), s.value.as_str()))
    }

    /// Number of options the file mentions.
    pub fn len(&self) -> usize {
        self.options.len()
    }

    /// Whether the file mentions no option.
    pub fn is_empty(&self) -> bool {
        self.options.is_empty()
    }

    /// Every option of `self` (the wanted fragment) whose value in `config`
    /// differs, in name order. Empty when `config` has all of them as asked.
    pub fn mismatches_in(&self, config: &Kconfig) -> Vec<Mismatch> {
        self.options()
            .filter_map(|(name, wanted)| {
                let got = config.value(name);
                (got != wanted).then(|| Mismatch {
                    name: name.to_string(),
                    wanted: wanted.to_string(),
                    got: got.to_string(),
                    present: config.mentions(name),
                })
            })
            .collect()
    }
}

/// One option that did not land in a `.config` as the fragment asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// `CONFIG_…` name.
    pub name: String,
    /// What the fragment asks for.
    pub wanted: String,
    /// What the `.config` has ([`OFF`] when absent).
    pub got: String,
    /// Whether the `.config` mentions the option at all; an absent option
    /// usually means a dependency is missing.
    pub present: bool,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: wanted {}, got {}", self.name, self.wanted, self.got)?;
        if !self.present {
            write!(f, " (absent: a dependency is not met)")?;
        }
        Ok(())
    }
}

/// `Ok(None)` for blank lines and comments, `Ok(Some((name, value)))` for a
/// setting, `Err(())` for anything else.
fn parse_line(line: &str) -> Result<Option<(&str, &str)>, ()> {
    if line.is_empty() {
        return Ok(None);
    }
    if let Some(comment) = line.strip_prefix('#') {
        let off = comment
            .trim_start()
            .strip_suffix(" is not set")
            .filter(|name| is_option_name(name));
        return Ok(off.map(|name| (name, OFF)));
    }
    let (name, value) = line.split_once('=').ok_or(())?;
    if !is_option_name(name) || value.is_empty() {
        return Err(());
    }
    Ok(Some((name, value)))
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_set_not_set_and_skips_comments() {
        let text = "# a comment\n\nCONFIG_SMP=y\n# CONFIG_VT is not set\nCONFIG_NR_CPUS=64\nCONFIG_CMDLINE=\"a b\"\n";
        let config = Kconfig::parse(text).unwrap();
        assert_eq!(config.len(), 4);
        assert_eq!(config.value("CONFIG_SMP"), "y");
        assert_eq!(config.value("CONFIG_VT"), OFF);
        assert!(config.mentions("CONFIG_VT"));
        assert_eq!(config.value("CONFIG_NR_CPUS"), "64");
        assert_eq!(config.value("CONFIG_CMDLINE"), "\"a b\"");
        assert_eq!(config.value("CONFIG_ABSENT"), OFF);
        assert!(!config.mentions("CONFIG_ABSENT"));
    }

    #[test]
    fn parse_with_bad_line_returns_malformed_line_with_number() {
        let err = Kconfig::parse("CONFIG_SMP=y\nSMP=y\n").unwrap_err();
        assert_eq!(
            err,
            KconfigError::MalformedLine {
                line: 2,
                text: "SMP=y".to_string()
            }
        );
        assert!(Kconfig::parse("CONFIG_=y").is_err());
        assert!(Kconfig::parse("CONFIG_SMP=").is_err());
        assert!(Kconfig::parse("CONFIG_SMP").is_err());
    }

    #[test]
    fn parse_with_option_twice_returns_duplicate() {
        let err = Kconfig::parse("CONFIG_SMP=y\n# CONFIG_SMP is not set\n").unwrap_err();
        assert_eq!(
            err,
            KconfigError::DuplicateOption {
                name: "CONFIG_SMP".to_string(),
                line: 2,
                first_line: 1
            }
        );
    }

    #[test]
    fn mismatches_lists_missing_and_differing_options() {
        let fragment = Kconfig::parse(
            "CONFIG_SMP=y\nCONFIG_PVH=y\n# CONFIG_VT is not set\n# CONFIG_INPUT is not set\nCONFIG_NR_CPUS=64\n",
        )
        .unwrap();
        // VT absent counts as off; INPUT is on; PVH missing; NR_CPUS differs.
        let config = Kconfig::parse("CONFIG_SMP=y\nCONFIG_INPUT=y\nCONFIG_NR_CPUS=2\n").unwrap();
        let found: Vec<String> = fragment
            .mismatches_in(&config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "CONFIG_INPUT: wanted n, got y",
                "CONFIG_NR_CPUS: wanted 64, got 2",
                "CONFIG_PVH: wanted y, got n (absent: a dependency is not met)",
            ]
        );
    }

    #[test]
    fn mismatches_is_empty_when_config_has_everything() {
        let fragment = Kconfig::parse("CONFIG_SMP=y\n# CONFIG_VT is not set\n").unwrap();
        let config =
            Kconfig::parse("CONFIG_SMP=y\n# CONFIG_VT is not set\nCONFIG_X86=y\n").unwrap();
        assert!(fragment.mismatches_in(&config).is_empty());
    }

    #[test]
    fn guest_fragment_parses() {
        let fragment = Kconfig::parse(crate::GUEST_FRAGMENT).unwrap();
        assert_eq!(fragment.value("CONFIG_PVH"), "y");
        assert_eq!(fragment.value("CONFIG_VIRTIO_VSOCKETS"), "y");
        assert!(fragment.mentions("CONFIG_LEGACY_PTYS"));
        assert_eq!(fragment.value("CONFIG_MODULES"), OFF);
    }
}
