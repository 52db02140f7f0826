//! RFC 8785 JSON Canonicalization Scheme (JCS): object members sorted by
//! their UTF-16 code units, no whitespace, strings escaped as ECMAScript's
//! `JSON.stringify` does, numbers in ECMAScript's shortest form.
//!
//! REPORT_DATA binds the hash of a canonical document, so the attester and
//! the verifier must produce the same bytes from the same JSON value.

use serde_json::Value;
use std::fmt::Write as _;
use thiserror::Error;

/// Errors from canonicalisation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CanonicalJsonError {
    /// NaN or infinity have no JSON form.
    #[error("number {0} has no canonical json form")]
    Number(String),
}

/// Canonical form of `value`.
pub fn canonicalize(value: &Value) -> Result<String, CanonicalJsonError> {
    let mut out = String::new();
    write_value(value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut String) -> Result<(), CanonicalJsonError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                // Above 2^53 ECMAScript would round; serialise what the f64 is.
                out.push_str(&es_number(u as f64)?);
            } else {
                let f = n
                    .as_f64()
                    .ok_or_else(|| CanonicalJsonError::Number(n.to_string()))?;
                out.push_str(&es_number(f)?);
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_value(&map[key.as_str()], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\u{09}' => out.push_str("\\t"),
            '\u{0A}' => out.push_str("\\n"),
            '\u{0C}' => out.push_str("\\f"),
            '\u{0D}' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// ECMAScript `Number.prototype.toString` for finite doubles.
fn es_number(f: f64) -> Result<String, CanonicalJsonError> {
    if !f.is_finite() {
        return Err(CanonicalJsonError::Number(f.to_string()));
    }
    if f == 0.0 {
        return Ok("0".into());
    }
    let sign = if f < 0.0 { "-" } else { "" };
    // `{:e}` yields the shortest round-trip digits: "d.ddde±x".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    let n = exp.parse::<i32>().unwrap_or(0) + 1;
    let body = if k <= n && n <= 21 {
        format!("{digits}{}", "0".repeat((n - k) as usize))
    } else if 0 < n && n <= 21 {
        format!("{}.{}", &digits[..n as usize], &digits[n as usize..])
    } else if -6 < n && n <= 0 {
        format!("0.{}{digits}", "0".repeat((-n) as usize))
    } else {
        let e = n - 1;
        let esign = if e < 0 { "-" } else { "+" };
        if k == 1 {
            format!("{digits}e{esign}{}", e.abs())
        } else {
            format!("{}.{}e{esign}{}", &digits[..1], &digits[1..], e.abs())
        }
    };
    Ok(format!("{sign}{body}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        let v = json!({"tee-pubkey": {"y": "2", "x": "1", "kty": "EC"}, "nonce": "abc", "additional-evidence": ""});
        assert_eq!(
            canonicalize(&v).unwrap(),
            r#"{"additional-evidence":"","nonce":"abc","tee-pubkey":{"kty":"EC","x":"1","y":"2"}}"#
        );
    }

    #[test]
    #[allow(clippy::excessive_precision)] // the RFC's literal, on purpose
    fn rfc8785_sample_numbers_and_strings() {
        // Values from RFC 8785 section 3.2.2 and appendix B.
        let v = json!({"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
                       "string": "\u{20ac}$\u{000F}\u{000a}A'\u{0042}\u{0022}\u{005c}\\\"/",
                       "literals": [null, true, false]});
        assert_eq!(
            canonicalize(&v).unwrap(),
            r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
        );
    }

    #[test]
    fn sorts_by_utf16_code_units() {
        // U+1F600 is the surrogate pair D83D DE00 in UTF-16 and so sorts
        // before U+FB33, although its code point is larger (RFC 8785 3.2.3).
        let v = json!({"\u{fb33}": 1, "\u{1f600}": 2, "\r": 3, "1": 4});
        assert_eq!(
            canonicalize(&v).unwrap(),
            "{\"\\r\":3,\"1\":4,\"\u{1f600}\":2,\"\u{fb33}\":1}"
        );
    }

    #[test]
    fn es_number_edge_cases() {
        assert_eq!(es_number(1e21).unwrap(), "1e+21");
        assert_eq!(es_number(1e20).unwrap(), "100000000000000000000");
        assert_eq!(es_number(1e-7).unwrap(), "1e-7");
        assert_eq!(es_number(1.5e-6).unwrap(), "0.0000015");
        assert_eq!(es_number(-0.5).unwrap(), "-0.5");
        assert!(es_number(f64::NAN).is_err());
    }
}
