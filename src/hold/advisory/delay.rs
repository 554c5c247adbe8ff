//! The lock-delay: a run that takes the lock on a server that came up (started, restarted,
//! reinitialised after a crash, promoted) less than L ago holds the lock but starts its command
//! only L after that moment. Every such event ends every session, so the lock was free at once,
//! while the job of the run that held it before may still be running: its heimdall notices the
//! lost session at its next heartbeat and stops the job within the bound `keepalive` derives
//! (heartbeat + heartbeat-timeout + kill-after + 2s), which is also the default L.
//!
//! Here: what the server tells a role about when it came up ([`reading_sql`], read in the
//! message that takes the lock, so the happy path pays no round trip), what that answer means
//! ([`parse`]), and the wait, with one check of the lock after it ([`hold_off`]). Everything is
//! measured on the server's clock (`clock_timestamp() - <moment>`); no two hosts' clocks are ever
//! compared.
//!
//! Not responsible for taking the lock (`advisory/mod.rs`), nor for lease mode, which needs no delay: the
//! lease row survives a restart and its expiry already protects it.

use std::time::Duration;

use anyhow::Result;

use crate::domain::guard::Guard;
use crate::exit::{Failure, fail};
use crate::log;

/// A checkpoint whose redo point lies within this many bytes of where WAL replay ended is taken
/// for the first checkpoint after that recovery: the end-of-recovery checkpoint after a crash
/// (0 bytes), or the one a promotion requests at once (48 bytes on PostgreSQL 15 on an idle
/// server, more for what clients wrote meanwhile). Later, routine checkpoints move
/// `checkpoint_time` every few minutes; one that falls within the window only makes a run wait
/// needlessly, the safe direction. One WAL segment at the default size.
const FIRST_CHECKPOINT_WINDOW: u64 = 16 * 1024 * 1024;

/// One thing the server tells about when it came up.
struct Signal {
    /// Its name in the answer.
    key: &'static str,
    /// What it is and which events move it, for messages.
    says: &'static str,
    /// The functions it calls (in `pg_catalog`), which a DBA may have revoked from PUBLIC: the
    /// signal is skipped for a role that may not execute one, rather than fail the lock.
    functions: &'static [&'static str],
    /// A further condition, on the role: SQL.
    role_may: Option<&'static str>,
    /// The moment it marks (a timestamptz, NULL when it marks nothing), SQL.
    moment: &'static str,
}

/// Every signal, each readable by any role unless said otherwise (PostgreSQL 10 to 18). The
/// newest moment of those a role can read is when the server came up; what each event moves,
/// for which role, is in docs/failures.md ("Server restarts and failovers").
const SIGNALS: [Signal; 4] = [
    Signal {
        key: "postmaster",
        says: "pg_postmaster_start_time(): a start or restart",
        functions: &["pg_postmaster_start_time()"],
        role_may: None,
        moment: "pg_catalog.pg_postmaster_start_time()",
    },
    // The cumulative statistics are thrown away after a crash and at a start after an unclean
    // stop, and their reset time is set then. A reset by hand (pg_stat_reset_shared) moves it
    // too, which only costs a needless wait.
    Signal {
        key: "stats",
        says: "pg_stat_bgwriter.stats_reset: a crash, an unclean stop or a reset by hand",
        functions: &["pg_stat_get_bgwriter_stat_reset_time()"],
        role_may: None,
        moment: "pg_catalog.pg_stat_get_bgwriter_stat_reset_time()",
    },
    // The walwriter runs only in normal operation (postmaster.c starts it in PM_RUN): it starts
    // again after every start, crash reinitialisation and promotion, and at no other time. Its
    // backend_start is shown only to roles with the privileges of pg_read_all_stats.
    Signal {
        key: "walwriter",
        says: "the walwriter's start: a start, restart, crash or promotion",
        functions: &["pg_stat_get_activity(integer)"],
        role_may: Some(
            "pg_catalog.pg_has_role(pg_catalog.to_regrole('pg_read_all_stats'), 'USAGE')",
        ),
        moment: "(SELECT pg_catalog.max(a.backend_start) \
                 FROM pg_catalog.pg_stat_get_activity(NULL) a \
                 WHERE a.backend_type OPERATOR(pg_catalog.=) 'walwriter')",
    },
    // The first checkpoint after recovery (see FIRST_CHECKPOINT_WINDOW) starts right after the
    // recovery ended. checkpoint_time is its start in whole seconds, so a second is added to
    // keep the moment at or after the event. Until a promotion's first checkpoint has ended
    // (a spread checkpoint may take minutes), the control file still shows the standby's last
    // restartpoint, on the old timeline, while WAL is written on the new one: the promotion is
    // recent, but when exactly is unknown, so it counts from now.
    Signal {
        key: "checkpoint",
        says: "pg_control_checkpoint(): the first checkpoint after a crash or promotion",
        functions: &[
            "pg_control_checkpoint()",
            "pg_last_wal_replay_lsn()",
            "pg_walfile_name(pg_lsn)",
            "pg_current_wal_lsn()",
        ],
        role_may: None,
        moment: "(SELECT CASE WHEN pg_catalog.substr(c.redo_wal_file, 1, 8) \
                 OPERATOR(pg_catalog.<>) pg_catalog.substr(\
                 pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8) \
                 THEN pg_catalog.clock_timestamp() \
                 WHEN (c.redo_lsn OPERATOR(pg_catalog.-) pg_catalog.pg_last_wal_replay_lsn()) \
                 OPERATOR(pg_catalog.>=) 0 AND (c.redo_lsn OPERATOR(pg_catalog.-) \
                 pg_catalog.pg_last_wal_replay_lsn()) OPERATOR(pg_catalog.<=) FIRST_CHECKPOINT_WINDOW \
                 THEN c.checkpoint_time OPERATOR(pg_catalog.+) '1 second'::pg_catalog.interval END \
                 FROM pg_catalog.pg_control_checkpoint() c)",
    },
];

/// A SQL expression (text) that reads every signal this role may read, as `key=age …` with the
/// age in seconds on the server's clock, or NULL when it can read none. For the transaction
/// that takes the lock, on a primary (`pg_walfile_name` fails during recovery).
///
/// A privilege is checked when a statement starts, for every function it names, even in a CASE
/// branch that never runs; so the signals the role may read are put together into a query of
/// their own, which `query_to_xml` runs. The names `to_regprocedure` cannot find (an older
/// server) count as not allowed.
pub fn reading_sql() -> String {
    let parts: Vec<String> = SIGNALS
        .iter()
        .map(|signal| {
            let allowed: Vec<String> = signal
                .functions
                .iter()
                .map(|f| {
                    format!(
                        "pg_catalog.has_function_privilege(pg_catalog.to_regprocedure('pg_catalog.{f}'), 'EXECUTE')"
                    )
                })
                .chain(signal.role_may.map(str::to_owned))
                .collect();
            let moment = signal
                .moment
                .replace("FIRST_CHECKPOINT_WINDOW", &FIRST_CHECKPOINT_WINDOW.to_string());
            format!(
                "CASE WHEN {} THEN $heimdall$'{}=' OPERATOR(pg_catalog.||) pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) {moment})$heimdall$ END",
                allowed.join(" AND "),
                signal.key,
            )
        })
        .collect();
    format!(
        "pg_catalog.substring(pg_catalog.query_to_xml(pg_catalog.concat(\
         'SELECT pg_catalog.concat_ws('' '', ', pg_catalog.concat_ws(', ', 'NULL', {}), ') AS r'), \
         false, true, '')::pg_catalog.text, '<r>([^<]*)</r>')",
        parts.join(", ")
    )
}

/// When the server came up, as the newest readable signal tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerUp {
    /// How long before the reading, in seconds on the server's clock; below zero when the
    /// signal rounds up into the future (a checkpoint's whole seconds).
    pub ago: f64,
    /// Which signal, and what moves it.
    pub says: &'static str,
    /// The whole answer, for `-vv`.
    pub answer: String,
}

/// The answer to [`reading_sql`]: the newest moment among the signals, or None when the role
/// could read none (or the server answered something else).
pub fn parse(answer: &str) -> Option<ServerUp> {
    answer
        .split(' ')
        .filter_map(|pair| {
            let (key, age) = pair.split_once('=')?;
            let signal = SIGNALS.iter().find(|s| s.key == key)?;
            let age: f64 = age.parse().ok().filter(|a: &f64| a.is_finite())?;
            Some((signal, age))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(signal, ago)| ServerUp {
            ago,
            says: signal.says,
            answer: answer.to_owned(),
        })
}

/// How long to hold the lock before starting the command: what is left of `delay` after the
/// server came up.
fn remaining(delay: Duration, up: &ServerUp) -> Duration {
    let ago = Duration::try_from_secs_f64(up.ago.max(0.0)).unwrap_or(Duration::MAX);
    // Rounding into the future (a negative age) lengthens the wait by as much.
    let ahead = Duration::try_from_secs_f64((-up.ago).max(0.0)).unwrap_or_default();
    (delay + ahead).saturating_sub(ago)
}

/// The lock-delay, between taking the lock and starting the command: waits until `delay` after
/// the server came up, then checks once that the lock is still held. A signal meanwhile ends
/// heimdall as any signal before the command starts does (128+N, the command never runs). A
/// lock lost meanwhile is an error: the command did not run.
pub fn hold_off(
    delay: Duration,
    up: Option<&ServerUp>,
    guard: &mut dyn Guard,
    lock: &str,
) -> Result<()> {
    if delay.is_zero() {
        return Ok(());
    }
    let configured = humantime::format_duration(delay);
    let Some(up) = up else {
        log::info(format!(
            "cannot tell when the server came up (this role may read none of its signals); starting the command without a lock-delay (--lock-delay {configured})"
        ));
        return Ok(());
    };
    log::debug(format!(
        "when the server came up, by its clock: {}",
        up.answer
    ));
    let wait = remaining(delay, up);
    if wait.is_zero() {
        log::info(format!(
            "the server came up {} ago ({}); no lock-delay needed (--lock-delay {configured})",
            ago_words(up.ago),
            up.says
        ));
        return Ok(());
    }
    let message = format!(
        "the server came up {} ago ({}): holding lock {lock} {:.1}s before starting the command, so that a job that held it before has stopped (--lock-delay {configured})",
        ago_words(up.ago),
        up.says,
        wait.as_secs_f64()
    );
    if wait > Duration::from_secs(1) {
        log::warn(message);
    } else {
        log::info(message);
    }
    std::thread::sleep(wait);
    guard.check().map_err(|reason| {
        fail(
            Failure::Unavailable,
            format!(
                "lost lock {lock} during the lock-delay, before the command started: {reason}; the command did not run"
            ),
        )
    })?;
    log::debug("the lock is still held after the lock-delay");
    Ok(())
}

/// `2.5s`, or `3h 12m` for a long-lived server.
fn ago_words(ago: f64) -> String {
    if ago < 60.0 {
        format!("{:.1}s", ago.max(0.0))
    } else {
        humantime::format_duration(Duration::from_secs(ago as u64)).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_readable_signal_dates_the_start() {
        let up = parse("postmaster=3600.5 stats=12.25 checkpoint=11.9").unwrap();
        assert_eq!(up.ago, 11.9);
        assert!(up.says.contains("first checkpoint"), "{up:?}");
        let up = parse("postmaster=3.5").unwrap();
        assert!(up.says.starts_with("pg_postmaster_start_time()"));
        assert_eq!(parse("checkpoint=0 walwriter=0.5").unwrap().ago, 0.0);
    }

    #[test]
    fn an_answer_without_signals_dates_nothing() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("unknown=3 postmaster=x stats=NaN"), None);
    }

    #[test]
    fn the_wait_is_what_is_left_of_the_delay() {
        let up = |ago: f64| ServerUp {
            ago,
            says: "",
            answer: String::new(),
        };
        let five = Duration::from_secs(5);
        assert_eq!(remaining(five, &up(1.5)), Duration::from_millis(3500));
        assert_eq!(remaining(five, &up(5.0)), Duration::ZERO);
        assert_eq!(remaining(five, &up(86_400.0)), Duration::ZERO);
        // A moment rounded into the future waits that much longer.
        assert_eq!(remaining(five, &up(-0.5)), Duration::from_millis(5500));
    }

    #[test]
    fn every_signal_is_guarded_by_the_privileges_it_needs() {
        let sql = reading_sql();
        for signal in &SIGNALS {
            for f in signal.functions {
                assert!(
                    sql.contains(&format!("to_regprocedure('pg_catalog.{f}')")),
                    "{f} unguarded: {sql}"
                );
            }
            assert!(sql.contains(&format!("'{}='", signal.key)), "{sql}");
        }
        assert!(sql.contains("OPERATOR(pg_catalog.<=) 16777216"), "{sql}");
        assert!(!sql.contains("FIRST_CHECKPOINT_WINDOW"), "{sql}");
    }
}
