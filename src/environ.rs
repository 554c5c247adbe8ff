//! The environment contract between a heimdall and its command: the names of the `HEIMDALL_*`
//! variables the command gets, and how a heimdall that the command starts reads them back to
//! recognise a lock it already holds ([`already_held`]). `--help` and the man page list them
//! from here.
//!
//! Not here: the values the command gets (`run/environ.rs`), the flags' own environment twins
//! (`HEIMDALL_WAIT`, ...), which clap reads (`cli`), and proving that an outer heimdall really
//! holds the lock (`run/reentry.rs`).

use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::{LockTarget, Mode};
use crate::domain::outer::Outer;

/// Environment variables through which a command learns about its lock, and through which a
/// heimdall started by that command recognises a lock it already holds.
pub const ENV_LOCK_HELD: &str = "HEIMDALL_LOCK_HELD";
pub const ENV_KEY: &str = "HEIMDALL_KEY";
pub const ENV_DATABASE: &str = "HEIMDALL_LOCK_DATABASE";
pub const ENV_MODE: &str = "HEIMDALL_LOCK_MODE";
pub const ENV_SLOTS: &str = "HEIMDALL_SLOTS";
/// The pid of the heimdall that holds the lock, and of its backend: a heimdall the command
/// starts proves re-entrancy with them (see `run/reentry.rs`); the keeper finds the job's
/// processes by the first.
pub const ENV_PID: &str = "HEIMDALL_PID";
pub const ENV_BACKEND_PID: &str = "HEIMDALL_BACKEND_PID";
/// When the transaction that holds an advisory lock began (seconds since the epoch, with six
/// decimals): with the backend pid, what a nested heimdall checks against
/// `pg_stat_activity.xact_start`, since a backend pid alone may have been reused.
pub const ENV_LOCK_SINCE: &str = "HEIMDALL_LOCK_SINCE";
/// Lease mode: the lease table, schema-qualified. A nested heimdall re-enters a lease only in
/// the same table: a version proves nothing about a row in another one.
pub const ENV_LOCK_TABLE: &str = "HEIMDALL_LOCK_TABLE";
/// The fencing token; in lease mode also what proves an outer lease still held (`reentry`).
pub const ENV_FENCING_TOKEN: &str = "HEIMDALL_FENCING_TOKEN";
pub const ENV_NAMESPACE: &str = "HEIMDALL_NAMESPACE";
pub const ENV_NAME: &str = "HEIMDALL_NAME";
pub const ENV_SLOT: &str = "HEIMDALL_SLOT";
/// The `--database` string without its password, for a heimdall the command starts.
pub const ENV_DATABASE_URL: &str = "HEIMDALL_DATABASE_URL";

/// What `--help` and the man page say the command gets: each name, with its value or condition.
pub const DOCUMENTED: [(&str, &str); 14] = [
    (ENV_NAMESPACE, ""),
    (ENV_NAME, ""),
    (ENV_KEY, ""),
    (ENV_SLOT, " (with --slots)"),
    (ENV_LOCK_HELD, "=1"),
    (ENV_FENCING_TOKEN, ""),
    (ENV_DATABASE, ""),
    (ENV_MODE, ""),
    (ENV_SLOTS, ""),
    (ENV_PID, ""),
    (ENV_BACKEND_PID, " (not in lease mode)"),
    (ENV_LOCK_SINCE, " (not in lease mode)"),
    (ENV_LOCK_TABLE, " (in lease mode)"),
    (ENV_DATABASE_URL, " (without its password)"),
];

/// Whether the environment says an outer heimdall already holds this very lock: the same keys
/// and slot count on the same `database` (as `ConnInfo::describe` says it), held the same way
/// (an advisory lock, or a lease in the same `table`). Gives the outer heimdall's pids and the
/// mode it holds the lock in, which the run must still prove (`run/reentry.rs`); whether that
/// mode covers this run's is for the run to decide once it has.
pub fn already_held(
    lock: &LockTarget,
    table: Option<&LeaseTable>,
    database: &str,
    var: impl Fn(&str) -> Option<String>,
) -> Option<Outer> {
    let same_lock = var(ENV_LOCK_HELD).as_deref() == Some("1")
        && var(ENV_KEY) == Some(lock.key.to_string())
        && var(ENV_SLOTS) == Some(lock.slots.to_string())
        && var(ENV_DATABASE).as_deref() == Some(database);
    // An advisory lock and a lease of the same name are two locks, and so are leases in two
    // tables.
    let same_kind = match table {
        Some(table) => {
            var(ENV_LOCK_TABLE)
                .and_then(|t| LeaseTable::parse(&t).ok())
                .as_ref()
                == Some(table)
        }
        None => var(ENV_LOCK_TABLE).is_none(),
    };
    let mode = match var(ENV_MODE).as_deref() {
        Some("exclusive") => Mode::Exclusive,
        Some("shared") => Mode::Shared,
        _ => return None,
    };
    let pid = |name| var(name).and_then(|v| v.parse::<i32>().ok());
    Some(Outer {
        heimdall_pid: pid(ENV_PID)?,
        mode,
        backend_pid: pid(ENV_BACKEND_PID),
        fencing_token: var(ENV_FENCING_TOKEN).and_then(|v| v.parse().ok()),
        lock_since: var(ENV_LOCK_SINCE).and_then(|v| micros(&v)),
    })
    .filter(|_| same_lock && same_kind)
}

/// `HEIMDALL_LOCK_SINCE` as microseconds since the epoch, read exactly: seconds with at most
/// six decimals. Anything else is no proof.
fn micros(text: &str) -> Option<i64> {
    let (seconds, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if seconds.is_empty() || !digits(seconds) || !digits(fraction) || fraction.len() > 6 {
        return None;
    }
    let fraction: i64 = format!("{fraction:0<6}").parse().ok()?;
    seconds
        .parse::<i64>()
        .ok()?
        .checked_mul(1_000_000)?
        .checked_add(fraction)
}

/// `HEIMDALL_NAMESPACE, ..., HEIMDALL_SLOT (with --slots), HEIMDALL_LOCK_HELD=1, ...`, with
/// each name passed through `name` (the man page sets them in bold).
pub fn documented_list(name: impl Fn(&str) -> String) -> String {
    DOCUMENTED
        .iter()
        .map(|(var, note)| format!("{}{note}", name(var)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::LockKey;

    #[test]
    fn reentrancy_needs_the_same_lock_slots_database_and_kind_of_lock() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 1,
        };
        let database = "host=h port=5432 dbname=d user=u";
        let env = |mode: &'static str, slots: &'static str, table: Option<&'static str>| {
            move |name: &str| match name {
                ENV_LOCK_HELD => Some("1".to_owned()),
                ENV_KEY => Some("1,2".to_owned()),
                ENV_SLOTS => Some(slots.to_owned()),
                ENV_MODE => Some(mode.to_owned()),
                ENV_DATABASE => Some(database.to_owned()),
                ENV_PID => Some("10".to_owned()),
                ENV_BACKEND_PID => Some("20".to_owned()),
                ENV_LOCK_SINCE => Some("1764500000.12345".to_owned()),
                ENV_FENCING_TOKEN => Some("30".to_owned()),
                ENV_LOCK_TABLE => table.map(str::to_owned),
                _ => None,
            }
        };
        let advisory = |env| already_held(&lock, None, database, env);
        assert_eq!(
            advisory(env("exclusive", "1", None)),
            Some(Outer {
                heimdall_pid: 10,
                mode: Mode::Exclusive,
                backend_pid: Some(20),
                fencing_token: Some(30),
                lock_since: Some(1_764_500_000_123_450),
            })
        );
        // The mode is the outer run's, whatever this run asks for.
        assert_eq!(
            advisory(env("shared", "1", None)).map(|o| o.mode),
            Some(Mode::Shared)
        );
        assert!(advisory(env("exclusive", "2", None)).is_none());
        assert!(advisory(env("other", "1", None)).is_none());
        assert!(already_held(&lock, None, database, |_: &str| None).is_none());
        // A lease is another lock than an advisory lock of the same name, and a lease in
        // another table another lock again.
        let leases = LeaseTable::parse("leases").unwrap();
        let lease = |env| already_held(&lock, Some(&leases), database, env);
        assert!(advisory(env("exclusive", "1", Some("public.leases"))).is_none());
        assert!(lease(env("exclusive", "1", None)).is_none());
        assert!(lease(env("exclusive", "1", Some("other.leases"))).is_none());
        assert!(lease(env("exclusive", "1", Some("public.leases"))).is_some());
    }

    #[test]
    fn the_holding_transactions_start_is_read_to_the_microsecond_or_not_at_all() {
        assert_eq!(micros("1764500000.123456"), Some(1_764_500_000_123_456));
        assert_eq!(micros("1764500000.1"), Some(1_764_500_000_100_000));
        assert_eq!(micros("1764500000"), Some(1_764_500_000_000_000));
        for bad in [
            "",
            ".5",
            "1764500000.1234567",
            "1.7645e9",
            "-1",
            "1.-2",
            "nan",
        ] {
            assert_eq!(micros(bad), None, "{bad:?}");
        }
    }
}
