//! The proof that an outer heimdall still holds the lock, as the SQL that asks it: one boolean,
//! for an advisory lock (the backend, its transaction, the keys, the mode) or a lease (the row's
//! version, unexpired). What makes a run ask, and what it does with the answer, is
//! `run/reentry.rs`.

use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::{LockTarget, Mode};
use crate::domain::outer::Outer;

use super::lease;

/// The query whose one boolean says whether `outer` still holds `lock` (in lease mode, in
/// `table`); `None` when the environment does not say enough to ask.
pub fn query(outer: &Outer, lock: &LockTarget, table: Option<&LeaseTable>) -> Option<String> {
    match (
        table,
        outer.fencing_token,
        outer.backend_pid,
        outer.lock_since,
    ) {
        (Some(table), Some(token), _, _) => Some(lease::holds_query(table, lock, token)),
        (None, _, Some(backend), Some(since)) => Some(advisory(backend, since, lock, outer.mode)),
        _ => None,
    }
}

/// One boolean, `held`: does `backend` hold a granted advisory lock on one of the lock's keys (any
/// slot), in this database, in a mode that covers `mode`, in the transaction that began at
/// `since` (microseconds since the epoch)? The start is compared as an integer: the float
/// `xact_start`'s epoch would go through the session's float formatting
/// (`extra_float_digits`), which may round it.
fn advisory(backend: i32, since: i64, lock: &LockTarget, mode: Mode) -> String {
    let eq = "OPERATOR(pg_catalog.=)";
    let keys: Vec<String> = lock
        .slot_keys()
        .into_iter()
        .map(|key| key.pg_locks_condition("l"))
        .collect();
    let modes = match mode {
        Mode::Exclusive => "'ExclusiveLock'",
        Mode::Shared => "'ExclusiveLock', 'ShareLock'",
    };
    // Every operator and cast is schema-qualified: through a transaction pool, another client
    // may have set a search_path that puts operators of its own first.
    format!(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_lock_status() l \
         WHERE l.locktype {eq} 'advisory' AND l.granted AND l.pid {eq} {backend} \
         AND l.database {eq} (SELECT d.oid FROM pg_catalog.pg_database d \
         WHERE d.datname {eq} pg_catalog.current_database()) \
         AND l.mode {eq} ANY (ARRAY[{modes}]) AND ({})) \
         AND EXISTS (SELECT FROM pg_catalog.pg_stat_activity a WHERE a.pid {eq} {backend} \
         AND {} {eq} {since}) AS held",
        keys.join(" OR "),
        crate::db::epoch_micros_sql("a.xact_start"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::LockKey;

    #[test]
    fn the_proof_asks_for_every_slot_key_and_a_covering_mode() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 2,
        };
        let sql = advisory(77, 1_764_500_000_123_456, &lock, Mode::Exclusive);
        assert!(sql.contains("l.pid OPERATOR(pg_catalog.=) 77"), "{sql}");
        assert!(sql.contains("ANY (ARRAY['ExclusiveLock'])"), "{sql}");
        assert_eq!(sql.matches("::pg_catalog.int2)").count(), 2, "{sql}");
        assert!(advisory(77, 1, &lock, Mode::Shared).contains("'ShareLock'"));
        // Another client of a pooled server connection may have set its search_path.
        assert_eq!(crate::db::unqualified(&sql), [""; 0], "{sql}");
        // The pid alone may have been reused: the holding transaction's start must match too,
        // to the microsecond.
        assert!(
            sql.contains("a.pid OPERATOR(pg_catalog.=) 77")
                && sql.contains("OPERATOR(pg_catalog.=) 1764500000123456"),
            "{sql}"
        );
    }
}
