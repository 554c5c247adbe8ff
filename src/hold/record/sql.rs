//! The statements of the run record, as text: what a statement that takes the lock carries
//! along to write the run's start (and to refuse it within `--min-interval`), the end that the
//! releasing message writes, and the reads of `status` and `list`.
//!
//! Every name means the same whatever the session's `search_path`: the table is
//! schema-qualified, every function, operator and type too. Every instant is the server's
//! clock ([`CLOCK`]), so no host's clock decides anything.

use std::time::Duration;

use super::Started;
use crate::config::RecordMode;
use crate::domain::guard::RunEnd;
use crate::domain::lease_table::RunTable;
use crate::domain::lock::LockTarget;
use crate::exit::LOCK_LOST;
use crate::hold::sql::{CLOCK, interval, literal};

use super::table::SHAPE;

/// `instant` as RFC 3339 text in UTC (`2026-01-31T02:00:00.123456Z`), whatever the session's
/// `DateStyle` and `TimeZone`.
fn utc(instant: &str) -> String {
    format!(
        "pg_catalog.to_char(pg_catalog.timezone('UTC', {instant}), 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    )
}

/// Seconds from `from` to `to`, as a float.
fn seconds(from: &str, to: &str) -> String {
    format!("pg_catalog.date_part('epoch', {to} OPERATOR(pg_catalog.-) {from})")
}

/// The columns of a row of the table `alias`, as [`super::LastRun::from_row`] reads them with
/// `prefix`: the row's own, the instants as UTC text, and the run's `age` and `duration` in
/// seconds on the server's clock.
pub fn last_columns(alias: &str, prefix: &str) -> String {
    let plain: Vec<String> = [
        "lock_key",
        "lock_name",
        "runs",
        "exit_code",
        "outcome",
        "host",
        "pid",
    ]
    .iter()
    .map(|c| format!("{alias}.{c} AS {prefix}{c}"))
    .collect();
    format!(
        "{}, {} AS {prefix}started_at, {} AS {prefix}ended_at, {} AS {prefix}age, {} AS {prefix}duration",
        plain.join(", "),
        utc(&format!("{alias}.started_at")),
        utc(&format!("{alias}.ended_at")),
        seconds(&format!("{alias}.started_at"), CLOCK),
        seconds(&format!("{alias}.started_at"), &format!("{alias}.ended_at")),
    )
}

/// Whether a run of the lock started within `--min-interval` (by the row [`read_ctes`] read
/// before the statement); false without an interval.
pub fn recent(mode: &RecordMode) -> String {
    match mode.min_interval {
        Some(min) => format!(
            "EXISTS (SELECT FROM rec_before b WHERE b.started_at OPERATOR(pg_catalog.>) ({}))",
            since(min)
        ),
        None => "false".to_owned(),
    }
}

/// `clock_timestamp() - min`: the earliest start within `min`.
pub fn since(min: Duration) -> String {
    format!("{CLOCK} OPERATOR(pg_catalog.-) {}", interval(min))
}

/// Where a run starts from, in the statement that takes the lock.
pub struct Source<'a> {
    /// A relation of the statement (a CTE) that has a row when the lock is taken.
    pub from: &'a str,
    /// A condition on it that must hold too.
    pub when: &'a str,
    /// The start, an instant on the server's clock.
    pub started_at: &'a str,
    /// Whether the row's own start decides `--min-interval`: the advisory lock's statement,
    /// which holds the lock as it writes. A lease's statement decides by the lease's row.
    pub rule: bool,
}

/// The common table expressions a statement that takes the lock reads the record with:
/// `rec_ok` (whether the table has the run table's shape; checked with `check`, the run's
/// first statement) and `rec_before` (the lock's row before the statement).
pub fn read_ctes(mode: &RecordMode, lock: &LockTarget, check: bool) -> String {
    let fits = if check {
        SHAPE.fits_sql(&mode.table)
    } else {
        "true".to_owned()
    };
    format!(
        "rec_ok AS (SELECT {fits} AS fits), \
         rec_before AS (SELECT b.* FROM {t} b WHERE b.lock_key OPERATOR(pg_catalog.=) {key})",
        t = mode.table.sql(),
        key = literal(&lock.key.to_string()),
    )
}

/// The common table expression that writes the run's start, after [`read_ctes`] and `source`:
/// `rec_started`, the row written with the run's number, when the lock was taken and, with
/// `--min-interval` and `source.rule`, no run started within it. That is checked on the row's
/// newest version, which a run that raced this one cannot slip past.
pub fn started_cte(mode: &RecordMode, lock: &LockTarget, source: &Source) -> String {
    let rule = match mode.min_interval {
        Some(min) if source.rule => format!(
            " WHERE r.started_at OPERATOR(pg_catalog.<=) (EXCLUDED.started_at OPERATOR(pg_catalog.-) {})",
            interval(min)
        ),
        _ => String::new(),
    };
    format!(
        "rec_started AS (INSERT INTO {t} AS r \
         (lock_key, lock_name, runs, started_at, ended_at, exit_code, outcome, host, pid) \
         SELECT {key}, {name}, 1, {started_at}, NULL, NULL, NULL, {host}, {pid} \
         FROM {from}, rec_ok WHERE rec_ok.fits AND {when} \
         ON CONFLICT (lock_key) DO UPDATE SET lock_name = EXCLUDED.lock_name, \
         runs = r.runs OPERATOR(pg_catalog.+) 1, started_at = EXCLUDED.started_at, \
         ended_at = NULL, exit_code = NULL, outcome = NULL, host = EXCLUDED.host, \
         pid = EXCLUDED.pid{rule} RETURNING r.runs)",
        t = mode.table.sql(),
        key = literal(&lock.key.to_string()),
        name = literal(&lock.short()),
        host = literal(&mode.host),
        pid = std::process::id(),
        from = source.from,
        when = source.when,
        started_at = source.started_at,
    )
}

/// The columns [`read_ctes`] and [`started_cte`] add to the statement's answer: `record_fits`, `run` (the run's
/// number, NULL when it did not start) and the lock's last run before it (`last_…`, see
/// [`last_columns`]).
pub fn answer_columns() -> String {
    format!(
        "rec_ok.fits AS record_fits, (SELECT s.runs FROM rec_started s) AS run, {}",
        last_columns("rec_before", "last_")
    )
}

/// What the answer's FROM clause joins for [`answer_columns`].
pub const JOINED: &str = "rec_ok LEFT JOIN rec_before ON true";

/// The run's end, for the message that releases the lock: written only to this run's row
/// (its key and number), as `end` says while `held` (SQL) says the lock was still held then,
/// else as lost. The end is when the command ended, on the server's clock: the release may
/// come later (`--min-hold`).
pub fn end(started: &Started, end: &RunEnd, held: &str) -> String {
    let ago = end.at.elapsed();
    format!(
        "UPDATE {t} AS r SET ended_at = ({CLOCK} OPERATOR(pg_catalog.-) {ago}), \
         exit_code = CASE WHEN {held} THEN {code} ELSE {LOCK_LOST} END, \
         outcome = CASE WHEN {held} THEN {outcome} ELSE 'lost' END \
         WHERE r.lock_key OPERATOR(pg_catalog.=) {key} AND r.runs OPERATOR(pg_catalog.=) {run}",
        t = started.table.sql(),
        ago = interval(ago),
        code = end.exit_code,
        outcome = literal(end.outcome),
        key = literal(&started.key),
        run = started.run,
    )
}

/// The rows of `keys`, or every row with `None`, for `status` and `list` (see
/// [`last_columns`]).
pub fn read(table: &RunTable, keys: Option<&[String]>) -> String {
    let filter = keys.map_or_else(String::new, |keys| {
        let keys: Vec<String> = keys.iter().map(|k| literal(k)).collect();
        format!(
            " WHERE r.lock_key OPERATOR(pg_catalog.=) ANY (ARRAY[{}])",
            keys.join(", ")
        )
    });
    format!(
        "SELECT {} FROM {} r{filter} ORDER BY r.lock_name, r.lock_key",
        last_columns("r", ""),
        table.sql()
    )
}

/// For tests: the run record in `runs` on host `web-3`, with `min` as `--min-interval`.
#[cfg(test)]
pub fn test_mode(min: Option<Duration>) -> RecordMode {
    RecordMode {
        table: RunTable::parse_for("--run-table", "runs").unwrap(),
        min_interval: min,
        host: "web-3".to_owned(),
    }
}

/// For tests: `db::unqualified`, once the assignments of the record's SET lists (syntax, not
/// the `=` operator) are taken out.
#[cfg(test)]
pub fn unqualified(sql: &str) -> Vec<&'static str> {
    let mut bare = sql.to_owned();
    for c in SHAPE.columns {
        for prefix in ["SET ", ", "] {
            bare = bare.replace(&format!("{prefix}{} = ", c.name), prefix);
        }
    }
    crate::db::unqualified(&bare)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::domain::key::LockKey;

    fn mode(min: Option<Duration>) -> RecordMode {
        test_mode(min)
    }

    #[test]
    fn no_statement_of_the_record_leaves_an_operator_or_cast_to_the_search_path() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: Some(("a".to_owned(), "b".to_owned())),
            slots: 1,
        };
        let source = Source {
            from: "lock",
            when: "lock.fencing_token IS NOT NULL",
            started_at: CLOCK,
            rule: true,
        };
        let min = Some(Duration::from_secs(1800));
        let started = Started {
            table: mode(None).table,
            key: "1,2".to_owned(),
            run: 7,
        };
        let end = RunEnd {
            exit_code: 3,
            outcome: "ran",
            at: Instant::now(),
        };
        for sql in [
            read_ctes(&mode(min), &lock, true),
            started_cte(&mode(min), &lock, &source),
            recent(&mode(min)),
            answer_columns(),
            super::end(&started, &end, "true"),
            crate::hold::table::present_sql(&mode(None).table),
            read(&mode(None).table, Some(&["1,2".to_owned()])),
            read(&mode(None).table, None),
        ] {
            assert_eq!(unqualified(&sql), [""; 0], "{sql}");
        }
    }

    #[test]
    fn the_interval_is_checked_on_the_rows_newest_version_only_where_asked() {
        let lock = LockTarget {
            key: LockKey::Single(42),
            names: None,
            slots: 1,
        };
        let mut source = Source {
            from: "taken",
            when: "true",
            started_at: "taken.acquired_at",
            rule: true,
        };
        let min = Some(Duration::from_secs(60));
        let sql = started_cte(&mode(min), &lock, &source);
        assert!(sql.contains("RETURNING r.runs"), "{sql}");
        assert!(
            sql.contains(
                "pid = EXCLUDED.pid WHERE r.started_at OPERATOR(pg_catalog.<=) (EXCLUDED.started_at"
            ),
            "{sql}"
        );
        assert!(sql.contains("60000::pg_catalog.float8"), "{sql}");
        assert!(read_ctes(&mode(min), &lock, false).contains("SELECT true AS fits"));
        assert!(read_ctes(&mode(min), &lock, true).contains("pg_catalog.regclass"));
        source.rule = false;
        assert!(!started_cte(&mode(min), &lock, &source).contains("r.started_at OPERATOR"));
        source.rule = true;
        assert!(!started_cte(&mode(None), &lock, &source).contains("r.started_at OPERATOR"));
        assert_eq!(recent(&mode(None)), "false");
    }
}
