//! The environment contract between a heimdall and its command: the `HEIMDALL_*` variables the
//! command gets, those it loses, and how a heimdall that the command starts reads them back to
//! recognise a lock it already holds. `--help` and the man page list them from here.
//!
//! Not here: the flags' own environment twins (`HEIMDALL_WAIT`, ...), which clap reads
//! (`cli.rs`), and proving that an outer heimdall really holds the lock (`reentry.rs`).

use crate::config::{Connection, LockTarget, Mode, Settings};
use crate::hold::Held;
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
/// When the transaction that holds an advisory lock began (seconds since the epoch): with the
/// backend pid, what a nested heimdall checks against `pg_stat_activity.xact_start`, since a
/// backend pid alone may have been reused.
pub const ENV_LOCK_SINCE: &str = "HEIMDALL_LOCK_SINCE";
/// The fencing token; in lease mode also what proves an outer lease still held (`reentry`).
pub const ENV_FENCING_TOKEN: &str = "HEIMDALL_FENCING_TOKEN";
const ENV_NAMESPACE: &str = "HEIMDALL_NAMESPACE";
const ENV_NAME: &str = "HEIMDALL_NAME";
const ENV_SLOT: &str = "HEIMDALL_SLOT";
/// The `--database` string without its password, for a heimdall the command starts.
const ENV_DATABASE_URL: &str = "HEIMDALL_DATABASE_URL";

/// What `--help` and the man page say the command gets: each name, with its value or condition.
pub const DOCUMENTED: [(&str, &str); 13] = [
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
    // A lease has no backend; an inherited one would name another lock's.
    if settings.lease.is_some() {
        unset.extend([ENV_BACKEND_PID, ENV_LOCK_SINCE]);
    }
    unset
}

/// Whether the environment says an outer heimdall already holds this very lock: the same keys
/// and slot count on the same database, in a mode at least as strong (an exclusive holder
/// covers a shared request; a shared holder cannot cover an exclusive one). Gives the outer
/// heimdall's pids, which the run must still check.
pub fn already_held(
    lock: &LockTarget,
    mode: Mode,
    connection: &Connection,
    var: impl Fn(&str) -> Option<String>,
) -> Option<Outer> {
    let held_mode = var(ENV_MODE);
    let said = var(ENV_LOCK_HELD).as_deref() == Some("1")
        && var(ENV_KEY) == Some(lock.key.to_string())
        && var(ENV_SLOTS) == Some(lock.slots.to_string())
        && var(ENV_DATABASE) == Some(connection.conn.describe())
        && (held_mode.as_deref() == Some(Mode::Exclusive.name())
            || held_mode.as_deref() == Some(mode.name()));
    let pid = |name| var(name).and_then(|v| v.parse::<i32>().ok());
    Some(Outer {
        heimdall_pid: pid(ENV_PID)?,
        backend_pid: pid(ENV_BACKEND_PID),
        fencing_token: var(ENV_FENCING_TOKEN).and_then(|v| v.parse().ok()),
        // A number, or nothing: the value goes into the proof's SQL.
        lock_since: var(ENV_LOCK_SINCE)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite()),
    })
    .filter(|_| said)
}

/// An exclusive run inside a command that holds the same lock shared can never get it: the
/// outer heimdall keeps its share until this run, part of its command, has ended. Says so.
pub fn refused_inside_shared_parent(settings: &Settings) -> bool {
    let inside = settings.mode == Mode::Exclusive
        && already_held(&settings.lock, Mode::Shared, &settings.connection, |name| {
            std::env::var(name).ok()
        })
        .is_some();
    if inside {
        log::warn(format!(
            "lock {} is held in shared mode by the heimdall that started this one ({ENV_MODE}=shared); an exclusive run inside it would wait for its own parent, so not running the command (take the outer lock without --shared, or this one with --shared)",
            settings.lock.describe()
        ));
    }
    inside
}

/// Why a re-entrant run trusts its environment, for its log line.
pub fn reentry_proof() -> String {
    format!(
        "{ENV_LOCK_HELD}, {ENV_KEY}, {ENV_SLOTS}, {ENV_MODE} and {ENV_DATABASE} say so, {ENV_PID} is an ancestor and {ENV_BACKEND_PID} holds the keys"
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
    use crate::conn::{ConnSettings, Environment};
    use crate::key::LockKey;

    #[test]
    fn reentrancy_needs_the_same_lock_slots_database_and_a_strong_enough_mode() {
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
        let env = |mode: &'static str, slots: &'static str| {
            let db = connection.conn.describe();
            move |name: &str| match name {
                ENV_LOCK_HELD => Some("1".to_owned()),
                ENV_KEY => Some("1,2".to_owned()),
                ENV_SLOTS => Some(slots.to_owned()),
                ENV_MODE => Some(mode.to_owned()),
                ENV_DATABASE => Some(db.clone()),
                ENV_PID => Some("10".to_owned()),
                ENV_BACKEND_PID => Some("20".to_owned()),
                ENV_LOCK_SINCE => Some("1764500000.123456".to_owned()),
                ENV_FENCING_TOKEN => Some("30".to_owned()),
                _ => None,
            }
        };
        let held = |mode, env| already_held(&lock, mode, &connection, env);
        assert_eq!(
            held(Mode::Exclusive, env("exclusive", "1")),
            Some(Outer {
                heimdall_pid: 10,
                backend_pid: Some(20),
                fencing_token: Some(30),
                lock_since: Some(1_764_500_000.123_456),
            })
        );
        assert!(held(Mode::Shared, env("exclusive", "1")).is_some());
        assert!(held(Mode::Exclusive, env("shared", "1")).is_none());
        assert!(held(Mode::Exclusive, env("exclusive", "2")).is_none());
        assert!(already_held(&lock, Mode::Exclusive, &connection, |_: &str| None).is_none());
    }
}
