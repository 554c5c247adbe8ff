//! The read-only subcommands: `status` (is the lock free, and who holds it), `list` (every lock
//! held through heimdall) and `key` (the keys and the pg_locks query, without a database).

use anyhow::{Context, Result};

use crate::cli::{KeyCli, LeaseDdlCli, ListCli, StatusCli, print_stdout};
use crate::config::{self, Dial};
use crate::db::{self, Session};
use crate::domain::appname;
use crate::domain::key::{Hash, LockKey};
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::{LockTarget, Mode};
use crate::exit::{Classify, Failure};
use crate::hold::advisory::holders::{self, Holder, human_age};
use crate::hold::lease::{self, LeaseHolder};
use crate::log;
use crate::process::identity;

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
        return lease_status(&cli, &lock, &mut session, table);
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
    let text = if cli.json {
        let (ns, name) = lock.names.clone().unzip();
        serde_json::json!({
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
        })
        .to_string()
    } else {
        let waiting = holders::describe_waiting(waiting, queue);
        format!("{}{waiting}", taken.text(&lock.describe(), &held_by(&held)))
    };
    print(&[text])?;
    Ok(taken.code(cli.busy_exit_code))
}

pub fn list(cli: ListCli) -> Result<u8> {
    log::set_level(config::level(&cli.output));
    let dial = Dial::from_args(&cli.conn, "list", None, &identity::SYSTEM)?;
    let mut session = db::open(&dial)?;
    if let Some(table) = &cli.lease.lease_table {
        return lease_list(&cli, &mut session, table);
    }
    let locks = holders::heimdall_locks(&mut session)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let mut out = Vec::new();
    if cli.json {
        let items: Vec<serde_json::Value> = locks
            .iter()
            .map(|h| {
                let mut value = h.to_json();
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
            .collect();
        out.push(serde_json::Value::Array(items).to_string());
    } else if locks.is_empty() {
        out.push("no locks held through heimdall".to_owned());
    } else {
        out.push(format!(
            "{:<32} {:<24} {:<4} {:<9} {:<36} AGE",
            "LOCK", "KEYS", "SLOT", "MODE", "HOLDER"
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
            Named::Unknown => ("unknown name".to_owned(), "?".to_owned()),
        };
        let age = h.age_seconds.map_or_else(|| "?".to_owned(), human_age);
        out.push(format!(
            "{label:<32} {:<24} {slot:<4} {:<9} {holder:<36} {age}",
            h.key.to_string(),
            h.mode.name()
        ));
    }
    print(&out)?;
    Ok(0)
}

/// The highest slot number: `--slots` allows at most 1000.
const MAX_SLOT: u16 = 999;

/// What `list` can say of a held key from the label in its holder's application_name. The key
/// is the truth and the label only a claim: a name is printed only once it hashes to the key.
#[derive(Debug, PartialEq, Eq)]
enum Named {
    /// `lock` (`NS/NAME` or `key K`) hashes to the key, in `slot` of it.
    Known {
        lock: String,
        names: Option<(String, String)>,
        slot: u16,
    },
    /// The label was cut to fit application_name; its beginning, marked with `~`.
    Cut(String),
    /// The label does not hash to the key: written by another program, or by a heimdall that
    /// let PostgreSQL turn the name's non-ASCII characters into `?`.
    Unknown,
}

impl Named {
    fn why(&self) -> &'static str {
        match self {
            Named::Known { .. } => "",
            Named::Cut(_) => "the names were cut to fit application_name's 63 bytes",
            Named::Unknown => "the names in application_name do not hash to the key",
        }
    }
}

/// Finds the lock behind `label` (`key K` or `NS/NAME`, percent-encoded by `appname`) and the
/// slot of it that `key` is: every split at a `/` (a namespace may hold one), with either
/// --hash (the label does not say which), and slots 0 to 999.
fn identify(label: &str, key: LockKey) -> Named {
    if let Some(start) = label.strip_suffix('~') {
        let bytes = appname::decode(start).unwrap_or_else(|| start.as_bytes().to_vec());
        let start = String::from_utf8_lossy(&bytes);
        return Named::Cut(format!("{}~", start.trim_end_matches('\u{fffd}')));
    }
    let slot_of = |base: LockKey| (0..=MAX_SLOT).find(|i| base.slot(*i) == key);
    // A label a heimdall wrote before the encoding is tried as it is, too.
    let decoded = appname::decode(label).and_then(|b| String::from_utf8(b).ok());
    for text in decoded.iter().map(String::as_str).chain([label]) {
        if let Some(slot) = text
            .strip_prefix("key ")
            .and_then(|k| k.parse().ok())
            .and_then(slot_of)
        {
            let lock = text.to_owned();
            return Named::Known {
                lock,
                names: None,
                slot,
            };
        }
        for (at, _) in text.match_indices('/') {
            let (ns, name) = (&text[..at], &text[at + 1..]);
            for hash in [Hash::Siphash, Hash::Fnv1] {
                if let Some(slot) = slot_of(LockKey::derive(hash, ns, name)) {
                    let names = Some((ns.to_owned(), name.to_owned()));
                    let lock = text.to_owned();
                    return Named::Known { lock, names, slot };
                }
            }
        }
    }
    Named::Unknown
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
    print_stdout(format!("{}\n", lease::table::ddl(&cli.lease_table))).context(STDOUT)?;
    Ok(0)
}

/// `status --lease-table`: the live leases on the lock's keys.
fn lease_status(
    cli: &StatusCli,
    lock: &LockTarget,
    session: &mut Session,
    table: &LeaseTable,
) -> Result<u8> {
    let held = lease::lock_holders(session, table, lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    // One row per key, the table's primary key: each live lease is one slot taken.
    let taken = Taken {
        taken: held.len(),
        slots: lock.slots,
    };
    let text = if cli.json {
        serde_json::json!({
            "lock": lock.short(),
            "keys": lock.key.to_string(),
            "slots": lock.slots,
            "lease_table": table.to_string(),
            "taken": taken.taken,
            "free": taken.free(),
            "holders": held.iter().map(LeaseHolder::to_json).collect::<Vec<_>>(),
        })
        .to_string()
    } else {
        let each: Vec<String> = held
            .iter()
            .map(|h| format!("{} {}", h.name, h.describe()))
            .collect();
        taken.text(
            &format!("{} (lease in {table})", lock.describe()),
            &format!("held by {}", each.join("; ")),
        )
    };
    print(&[text])?;
    Ok(taken.code(cli.busy_exit_code))
}

/// `list --lease-table`: every live lease in the table.
fn lease_list(cli: &ListCli, session: &mut Session, table: &LeaseTable) -> Result<u8> {
    let leases = lease::all_holders(session, table)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let mut out = Vec::new();
    if cli.json {
        let items: Vec<serde_json::Value> = leases.iter().map(LeaseHolder::to_json).collect();
        out.push(serde_json::Value::Array(items).to_string());
    } else if leases.is_empty() {
        out.push(format!("no live leases in {table}"));
    } else {
        out.push(format!(
            "{:<32} {:<24} {:<8} {:<44} EXPIRES IN",
            "LOCK", "KEYS", "VERSION", "HOLDER"
        ));
        for l in &leases {
            let expires = l
                .expires_in_seconds
                .map_or_else(|| "?".to_owned(), |s| format!("{s:.1}s"));
            out.push(format!(
                "{:<32} {:<24} {:<8} {:<44} {expires}",
                l.name, l.key, l.version, l.holder
            ));
        }
    }
    print(&out)?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_of(label: &str, key: LockKey) -> Option<u16> {
        match identify(label, key) {
            Named::Known { slot, .. } => Some(slot),
            _ => None,
        }
    }

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

    #[test]
    fn names_come_from_the_split_that_hashes_to_the_key_or_not_at_all() {
        let key = LockKey::derive(Hash::Siphash, "a/b", "c");
        let Named::Known { names, lock, .. } = identify("a/b/c", key) else {
            panic!("a/b/c not found");
        };
        assert_eq!(names, Some(("a/b".to_owned(), "c".to_owned())));
        assert_eq!(lock, "a/b/c");
        let key = LockKey::derive(Hash::Siphash, "ns", "jöb 100%");
        let encoded = appname::encode("ns/jöb 100%");
        let Named::Known { names, .. } = identify(&encoded, key) else {
            panic!("{encoded} not found");
        };
        assert_eq!(names, Some(("ns".to_owned(), "jöb 100%".to_owned())));
        assert_eq!(
            identify("ns/j?b 100%", key),
            Named::Unknown,
            "PostgreSQL's '?'"
        );
        assert_eq!(identify("ns/other", key), Named::Unknown);
        assert_eq!(
            identify("ns/j%C3%B6%C3~", key),
            Named::Cut("ns/jö~".to_owned()),
            "a cut character is dropped"
        );
    }
}
