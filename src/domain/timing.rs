//! A run's timing, and the pure arithmetic that follows from it: for an advisory lock, the
//! heartbeat and how soon the *server* gives up on a holder whose host was cut off or lost
//! power; for a lease, how often it is renewed and how long the job may run unrenewed
//! ([`LeaseTiming`]); how the watchdog checks ([`Pace`]); when the supervisor stops the command
//! on its own ([`Limits`]). No I/O: `config` computes these once, `hold` sends the server its
//! part, `supervise` keeps the deadlines.
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
//! Not responsible for: heimdall's own socket options (`config` sets the client side from the
//! same heartbeat), sending the settings and checking them (`hold/advisory/keepalive.rs`), or a
//! pooler in between, whose own keepalive settings decide (see docs/failures.md).

use std::time::Duration;

/// The watchdog's timing: a check every `interval`, each allowed `timeout` for its answer.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

/// How the watchdog checks.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Heartbeats on an advisory lock's session, each answered within the heartbeat timeout;
    /// `None`: no checks (`--heartbeat 0`), the thread only keeps the session.
    Heartbeat(Option<Heartbeat>),
    /// Lease renewals this often; the supervisor counts the lease's budget from each successful
    /// renewal's sending.
    Renewal(Duration),
}

/// When the supervisor stops the command on its own, as far as the settings decide it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--timeout`.
    pub timeout: Option<Duration>,
    /// From SIGTERM to SIGKILL when heimdall stops the command.
    pub kill_after: Duration,
    /// Lease mode: how long the command may run past the sending of the last successful
    /// renewal (or of the acquiring statement, at first) before it must be stopped.
    pub lease_budget: Option<Duration>,
}

/// Added to the cut-off job's bound (I + T + K) before the server may let go. See the module
/// docs.
pub const MARGIN: Duration = Duration::from_secs(2);
/// Keepalive probes, one second apart, before the server gives up: a handful, so one lost
/// probe does not end a healthy session (a live heimdall also answers them from its kernel).
pub const PROBES: u64 = 5;
/// Linux caps TCP_KEEPIDLE at 32,767 s; a larger value would be refused.
const MAX_IDLE_SECONDS: u64 = 32_767;

/// The server's keepalive settings for the holding session, as (GUC, value with unit), in the
/// GUCs' base units (seconds; milliseconds for `tcp_user_timeout`).
pub type ServerKeepalive = Vec<(&'static str, String)>;

/// D: how long after the last packet from heimdall the server drops the session, or None
/// without a heartbeat (see the module docs).
pub fn release_bound(heartbeat: Option<Heartbeat>, kill_after: Duration) -> Option<Duration> {
    let hb = heartbeat?;
    let total = hb.interval + hb.timeout + kill_after + MARGIN;
    let seconds = total.as_secs() + u64::from(total.subsec_nanos() > 0);
    Some(Duration::from_secs(seconds.min(MAX_IDLE_SECONDS + PROBES)))
}

/// Added to a holder's stop for a replacer's default wait (see [`takeover_bound`]).
pub const TAKEOVER_MARGIN: Duration = Duration::from_secs(10);

/// How long `--replace` (and `heimdall stop`) waits without `--wait`: the holder sees the
/// request at its next heartbeat (I), that heartbeat may take up to its timeout (T), and its
/// command gets up to kill-after (K) to stop; plus a margin for SIGKILL and the release. The
/// holder's settings are not known here: this run's own, which a fleet shares, stand for them
/// (the defaults, 5s and 5s, without a heartbeat). 30s with the defaults.
pub fn takeover_bound(heartbeat: Option<Heartbeat>, kill_after: Duration) -> Duration {
    let hb = heartbeat.unwrap_or(Heartbeat {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    });
    hb.interval + hb.timeout + kill_after + TAKEOVER_MARGIN
}

/// The GUCs to set for the session that holds the lock, as (name, value with unit). Empty
/// without a heartbeat.
pub fn server_settings(heartbeat: Option<Heartbeat>, kill_after: Duration) -> ServerKeepalive {
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

/// The smallest lease budget heimdall accepts.
const MIN_BUDGET: Duration = Duration::from_secs(1);

/// A lease's timing (`--lease-ttl`): how often to renew, and how long without a successful
/// renewal the job may run. The arithmetic is in `hold/lease/mod.rs`'s module docs: the job is
/// stopped a margin before the server could let anyone else in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub renew_every: Duration,
    /// From the moment the last successful renewal was sent: past this, the supervisor stops
    /// the job (TERM, then KILL after kill-after).
    pub budget: Duration,
}

impl LeaseTiming {
    pub fn new(ttl: Duration, kill_after: Duration) -> std::result::Result<LeaseTiming, String> {
        let margin = (ttl / 10).max(Duration::from_secs(1));
        let budget = ttl
            .checked_sub(kill_after)
            .and_then(|d| d.checked_sub(margin))
            .filter(|b| *b >= MIN_BUDGET)
            .ok_or_else(|| {
                format!(
                    "--lease-ttl {} is too short: it must exceed --kill-after ({}) + a safety margin ({}) + 1s, so the job is stopped before the lease can expire; raise --lease-ttl or lower --kill-after",
                    humantime::format_duration(ttl),
                    humantime::format_duration(kill_after),
                    humantime::format_duration(margin),
                )
            })?;
        // Two renewals fit in the budget, so one lost renewal alone never stops the job.
        let renew_every = (ttl / 3).min(budget / 2);
        Ok(LeaseTiming {
            ttl,
            renew_every,
            budget,
        })
    }
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

    fn value(settings: &ServerKeepalive, name: &str) -> u64 {
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
    fn the_job_is_stopped_a_margin_before_the_lease_can_expire() {
        let t = LeaseTiming::new(Duration::from_secs(30), Duration::from_secs(10)).unwrap();
        assert_eq!(t.budget, Duration::from_secs(17));
        assert_eq!(t.renew_every, Duration::from_millis(8500));
        // budget + kill_after + margin = ttl
        assert_eq!(
            t.budget + Duration::from_secs(10) + Duration::from_secs(3),
            t.ttl
        );
        let short = LeaseTiming::new(Duration::from_secs(5), Duration::from_secs(1)).unwrap();
        assert_eq!(short.budget, Duration::from_secs(3));
        assert!(LeaseTiming::new(Duration::from_secs(10), Duration::from_secs(10)).is_err());
    }
}
