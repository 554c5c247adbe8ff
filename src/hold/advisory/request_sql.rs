//! The SQL of a takeover's request (`--replace`, `heimdall stop`): the replacer's shared lock on
//! the request key ([`LockKey::request`]), the holder's heartbeat question whether anyone holds
//! it, and a granted waiter's question whether a replacer waits behind it. Not responsible for
//! what the answers lead to (`takeover.rs`, `lock.rs`).

use crate::domain::key::LockKey;

/// `pg_locks`' rows of this database's advisory lock on `key` that some session holds, but for
/// this one: `key` is a takeover request's ([`LockKey::request`]), so these are the sessions
/// that ask for the lock. Read from `pg_lock_status()`, the function behind the view: a backend
/// that has not used the view yet loads its rewrite rule first, which costs more than the
/// question, and every granted waiter asks it (see [`superseded_sql`]).
fn requests(key: LockKey) -> String {
    let eq = "OPERATOR(pg_catalog.=)";
    format!(
        "{} AND r.database {eq} (SELECT d.oid FROM pg_catalog.pg_database d \
         WHERE d.datname {eq} pg_catalog.current_database())",
        requests_in_any_database(key)
    )
}

/// [`requests`] in every database: without the look-up of this database in `pg_database`, whose
/// lock a transaction keeps to its end.
fn requests_in_any_database(key: LockKey) -> String {
    format!(
        "FROM pg_catalog.pg_lock_status() r WHERE r.locktype OPERATOR(pg_catalog.=) 'advisory' \
         AND r.granted AND {} AND r.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()",
        key.request().pg_locks_condition("r")
    )
}

/// The pid of one session among `requests` ([`requests`] or [`requests_in_any_database`]),
/// NULL when there is none: a scalar subquery.
fn first_asker(requests: &str) -> String {
    format!("(SELECT r.pid {requests} LIMIT 1)")
}

/// The heartbeat's question beside `lock.rs`'s proof that the lock is held: the backend
/// pid of a session that asks for the lock held on `key` (`--replace`, `heimdall stop`), as
/// column `replacer`, NULL when none does. One look at `pg_locks` (no `pg_stat_activity`,
/// whose answers a transaction keeps from its first look: the holding transaction is one
/// long transaction), which the holder's heartbeat already sends a round trip for.
pub fn replacer_column(key: LockKey) -> String {
    format!("{} AS replacer", first_asker(&requests(key)))
}

/// Who asked for the lock, by the pid [`replacer_column`] found: its `application_name`, as
/// column `application_name`, and whether its role may ask, as column `may_stop`: whether it
/// could end this session with `pg_terminate_backend` (PostgreSQL's rule: a superuser, or, for
/// a holder that is not a superuser, a role with the privileges of the holder's role or of
/// `pg_signal_backend`). The request key is public and takes no privilege, so without this any
/// role that can connect could stop any heimdall job. The statistics snapshot is cleared first:
/// the holding transaction may have looked before the replacer connected.
pub fn replacer_name_sql(pid: i32) -> String {
    format!(
        "SELECT pg_catalog.pg_stat_clear_snapshot(); SELECT a.application_name, \
         CASE WHEN (SELECT r.rolsuper FROM pg_catalog.pg_roles r \
         WHERE r.rolname OPERATOR(pg_catalog.=) session_user) \
         THEN (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) a.usesysid) \
         ELSE pg_catalog.pg_has_role(a.usesysid, session_user, 'USAGE') \
         OR pg_catalog.pg_has_role(a.usesysid, 'pg_signal_backend', 'USAGE') END AS may_stop \
         FROM pg_catalog.pg_stat_activity a WHERE a.pid OPERATOR(pg_catalog.=) {pid}"
    )
}

/// A replacer's request, taken in the transaction that waits, before the wait: the shared
/// lock on the request key ([`LockKey::request`]). Shared, so that any number of replacers
/// ask at once; nothing takes it exclusively, so it is granted at once.
pub fn request_sql(key: LockKey) -> String {
    format!(
        "SELECT pg_catalog.pg_advisory_xact_lock_shared({});",
        key.request().sql_args()
    )
}

/// Asked of a waiter granted the lock on `key`, before it settles into holding it: does
/// another session ask for the lock (a replacer that waits behind it)? One row: `superseded_by`,
/// the asking session's pid (NULL: none does). Every `--wait` run asks it between the grant and
/// its command, so it asks no more than this: the asker's name comes from [`asker_name_sql`],
/// only when there is one. Asked once before the wait too ([`superseded_warm_up_sql`]).
pub fn superseded_sql(key: LockKey) -> String {
    format!("SELECT {} AS superseded_by", first_asker(&requests(key)))
}

/// [`superseded_sql`] as a run about to wait asks it, answer thrown away, so that the backend
/// has planned it before the grant (`once_held::warm_up_sql`): in every database, since the
/// wait's transaction would otherwise keep its lock on `pg_database` while it waits, hours
/// maybe (a `VACUUM FULL` of `pg_database` would queue behind every waiter). Ends with `;`.
pub fn superseded_warm_up_sql(key: LockKey) -> String {
    format!(
        "SELECT {} AS superseded_by;",
        first_asker(&requests_in_any_database(key))
    )
}

/// The `application_name` of the session `pid`, from a fresh statistics snapshot: the last row
/// (column `application_name`; no such row when the session is gone), after the snapshot's.
pub fn asker_name_sql(pid: i32) -> String {
    format!(
        "SELECT pg_catalog.pg_stat_clear_snapshot(); \
         SELECT a.application_name FROM pg_catalog.pg_stat_get_activity({pid}) a"
    )
}
