//! Re-entrancy, proved: a heimdall started inside a job that already holds the same lock runs
//! its command directly, but only once it has proved that. The environment alone proves
//! nothing: it can be copied to an unrelated process, or outlive the run in a daemon the job
//! started. Two facts are checked instead:
//!
//! - the heimdall named by `HEIMDALL_PID` is an ancestor of this process (the parent chain in
//!   /proc), so this process is part of its job;
//! - the backend named by `HEIMDALL_BACKEND_PID` still holds a granted advisory lock on these
//!   keys in this database, in the mode the environment says, in the transaction that began at
//!   `HEIMDALL_LOCK_SINCE` (`pg_lock_status()`, `pg_stat_activity`); in lease mode, the lease
//!   row in the same table still carries the outer run's version (`HEIMDALL_FENCING_TOKEN`)
//!   unexpired.
//!
//! A proof that fails is an ordinary run, which takes the lock itself. A proof that holds
//! decides between running directly and refusing: an exclusive run inside a shared holder
//! could only wait for its own parent.
//!
//! Not responsible for the cheaper environment check that makes a run a candidate
//! ([`crate::config`]), nor for running the command.

use crate::config::{LockTarget, Mode, Settings};
use crate::db::Conn;
use crate::hold::lease::LeaseTable;
use crate::log;

/// The outer heimdall an inner one may be running under, from its environment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outer {
    pub heimdall_pid: i32,
    /// The mode the outer run holds the lock in.
    pub mode: Mode,
    /// The backend that holds an advisory lock; absent in lease mode.
    pub backend_pid: Option<i32>,
    /// The outer run's fencing token: in lease mode, the version its lease row must carry.
    pub fencing_token: Option<i64>,
    /// When the outer run's holding transaction began, in microseconds since the epoch.
    pub lock_since: Option<i64>,
}

/// What a run inside another heimdall's job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nested {
    /// Not nested in a holder of this lock, or not proved to be: an ordinary run.
    No,
    /// Proved to run inside a holder of this lock that covers this run: run directly.
    Held,
    /// Proved to run inside a shared holder, and exclusive itself: refuse.
    InsideShared,
}

/// Whether the heimdall that started this one holds this very lock: its environment says so
/// ([`Settings::reentrant`]) and the proof holds on `conn`.
pub fn nested(settings: &Settings, conn: &mut Conn) -> Nested {
    let Some(outer) = settings.reentrant else {
        return Nested::No;
    };
    let lease = settings.lease.as_ref().map(|l| &l.table);
    if !proven(outer, &settings.lock, lease, conn) {
        Nested::No
    } else if outer.mode == Mode::Shared && settings.mode == Mode::Exclusive {
        Nested::InsideShared
    } else {
        Nested::Held
    }
}

/// Whether `outer` is proved to hold `lock` for this process, in the mode it says (see the
/// module docs). A failed query is no proof.
fn proven(outer: Outer, lock: &LockTarget, lease: Option<&LeaseTable>, conn: &mut Conn) -> bool {
    if !is_ancestor(outer.heimdall_pid) {
        log::info(format!(
            "the environment says heimdall pid {} holds this lock, but it is not an ancestor of this process; taking the lock normally",
            outer.heimdall_pid
        ));
        return false;
    }
    let sql = match (
        lease,
        outer.fencing_token,
        outer.backend_pid,
        outer.lock_since,
    ) {
        (Some(table), Some(token), _, _) => crate::hold::lease::holds_query(table, lock, token),
        (None, _, Some(backend), Some(since)) => holds_query(backend, since, lock, outer.mode),
        _ => {
            log::info(
                "the environment does not say what holds this lock for the heimdall that started this one; taking the lock normally",
            );
            return false;
        }
    };
    let held = conn.rows(&sql).map(|rows| {
        rows.first()
            .and_then(|row| row.first())
            .is_some_and(|value| value.as_deref() == Some("t"))
    });
    match held {
        Ok(true) => true,
        Ok(false) => {
            log::info(
                "the heimdall that started this one no longer holds the lock; taking the lock normally",
            );
            false
        }
        Err(e) => {
            log::info(format!(
                "cannot check whether the outer heimdall's backend holds the lock ({}); taking the lock normally",
                crate::db::describe_pg_error(&e)
            ));
            false
        }
    }
}

/// True if `pid` is this process's parent, grandparent, and so on.
fn is_ancestor(pid: i32) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: getppid has no preconditions.
    let mut current = unsafe { libc::getppid() };
    // A parent chain is short; the bound only guards against a loop read from a racing /proc.
    for _ in 0..4096 {
        if current == pid {
            return true;
        }
        if current <= 1 {
            return false;
        }
        match crate::process::child::stat(current) {
            Some(fields) => current = fields.ppid,
            None => return false,
        }
    }
    false
}

/// One boolean: does `backend` hold a granted advisory lock on one of the lock's keys (any
/// slot), in this database, in a mode that covers `mode`, in the transaction that began at
/// `since` (microseconds since the epoch)? The start is compared as an integer: the float
/// `xact_start`'s epoch would go through the session's float formatting
/// (`extra_float_digits`), which may round it.
fn holds_query(backend: i32, since: i64, lock: &LockTarget, mode: Mode) -> String {
    let eq = "OPERATOR(pg_catalog.=)";
    let keys: Vec<String> = lock
        .slot_keys()
        .into_iter()
        .map(|key| {
            let (classid, objid, objsubid) = key.pg_locks_ids();
            format!(
                "(l.classid {eq} {classid}::pg_catalog.oid AND l.objid {eq} {objid}::pg_catalog.oid \
                 AND l.objsubid {eq} {objsubid}::pg_catalog.int2)"
            )
        })
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
         AND {} {eq} {since})",
        keys.join(" OR "),
        crate::db::epoch_micros_sql("a.xact_start"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::LockKey;

    #[test]
    fn this_processs_parent_is_an_ancestor_and_init_and_itself_are_not() {
        let parent = std::os::unix::process::parent_id() as i32;
        let me = std::process::id() as i32;
        assert!(is_ancestor(parent));
        assert!(!is_ancestor(me));
        assert!(!is_ancestor(1));
    }

    #[test]
    fn the_proof_asks_for_every_slot_key_and_a_covering_mode() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 2,
        };
        let sql = holds_query(77, 1_764_500_000_123_456, &lock, Mode::Exclusive);
        assert!(sql.contains("l.pid OPERATOR(pg_catalog.=) 77"), "{sql}");
        assert!(sql.contains("ANY (ARRAY['ExclusiveLock'])"), "{sql}");
        assert_eq!(sql.matches("::pg_catalog.int2)").count(), 2, "{sql}");
        assert!(holds_query(77, 1, &lock, Mode::Shared).contains("'ShareLock'"));
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
