//! How soon the *server* gives up on a holder whose host was cut off or lost power, derived
//! from the watchdog's timing; and checking, at `-v`, that the server took the settings.
//!
//! A cut or a power loss sends the server nothing: no FIN, no RST. Its backend holds the lock
//! until the kernel gives up on the connection, and Linux starts keepalive probing only after
//! 7,200 s. So heimdall sets, for the holding session, `tcp_keepalives_idle`,
//! `tcp_keepalives_interval`, `tcp_keepalives_count` and `tcp_user_timeout` (all per-session,
//! no privilege needed).
//!
//! The arithmetic, with I = `--heartbeat`, T = `--heartbeat-timeout`, K = `--kill-after` and L
//! the moment the server last received a packet from heimdall (L is at or before the cut):
//!
//! - **The job on the cut-off host is gone by L + I + T + K.** heimdall sends a check at most I
//!   after the last answer, gives it T, then sends SIGTERM and, K later, SIGKILL.
//! - **The server drops the session at L + D**, D = I + T + K + [`MARGIN`], in whole seconds.
//!   With the connection idle (the cut falls between checks), keepalive probes start after
//!   `tcp_keepalives_idle` = D - n s and go out every second; when the n-th ([`PROBES`]) is
//!   unanswered, at D, the kernel drops the connection, the backend exits and the lock is free.
//!   On Linux `tcp_user_timeout` = D ends the probing at D too (it overrides the count). With
//!   an answer in flight at the cut (unacknowledged data; keepalive waits), `tcp_user_timeout`
//!   drops the connection D after it was sent.
//! - So the server lets go only after the job is surely gone, and **at most D after the cut**
//!   (at least D - I), give or take the kernel's timer slack (timers of a few seconds may fire
//!   some hundred milliseconds late). Defaults (5s, 5s, 10s): D = 22 s. `--heartbeat 2s`:
//!   D = 16 s. Linux accepts an idle time up to 32,767 s, so D is capped at 32,772 s (about
//!   9 h): a longer `--kill-after` outlasts it.
//!
//! [`MARGIN`] covers what the two clocks do not share: the one-way delay (the server counts
//! from a packet's arrival, heimdall from its sending), heimdall's own latency in noticing the
//! deadline and signalling, and the kernel's timer granularity.
//!
//! Without a heartbeat (`--heartbeat 0`) nothing is set: no watchdog stops a cut-off job, so a
//! server that let go sooner would only let a second host start beside it. The server's own
//! keepalive settings then decide, as before.
//!
//! Not responsible for: heimdall's own socket options (config.rs sets the client side from the
//! same heartbeat), sending the settings (lock.rs, with the lock statement), or a pooler in
//! between, whose own keepalive settings decide (see the README).

use std::time::Duration;

use crate::config::Heartbeat;
use crate::log;

/// Added to the cut-off job's bound (I + T + K) before the server may let go. See the module
/// docs.
pub const MARGIN: Duration = Duration::from_secs(2);
/// Keepalive probes, one second apart, before the server gives up: a handful, so one lost
/// probe does not end a healthy session (a live heimdall also answers them from its kernel).
pub const PROBES: u64 = 5;
/// Linux caps TCP_KEEPIDLE at 32,767 s; a larger value would be refused.
const MAX_IDLE_SECONDS: u64 = 32_767;

/// The settings, in the GUCs' base units (seconds; milliseconds for `tcp_user_timeout`).
pub type Settings = Vec<(&'static str, String)>;

/// D: how long after the last packet from heimdall the server drops the session, or None
/// without a heartbeat (see the module docs).
pub fn release_bound(heartbeat: Option<Heartbeat>, kill_after: Duration) -> Option<Duration> {
    let hb = heartbeat?;
    let total = hb.interval + hb.timeout + kill_after + MARGIN;
    let seconds = total.as_secs() + u64::from(total.subsec_nanos() > 0);
    Some(Duration::from_secs(seconds.min(MAX_IDLE_SECONDS + PROBES)))
}

/// The GUCs to set for the session that holds the lock, as (name, value with unit). Empty
/// without a heartbeat.
pub fn server_settings(heartbeat: Option<Heartbeat>, kill_after: Duration) -> Settings {
    let Some(bound) = release_bound(heartbeat, kill_after) else {
        return Vec::new();
    };
    let total = bound.as_secs();
    // The idle time must be at least 1 s; a very short bound gets fewer probes.
    let probes = PROBES.min(total - 1);
    vec![
        ("tcp_keepalives_idle", format!("{}s", total - probes)),
        ("tcp_keepalives_interval", "1s".to_owned()),
        ("tcp_keepalives_count", probes.to_string()),
        ("tcp_user_timeout", format!("{}ms", total * 1000)),
    ]
}

/// `; SELECT …` to append to the lock's message: sets the settings for the holding transaction
/// (`set_config(…, true)`, i.e. `SET LOCAL`) and answers with what took effect, as
/// `name=value …` in base units. It cannot fail the transaction that holds the lock: a setting
/// the server does not know (`tcp_user_timeout` before PostgreSQL 12, `transaction_timeout`
/// before 17) is skipped rather than an error, and one the platform cannot apply shows in the
/// answer. Empty for no settings.
pub fn set_sql(settings: &[(&'static str, String)]) -> String {
    if settings.is_empty() {
        return String::new();
    }
    let values: Vec<String> = settings
        .iter()
        .map(|(name, value)| format!("('{name}', '{value}')"))
        .collect();
    format!(
        "; SELECT pg_catalog.string_agg(pg_catalog.concat_ws('=', s.n, \
         pg_catalog.set_config(s.n, s.v, true)), ' ') FROM (VALUES {}) s(n, v) \
         WHERE pg_catalog.current_setting(s.n, true) IS NOT NULL",
        values.join(", ")
    )
}

/// At `-v`, from the answer to [`set_sql`]: what a cut means, or a warning that the server did
/// not apply a setting. PostgreSQL ignores a socket option the platform lacks
/// (`tcp_user_timeout` off Linux, `tcp_keepalives_count` on Windows) and shows the old value;
/// over a Unix socket it shows every one as 0, and there is no network to cut.
pub fn report(settings: &[(&'static str, String)], answer: &str) {
    if settings.is_empty() {
        return;
    }
    log::debug(format!(
        "the server's keepalive for the holding session: {answer}"
    ));
    let shown: Vec<(&str, &str)> = answer
        .split(' ')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    if !shown.is_empty() && shown.iter().all(|(_, value)| *value == "0") {
        log::debug("connected over a Unix socket: no network to cut, keepalive does not apply");
        return;
    }
    let missing: Vec<String> = settings
        .iter()
        .filter_map(|(name, value)| {
            let now = shown.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            (!applied(value, now))
                .then(|| format!("{name} is {} (wanted {value})", now.unwrap_or("unknown")))
        })
        .collect();
    if missing.is_empty() {
        log::info(format!(
            "if the network to the server is cut, the server drops this session and the lock {} after the last packet from heimdall ({answer})",
            settings_summary(settings),
        ));
    } else {
        log::info(format!(
            "warning: the server did not apply every keepalive setting ({}); if this host is cut off, the lock may stay held until the server's own keepalive gives up",
            missing.join(", ")
        ));
    }
}

/// The server shows these GUCs as a bare number in their base unit.
fn applied(wanted: &str, shown: Option<&str>) -> bool {
    shown == Some(wanted.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
}

/// D, from the settings themselves: idle + count × interval.
fn settings_summary(settings: &[(&'static str, String)]) -> String {
    let number = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| {
                v.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let total = number("tcp_keepalives_idle")
        + number("tcp_keepalives_count") * number("tcp_keepalives_interval");
    humantime::format_duration(Duration::from_secs(total)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(interval_ms: u64, timeout_ms: u64) -> Option<Heartbeat> {
        Some(Heartbeat {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
        })
    }

    fn value(settings: &Settings, name: &str) -> u64 {
        let (_, v) = settings.iter().find(|(n, _)| *n == name).unwrap();
        v.trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .parse()
            .unwrap()
    }

    const SECS_10: Duration = Duration::from_secs(10);

    #[test]
    fn defaults_release_the_lock_within_30_seconds_of_a_cut() {
        let s = server_settings(hb(5000, 5000), SECS_10);
        assert_eq!(
            s,
            vec![
                ("tcp_keepalives_idle", "17s".to_owned()),
                ("tcp_keepalives_interval", "1s".to_owned()),
                ("tcp_keepalives_count", "5".to_owned()),
                ("tcp_user_timeout", "22000ms".to_owned()),
            ]
        );
        assert!(release_bound(hb(5000, 5000), SECS_10).unwrap() <= Duration::from_secs(30));
    }

    #[test]
    fn a_two_second_heartbeat_releases_the_lock_within_20_seconds_of_a_cut() {
        let bound = release_bound(hb(2000, 2000), SECS_10).unwrap();
        assert_eq!(bound, Duration::from_secs(16));
        assert!(bound <= Duration::from_secs(20));
    }

    #[test]
    fn without_a_heartbeat_nothing_is_set() {
        assert!(server_settings(None, SECS_10).is_empty());
        assert_eq!(release_bound(None, SECS_10), None);
        assert_eq!(set_sql(&[]), "");
    }

    #[test]
    fn the_server_lets_go_only_after_the_cut_off_job_is_gone() {
        for interval in [100, 1000, 1500, 2000, 5000, 60_000] {
            for timeout in [100, 1000, 5000, 30_000] {
                for kill_after in [0, 1, 10, 300] {
                    let k = Duration::from_secs(kill_after);
                    let h = hb(interval, timeout);
                    let s = server_settings(h, k);
                    let job_gone = Duration::from_millis(interval + timeout) + k;
                    let keepalive = value(&s, "tcp_keepalives_idle")
                        + value(&s, "tcp_keepalives_count") * value(&s, "tcp_keepalives_interval");
                    let user_timeout = value(&s, "tcp_user_timeout");
                    // Both ways of noticing the dead peer end at the same moment, D...
                    assert_eq!(keepalive * 1000, user_timeout, "{s:?}");
                    assert_eq!(Duration::from_secs(keepalive), release_bound(h, k).unwrap());
                    // ...which comes at least MARGIN after the job is gone.
                    assert!(
                        Duration::from_secs(keepalive) >= job_gone + MARGIN,
                        "{interval} {timeout} {kill_after}: {s:?}"
                    );
                    assert!(value(&s, "tcp_keepalives_idle") >= 1, "{s:?}");
                    assert!(value(&s, "tcp_keepalives_count") >= 1, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn a_very_short_bound_still_idles_a_whole_second() {
        let s = server_settings(hb(100, 100), Duration::ZERO);
        assert_eq!(value(&s, "tcp_keepalives_idle"), 1);
        assert_eq!(value(&s, "tcp_keepalives_count"), 2);
        assert_eq!(value(&s, "tcp_user_timeout"), 3000);
    }

    #[test]
    fn a_huge_kill_after_stays_within_what_linux_accepts() {
        let s = server_settings(hb(5000, 5000), Duration::from_secs(100_000));
        assert_eq!(value(&s, "tcp_keepalives_idle"), MAX_IDLE_SECONDS);
    }

    #[test]
    fn settings_are_set_for_the_transaction_and_skipped_where_unknown() {
        let s = server_settings(hb(1000, 1000), Duration::from_secs(1));
        let sql = set_sql(&s);
        assert!(
            sql.contains(
                "(VALUES ('tcp_keepalives_idle', '1s'), ('tcp_keepalives_interval', '1s'), \
                 ('tcp_keepalives_count', '4'), ('tcp_user_timeout', '5000ms'))"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("set_config(s.n, s.v, true)"),
            "SET LOCAL: {sql}"
        );
        assert!(
            sql.contains("current_setting(s.n, true) IS NOT NULL"),
            "{sql}"
        );
    }

    #[test]
    fn a_setting_counts_as_applied_when_the_server_shows_the_number() {
        assert!(applied("17s", Some("17")));
        assert!(applied("22000ms", Some("22000")));
        assert!(applied("5", Some("5")));
        assert!(!applied("22000ms", Some("0")));
        assert!(!applied("5", None));
    }
}
