//! `Lsn`: a PostgreSQL write-ahead-log position.
//!
//! Invariant: an `Lsn` is the plain 64-bit WAL byte position. Its text form is
//! always Postgres's own `HIGH/LOW` hex form (`16/B374D848`), so values printed
//! here can be pasted into `pg_replication_slots` queries and back; its serde
//! form is the bare `u64`, so stored checkpoints never depend on formatting.

use std::fmt;
use std::str::FromStr;

/// A position in the PostgreSQL write-ahead log.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position before any WAL; Postgres prints it as `0/0`.
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    /// Postgres's `pg_lsn` text form: high and low 32 bits in upper-case hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    /// Parses the `pg_lsn` text form, e.g. `16/B374D848` (hex is
    /// case-insensitive; both halves are required, each 1 to 8 digits).
    fn from_str(text: &str) -> Result<Lsn, String> {
        let invalid = || {
            format!(
                "invalid LSN {text:?}: expected two hex numbers of 1 to 8 digits \
                 separated by '/', like \"16/B374D848\""
            )
        };
        let (high, low) = text.split_once('/').ok_or_else(invalid)?;
        let high = parse_half(high).ok_or_else(invalid)?;
        let low = parse_half(low).ok_or_else(invalid)?;
        Ok(Lsn((u64::from(high) << 32) | u64::from(low)))
    }
}

/// One 32-bit half of the text form. Checked digit by digit first because
/// `u32::from_str_radix` would also accept a leading `+`, which Postgres does
/// not print.
fn parse_half(digits: &str) -> Option<u32> {
    let plain_hex = !digits.is_empty()
        && digits.len() <= 8
        && digits.bytes().all(|byte| byte.is_ascii_hexdigit());
    if !plain_hex {
        return None;
    }
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_in_postgres_form() {
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(0x1_0000_0000).to_string(), "1/0");
    }

    #[test]
    fn parses_postgres_form_case_insensitively() {
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse(), Ok(Lsn::ZERO));
        assert_eq!("00000000/00000001".parse(), Ok(Lsn(1)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse(), Ok(Lsn(u64::MAX)));
    }

    #[test]
    fn round_trips_through_text() {
        for value in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            let lsn = Lsn(value);
            assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
        }
    }

    #[test]
    fn rejects_malformed_text_naming_it() {
        for bad in [
            "",
            "/",
            "16",
            "16/",
            "/B374D848",
            "16/B374D848/0",
            "1G/0",
            "0/123456789",
            "123456789/0",
            "+1/0",
            "0/-1",
            " 16/B374D848",
            "16 /B374D848",
            "0x16/B374D848",
        ] {
            let error = bad.parse::<Lsn>().expect_err(bad);
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn serializes_as_plain_number() {
        let lsn = Lsn(0x16_B374_D848);
        let json = serde_json::to_string(&lsn).expect("serialize");
        assert_eq!(json, "97500059720");
        assert_eq!(
            serde_json::from_str::<Lsn>(&json).expect("deserialize"),
            lsn
        );
    }

    #[test]
    fn orders_by_position() {
        assert!(Lsn(0x1_0000_0000) > Lsn(0xFFFF_FFFF));
        assert!(Lsn::ZERO < Lsn(1));
    }
}
