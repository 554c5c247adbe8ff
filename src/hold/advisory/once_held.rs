//! What a run asks of the server once it holds the lock, in the statement that settles into
//! holding it (`sql::settle_sql`): the WAL record that makes the fencing token durable and the
//! lock-delay's reading of when the server came up (`delay.rs`), in one query; and what a run
//! about to wait asks before it waits, so that none of it is asked cold in a handoff.

use super::delay;
use super::request_sql::superseded_warm_up_sql;
use crate::domain::key::LockKey;

/// The transaction that assigns the fencing token must reach the disk before the token is
/// used: a token lost in a crash is handed out again (the next transaction id after recovery
/// is one past the last that WAL shows). A transaction that has an id but wrote no WAL commits
/// asynchronously whatever `synchronous_commit` says (xact.c, RecordTransactionCommit), so it
/// writes a transactional logical message (prefix `heimdall`, ignored by recovery; logical
/// decoding sees it), and commits under `DURABLE_COMMIT`. Skipped on a standby, where it
/// would fail, and for a role that may not execute it. PostgreSQL 17 gave the function a
/// fourth argument (`flush`, with a default): the call below fits both, and the privilege is
/// asked of whichever signature the server has, or the record would be skipped, and the token
/// lost in a crash, on 17 and later.
///
/// The same query reads when the server came up, when `server_up` says so (see
/// `delay::reading_sql`): both run only in a transaction that holds the lock (`held`), on a
/// primary (a waiter's [`warm_up_sql`] reads before, and writes nothing), and both need
/// `query_to_xml`, since a privilege is checked for every function a
/// statement names, even in a CASE branch that never runs. One query costs the fresh backend
/// every run gets half as much server time as two (about 1.4 ms against 2.8 ms, measured).
/// Its answer is `query_to_xml`'s row (`now`, the signals, `wal_record`), or NULL.
pub(super) fn wal_record_and_reading(held: &str, server_up: bool) -> String {
    format!(
        "CASE WHEN pg_catalog.pg_is_in_recovery() OR NOT {held} THEN NULL ELSE {} END",
        reading_xml(server_up, true)
    )
}

/// For a run about to wait in the server's queue for `key`: what it will ask once granted,
/// asked now, with the answers thrown away. A backend looks up, cold, everything a query names
/// the first time it runs it (1.4 ms for the question whether a replacer waits, about as much
/// for the reading of when the server came up, in a fresh backend); asked while the wait has yet
/// to begin, those look-ups are no longer paid in the handoff, between the holder's release and
/// the waiter's command. They write nothing (the privilege on the logical message is checked,
/// no message written) and lock nothing that the wait's transaction would keep (see
/// `request_sql::superseded_warm_up_sql`). The statistics snapshot the reading took is cleared,
/// so that the settle step reads the walwriter's start and the statistics' reset afresh after
/// the grant, as it did without a warm-up. Each statement ends with `;`.
pub(super) fn warm_up_sql(key: LockKey, server_up: bool) -> String {
    format!(
        "{} SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE {} END AS warm_up; \
         SELECT pg_catalog.pg_stat_clear_snapshot();",
        superseded_warm_up_sql(key),
        reading_xml(server_up, false)
    )
}

/// `query_to_xml` of the query that reads when the server came up (with `server_up`) and, with
/// `write`, writes the WAL record; as text.
fn reading_xml(server_up: bool, write: bool) -> String {
    let (signals, from) = if server_up {
        delay::reading_sql()
    } else {
        (String::new(), String::new())
    };
    let record = if write {
        "$heimdall$, pg_catalog.pg_logical_emit_message(true, 'heimdall', 'fencing token') \
         AS wal_record$heimdall$"
    } else {
        "''"
    };
    format!(
        "pg_catalog.query_to_xml(pg_catalog.concat('SELECT pg_catalog.clock_timestamp() AS now'\
         {signals}, CASE WHEN pg_catalog.has_function_privilege(COALESCE(pg_catalog.to_regprocedure(\
         'pg_catalog.pg_logical_emit_message(boolean,text,text,boolean)'), pg_catalog.to_regprocedure(\
         'pg_catalog.pg_logical_emit_message(boolean,text,text)')), 'EXECUTE') \
         THEN {record} END{from}), false, true, '')::pg_catalog.text"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiters_warm_up_reads_what_the_settle_step_reads_but_writes_and_holds_nothing() {
        let warm_up = warm_up_sql(LockKey::Pair(1, 2), true);
        let settle = wal_record_and_reading("true", true);
        assert!(
            warm_up.contains(&superseded_warm_up_sql(LockKey::Pair(1, 2))),
            "{warm_up}"
        );
        assert!(!warm_up.contains("pg_database"), "no lock kept: {warm_up}");
        assert!(
            warm_up.ends_with("pg_catalog.pg_stat_clear_snapshot();"),
            "{warm_up}"
        );
        assert!(warm_up.contains(&delay::reading_sql().0), "{warm_up}");
        assert!(settle.contains("pg_logical_emit_message(true"), "{settle}");
        assert!(
            !warm_up.contains("pg_logical_emit_message(true"),
            "{warm_up}"
        );
        assert!(!warm_up.contains("advisory_"), "no lock: {warm_up}");
        assert!(
            warm_up.contains("WHEN pg_catalog.pg_is_in_recovery() THEN NULL ELSE"),
            "pg_walfile_name fails on a standby: {warm_up}"
        );
        assert!(warm_up.ends_with(';'), "{warm_up}");
    }
}
