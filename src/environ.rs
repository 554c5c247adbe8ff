//! The environment contract between a heimdall and its command: the `HEIMDALL_*` variables the
//! command gets, those it loses, and how a heimdall that the command starts reads them back to
//! recognise a lock it already holds. `--help` and the man page list them from here.
//!
//! Not here: the flags' own environment twins (`HEIMDALL_WAIT`, ...), which clap reads
//! (`cli.rs`), and proving that an outer heimdall really holds the lock (`reentry.rs`).

use crate::config::{Connection, LockTarget, Mode, Settings};
use crate::hold::Held;
use crate::hold::lease::LeaseTable;
use crate::log;
use crate::reentry::Outer;

/// Environment variables through which a command learns about its lock, and through which a
/// heimdall started by that command recognises a lock it already holds.
pub const ENV_LOCK_HELD: &str = "HEIMDALL_LOCK_HELD";
pub const ENV_KEY: &str = "HEIMDALL_KEY";
pub const ENV_DATABASE: &str = "HEIMDALL_LOCK_DATABASE";
pub const ENV_MODE: &str = "HEIMDALL_LOCK_MODE";
pub const ENV_SLOTS: &str = "HEIMDALL_SLOTS";
/// The pid of the heimdall that holds the lock, and of its backend: a heimdall the command
/// starts proves re-entrancy with them (see [`crate::reentry`]); the keeper finds the job's
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
const ENV_NAMESPACE: &str = "HEIMDALL_NAMESPACE";
const ENV_NAME: &str = "HEIMDALL_NAME";
const ENV_SLOT: &str = "HEIMDALL_SLOT";
/// The `--database` string without its password, for a heimdall the command starts.
const ENV_DATABASE_URL: &str = "HEIMDALL_DATABASE_URL";

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

/// What the command learns about its lock; the key, database, mode and slot count also let a
/// heimdall that the command starts recognise the lock as already held.
pub fn for_command(settings: &Settings, held: &Held) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (ENV_KEY, settings.lock.key.to_string()),
        (ENV_LOCK_HELD, "1".to_owned()),
        (ENV_DATABASE, settings.connection.conn.describe()),
        (ENV_MODE, settings.mode.name().to_owned()),
        (ENV_SLOTS, settings.lock.slots.to_string()),
        (ENV_FENCING_TOKEN, held.fencing_token.to_string()),
        (ENV_PID, std::process::id().to_string()),
    ];
    if let Some(backend_pid) = held.backend_pid {
        env.push((ENV_BACKEND_PID, backend_pid.to_string()));
    }
    if let Some(since) = &held.lock_since {
        env.push((ENV_LOCK_SINCE, since.clone()));
    }
    if let Some(lease) = &settings.lease {
        env.push((ENV_LOCK_TABLE, lease.table.qualified()));
    }
    if let Some((ns, name)) = &settings.lock.names {
        env.push((ENV_NAMESPACE, ns.clone()));
        env.push((ENV_NAME, name.clone()));
    }
    if settings.lock.slots > 1 {
        env.push((ENV_SLOT, held.slot.to_string()));
    }
    // The lock database's password stays with heimdall (README, Security notes).
    if let Some(database) = &settings.connection.database_for_command {
        env.push((ENV_DATABASE_URL, database.clone()));
    }
    env
}

/// What the command must not inherit: with `--key`, names from an outer heimdall would
/// describe another lock; without slots, so would an inherited slot.
pub fn removed_for_command(settings: &Settings) -> Vec<&'static str> {
    let mut unset = Vec::new();
    if settings.lock.names.is_none() {
        unset.extend([ENV_NAMESPACE, ENV_NAME]);
    }
    if settings.lock.slots == 1 {
        unset.push(ENV_SLOT);
    }
    // A lease has no backend, and an advisory lock no table; an inherited one would name
    // another lock's.
    if settings.lease.is_some() {
        unset.extend([ENV_BACKEND_PID, ENV_LOCK_SINCE]);
    } else {
        unset.push(ENV_LOCK_TABLE);
    }
    unset
}

/// Whether the environment says an outer heimdall already holds this very lock: the same keys
/// and slot count on the same database, held the same way (an advisory lock, or a lease in the
/// same `table`). Gives the outer heimdall's pids and the mode it holds the lock in, which the
/// run must still prove ([`crate::reentry`]); whether that mode covers this run's is for the
/// run to decide once it has.
pub fn already_held(
    lock: &LockTarget,
    table: Option<&LeaseTable>,
    connection: &Connection,
    var: impl Fn(&str) -> Option<String>,
) -> Option<Outer> {
    let same_lock = var(ENV_LOCK_HELD).as_deref() == Some("1")
        && var(ENV_KEY) == Some(lock.key.to_string())
        && var(ENV_SLOTS) == Some(lock.slots.to_string())
        && var(ENV_DATABASE) == Some(connection.conn.describe());
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

/// An exclusive run inside a command that holds the same lock shared, proved, can never get
/// it: the outer heimdall keeps its share until this run, part of its command, has ended.
/// Says so.
pub fn refuse_inside_shared_parent(settings: &Settings) {
    log::warn(format!(
        "lock {} is held in shared mode by the heimdall that started this one ({ENV_MODE}=shared); an exclusive run inside it would wait for its own parent, so not running the command (take the outer lock without --shared, or this one with --shared)",
        settings.lock.describe()
    ));
}

/// Why a re-entrant run trusts its environment, for its log line.
pub fn reentry_proof(settings: &Settings) -> String {
    let holds = match &settings.lease {
        Some(lease) => format!(
            "the lease in {} still carries {ENV_FENCING_TOKEN}",
            lease.table
        ),
        None => format!("{ENV_BACKEND_PID} holds the keys since {ENV_LOCK_SINCE}"),
    };
    format!(
        "{ENV_LOCK_HELD}, {ENV_KEY}, {ENV_SLOTS}, {ENV_MODE} and {ENV_DATABASE} say so, {ENV_PID} is an ancestor and {holds}"
    )
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
    use std::time::Duration;

    use super::*;
    use crate::conninfo::{ConnSettings, Environment};
    use crate::domain::key::LockKey;

    #[test]
    fn reentrancy_needs_the_same_lock_slots_database_and_kind_of_lock() {
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 1,
        };
        let connection = Connection {
            conn: ConnSettings::resolve(
                Some("host=h dbname=d user=u"),
                &Environment {
                    var: &|_| None,
                    os_user: &|| Some("u".into()),
                    home: None,
                },
            )
            .unwrap(),
            connect_timeout: Duration::from_secs(1),
            application_name: "x".into(),
            database_for_command: None,
        };
        let env = |mode: &'static str, slots: &'static str, table: Option<&'static str>| {
            let db = connection.conn.describe();
            move |name: &str| match name {
                ENV_LOCK_HELD => Some("1".to_owned()),
                ENV_KEY => Some("1,2".to_owned()),
                ENV_SLOTS => Some(slots.to_owned()),
                ENV_MODE => Some(mode.to_owned()),
                ENV_DATABASE => Some(db.clone()),
                ENV_PID => Some("10".to_owned()),
                ENV_BACKEND_PID => Some("20".to_owned()),
                ENV_LOCK_SINCE => Some("1764500000.12345".to_owned()),
                ENV_FENCING_TOKEN => Some("30".to_owned()),
                ENV_LOCK_TABLE => table.map(str::to_owned),
                _ => None,
            }
        };
        let advisory = |env| already_held(&lock, None, &connection, env);
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
        assert!(already_held(&lock, None, &connection, |_: &str| None).is_none());
        // A lease is another lock than an advisory lock of the same name, and a lease in
        // another table another lock again.
        let leases = LeaseTable::parse("leases").unwrap();
        let lease = |env| already_held(&lock, Some(&leases), &connection, env);
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
