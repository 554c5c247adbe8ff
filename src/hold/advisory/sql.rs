//! The statements of the acquisition protocol, as text: which functions each mode calls, the
//! first attempt over every slot, and the settling into the holding transaction. The steps
//! that send them, and what the answers mean, are in `advisory/mod.rs`.

use super::keepalive;
use super::once_held::wal_record_and_reading;
use crate::config::RecordMode;
use crate::db::DURABLE_COMMIT;
use crate::domain::key::LockKey;
use crate::domain::lock::{LockTarget, Mode};
use crate::hold::record::sql as record;

/// The lock functions of one mode, schema-qualified: a role's `search_path` must not be able to
/// put functions of its own with the same names in front of PostgreSQL's.
pub struct Functions {
    try_xact: &'static str,
    pub wait_xact: &'static str,
    try_session: &'static str,
    unlock_session: &'static str,
}

pub fn functions(mode: Mode) -> Functions {
    match mode {
        Mode::Exclusive => Functions {
            try_xact: "pg_catalog.pg_try_advisory_xact_lock",
            wait_xact: "pg_catalog.pg_advisory_xact_lock",
            try_session: "pg_catalog.pg_try_advisory_lock",
            unlock_session: "pg_catalog.pg_advisory_unlock",
        },
        Mode::Shared => Functions {
            try_xact: "pg_catalog.pg_try_advisory_xact_lock_shared",
            wait_xact: "pg_catalog.pg_advisory_xact_lock_shared",
            try_session: "pg_catalog.pg_try_advisory_lock_shared",
            unlock_session: "pg_catalog.pg_advisory_unlock_shared",
        },
    }
}

/// Read committed, whatever the role's default: a repeatable-read or serializable transaction
/// keeps its snapshot, and with it `backend_xmin`, for the whole run, which holds back VACUUM.
pub const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// Ends a transaction that may have taken the session-level lock on the way to holding (a
/// settle step that a cancel or a failure cut short): nothing of it may outlive the failure on a
/// server connection that a pooler rolls back and hands to another client.
pub const ROLLBACK_ALL: &str = "ROLLBACK; SELECT pg_catalog.pg_advisory_unlock_all()";

/// For a wait in the server's queue: the backend looks at its client's socket every second
/// while it waits (PostgreSQL 14 and later; older servers skip it), so a waiter that vanished
/// without a cancel (SIGKILLed, or cut off) leaves the queue within a second, instead of staying
/// at its head until granted a lock nobody will use, holding up every waiter behind it.
pub const WATCH_CLIENT: &str = " SELECT pg_catalog.set_config(s.n, '1s', true) \
     FROM (VALUES ('client_connection_check_interval')) s(n) \
     WHERE pg_catalog.current_setting(s.n, true) IS NOT NULL;";

/// Settings that would end the holding transaction, or its heartbeats, are switched off for it
/// alone (`SET LOCAL`: a pooler may hand the server connection to another client afterwards).
/// `idle_session_timeout` needs nothing: it never applies inside a transaction. PostgreSQL 17's
/// `transaction_timeout` is in [`GUARDED_SETTINGS`]: older servers do not know it.
const HOLDING_SETTINGS: &str = "SET LOCAL idle_in_transaction_session_timeout = 0; \
     SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0";

/// Settings for the holding transaction that an older server may not know, set (or skipped)
/// with the keepalive settings: a role's or database's `transaction_timeout` would end the
/// holding session, and the lock with it, however healthy the job.
const GUARDED_SETTINGS: [(&str, &str); 1] = [("transaction_timeout", "0")];

/// The first attempt: open the transaction and try every slot, in order, in one statement,
/// together with the standby check. CASE stops at the first slot it gets,
/// and keeps the volatile lock functions from running on a standby at all. One row: `standby`,
/// and the `slot` taken (-1 for none, NULL on a standby).
pub fn take_sql(lock: &LockTarget, mode: Mode) -> String {
    format!("{BEGIN}; {}", attempt_sql(lock, mode))
}

/// [`take_sql`] in a transaction already open: the statement alone.
pub fn attempt_sql(lock: &LockTarget, mode: Mode) -> String {
    let f = functions(mode);
    let attempts: String = lock
        .slot_keys()
        .iter()
        .enumerate()
        .map(|(i, key)| format!(" WHEN {}({}) THEN {i}", f.try_xact, key.sql_args()))
        .collect();
    format!(
        "SELECT pg_catalog.pg_is_in_recovery() AS standby, \
         CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL{attempts} ELSE -1 END AS slot"
    )
}

/// The savepoint a slice of a `--slots` wait runs in when the wait holds a `--queue` place:
/// rolling back to it ends the slice, but neither the transaction nor the place taken before it.
pub const SLICE: &str = "heimdall_wait";

/// Takes a waiting place of a `--queue` bound: the first free one of `places` places of the
/// lock `key`, tried in order, as column `place` (NULL when all are taken). CASE evaluates its
/// branches in order and stops at the first true one (OR promises no order), and each try is
/// atomic, so two runs that arrive together cannot both take the last place. A place is an
/// exclusive transaction-level lock whatever the run's mode, so it goes with the transaction
/// that waits: granted (the settle step's commit), cancelled, or its session gone.
pub fn place_sql(key: LockKey, places: u16) -> String {
    let tries: String = (0..places)
        .map(|i| {
            format!(
                " WHEN pg_catalog.pg_try_advisory_xact_lock({}) THEN {i}",
                key.place(i).sql_args()
            )
        })
        .collect();
    format!("CASE{tries} END")
}

/// A wait in the server's queue for `key` that first takes a place of a `--queue` bound
/// ([`place_sql`]), in the same statement, and waits only with a place: one row, `place`
/// (NULL: every place was taken, and nothing waited) and `granted`. The place is taken in a
/// CTE that PostgreSQL evaluates once, before the CASE that waits.
pub fn queued_wait_sql(key: LockKey, mode: Mode, places: u16) -> String {
    format!(
        "WITH p AS MATERIALIZED (SELECT {} AS place) SELECT p.place, \
         CASE WHEN p.place IS NOT NULL THEN {}({}) IS NOT NULL END AS granted FROM p",
        place_sql(key, places),
        functions(mode).wait_xact,
        key.sql_args()
    )
}

/// Turns a transaction that holds the lock on `key` into the holding transaction, without a
/// moment in which the lock is free and without a transaction id kept for the run:
/// 1. the session-level lock on the same key (granted at once: this backend holds it already),
///    so that the lock survives the commit that follows;
/// 2. the fencing token, a transaction id assigned while the lock is held, so tokens rise
///    strictly from one holder to the next;
/// 3. COMMIT AND CHAIN: the id is gone, and a pooler sees the connection still in a transaction;
/// 4. the settings for the holding transaction;
/// 5. the transaction-level lock again (at once, through the session lock), then the session
///    lock dropped, so nothing of the lock can outlive the transaction or the connection.
///
/// Step 5 also names the backend that holds the lock. Only this answer can: through a
/// transaction pooler, the transaction that waited in the queue may run on another server
/// connection than the first attempt did, and step 5 runs in the holding transaction itself.
///
/// On a standby every step is skipped, so the caller can refuse it by name. When this backend
/// did not hold the lock at 1, nothing is held at the end unless the lock came free meanwhile,
/// and then it is held properly: step 5's answer alone says whether the lock is held.
///
/// Step 2's statement also answers, with `server_up`, when the server came up (for the
/// lock-delay), and makes the token durable (see `once_held.rs`).
///
/// With the run record, step 2 writes the run's start in the same transaction (so it is
/// durable before the command starts, as the token is), and with `--min-interval` writes it
/// only when no run of the lock started within the interval: decided while this transaction
/// holds the lock, so two runs cannot both find the record empty (see `record::sql`).
///
/// The answer, row by row: step 2's (`fencing_token`, `server_up`, and the record's columns
/// with a record), step 5's (`held`, `since`: the transaction's start, `since_epoch`,
/// `backend_pid`), then the keepalive settings' (`keepalive`, see `keepalive::set_sql`) when
/// there are any.
pub fn settle_sql(
    key: LockKey,
    mode: Mode,
    keepalive: &[(&'static str, String)],
    server_up: bool,
    record: Option<(&RecordMode, &LockTarget, bool)>,
) -> String {
    let f = functions(mode);
    let args = key.sql_args();
    // Whether this transaction holds the lock (re-entrant: true for the holder, false for a run
    // that found it busy, whose answer is thrown away). Only a holder pays for the reading of
    // when the server came up and for the WAL record.
    let held_here = format!("{}({args})", f.try_xact);
    let up = wal_record_and_reading(&held_here, server_up);
    let token = format!(
        "CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
         WHEN {try_session}({args}) THEN pg_catalog.txid_current() END",
        try_session = f.try_session
    );
    let step_2 = match record {
        None => format!("SELECT {token} AS fencing_token, {up} AS server_up"),
        Some((record_mode, lock, check)) => {
            let source = record::Source {
                from: "lock",
                when: "lock.fencing_token IS NOT NULL",
                started_at: crate::hold::sql::CLOCK,
                rule: true,
            };
            // The token once, in a CTE: the run's start is written only if the lock is held.
            format!(
                "WITH lock AS MATERIALIZED (SELECT {token} AS fencing_token), {}, {} \
                 SELECT lock.fencing_token, {up} AS server_up, {} FROM lock, {}",
                record::read_ctes(record_mode, lock, check),
                record::started_cte(record_mode, lock, &source),
                record::answer_columns(),
                record::JOINED,
            )
        }
    };
    format!(
        "{step_2}; {DURABLE_COMMIT}; COMMIT AND CHAIN; {HOLDING_SETTINGS}; \
         SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
         WHEN {try_xact}({args}) THEN {unlock}({args}) END AS held, pg_catalog.now() AS since, \
         {since} AS since_epoch, pg_catalog.pg_backend_pid() AS backend_pid{keepalive}",
        since = crate::db::epoch_seconds_sql("pg_catalog.now()"),
        keepalive = keepalive::set_sql(
            &GUARDED_SETTINGS
                .iter()
                .map(|(name, value)| (*name, (*value).to_owned()))
                .chain(keepalive.iter().cloned())
                .collect::<Vec<_>>()
        ),
        try_xact = f.try_xact,
        unlock = f.unlock_session,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hold::advisory::request_sql::{
        replacer_column, replacer_name_sql, request_sql, superseded_sql,
    };

    #[test]
    fn no_statement_of_the_lock_leaves_an_operator_or_cast_to_the_search_path() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 3,
        };
        // `SET LOCAL x = v` is syntax, not an operator.
        let unset = |sql: String| {
            let mut parts = sql.split("SET LOCAL ");
            let first = parts.next().unwrap_or_default().to_owned();
            parts.fold(first, |kept, part| {
                kept + part.split_once(" = ").map_or(part, |(_, rest)| rest)
            })
        };
        let one = LockTarget {
            slots: 1,
            ..lock.clone()
        };
        for sql in [
            take_sql(&lock, Mode::Exclusive),
            queued_wait_sql(LockKey::Pair(1, 2), Mode::Shared, 3),
            queued_wait_sql(LockKey::Single(-5), Mode::Exclusive, 1),
            settle_sql(LockKey::Pair(1, 2), Mode::Shared, &[], true, None),
            settle_sql(
                LockKey::Pair(1, 2),
                Mode::Exclusive,
                &[],
                false,
                Some((&record_mode(), &one, true)),
            ),
            WATCH_CLIENT.to_owned(),
            crate::db::DURABLE_COMMIT.to_owned(),
            format!("SELECT {}", replacer_column(LockKey::Pair(1, 2))),
            replacer_name_sql(42),
            request_sql(LockKey::Pair(1, 2)),
            superseded_sql(LockKey::Single(-5)),
            crate::hold::advisory::once_held::warm_up_sql(LockKey::Pair(1, 2), true),
        ] {
            let sql = unset(sql);
            assert_eq!(record::unqualified(&sql), Vec::<&str>::new(), "{sql}");
        }
    }

    #[test]
    fn every_column_the_answers_are_read_by_is_named_in_the_statements() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 1,
        };
        let take = take_sql(&lock, Mode::Exclusive);
        let keepalive = [("tcp_keepalives_count", "5".to_owned())];
        let settle = settle_sql(LockKey::Pair(1, 2), Mode::Exclusive, &keepalive, true, None);
        for (sql, names) in [
            (&take, &["standby", "slot"][..]),
            (
                &queued_wait_sql(LockKey::Pair(1, 2), Mode::Exclusive, 2),
                &["place", "granted"][..],
            ),
            (
                &settle,
                &[
                    "fencing_token",
                    "server_up",
                    "held",
                    "since",
                    "since_epoch",
                    "backend_pid",
                    "keepalive",
                ],
            ),
        ] {
            for name in names {
                assert!(sql.contains(&format!(" AS {name}")), "{name}: {sql}");
            }
        }
    }

    #[test]
    fn the_holding_transaction_switches_off_every_timeout_that_could_end_it() {
        let sql = settle_sql(LockKey::Pair(1, 2), Mode::Exclusive, &[], true, None);
        for setting in [
            "SET LOCAL idle_in_transaction_session_timeout = 0",
            "SET LOCAL statement_timeout = 0",
            "SET LOCAL lock_timeout = 0",
            "('transaction_timeout', '0')",
        ] {
            assert!(sql.contains(setting), "{setting} missing: {sql}");
        }
        // Every setting comes after the chain, in the transaction that holds the lock.
        let chain = sql.find("COMMIT AND CHAIN").unwrap();
        assert!(sql.find("transaction_timeout").unwrap() > chain);
        assert!(sql.find("statement_timeout").unwrap() > chain);
    }

    /// A run that finds the lock busy throws the settle step's answer away: it must not pay
    /// for the reading of when the server came up, nor write the WAL record (whose commit would
    /// wait for a flush). Both are computed only when this transaction holds the lock.
    #[test]
    fn only_a_holder_reads_when_the_server_came_up_and_writes_the_wal_record() {
        for (mode, try_xact) in [
            (Mode::Exclusive, "pg_catalog.pg_try_advisory_xact_lock(1,2)"),
            (
                Mode::Shared,
                "pg_catalog.pg_try_advisory_xact_lock_shared(1,2)",
            ),
        ] {
            let sql = settle_sql(LockKey::Pair(1, 2), mode, &[], true, None);
            let guard = format!("pg_catalog.pg_is_in_recovery() OR NOT {try_xact} THEN NULL");
            let reading = sql.find("query_to_xml(pg_catalog.concat").unwrap();
            let record = sql.find("pg_logical_emit_message").unwrap();
            let guards: Vec<usize> = sql.match_indices(&guard).map(|(i, _)| i).collect();
            assert!(
                guards.iter().any(|&g| g < reading) && guards.iter().any(|&g| g < record),
                "{guard} does not guard both: {sql}"
            );
            assert_eq!(guards.len(), 1, "one guard, one query for both: {sql}");
        }
    }

    #[test]
    fn the_token_commits_durably_and_the_reading_rides_in_the_same_statement() {
        let sql = settle_sql(LockKey::Pair(1, 2), Mode::Exclusive, &[], true, None);
        let chain = sql.find("COMMIT AND CHAIN").unwrap();
        let durable = sql.find(DURABLE_COMMIT).unwrap();
        let token = sql.find("txid_current()").unwrap();
        let wal = sql.find("pg_logical_emit_message(true").unwrap();
        let reading = sql.find("pg_postmaster_start_time").unwrap();
        assert!(token < wal && wal < durable && durable < chain, "{sql}");
        assert!(token < reading && reading < chain, "{sql}");
        let without = settle_sql(LockKey::Pair(1, 2), Mode::Exclusive, &[], false, None);
        assert!(!without.contains("pg_postmaster_start_time"), "{without}");
        assert!(without.contains(DURABLE_COMMIT), "{without}");
    }

    fn record_mode() -> RecordMode {
        record::test_mode(Some(std::time::Duration::from_secs(1800)))
    }

    #[test]
    fn the_runs_start_is_written_under_the_lock_and_committed_with_the_token() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 1,
        };
        let sql = settle_sql(
            LockKey::Pair(1, 2),
            Mode::Exclusive,
            &[],
            true,
            Some((&record_mode(), &lock, true)),
        );
        let lock_taken = sql.find("pg_catalog.pg_try_advisory_lock(").unwrap();
        let written = sql.find("INSERT INTO \"public\".\"runs\"").unwrap();
        let durable = sql.find(DURABLE_COMMIT).unwrap();
        let chain = sql.find("COMMIT AND CHAIN").unwrap();
        assert!(
            lock_taken < written && written < durable && durable < chain,
            "{sql}"
        );
        assert!(
            sql.contains("WHERE rec_ok.fits AND lock.fencing_token IS NOT NULL"),
            "{sql}"
        );
        assert!(
            sql.contains("pid = EXCLUDED.pid WHERE r.started_at OPERATOR(pg_catalog.<=)"),
            "{sql}"
        );
        for name in [
            "fencing_token",
            "server_up",
            "record_fits",
            "run",
            "last_host",
        ] {
            assert!(sql.contains(&format!(" AS {name}")), "{name}: {sql}");
        }
    }

    #[test]
    fn a_place_is_tried_in_order_and_the_wait_comes_only_after_one_is_taken() {
        let key = LockKey::Pair(1, 2);
        let sql = queued_wait_sql(key, Mode::Exclusive, 3);
        let at = |needle: String| {
            sql.find(&needle)
                .unwrap_or_else(|| panic!("{needle}: {sql}"))
        };
        let tries: Vec<usize> = (0..3)
            .map(|i| at(format!("lock({}) THEN {i}", key.place(i).sql_args())))
            .collect();
        assert!(tries.windows(2).all(|w| w[0] < w[1]), "{sql}");
        // The wait is on the lock itself, in the CASE that reads the place, after every try.
        let wait = at("pg_catalog.pg_advisory_xact_lock(1,2)".to_owned());
        assert!(tries[2] < wait, "{sql}");
        assert!(sql.contains("THEN pg_catalog.pg_advisory_xact_lock(1,2) IS NOT NULL END"));
        // Places are exclusive whatever the mode: a shared place would let every run in.
        let shared = queued_wait_sql(key, Mode::Shared, 1);
        assert!(
            shared.contains("pg_try_advisory_xact_lock(")
                && !shared.contains("try_advisory_xact_lock_shared"),
            "{shared}"
        );
        assert!(
            shared.contains("pg_advisory_xact_lock_shared(1,2)"),
            "{shared}"
        );
    }
}
