//! RFC 3339 timestamps in UTC (`2026-11-30T12:00:00.123Z`), for the access
//! log and the stats' `started_at`. The civil-date conversion is Howard
//! Hinnant's `civil_from_days`; a property test checks it against `httpdate`.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Appends `time` as RFC 3339 UTC to `out`, with milliseconds or without
/// (Puma's `started_at` has none). Times before 1970 are written as the epoch.
pub fn write_rfc3339(out: &mut String, time: SystemTime, millis: bool) {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    );
    if millis {
        let _ = write!(out, ".{:03}", since.subsec_millis());
    }
    out.push('Z');
}

pub fn rfc3339(time: SystemTime, millis: bool) -> String {
    let mut out = String::with_capacity(24);
    write_rfc3339(&mut out, time, millis);
    out
}

/// (year, month, day) of the day `days` after 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn known_instants() {
        let at = |secs: u64, millis: u64| UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis);
        assert_eq!(rfc3339(at(0, 0), true), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(at(951_782_400, 7), true),
            "2000-02-29T00:00:00.007Z"
        );
        assert_eq!(
            rfc3339(at(1_700_000_000, 999), false),
            "2023-11-14T22:13:20Z"
        );
    }

    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];

    proptest! {
        /// Agrees with httpdate's IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT").
        #[test]
        fn agrees_with_httpdate(secs in 0u64..253_402_300_799) {
            let time = UNIX_EPOCH + Duration::from_secs(secs);
            let ours = rfc3339(time, false);
            let theirs = httpdate::fmt_http_date(time);
            let parts: Vec<&str> = theirs.split(' ').collect();
            let month = MONTHS.iter().position(|m| *m == parts[2]).unwrap() + 1;
            let expected = format!("{}-{:02}-{}T{}Z", parts[3], month, parts[1], parts[4]);
            prop_assert_eq!(ours, expected);
        }
    }
}
