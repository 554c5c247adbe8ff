//! The command's environment: the `HEIMDALL_*` values it gets from the settings and from what
//! holds the lock, and the inherited ones it must lose. The names, and how a heimdall the command
//! starts reads them back, are in `environ.rs`.

use crate::config::Settings;
use crate::environ::{
    ENV_BACKEND_PID, ENV_DATABASE, ENV_DATABASE_URL, ENV_FENCING_TOKEN, ENV_KEY, ENV_LOCK_HELD,
    ENV_LOCK_SINCE, ENV_LOCK_TABLE, ENV_MODE, ENV_NAME, ENV_NAMESPACE, ENV_PID, ENV_SLOT,
    ENV_SLOTS,
};
use crate::hold::{Held, HeldBy};

/// What the command gets, and what it must not inherit.
pub struct CommandEnv {
    pub set: Vec<(&'static str, String)>,
    pub unset: Vec<&'static str>,
}

/// What the command learns about its lock; the key, database, mode and slot count also let a
/// heimdall that the command starts recognise the lock as already held. What it must not
/// inherit: with `--key`, names from an outer heimdall would describe another lock; without
/// slots, so would an inherited slot; and an inherited backend (for a lease) or table (for an
/// advisory lock) would name another lock's.
pub fn for_command(settings: &Settings, held: &Held) -> CommandEnv {
    let mut set = vec![
        (ENV_KEY, settings.lock.key.to_string()),
        (ENV_LOCK_HELD, "1".to_owned()),
        (ENV_DATABASE, settings.dial.info.describe()),
        (ENV_MODE, settings.mode.name().to_owned()),
        (ENV_SLOTS, settings.lock.slots.to_string()),
        (ENV_FENCING_TOKEN, held.fencing_token.to_string()),
        (ENV_PID, std::process::id().to_string()),
    ];
    let mut unset = Vec::new();
    match &held.by {
        HeldBy::Advisory {
            backend_pid,
            lock_since,
            ..
        } => {
            set.push((ENV_BACKEND_PID, backend_pid.to_string()));
            set.push((ENV_LOCK_SINCE, lock_since.clone()));
            unset.push(ENV_LOCK_TABLE);
        }
        HeldBy::Lease { table, .. } => {
            set.push((ENV_LOCK_TABLE, table.qualified()));
            unset.extend([ENV_BACKEND_PID, ENV_LOCK_SINCE]);
        }
    }
    match &settings.lock.names {
        Some((ns, name)) => {
            set.push((ENV_NAMESPACE, ns.clone()));
            set.push((ENV_NAME, name.clone()));
        }
        None => unset.extend([ENV_NAMESPACE, ENV_NAME]),
    }
    if settings.lock.slots > 1 {
        set.push((ENV_SLOT, held.slot.to_string()));
    } else {
        unset.push(ENV_SLOT);
    }
    // The lock database's password stays with heimdall (README, Security notes).
    if let Some(database) = &settings.database_for_command {
        set.push((ENV_DATABASE_URL, database.clone()));
    }
    CommandEnv { set, unset }
}
