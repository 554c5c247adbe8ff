//! The run record (`--run-table`, implied by `--min-interval`): one row per lock with its last
//! run (start, end, exit status, outcome, who ran it, how many runs), in a table heimdall
//! creates on first use, as lease mode does.
//!
//! A run's start is written by the statement that takes the lock (`advisory/sql.rs`,
//! `lease/sql.rs`), committed durably before the command starts, so a run that is killed still
//! counts; with `--min-interval` that statement also refuses to start a run within the interval
//! of the last one, decided under the lock, on the server's clock. The end is written by the
//! message that releases the lock. What is here: the statements' pieces (`sql.rs`), the table's
//! shape (`table.rs`), and the last run as messages, `status` and `list` show it.

use std::time::Instant;

use crate::db::{Row, Session, describe_pg_error};
use crate::domain::ending::signal_name;
use crate::domain::guard::RunEnd;
use crate::domain::lease_table::RunTable;
use crate::exit::{LOCK_LOST, Outcome, REPLACED, SIGNAL_BASE, TIMED_OUT};

pub mod sql;
pub mod table;

/// A run's row, once its start is written: what its end updates.
#[derive(Debug, Clone)]
pub struct Started {
    pub table: RunTable,
    pub key: String,
    /// The run's number: the end is written to the row only while it still carries it.
    pub run: i64,
}

/// What the statement that took the lock said of the record.
#[derive(Debug)]
pub enum Said {
    /// The run's start is written, with its number.
    Started(i64),
    /// `--min-interval`: a run started within it; this one must not. The last run, when the
    /// record has it.
    Skipped(Option<LastRun>),
    /// The table has another shape: nothing was written.
    Misfit,
}

impl Said {
    /// From the answer's columns (see `sql::answer_columns`).
    pub fn of(row: &Row) -> Said {
        if !row.is_true("record_fits") {
            return Said::Misfit;
        }
        match row.get::<i64>("run") {
            Some(run) => Said::Started(run),
            None => Said::Skipped(LastRun::from_row(row, "last_")),
        }
    }
}

/// The record's outcome for a run that ended as `outcome`, its end at `at`.
pub fn end_of(outcome: Outcome, at: Instant) -> RunEnd {
    let name = match outcome {
        Outcome::Exited(_) => "ran",
        Outcome::Signaled(_) => "signaled",
        Outcome::TimedOut => "timeout",
        Outcome::Replaced => "replaced",
        Outcome::LockLost | Outcome::Busy(_) | Outcome::Skipped(_) | Outcome::QueueFull(_) => {
            "lost"
        }
    };
    RunEnd {
        exit_code: outcome.code(),
        outcome: name,
        at,
    }
}

/// A lock's last run, as the record has it; ages and durations on the server's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct LastRun {
    pub key: String,
    pub name: String,
    pub runs: i64,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub ended_at: Option<String>,
    pub exit_code: Option<i32>,
    pub outcome: Option<String>,
    pub host: String,
    pub pid: i32,
    /// Seconds since it started.
    pub age: f64,
    /// Seconds from its start to its end.
    pub duration: Option<f64>,
}

/// How a last run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    Timeout,
    Lost,
    /// A replacer asked for the lock, and the command was stopped.
    Replaced,
    /// No end yet, and the lock is held (by this run, as far as anyone can tell).
    Running,
    /// No end, and the lock is free: the end never came (heimdall was killed, or lost its
    /// connection before it could write it).
    Killed,
}

impl Ending {
    pub fn name(self) -> &'static str {
        match self {
            Ending::Exited(_) => "ran",
            Ending::Signaled(_) => "signaled",
            Ending::Timeout => "timeout",
            Ending::Lost => "lost",
            Ending::Replaced => "replaced",
            Ending::Running => "running",
            Ending::Killed => "killed",
        }
    }
}

impl LastRun {
    /// The columns of `sql::last_columns` with `prefix`; `None` when there is no row.
    pub fn from_row(row: &Row, prefix: &str) -> Option<LastRun> {
        let col = |name: &str| format!("{prefix}{name}");
        Some(LastRun {
            key: row.string(&col("lock_key"))?,
            name: row.string(&col("lock_name")).unwrap_or_default(),
            runs: row.get(&col("runs")).unwrap_or_default(),
            started_at: row.string(&col("started_at")).unwrap_or_default(),
            ended_at: row.string(&col("ended_at")),
            exit_code: row.get(&col("exit_code")),
            outcome: row.string(&col("outcome")),
            host: row.string(&col("host")).unwrap_or_default(),
            pid: row.get(&col("pid")).unwrap_or_default(),
            age: row.get(&col("age")).unwrap_or_default(),
            duration: row.get(&col("duration")),
        })
    }

    /// How it ended; `held`: whether its lock is held now, by this run as far as one can tell.
    pub fn ending(&self, held: bool) -> Ending {
        let code = self.exit_code.unwrap_or_default();
        match (self.outcome.as_deref(), self.ended_at.is_some()) {
            (_, false) if held => Ending::Running,
            (_, false) => Ending::Killed,
            (Some("signaled"), _) => Ending::Signaled(code - i32::from(SIGNAL_BASE)),
            (Some("timeout"), _) => Ending::Timeout,
            (Some("lost"), _) => Ending::Lost,
            (Some("replaced"), _) => Ending::Replaced,
            _ => Ending::Exited(code),
        }
    }

    /// `started 4m 12s ago on web-3 (pid 4242), exited 0 after 2.1s`.
    pub fn describe(&self, held: bool) -> String {
        let after = self
            .duration
            .map_or_else(String::new, |d| format!(" after {}", span(d)));
        let end = match self.ending(held) {
            Ending::Exited(code) => format!("exited {code}{after}"),
            Ending::Signaled(signal) => format!("was killed by {}{after}", signal_name(signal)),
            Ending::Timeout => format!("was stopped by --timeout{after} (exit {TIMED_OUT})"),
            Ending::Lost => format!("lost its lock{after} (exit {LOCK_LOST})"),
            Ending::Replaced => format!("was replaced{after} (exit {REPLACED})"),
            Ending::Running => "still running".to_owned(),
            Ending::Killed => {
                "never ended (killed: its heimdall died before it could record the end)".to_owned()
            }
        };
        format!(
            "started {} ago on {} (pid {}), {end}",
            span(self.age),
            self.host,
            self.pid
        )
    }

    pub fn to_json(&self, held: bool) -> serde_json::Value {
        serde_json::json!({
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "exit_code": self.exit_code,
            "outcome": self.ending(held).name(),
            "holder": { "host": self.host, "pid": self.pid },
            "runs": self.runs,
            "age_seconds": self.age,
            "duration_seconds": self.duration,
        })
    }
}

/// `2.1s` under a minute, `4m 12s` beyond.
fn span(seconds: f64) -> String {
    if seconds < 60.0 {
        format!("{:.1}s", seconds.max(0.0))
    } else {
        humantime::format_duration(std::time::Duration::from_secs(seconds as u64)).to_string()
    }
}

/// The last runs of `keys` (every lock's with `None`), for `status` and `list`: none when the
/// table does not exist (no run has used it yet), an error naming the problem when it cannot be
/// read or has another shape.
pub fn last_runs(
    session: &mut Session,
    table: &RunTable,
    keys: Option<&[String]>,
) -> std::result::Result<Vec<LastRun>, String> {
    let unreadable = |e: &postgres::Error| {
        format!(
            "cannot read the run table {table}: {}",
            describe_pg_error(e)
        )
    };
    let present = session
        .first_row(&crate::hold::table::present_sql(table))
        .map_err(|e| unreadable(&e))?;
    if !present.is_true("present") {
        return Ok(Vec::new());
    }
    table::SHAPE.checked(session, table)?;
    let rows = session
        .rows(&sql::read(table, keys))
        .map_err(|e| unreadable(&e))?;
    Ok(rows
        .iter()
        .filter_map(|r| LastRun::from_row(r, ""))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(outcome: Option<&str>, exit_code: Option<i32>, duration: Option<f64>) -> LastRun {
        LastRun {
            key: "1,2".to_owned(),
            name: "a/b".to_owned(),
            runs: 3,
            started_at: "2026-01-31T02:00:00.000000Z".to_owned(),
            ended_at: duration.map(|_| "2026-01-31T02:00:02.100000Z".to_owned()),
            exit_code,
            outcome: outcome.map(str::to_owned),
            host: "web-3".to_owned(),
            pid: 4242,
            age: 252.4,
            duration,
        }
    }

    #[test]
    fn a_last_run_says_when_where_and_how_it_ended() {
        assert_eq!(
            run(Some("ran"), Some(0), Some(2.14)).describe(false),
            "started 4m 12s ago on web-3 (pid 4242), exited 0 after 2.1s"
        );
        assert_eq!(
            run(Some("signaled"), Some(143), Some(1.0)).describe(false),
            "started 4m 12s ago on web-3 (pid 4242), was killed by SIGTERM after 1.0s"
        );
        assert!(
            run(Some("timeout"), Some(124), Some(61.0))
                .describe(false)
                .ends_with("was stopped by --timeout after 1m 1s (exit 124)")
        );
        assert!(
            run(Some("lost"), Some(76), Some(3.0))
                .describe(true)
                .ends_with("lost its lock after 3.0s (exit 76)")
        );
        assert!(
            run(None, None, None)
                .describe(true)
                .ends_with("still running")
        );
        assert!(
            run(None, None, None)
                .describe(false)
                .contains("never ended (killed")
        );
    }

    #[test]
    fn the_json_names_the_outcome_and_the_holder() {
        let json = run(Some("ran"), Some(3), Some(0.2)).to_json(false);
        assert_eq!(json["exit_code"], 3);
        assert_eq!(json["outcome"], "ran");
        assert_eq!(json["holder"]["host"], "web-3");
        assert_eq!(json["holder"]["pid"], 4242);
        let killed = run(None, None, None).to_json(false);
        assert_eq!(killed["outcome"], "killed");
        assert!(killed["ended_at"].is_null() && killed["exit_code"].is_null());
        assert_eq!(run(None, None, None).to_json(true)["outcome"], "running");
    }

    #[test]
    fn each_outcome_is_recorded_with_heimdalls_exit_code() {
        let at = Instant::now();
        let end = end_of(Outcome::Exited(3), at);
        assert_eq!((end.exit_code, end.outcome), (3, "ran"));
        let end = end_of(Outcome::Signaled(libc::SIGTERM), at);
        assert_eq!((end.exit_code, end.outcome), (143, "signaled"));
        assert_eq!(end_of(Outcome::TimedOut, at).outcome, "timeout");
        assert_eq!(end_of(Outcome::LockLost, at).exit_code, 76);
    }
}
