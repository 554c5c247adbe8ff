//! The read-only subcommands: `status` (is the lock free, and who holds it), `list` (every lock
//! held through heimdall) and `key` (the keys and the pg_locks query, without a database).

use anyhow::Result;

use crate::cli::{KeyCli, ListCli, StatusCli};
use crate::config::{Connection, LockTarget};
use crate::exit::{Classify, Failure};
use crate::holders::{self, Holder, human_age, parse_application_name};
use crate::key::LockKey;
use crate::lock;
use crate::log;

/// Exit 0 when free, the busy code when held, so scripts can test without running anything.
pub fn status(cli: StatusCli) -> Result<u8> {
    log::set_level(log::Level::from_args(&cli.output));
    let lock = LockTarget::from_args(&cli.lock)?;
    let connection = Connection::from_args(&cli.conn, "status", None)?;
    let mut conn = lock::connect(&connection)?;
    let all = holders::query(&mut conn, &lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let (held, waiting): (Vec<Holder>, Vec<Holder>) = all.into_iter().partition(|h| h.granted);
    if cli.json {
        let (ns, name) = lock.names.clone().unzip();
        println!(
            "{}",
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
        );
    } else if held.is_empty() {
        println!("lock {}: free", lock.describe());
    } else {
        let waiting = match waiting.len() {
            0 => String::new(),
            n => format!("; {n} waiting"),
        };
        println!(
            "lock {}: {}{waiting}",
            lock.describe(),
            holders::describe(&held)
        );
    }
    Ok(if held.is_empty() {
        0
    } else {
        cli.busy_exit_code
    })
}

pub fn list(cli: ListCli) -> Result<u8> {
    log::set_level(log::Level::from_args(&cli.output));
    let connection = Connection::from_args(&cli.conn, "list", None)?;
    let mut conn = lock::connect(&connection)?;
    let locks = holders::heimdall_locks(&mut conn)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    if cli.json {
        let items: Vec<serde_json::Value> = locks
            .iter()
            .map(|h| {
                let parsed = h
                    .application_name
                    .as_deref()
                    .and_then(parse_application_name);
                let mut value = h.to_json();
                if let Some((label, host, pid)) = parsed {
                    let (ns, name) = label
                        .split_once('/')
                        .map(|(a, b)| (Some(a.to_owned()), Some(b.to_owned())))
                        .unwrap_or((None, None));
                    value["lock"] = label.into();
                    value["namespace"] = ns.into();
                    value["name"] = name.into();
                    value["host"] = host.into();
                    value["heimdall_pid"] = pid.into();
                }
                value
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
        return Ok(0);
    }
    if locks.is_empty() {
        println!("no locks held through heimdall");
        return Ok(0);
    }
    println!(
        "{:<32} {:<24} {:<9} {:<36} AGE",
        "LOCK", "KEYS", "MODE", "HOLDER"
    );
    for h in &locks {
        let (label, holder) = match h
            .application_name
            .as_deref()
            .and_then(parse_application_name)
        {
            Some((label, host, pid)) => (label, format!("{host} pid {pid} (backend {})", h.pid)),
            None => ("?".to_owned(), format!("backend {}", h.pid)),
        };
        let age = h.age_seconds.map_or_else(|| "?".to_owned(), human_age);
        println!(
            "{label:<32} {:<24} {:<9} {holder:<36} {age}",
            h.key.to_string(),
            h.mode
        );
    }
    Ok(0)
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
        println!(
            "{}",
            serde_json::json!({
                "lock": lock.short(),
                "hash": lock.names.as_ref().map(|_| cli.lock.hash.name()),
                "keys": lock.key.to_string(),
                "slots": slots,
                "query": query,
            })
        );
        return Ok(0);
    }
    println!("lock:     {}", lock.short());
    if lock.names.is_some() {
        println!("hash:     {}", cli.lock.hash.name());
    }
    for (i, k) in keys.iter().enumerate() {
        let (classid, objid, objsubid) = k.pg_locks_ids();
        let slot = if keys.len() > 1 {
            format!(" (slot {i})")
        } else {
            String::new()
        };
        println!(
            "keys:     {k}{slot}   pg_locks: classid={classid} objid={objid} objsubid={objsubid}"
        );
    }
    println!("query:    {query}");
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
