//! The subcommands that look at locks: `status` (is the lock free, who holds it, and its last run),
//! `list` (every lock held through heimdall, and every lock with a run record), `key` (the keys
//! and the pg_locks query, without a database), and the DDL of the tables heimdall keeps
//! (`lease-ddl`, `run-ddl`), all read-only; and `stop` (`stop.rs`), which asks a holder to let
//! go. Lease mode's `status` and `list` are in `lease.rs`, the run record's part in `runs.rs`.

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use crate::cli::{KeyCli, LeaseDdlCli, ListCli, RunDdlCli, StatusCli, print_stdout};
use crate::config::{self, Dial};
use crate::db;
use crate::domain::appname;
use crate::domain::key::LockKey;
use crate::domain::lock::Mode;
use crate::exit::{Classify, Failure};
use crate::hold::advisory::holders::{self, Holder, human_age};
use crate::hold::lease;
use crate::hold::record;
use crate::log;
use crate::process::identity;

mod identify;
mod lease_mode;
mod runs;
mod stop;

use identify::{Named, identify};
use runs::Runs;
pub use stop::stop;

const STDOUT: &str = "cannot write to stdout";

/// Prints `rows`, one line each, escaped as heimdall's messages are ([`log::escape`]): a lock
/// name with a newline must not add a row, nor one with an escape sequence drive the terminal.
/// JSON stays JSON.
fn print<S: AsRef<str>>(rows: &[S]) -> Result<()> {
    let mut out = String::new();
    for row in rows {
        out.push_str(&log::escape(row.as_ref()));
        out.push('\n');
    }
    print_stdout(out).context(STDOUT)
}

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

/// How many of a lock's slots are taken, for `status`: with `--slots N`, a run starts while one
/// is left, so the lock counts as free (exit 0) until all N are taken.
struct Taken {
    taken: usize,
    slots: u16,
}

impl Taken {
    fn free(&self) -> bool {
        self.taken < usize::from(self.slots)
    }

    /// `lock …: free`, `lock …: held by …`, or with slots `lock …: 2 of 3 slots taken (a run
    /// would start); held by …`.
    fn text(&self, lock: &str, held_by: &str) -> String {
        match (self.slots, self.taken) {
            (1, 0) => format!("lock {lock}: free"),
            (1, _) => format!("lock {lock}: {held_by}"),
            (n, 0) => format!("lock {lock}: free (0 of {n} slots taken)"),
            (n, taken) if self.free() => {
                format!("lock {lock}: {taken} of {n} slots taken (a run would start); {held_by}")
            }
            (n, taken) => format!("lock {lock}: {taken} of {n} slots taken; {held_by}"),
        }
    }

    /// The exit status: 0 while a run would start, the busy code once it would not.
    fn code(&self, busy_exit_code: u8) -> u8 {
        if self.free() { 0 } else { busy_exit_code }
    }
}

/// Exit 0 when a run would start (the lock, or one of its slots, is free), the busy code when
/// it would not, so scripts can test without running anything.
pub fn status(cli: StatusCli) -> Result<u8> {
    log::set_level(config::level(&cli.output));
    let lock = config::lock_target(&cli.lock)?;
    let dial = Dial::from_args(&cli.conn, "status", None, &identity::SYSTEM)?;
    let mut session = db::open(&dial)?;
    if let Some(table) = &cli.lease.lease_table {
        return lease_mode::status(&cli, &lock, &mut session, table);
    }
    let all = holders::query(&mut session, &lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let (held, waiting): (Vec<Holder>, Vec<Holder>) = all.into_iter().partition(|h| h.granted);
    let mut keys: Vec<LockKey> = held.iter().map(|h| h.key).collect();
    keys.sort_unstable_by_key(|k| k.to_string());
    keys.dedup();
    let taken = Taken {
        taken: keys.len(),
        slots: lock.slots,
    };
    // With `--queue N`, the runs that wait are the places taken: exact with `--slots` too,
    // whose waiters are in the server's queue only a slice at a time.
    let queue = cli.lock.queue;
    let waiting = match queue {
        Some(places) => holders::places_taken(&mut session, lock.key, places)
            .map_err(anyhow::Error::msg)
            .classify(Failure::Unavailable)?,
        None => waiting.len(),
    };
    let runs = Runs::read(&mut session, &cli.record, Some(&[lock.key.to_string()]))?;
    let last = runs.of(&lock.key.to_string());
    let running = last.is_some_and(|last| {
        runs::running(last, held.iter().map(|h| h.application_name.as_deref()))
    });
    let mut out = Vec::new();
    if cli.json {
        let (ns, name) = lock.names.clone().unzip();
        let json = serde_json::json!({
                "lock": lock.short(),
                "namespace": ns,
                "name": name,
                "keys": lock.key.to_string(),
                "slots": lock.slots,
                "taken": taken.taken,
                "free": taken.free(),
                "holders": held.iter().map(Holder::to_json).collect::<Vec<_>>(),
                "waiting": waiting,
                "queue": queue,
                "queue_full": queue.map(|places| waiting >= usize::from(places)),
                "last_run": last.map(|last| last.to_json(running)),
        });
        out.push(json.to_string());
    } else {
        let waiting = holders::describe_waiting(waiting, queue);
        out.push(format!(
            "{}{waiting}",
            taken.text(&lock.describe(), &held_by(&held))
        ));
        out.extend(last.map(|last| runs::line(last, running)));
    }
    print(&out)?;
    Ok(taken.code(cli.busy_exit_code))
}

pub fn list(cli: ListCli) -> Result<u8> {
    log::set_level(config::level(&cli.output));
    let dial = Dial::from_args(&cli.conn, "list", None, &identity::SYSTEM)?;
    let mut session = db::open(&dial)?;
    if let Some(table) = &cli.lease.lease_table {
        return lease_mode::list(&cli, &mut session, table);
    }
    let mut locks = holders::heimdall_locks(&mut session)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    // A waiter's `--queue` place and a takeover's request are granted locks too, but nobody
    // holds the lock by them.
    locks.retain(|h| {
        let label = h.application_name.as_deref().and_then(appname::parse);
        !matches!(label, Some((label, _, _)) if matches!(identify(&label, h.key), Named::Waiter { .. }))
    });
    let runs = Runs::read(&mut session, &cli.record, None)?;
    let held: BTreeSet<String> = locks.iter().map(|h| h.key.to_string()).collect();
    // A held key's last run: running while one of the key's holders is its heimdall.
    let last_of = |key: LockKey| {
        let key = key.to_string();
        runs.of(&key).map(|last| {
            let apps = locks.iter().filter(|h| h.key.to_string() == key);
            let running = runs::running(last, apps.map(|h| h.application_name.as_deref()));
            (last, running)
        })
    };
    let mut out = Vec::new();
    if cli.json {
        let items: Vec<serde_json::Value> = locks
            .iter()
            .map(|h| {
                let mut value = h.to_json();
                value["held"] = true.into();
                value["last_run"] = last_of(h.key).map(|(l, running)| l.to_json(running)).into();
                let parsed = h.application_name.as_deref().and_then(appname::parse);
                let Some((label, host, pid)) = parsed else {
                    return value;
                };
                value["host"] = host.into();
                value["heimdall_pid"] = pid.into();
                let (lock, names, slot) = match identify(&label, h.key) {
                    Named::Known { lock, names, slot } => (Some(lock), names, Some(slot)),
                    unknown => {
                        value["unknown_name"] = unknown.why().into();
                        (None, None, None)
                    }
                };
                let (ns, name) = names.unzip();
                value["lock"] = lock.into();
                value["namespace"] = ns.into();
                value["name"] = name.into();
                value["slot"] = slot.into();
                value
            })
            .chain(runs.free(&held).map(runs::free_json))
            .collect();
        out.push(serde_json::Value::Array(items).to_string());
    } else if locks.is_empty() && runs.is_empty() {
        out.push("no locks held through heimdall".to_owned());
    } else {
        out.push(list_row(
            &["LOCK", "KEYS", "SLOT", "MODE", "HOLDER", "AGE"],
            (!runs.is_empty()).then_some("LAST RUN".to_owned()),
        ));
    }
    for h in locks.iter().filter(|_| !cli.json) {
        let (named, holder) = match h.application_name.as_deref().and_then(appname::parse) {
            Some((label, host, pid)) => (
                identify(&label, h.key),
                format!("{host} pid {pid} (backend {})", h.pid),
            ),
            None => (Named::Unknown, format!("backend {}", h.pid)),
        };
        let (label, slot) = match named {
            Named::Known { lock, slot, .. } => (lock, slot.to_string()),
            Named::Cut(start) => (format!("unknown name (cut: {start})"), "?".to_owned()),
            Named::Unknown | Named::Waiter { .. } => ("unknown name".to_owned(), "?".to_owned()),
        };
        let age = h.age_seconds.map_or_else(|| "?".to_owned(), human_age);
        let last = (!runs.is_empty()).then(|| {
            last_of(h.key).map_or_else(|| "-".to_owned(), |(l, running)| l.describe(running))
        });
        let (key, mode) = (h.key.to_string(), h.mode.name());
        out.push(list_row(&[&label, &key, &slot, mode, &holder, &age], last));
    }
    for last in runs.free(&held).filter(|_| !cli.json) {
        let row = [&last.name, &last.key, "-", "free", "-", "-"];
        out.push(list_row(&row, Some(last.describe(false))));
    }
    print(&out)?;
    Ok(0)
}

/// One line of `list`: lock, keys, slot, mode, holder and age, then the last run when the
/// record has any.
fn list_row(cells: &[&str; 6], last: Option<String>) -> String {
    let [lock, keys, slot, mode, holder, age] = cells;
    let row = format!("{lock:<32} {keys:<24} {slot:<4} {mode:<9} {holder:<36} ");
    match last {
        Some(last) => format!("{row}{age:<12} {last}"),
        None => format!("{row}{age}"),
    }
}

/// Needs no database: the keys are a pure function of the names.
pub fn key(cli: KeyCli) -> Result<u8> {
    let lock = config::lock_target(&cli.lock)?;
    let keys = lock.slot_keys();
    let places: Vec<LockKey> = (0..cli.lock.queue.unwrap_or(0))
        .map(|i| lock.key.place(i))
        .collect();
    let query = pg_locks_query(&[&keys[..], &places[..]].concat());
    if cli.json {
        // Each slot, or `--queue` place, with its keys and how pg_locks shows them.
        let each = |what: &str, keys: &[LockKey]| -> Vec<serde_json::Value> {
            let row = |(i, k): (usize, &LockKey)| {
                let (classid, objid, objsubid) = k.pg_locks_ids();
                serde_json::json!({ what: i, "keys": k.to_string(), "classid": classid,
                    "objid": objid, "objsubid": objsubid })
            };
            keys.iter().enumerate().map(row).collect()
        };
        let json = serde_json::json!({
            "lock": lock.short(),
            "hash": lock.names.as_ref().map(|_| cli.lock.hash.name()),
            "keys": lock.key.to_string(),
            "slots": each("slot", &keys),
            "places": each("place", &places),
            "query": query,
        });
        print(&[json.to_string()])?;
        return Ok(0);
    }
    let mut out = vec![format!("lock:     {}", lock.short())];
    if lock.names.is_some() {
        out.push(format!("hash:     {}", cli.lock.hash.name()));
    }
    let ids = |k: &LockKey| {
        let (classid, objid, objsubid) = k.pg_locks_ids();
        format!("pg_locks: classid={classid} objid={objid} objsubid={objsubid}")
    };
    for (i, k) in keys.iter().enumerate() {
        let slot = if keys.len() > 1 {
            format!(" (slot {i})")
        } else {
            String::new()
        };
        out.push(format!("keys:     {k}{slot}   {}", ids(k)));
    }
    for (i, k) in places.iter().enumerate() {
        out.push(format!("place:    {k} (--queue place {i})   {}", ids(k)));
    }
    out.push(format!("query:    {query}"));
    print(&out)?;
    Ok(0)
}

/// The query a DBA can paste to see who holds (or waits for) these keys: the keys' condition
/// is the one heimdall's own questions use.
fn pg_locks_query(keys: &[LockKey]) -> String {
    let each: Vec<String> = keys.iter().map(|k| k.pg_locks_condition("l")).collect();
    format!(
        "SELECT l.pid, l.mode, l.granted, a.application_name, a.client_addr, a.backend_start \
         FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND ({});",
        each.join(" OR ")
    )
}

/// The lease table's DDL, for a DBA: the same statement heimdall runs when the table is missing.
pub fn lease_ddl(cli: LeaseDdlCli) -> Result<u8> {
    let ddl = lease::table::SHAPE.ddl(&cli.lease_table);
    let takeover = lease::table::takeover_columns_ddl(&cli.lease_table);
    print_stdout(format!(
        "{ddl}\n-- The takeover request's columns (--replace, heimdall stop), added by the first\n-- replacer when missing; a table without them still serves every other run.\n{takeover}\n"
    ))
    .context(STDOUT)?;
    Ok(0)
}

/// The run table's DDL, for a DBA: the same statement heimdall runs when the table is missing.
pub fn run_ddl(cli: RunDdlCli) -> Result<u8> {
    let ddl = record::table::SHAPE.ddl(&cli.run_table);
    print_stdout(format!("{ddl}\n")).context(STDOUT)?;
    Ok(0)
}
