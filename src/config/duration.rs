//! Human durations in config files (`250ms`, `30s`, `5m`, `1h`, `7d`).
//!
//! Invariant: a duration is always written with its unit, so `timeout: 30`
//! can never be misread as milliseconds by one person and seconds by another.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `<integer><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split_at = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("`{text}` has no unit; write it like `250ms`, `30s`, `5m` or `1h`")
    })?;
    let (digits, unit) = text.split_at(split_at);
    let amount: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` does not start with a whole number; write it like `30s`"))?;
    let per_unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        "d" => Duration::from_secs(86_400),
        _ => {
            return Err(format!(
                "`{text}` has unknown unit `{unit}`; use ms, s, m, h or d"
            ))
        }
    };
    per_unit
        .checked_mul(u32::try_from(amount).map_err(|_| format!("`{text}` is too large"))?)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Serde adapter: `#[serde(deserialize_with = "duration::deserialize")]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// Serde adapter for an optional duration (absent or `null` is `None`).
pub fn deserialize_optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        Some(text) => parse_duration(&text)
            .map(Some)
            .map_err(serde::de::Error::custom),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration(" 1h "), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_missing_or_unknown_units() {
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w")
            .unwrap_err()
            .contains("unknown unit `w`"));
        assert!(parse_duration("ms").unwrap_err().contains("whole number"));
        assert!(parse_duration("-5s").unwrap_err().contains("whole number"));
        assert!(parse_duration("99999999999h")
            .unwrap_err()
            .contains("too large"));
    }
}
