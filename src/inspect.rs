//! The read-only subcommands: `status` (is the lock free, and who holds it), `list` (every lock
//! held through heimdall) and `key` (the keys and the pg_locks query, without a database).

use anyhow::{Context, Result};

use crate::appname;
use crate::cli::{KeyCli, LeaseDdlCli, ListCli, StatusCli, print_stdout};
use crate::config::{Connection, LockTarget, Mode};
use crate::db::Conn;
use crate::exit::{Classify, Failure};
use crate::holders::{self, Holder, human_age};
use crate::key::{Hash, LockKey};
use crate::lease::{self, LeaseHolder, LeaseTable};
use crate::log;

const STDOUT: &str = "cannot write to stdout";

/// "held by pid …", or "held in shared mode by pid …; pid …": several holders of one key are
/// no conflict when they share it, and the text should say so as the JSON does.
fn held_by(held: &[Holder]) -> String {
    let text = holders::describe(held);
    match text.strip_prefix("held by ") {
        Some(who) if held.iter().all(|h| h.mode == Mode::Shared) => {
            format!("held in shared mode by {who}")
        }
        _ => text,
    }
}

/// Exit 0 when free, the busy code when held, so scripts can test without running anything.
pub fn status(cli: StatusCli) -> Result<u8> {
    log::set_level(log::Level::from_args(&cli.output));
    let lock = LockTarget::from_args(&cli.lock)?;
    let connection = Connection::from_args(&cli.conn, "status", None)?;
    let mut conn = connection.open()?;
    if let Some(table) = &cli.lease.lease_table {
        return lease_status(&cli, &lock, &mut conn, table);
    }
    let all = holders::query(&mut conn, &lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let (held, waiting): (Vec<Holder>, Vec<Holder>) = all.into_iter().partition(|h| h.granted);
    let text = if cli.json {
        let (ns, name) = lock.names.clone().unzip();
        serde_json::json!({
                "lock": lock.short(),
                "namespace": ns,
                "name": name,
                "keys": lock.key.to_string(),
                "slots": lock.slots,
                "free": held.is_empty(),
                "holders": held.iter().map(Holder::to_json).collect::<Vec<_>>(),
                "waiting": waiting.len(),
        })
        .to_string()
    } else if held.is_empty() {
        format!("lock {}: free", lock.describe())
    } else {
        let waiting = match waiting.len() {
            0 => String::new(),
            n => format!("; {n} waiting"),
        };
        format!("lock {}: {}{waiting}", lock.describe(), held_by(&held))
    };
    print_stdout(format!("{text}\n")).context(STDOUT)?;
    Ok(if held.is_empty() {
        0
    } else {
        cli.busy_exit_code
    })
}

pub fn list(cli: ListCli) -> Result<u8> {
    log::set_level(log::Level::from_args(&cli.output));
    let connection = Connection::from_args(&cli.conn, "list", None)?;
    let mut conn = connection.open()?;
    if let Some(table) = &cli.lease.lease_table {
        return lease_list(&cli, &mut conn, table);
    }
    let locks = holders::heimdall_locks(&mut conn)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let mut out = String::new();
    if cli.json {
        let items: Vec<serde_json::Value> = locks
            .iter()
            .map(|h| {
                let parsed = h.application_name.as_deref().and_then(appname::parse);
                let mut value = h.to_json();
                if let Some((label, host, pid)) = parsed {
                    let (ns, name) = label
                        .split_once('/')
                        .map(|(a, b)| (Some(a.to_owned()), Some(b.to_owned())))
                        .unwrap_or((None, None));
                    value["slot"] = slot_of(&label, h.key).into();
                    value["lock"] = label.into();
                    value["namespace"] = ns.into();
                    value["name"] = name.into();
                    value["host"] = host.into();
                    value["heimdall_pid"] = pid.into();
                }
                value
            })
            .collect();
        out.push_str(&format!("{}\n", serde_json::Value::Array(items)));
    } else if locks.is_empty() {
        out.push_str("no locks held through heimdall\n");
    } else {
        out.push_str(&format!(
            "{:<32} {:<24} {:<4} {:<9} {:<36} AGE\n",
            "LOCK", "KEYS", "SLOT", "MODE", "HOLDER"
        ));
    }
    for h in locks.iter().filter(|_| !cli.json) {
        let (label, holder) = match h.application_name.as_deref().and_then(appname::parse) {
            Some((label, host, pid)) => (label, format!("{host} pid {pid} (backend {})", h.pid)),
            None => ("?".to_owned(), format!("backend {}", h.pid)),
        };
        let slot = slot_of(&label, h.key).map_or_else(|| "?".to_owned(), |s| s.to_string());
        let age = h.age_seconds.map_or_else(|| "?".to_owned(), human_age);
        out.push_str(&format!(
            "{label:<32} {:<24} {slot:<4} {:<9} {holder:<36} {age}\n",
            h.key.to_string(),
            h.mode.name()
        ));
    }
    print_stdout(out).context(STDOUT)?;
    Ok(0)
}

/// The highest slot number: `--slots` allows at most 1000.
const MAX_SLOT: u16 = 999;

/// Which slot of its lock a held key is (0 for a lock without --slots), from the label heimdall
/// puts in application_name: `key K` or `NS/NAME`, hashed either way since the label does not
/// say which --hash. `None` when the label was shortened or names another lock.
fn slot_of(label: &str, key: LockKey) -> Option<u16> {
    let bases: Vec<LockKey> = match label.strip_prefix("key ") {
        Some(k) => vec![k.parse().ok()?],
        // A namespace may itself contain '/': try every split.
        None => label
            .match_indices('/')
            .flat_map(|(at, _)| {
                let (ns, name) = (&label[..at], &label[at + 1..]);
                [Hash::Siphash, Hash::Fnv1].map(|h| LockKey::derive(h, ns, name))
            })
            .collect(),
    };
    bases
        .into_iter()
        .find_map(|base| (0..=MAX_SLOT).find(|i| base.slot(*i) == key))
}

/// Needs no database: the keys are a pure function of the names.
pub fn key(cli: KeyCli) -> Result<u8> {
    let lock = LockTarget::from_args(&cli.lock)?;
    let keys = lock.slot_keys();
    let query = pg_locks_query(&keys);
    if cli.json {
        let slots: Vec<serde_json::Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let (classid, objid, objsubid) = k.pg_locks_ids();
                serde_json::json!({
                    "slot": i,
                    "keys": k.to_string(),
                    "classid": classid,
                    "objid": objid,
                    "objsubid": objsubid,
                })
            })
            .collect();
        let json = serde_json::json!({
            "lock": lock.short(),
            "hash": lock.names.as_ref().map(|_| cli.lock.hash.name()),
            "keys": lock.key.to_string(),
            "slots": slots,
            "query": query,
        });
        print_stdout(format!("{json}\n")).context(STDOUT)?;
        return Ok(0);
    }
    let mut out = format!("lock:     {}\n", lock.short());
    if lock.names.is_some() {
        out.push_str(&format!("hash:     {}\n", cli.lock.hash.name()));
    }
    for (i, k) in keys.iter().enumerate() {
        let (classid, objid, objsubid) = k.pg_locks_ids();
        let slot = if keys.len() > 1 {
            format!(" (slot {i})")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "keys:     {k}{slot}   pg_locks: classid={classid} objid={objid} objsubid={objsubid}\n"
        ));
    }
    out.push_str(&format!("query:    {query}\n"));
    print_stdout(out).context(STDOUT)?;
    Ok(0)
}

/// The query a DBA can paste to see who holds (or waits for) these keys.
fn pg_locks_query(keys: &[LockKey]) -> String {
    let ids: Vec<String> = keys
        .iter()
        .map(|k| {
            let (c, o, s) = k.pg_locks_ids();
            format!("({c}, {o}, {s})")
        })
        .collect();
    format!(
        "SELECT l.pid, l.mode, l.granted, a.application_name, a.client_addr, a.backend_start \
         FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND (l.classid::int8, l.objid::int8, l.objsubid) IN ({});",
        ids.join(", ")
    )
}

/// The lease table's DDL, for a DBA: the same statement heimdall runs when the table is missing.
pub fn lease_ddl(cli: LeaseDdlCli) -> Result<u8> {
    print_stdout(format!("{}\n", cli.lease_table.ddl())).context(STDOUT)?;
    Ok(0)
}

/// `status --lease-table`: the live leases on the lock's keys.
fn lease_status(
    cli: &StatusCli,
    lock: &LockTarget,
    conn: &mut Conn,
    table: &LeaseTable,
) -> Result<u8> {
    let held = lease::lock_holders(conn, table, lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let text = if cli.json {
        serde_json::json!({
            "lock": lock.short(),
            "keys": lock.key.to_string(),
            "slots": lock.slots,
            "lease_table": table.to_string(),
            "free": held.is_empty(),
            "holders": held.iter().map(LeaseHolder::to_json).collect::<Vec<_>>(),
        })
        .to_string()
    } else if held.is_empty() {
        format!("lock {} (lease in {table}): free", lock.describe())
    } else {
        let each: Vec<String> = held
            .iter()
            .map(|h| format!("{} {}", h.name, h.describe()))
            .collect();
        format!(
            "lock {} (lease in {table}): held by {}",
            lock.describe(),
            each.join("; ")
        )
    };
    print_stdout(format!("{text}\n")).context(STDOUT)?;
    Ok(if held.is_empty() {
        0
    } else {
        cli.busy_exit_code
    })
}

/// `list --lease-table`: every live lease in the table.
fn lease_list(cli: &ListCli, conn: &mut Conn, table: &LeaseTable) -> Result<u8> {
    let leases = lease::all_holders(conn, table)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let mut out = String::new();
    if cli.json {
        let items: Vec<serde_json::Value> = leases.iter().map(LeaseHolder::to_json).collect();
        out.push_str(&format!("{}\n", serde_json::Value::Array(items)));
    } else if leases.is_empty() {
        out.push_str(&format!("no live leases in {table}\n"));
    } else {
        out.push_str(&format!(
            "{:<32} {:<24} {:<8} {:<44} EXPIRES IN\n",
            "LOCK", "KEYS", "VERSION", "HOLDER"
        ));
        for l in &leases {
            let expires = l
                .expires_in_seconds
                .map_or_else(|| "?".to_owned(), |s| format!("{s:.1}s"));
            out.push_str(&format!(
                "{:<32} {:<24} {:<8} {:<44} {expires}\n",
                l.name, l.key, l.version, l.holder
            ));
        }
    }
    print_stdout(out).context(STDOUT)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_found_from_the_label_whatever_the_hash() {
        let siphash = LockKey::derive(Hash::Siphash, "a/b", "c");
        assert_eq!(slot_of("a/b/c", siphash.slot(7)), Some(7));
        assert_eq!(slot_of("a/b/c", siphash), Some(0));
        let fnv1 = LockKey::derive(Hash::Fnv1, "joker", "test");
        assert_eq!(slot_of("joker/test", fnv1.slot(999)), Some(999));
        assert_eq!(slot_of("key 42", LockKey::Single(45)), Some(3));
        assert_eq!(slot_of("key 1,2", LockKey::Pair(1, 4)), Some(2));
        assert_eq!(slot_of("joker/te~", fnv1), None);
        assert_eq!(slot_of("key 42", LockKey::Single(41)), None);
    }
}
