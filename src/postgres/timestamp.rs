//! A `timestamptz` as Postgres prints it, turned into RFC 3339 in UTC.
//!
//! Invariant: both capture modes give a row's `created_at` the same text,
//! `YYYY-MM-DDTHH:MM:SS.ffffffZ` (polling asks Postgres for exactly that
//! with `to_char`; replication receives the server's ISO output and
//! converts it here), so a record routed from either mode is the same.
//! Anything that is not an ISO timestamp with a whole-minute offset
//! (`infinity`, BC dates, another `DateStyle`) gives `None`, never a guess.

/// The text `to_char(... AT TIME ZONE 'UTC', …)` gives in polling, so both
/// modes agree.
pub const POLLING_FORMAT_SQL: &str = r#"'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"#;

/// `2026-12-02 18:10:15.5+01` (DateStyle ISO, any TimeZone) →
/// `2026-12-02T17:10:15.500000Z`.
pub fn iso_to_rfc3339_utc(text: &str) -> Option<String> {
    let (date, rest) = text.split_once(' ')?;
    let mut date_parts = date.splitn(3, '-');
    let year: i64 = number(date_parts.next()?, 4)?;
    let month: i64 = number(date_parts.next()?, 2)?;
    let day: i64 = number(date_parts.next()?, 2)?;
    // The offset starts at the first sign after the time.
    let sign_at = rest.find(['+', '-'])?;
    let (time, offset) = rest.split_at(sign_at);
    let (clock, fraction) = match time.split_once('.') {
        Some((clock, fraction)) => (clock, fraction),
        None => (time, ""),
    };
    let mut clock_parts = clock.splitn(3, ':');
    let hour: i64 = number(clock_parts.next()?, 2)?;
    let minute: i64 = number(clock_parts.next()?, 2)?;
    let second: i64 = number(clock_parts.next()?, 2)?;
    if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{fraction:0<6}").parse().ok()?;
    let offset_minutes = offset_minutes(offset)?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let local_minutes = days_from_civil(year, month, day) * 1440 + hour * 60 + minute;
    let utc_minutes = local_minutes - offset_minutes;
    let (days, minute_of_day) = (utc_minutes.div_euclid(1440), utc_minutes.rem_euclid(1440));
    let (year, month, day) = civil_from_days(days);
    if !(1..=9999).contains(&year) {
        return None;
    }
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{second:02}.{micros:06}Z",
        minute_of_day / 60,
        minute_of_day % 60
    ))
}

/// Exactly `digits` ASCII digits.
fn number(text: &str, digits: usize) -> Option<i64> {
    (text.len() == digits && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse().ok())
        .flatten()
}

/// `+01`, `-05:30` → minutes east of UTC. An offset with seconds (local
/// mean time before 1900) has no RFC 3339 form.
fn offset_minutes(offset: &str) -> Option<i64> {
    let sign = match offset.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let mut parts = offset[1..].split(':');
    let hours = number(parts.next()?, 2)?;
    let minutes = match parts.next() {
        Some(minutes) => number(minutes, 2)?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(sign * (hours * 60 + minutes))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of `days_from_civil`.
pub(crate) fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_output_only_changes_shape() {
        assert_eq!(
            iso_to_rfc3339_utc("2026-12-02 17:10:15.123456+00").as_deref(),
            Some("2026-12-02T17:10:15.123456Z")
        );
        assert_eq!(
            iso_to_rfc3339_utc("2026-12-02 17:10:15+00").as_deref(),
            Some("2026-12-02T17:10:15.000000Z")
        );
        assert_eq!(
            iso_to_rfc3339_utc("2026-12-02 17:10:15.5+00").as_deref(),
            Some("2026-12-02T17:10:15.500000Z")
        );
    }

    #[test]
    fn offsets_are_taken_back_to_utc_across_days_months_and_leap_years() {
        assert_eq!(
            iso_to_rfc3339_utc("2026-12-02 18:10:15.1+01").as_deref(),
            Some("2026-12-02T17:10:15.100000Z")
        );
        assert_eq!(
            iso_to_rfc3339_utc("2024-03-01 02:00:00+05:30").as_deref(),
            Some("2024-02-29T20:30:00.000000Z")
        );
        assert_eq!(
            iso_to_rfc3339_utc("2026-12-31 20:00:00-05").as_deref(),
            Some("2027-01-01T01:00:00.000000Z")
        );
        assert_eq!(
            iso_to_rfc3339_utc("1970-01-01 00:00:00+00").as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
    }

    #[test]
    fn what_is_not_an_iso_timestamp_gives_none() {
        for text in [
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00+00 BC",
            "Wed Dec 02 17:10:15.123456 2026 UTC",
            "12/02/2026 17:10:15.12 UTC",
            "1850-01-01 00:00:00+00:53:28",
            "2026-13-02 17:10:15+00",
            "2026-12-02 17:10:15.1234567+00",
            "",
        ] {
            assert_eq!(iso_to_rfc3339_utc(text), None, "{text}");
        }
    }

    #[test]
    fn the_calendar_round_trips() {
        for days in (-800_000..800_000).step_by(997) {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days);
        }
    }
}
