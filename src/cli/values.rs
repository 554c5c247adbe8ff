//! The value parsers behind the flags: durations (humantime or seconds, with their
//! maximums), `--wait`'s optional value, non-empty names and the lease table.

use std::time::Duration;

use crate::domain::lease_table::{LeaseTable, RunTable};
use crate::domain::lock::Wait;

pub fn lease_table(s: &str) -> Result<LeaseTable, String> {
    LeaseTable::parse(s)
}
pub fn run_table(s: &str) -> Result<RunTable, String> {
    RunTable::parse_for("--run-table", s)
}
/// `--min-interval`: a [`long_duration`] of more than 0. Zero would mean "no interval", which
/// leaving the flag out says; a negative one is a typo either way.
pub fn min_interval(s: &str) -> Result<Duration, String> {
    if s.trim().starts_with('-') {
        return Err(format!(
            "'{s}' is negative: give how long must pass between two runs' starts, e.g. 30m"
        ));
    }
    match long_duration(s)? {
        Duration::ZERO => {
            Err("0 would be no interval at all: leave --min-interval out, or give e.g. 30m".into())
        }
        d => Ok(d),
    }
}
pub fn non_empty(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(s.to_owned())
    }
}
/// `30s`, `5m`, `1h30m`, or a bare number of seconds (the Go heimdall's form), fractions
/// included (`1.5`, as `timeout 1.5` takes it).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    if let Some(secs) = fractional_seconds(s) {
        return Ok(secs);
    }
    humantime::parse_duration(s).map_err(|_| {
        format!("'{s}' is not a duration: write e.g. 30s, 5m, 1h30m, 250ms or a number of seconds")
    })
}
/// Digits with one decimal point, nothing else: no sign, exponent, `inf` or `NaN`.
fn fractional_seconds(s: &str) -> Option<Duration> {
    let (whole, fraction) = s.split_once('.')?;
    let digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !digits(whole) || !digits(fraction) {
        return None;
    }
    Duration::try_from_secs_f64(s.parse().ok()?).ok()
}
/// The most `--timeout`, `--kill-after`, `--wait=`, `--min-hold` and `--connect-timeout`
/// accept: one year (365.25 days, humantime's `1y`). Longer than any job or wait a scheduler
/// would mean, and far from where a deadline would overflow the clock; a value past it is a
/// typo, refused with exit 2 before anything connects or runs.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);
/// The most `--heartbeat` and `--heartbeat-timeout` accept: one hour. A rarer check hardly
/// watches the lock, and the interval also sets the connection's TCP keepalive idle time,
/// which Linux caps at 32767 s.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);
/// A [`duration`] of at most [`MAX_DURATION`].
pub fn long_duration(s: &str) -> Result<Duration, String> {
    at_most(duration(s)?, MAX_DURATION, "1y")
}
/// A [`duration`] of at most [`MAX_HEARTBEAT`].
pub fn heartbeat_duration(s: &str) -> Result<Duration, String> {
    at_most(duration(s)?, MAX_HEARTBEAT, "1h")
}
fn at_most(d: Duration, max: Duration, name: &str) -> Result<Duration, String> {
    if d > max {
        Err(format!("longer than the maximum, {name}"))
    } else {
        Ok(d)
    }
}
/// `--wait` alone (or `forever`) waits as long as it takes; a duration bounds the wait.
pub fn wait(s: &str) -> Result<Wait, String> {
    match s.trim() {
        "" | "forever" => Ok(Wait::Forever),
        other => long_duration(other).map(Wait::Up),
    }
}
/// An exit code, 0-255 (`--busy-exit-code`, as `flock -E` takes it), said as a range rather
/// than as clap's `0..=255`.
pub fn exit_code(s: &str) -> Result<u8, String> {
    s.trim().parse().map_err(|_| "must be 0–255".to_owned())
}
/// `--slots`: 1 to 1000.
pub fn slots(s: &str) -> Result<u16, String> {
    match s.trim().parse() {
        Ok(n @ 1..=1000) => Ok(n),
        _ => Err("must be 1–1000".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_humantime_and_bare_seconds() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(duration("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(duration(".5"), Ok(Duration::from_millis(500)));
        for bad in ["1.5.5", "-1.5", "1e3", ".", "inf", "NaN", "1,5"] {
            assert!(duration(bad).is_err(), "{bad}");
        }
        assert!(duration("soon").is_err());
        assert!(duration("-5").is_err());
        assert_eq!(long_duration("1y"), Ok(MAX_DURATION));
        assert!(long_duration("18446744073709551615").is_err());
        assert!(long_duration("366d").is_err());
        assert_eq!(heartbeat_duration("1h"), Ok(MAX_HEARTBEAT));
        assert!(heartbeat_duration("61m").is_err());
        assert_eq!(min_interval("30m"), Ok(Duration::from_secs(1800)));
        for bad in ["0", "0s", "-5s", " -1", "366d", "soon"] {
            assert!(min_interval(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ranges_are_said_as_ranges() {
        assert_eq!(exit_code("75"), Ok(75));
        assert_eq!(exit_code("0"), Ok(0));
        for bad in ["256", "-1", "x", ""] {
            assert_eq!(exit_code(bad), Err("must be 0–255".to_owned()), "{bad}");
        }
        assert_eq!(slots("1000"), Ok(1000));
        for bad in ["0", "1001", "x"] {
            assert_eq!(slots(bad), Err("must be 1–1000".to_owned()), "{bad}");
        }
    }
}
