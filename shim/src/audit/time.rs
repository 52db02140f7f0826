//! Times in audit records: RFC 3339 in UTC with milliseconds
//! (`2026-11-24T04:30:00.123Z`), and the `--since`/`--until` forms of
//! `cloister audit` (RFC 3339 with any offset, or a duration back from now
//! such as `10m`).
//!
//! Written here rather than taken from a date crate: the shim needs only
//! these two conversions, and the civil-date arithmetic is a dozen lines
//! (Howard Hinnant's `days_from_civil` / `civil_from_days`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A time `cloister audit` cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("time {0:?} is not RFC 3339 (2026-11-24T04:30:00Z) or a duration back from now (90s, 10m, 2h, 1d)")]
    Unreadable(String),
    #[error("time {0:?} is before 1970")]
    BeforeEpoch(String),
}

/// `2026-11-24T04:30:00.123Z` for `time` (times before 1970 print as 1970).
pub fn format_rfc3339_millis(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX);
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// Reads an RFC 3339 time (`T` or space between date and time, optional
/// fraction, `Z` or `±HH:MM`).
pub fn parse_rfc3339(text: &str) -> Result<SystemTime, TimeError> {
    let bad = || TimeError::Unreadable(text.to_owned());
    let bytes = text.as_bytes();
    if bytes.len() < 20 || !matches!(bytes[10], b'T' | b't' | b' ') {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| -> Result<i64, TimeError> {
        let part = text.get(range).ok_or_else(bad)?;
        if !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<i64>().map_err(|_| bad())
    };
    if bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' || bytes[16] != b':' {
        return Err(bad());
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut rest = &text[19..];
    let mut nanos: u32 = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        // Nanosecond precision; further digits are dropped.
        for (i, b) in fraction.bytes().take(digits.min(9)).enumerate() {
            nanos += u32::from(b - b'0') * 10u32.pow(8 - u32::try_from(i).unwrap_or(8));
        }
        rest = &fraction[digits..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(bad()),
            };
            let offset = &rest[1..];
            if offset.len() != 5 || offset.as_bytes()[2] != b':' {
                return Err(bad());
            }
            let digits = |part: &str| -> Result<i64, TimeError> {
                if !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                part.parse::<i64>().map_err(|_| bad())
            };
            let (h, m) = (digits(&offset[..2])?, digits(&offset[3..])?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            sign * (h * 3600 + m * 60)
        }
    };
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second
        - offset_secs;
    let secs = u64::try_from(secs).map_err(|_| TimeError::BeforeEpoch(text.to_owned()))?;
    Ok(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// `--since`/`--until`: RFC 3339, or a duration back from `now` (`45s`,
/// `10m`, `2h`, `7d`).
pub fn parse_time_bound(text: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let text = text.trim();
    if let Some(unit) = text.chars().last().filter(char::is_ascii_alphabetic) {
        let count = &text[..text.len() - 1];
        if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
            let scale = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => return Err(TimeError::Unreadable(text.to_owned())),
            };
            let secs = count
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .ok_or_else(|| TimeError::Unreadable(text.to_owned()))?;
            return now
                .checked_sub(Duration::from_secs(secs))
                .filter(|t| *t >= UNIX_EPOCH)
                .ok_or_else(|| TimeError::BeforeEpoch(text.to_owned()));
        }
    }
    parse_rfc3339(text)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, millis * 1_000_000)
    }

    #[test]
    fn formats_utc_with_milliseconds() {
        assert_eq!(format_rfc3339_millis(at(0, 0)), "1970-01-01T00:00:00.000Z");
        // `date -u -d @1700000000` = 2023-11-14 22:13:20.
        assert_eq!(
            format_rfc3339_millis(at(1_700_000_000, 7)),
            "2023-11-14T22:13:20.007Z"
        );
        // A leap day.
        assert_eq!(
            format_rfc3339_millis(at(951_782_400, 999)),
            "2000-02-29T00:00:00.999Z"
        );
    }

    #[test]
    fn parse_inverts_format_across_dates() {
        for secs in [
            0,
            59,
            951_782_400,
            1_700_000_000,
            4_102_444_800,
            1_234_567_890,
        ] {
            let time = at(secs, 123);
            assert_eq!(parse_rfc3339(&format_rfc3339_millis(time)).unwrap(), time);
        }
    }

    #[test]
    fn parse_takes_offsets_fractions_and_a_space() {
        let utc = parse_rfc3339("2023-11-14T22:13:20Z").unwrap();
        assert_eq!(utc, at(1_700_000_000, 0));
        assert_eq!(parse_rfc3339("2023-11-15T00:13:20+02:00").unwrap(), utc);
        assert_eq!(parse_rfc3339("2023-11-14T21:13:20-01:00").unwrap(), utc);
        assert_eq!(parse_rfc3339("2023-11-14 22:13:20z").unwrap(), utc);
        assert_eq!(
            parse_rfc3339("2023-11-14T22:13:20.5Z").unwrap(),
            at(1_700_000_000, 500)
        );
    }

    #[test]
    fn parse_refuses_what_is_not_rfc3339_by_value() {
        for bad in [
            "",
            "yesterday",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-13-14T22:13:20Z",
            "2023-02-30T22:13:20Z",
            "2023-11-14T24:13:20Z",
            "2023-11-14T22:13:20.Z",
            "2023-11-14T22:13:20+0200",
            "2023-11-14T22:13:20+٠٢:00",
            "+023-11-14T22:13:20Z",
        ] {
            let err = parse_rfc3339(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(matches!(
            parse_rfc3339("1969-12-31T23:59:59Z"),
            Err(TimeError::BeforeEpoch(_))
        ));
    }

    #[test]
    fn bounds_are_relative_durations_or_absolute_times() {
        let now = at(1_700_000_000, 0);
        assert_eq!(parse_time_bound("10m", now).unwrap(), at(1_699_999_400, 0));
        assert_eq!(parse_time_bound("90s", now).unwrap(), at(1_699_999_910, 0));
        assert_eq!(parse_time_bound("2h", now).unwrap(), at(1_699_992_800, 0));
        assert_eq!(parse_time_bound("1d", now).unwrap(), at(1_699_913_600, 0));
        assert_eq!(parse_time_bound("2023-11-14T22:13:20Z", now).unwrap(), now);
        assert!(parse_time_bound("10w", now).is_err());
        assert!(parse_time_bound("m", now).is_err());
        assert!(parse_time_bound("99999999999999999999d", now).is_err());
    }
}
