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
//! measured on the server's clock (its `clock_timestamp()` less each moment, both as the server
//! reads them); no two hosts' clocks are ever compared.
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
    /// What it adds to the reading's select list (SQL): raw values, each named. The moment is
    /// worked out here, not by the server (see [`reading_sql`]).
    columns: &'static str,
    /// What it adds to the reading's FROM list, if anything.
    from: Option<&'static str>,
    /// The moment it marks, from the answer, in seconds since the epoch.
    moment: fn(&Answer) -> Option<f64>,
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
        columns: "pg_catalog.pg_postmaster_start_time() AS postmaster",
        from: None,
        moment: |answer| answer.timestamp("postmaster"),
    },
    // The cumulative statistics are thrown away after a crash and at a start after an unclean
    // stop, and their reset time is set then. A reset by hand (pg_stat_reset_shared) moves it
    // too, which only costs a needless wait.
    Signal {
        key: "stats",
        says: "pg_stat_bgwriter.stats_reset: a crash, an unclean stop or a reset by hand",
        functions: &["pg_stat_get_bgwriter_stat_reset_time()"],
        role_may: None,
        columns: "pg_catalog.pg_stat_get_bgwriter_stat_reset_time() AS stats",
        from: None,
        moment: |answer| answer.timestamp("stats"),
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
        columns: "(SELECT pg_catalog.max(a.backend_start) \
                  FROM pg_catalog.pg_stat_get_activity(NULL) a \
                  WHERE a.backend_type OPERATOR(pg_catalog.=) 'walwriter') AS walwriter",
        from: None,
        moment: |answer| answer.timestamp("walwriter"),
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
        columns: "c.checkpoint_time AS checkpoint, c.redo_lsn AS checkpoint_redo, \
                  c.redo_wal_file AS checkpoint_file, \
                  pg_catalog.pg_last_wal_replay_lsn() AS replayed_to, \
                  pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()) AS current_file",
        from: Some("pg_catalog.pg_control_checkpoint() c"),
        moment: first_checkpoint,
    },
];

/// The moment the checkpoint signal marks: see its comment in [`SIGNALS`].
fn first_checkpoint(answer: &Answer) -> Option<f64> {
    // A WAL file's name starts with its timeline, in eight hex digits.
    let timeline = |name: &str| name.get(..8).map(str::to_owned);
    let written_on = timeline(answer.text("current_file")?)?;
    if timeline(answer.text("checkpoint_file")?)? != written_on {
        return Some(answer.now);
    }
    let redo = lsn(answer.text("checkpoint_redo")?)?;
    // NULL (left out) on a server that never replayed WAL: no checkpoint counts then.
    let replayed = lsn(answer.text("replayed_to")?)?;
    let past = redo.checked_sub(replayed)?;
    (past <= FIRST_CHECKPOINT_WINDOW).then_some(answer.timestamp("checkpoint")? + 1.0)
}

/// A `pg_lsn` as text (`16/B374D848`) as a number.
fn lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// The fragments of a query that reads every signal this role may read, for `query_to_xml`:
/// `(select list items, FROM items)`, each a SQL text expression (NULL for a signal the role
/// may not read), to be concatenated after `SELECT <something>` and after the other items.
///
/// A privilege is checked when a statement starts, for every function it names, even in a CASE
/// branch that never runs; so the signals the role may read are put together into a query of
/// their own, which `query_to_xml` runs. The names `to_regprocedure` cannot find (an older
/// server) count as not allowed. The query returns raw values, and the moments and ages are
/// worked out by heimdall: in the fresh backend every run gets, each operator and overloaded
/// function the server must look up costs a catalog search, and `date_part` with timestamp
/// arithmetic cost more than the reading itself. `query_to_xml` writes timestamps in the XML
/// Schema format (ISO 8601, with the zone's offset) whatever the role's `DateStyle`.
pub fn reading_sql() -> (String, String) {
    let guarded = |signal: &Signal, fragment: String| {
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
        format!(
            ", CASE WHEN {} THEN $heimdall${fragment}$heimdall$ END",
            allowed.join(" AND ")
        )
    };
    let columns = SIGNALS
        .iter()
        .map(|signal| guarded(signal, format!(", {}", signal.columns)))
        .collect();
    // Only one signal has a FROM item, so it needs no comma between items.
    let from = SIGNALS
        .iter()
        .filter_map(|signal| Some(guarded(signal, format!(" FROM {}", signal.from?))))
        .collect();
    (columns, from)
}

/// The reading's answer: `query_to_xml`'s one row, `<now>` (the server's clock when it read)
/// and each value the role could read (NULLs are left out).
pub struct Answer<'a> {
    xml: &'a str,
    now: f64,
}

impl<'a> Answer<'a> {
    fn of(xml: &'a str) -> Option<Self> {
        let mut answer = Answer { xml, now: 0.0 };
        answer.now = answer.timestamp("now")?;
        Some(answer)
    }

    /// The text of element `name`; values with markup in them are none heimdall reads.
    fn text(&self, name: &str) -> Option<&'a str> {
        let open = format!("<{name}>");
        let start = self.xml.find(&open)? + open.len();
        let len = self.xml[start..].find(&format!("</{name}>"))?;
        Some(&self.xml[start..start + len])
    }

    fn timestamp(&self, name: &str) -> Option<f64> {
        xsd_timestamp(self.text(name)?)
    }
}

/// An XML Schema `dateTime` with its offset, as `query_to_xml` writes a `timestamptz`
/// (`2026-12-02T14:32:12.477365+05:30`, whole seconds without the fraction, an offset of
/// seconds in `+HH:MM:SS`), in seconds since the epoch.
fn xsd_timestamp(text: &str) -> Option<f64> {
    let (date, time) = text.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|n| n.parse::<i64>().ok());
    let (year, month, day) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let sign_at = time.find(['+', '-'])?;
    let (clock, offset) = time.split_at(sign_at);
    let seconds_of = |hms: &str| -> Option<f64> {
        hms.split(':')
            .map(|part| {
                part.parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
            })
            .try_fold((0.0, 0), |(sum, n), part| Some((sum * 60.0 + part?, n + 1)))
            .filter(|&(_, n)| (2..=3).contains(&n))
            .map(|(sum, n)| if n == 2 { sum * 60.0 } else { sum })
    };
    let offset = seconds_of(&offset[1..])? * if offset.starts_with('-') { -1.0 } else { 1.0 };
    let days = days_from_civil(year, month, day)?;
    Some(days as f64 * 86_400.0 + seconds_of(clock)? - offset)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// When the server came up, as the newest readable signal tells it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerUp {
    /// How long before the reading, in seconds on the server's clock; below zero when the
    /// signal rounds up into the future (a checkpoint's whole seconds).
    pub ago: f64,
    /// Which signal, and what moves it.
    pub says: &'static str,
    /// Every signal read, as `key=age`, for `-vv`.
    pub answer: String,
}

/// The answer to [`reading_sql`]'s query: the newest moment among the signals, or None when
/// the role could read none (or the server answered something else).
pub fn parse(xml: &str) -> Option<ServerUp> {
    let answer = Answer::of(xml)?;
    let ages: Vec<(&Signal, f64)> = SIGNALS
        .iter()
        .filter_map(|signal| {
            let age = answer.now - (signal.moment)(&answer)?;
            age.is_finite().then_some((signal, age))
        })
        .collect();
    let words = ages
        .iter()
        .map(|(signal, age)| format!("{}={age:.6}", signal.key))
        .collect::<Vec<_>>()
        .join(" ");
    ages.iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|&(signal, ago)| ServerUp {
            ago,
            says: signal.says,
            answer: words,
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

    /// An answer as `query_to_xml` writes it, with `now` and the elements given.
    fn xml(now: &str, elements: &[(&str, &str)]) -> String {
        let body: String = elements
            .iter()
            .map(|(name, value)| format!("  <{name}>{value}</{name}>\n"))
            .collect();
        format!(
            "<row xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\n  <now>{now}</now>\n{body}</row>\n\n"
        )
    }

    const NOW: &str = "2026-12-02T14:32:12.5+00:00";

    #[test]
    fn the_newest_readable_signal_dates_the_start() {
        let answer = xml(
            NOW,
            &[
                ("postmaster", "2026-12-02T13:32:12+00:00"),
                ("stats", "2026-12-02T14:32:00.25+00:00"),
                ("walwriter", "2026-12-02T14:32:02.5+00:00"),
            ],
        );
        let up = parse(&answer).unwrap();
        assert_eq!(up.ago, 10.0);
        assert!(up.says.starts_with("the walwriter's start"), "{up:?}");
        assert_eq!(
            up.answer,
            "postmaster=3600.500000 stats=12.250000 walwriter=10.000000"
        );
        let up = parse(&xml(NOW, &[("postmaster", "2026-12-02T14:32:09+00:00")])).unwrap();
        assert_eq!(up.ago, 3.5);
        assert!(up.says.starts_with("pg_postmaster_start_time()"));
    }

    #[test]
    fn offsets_are_taken_off_whatever_the_role_s_time_zone() {
        // 14:32:12.5 UTC is 20:17:12.5 at +05:45 and 10:32:12.5 at -04:00; a zone of old
        // can have an offset in seconds.
        for (now, postmaster) in [
            ("2026-12-02T20:17:12.5+05:45", "2026-12-02T10:32:09-04:00"),
            ("2026-12-03T00:32:12.5+10:00", "2026-12-02T14:32:09+00:00"),
        ] {
            let up = parse(&xml(now, &[("postmaster", postmaster)])).unwrap();
            assert_eq!(up.ago, 3.5, "{now} {postmaster}");
        }
        assert_eq!(xsd_timestamp("1970-01-01T00:00:00+00:53:28"), Some(-3208.0));
        assert_eq!(xsd_timestamp("1970-01-01T00:00:00-00:53:28"), Some(3208.0));
        assert_eq!(
            xsd_timestamp("2000-03-01T00:00:00+00:00"),
            Some(951_868_800.0)
        );
        assert_eq!(xsd_timestamp("2026-12-02 14:32:12+00"), None);
    }

    #[test]
    fn the_first_checkpoint_after_recovery_dates_the_start() {
        let checkpoint = |redo: &str, replayed: Option<&str>, file: &str| {
            let mut elements = vec![
                ("checkpoint", "2026-12-02T14:32:00+00:00"),
                ("checkpoint_redo", redo),
                ("checkpoint_file", file),
                ("current_file", "000000030000000000000001"),
            ];
            elements.extend(replayed.map(|r| ("replayed_to", r)));
            parse(&xml(NOW, &elements)).map(|up| up.ago)
        };
        let on_3 = "000000030000000000000001";
        // Where replay ended, or up to 16 MB after: its start, and a second for the rounding.
        assert_eq!(checkpoint("0/1539BB0", Some("0/1539BB0"), on_3), Some(11.5));
        assert_eq!(checkpoint("1/1539BB0", Some("1/539BB0"), on_3), Some(11.5));
        // Further on, before replay ended, or on a server that never replayed: none.
        assert_eq!(checkpoint("1/1539BB1", Some("1/539BB0"), on_3), None);
        assert_eq!(checkpoint("0/1539BB0", Some("0/1539BB1"), on_3), None);
        assert_eq!(checkpoint("0/1539BB0", None, on_3), None);
        // Still the last restartpoint on the old timeline: a promotion that just happened.
        assert_eq!(
            checkpoint("0/1539BB0", None, "000000020000000000000001"),
            Some(0.0)
        );
    }

    #[test]
    fn an_answer_without_signals_dates_nothing() {
        assert_eq!(parse(""), None);
        assert_eq!(parse(&xml(NOW, &[])), None);
        assert_eq!(parse(&xml(NOW, &[("postmaster", "yesterday")])), None);
        assert_eq!(parse(&xml("now", &[("postmaster", NOW)])), None);
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
        let (columns, from) = reading_sql();
        for signal in &SIGNALS {
            let guarded = if signal.from.is_some() {
                &from
            } else {
                &columns
            };
            for f in signal.functions {
                assert!(
                    columns.contains(&format!("to_regprocedure('pg_catalog.{f}')"))
                        && guarded.contains(&format!("to_regprocedure('pg_catalog.{f}')")),
                    "{f} unguarded: {columns} {from}"
                );
            }
            assert!(
                columns.contains(&format!(" AS {}", signal.key)),
                "{columns}"
            );
        }
        assert!(
            from.starts_with(", CASE WHEN ") && from.contains(" FROM "),
            "{from}"
        );
    }
}
