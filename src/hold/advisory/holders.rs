//! Who holds a lock: `pg_locks` joined with `pg_stat_activity` (read from the functions behind
//! the views, `pg_lock_status()` and `pg_stat_get_activity(NULL)`: cheaper to plan in a fresh
//! backend), for the busy message, `status` and `list`. Read-only; one round trip per question.

use std::time::Duration;

use crate::db::{Row, Session, describe_pg_error};
use crate::domain::appname;
use crate::domain::key::LockKey;
use crate::domain::lock::{LockTarget, Mode};
use crate::hold::waiting::Holding;
use crate::log;

/// One session holding (or queued for) an advisory lock.
#[derive(Debug, Clone)]
pub struct Holder {
    pub pid: i32,
    pub key: LockKey,
    /// Which slot of the lock asked about the key is, with `--slots`; `None` without.
    pub slot: Option<u16>,
    pub mode: Mode,
    pub granted: bool,
    /// Visible to every role.
    pub application_name: Option<String>,
    /// The rest needs the same role or pg_read_all_stats; `None` when hidden.
    pub client_addr: Option<String>,
    pub backend_start: Option<String>,
    /// How long the holder's current transaction has run, else how long it has been connected.
    /// heimdall takes its lock as its holding transaction begins, so for a heimdall holder this
    /// is how long it has held the lock (after a `--wait`, and through a pooler, too).
    pub age_seconds: Option<f64>,
    /// `age_seconds` counts from the start of a transaction, not of the connection.
    pub age_is_transaction: bool,
    pub details_visible: bool,
    /// The holder reached the server through the same pooler or proxy as heimdall, so
    /// `client_addr` is that pooler's address, not the holder's.
    pub via_proxy: bool,
}

impl Holder {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "pid": self.pid,
            "keys": self.key.to_string(),
            "mode": self.mode.name(),
            "application_name": self.application_name,
            "client_addr": self.client_addr,
            "backend_start": self.backend_start,
            "age_seconds": self.age_seconds,
            "via_pooler_or_proxy": self.via_proxy,
        })
    }

    /// `pid 4211 ("heimdall a/b @web-3 pid 99", from 10.0.0.5, connected 12s ago)`, with
    /// `slots` (`slots 0-6, 8`) first when the lock has several.
    pub fn describe(&self, slots: &[u16]) -> String {
        let mut parts = Vec::new();
        match slots {
            [] => {}
            [one] => parts.push(format!("slot {one}")),
            many => parts.push(format!("slots {}", ranges(many))),
        }
        if let Some(app) = self.application_name.as_deref().filter(|a| !a.is_empty()) {
            parts.push(format!("\"{app}\""));
        }
        if self.details_visible {
            let from = self.client_addr.as_deref().unwrap_or("the local socket");
            parts.push(if self.via_proxy {
                format!("through a pooler or proxy at {from}, which hides the client's address")
            } else {
                format!("from {from}")
            });
            if let Some(age) = self.age_seconds {
                parts.push(if self.age_is_transaction {
                    format!("holding for {}", human_age(age))
                } else {
                    format!("connected {} ago", human_age(age))
                });
            }
        } else {
            parts.push("other details hidden: this role needs pg_read_all_stats".to_owned());
        }
        format!("pid {} ({})", self.pid, parts.join(", "))
    }
}

pub fn human_age(seconds: f64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

/// The first granted holder, for the status line of a wait that a person watches, with how
/// many other sessions hold the lock too.
pub fn holding(holders: &[Holder]) -> Option<Holding> {
    let mut granted = holders.iter().filter(|h| h.granted);
    let first = granted.next()?;
    let mut pids: Vec<i32> = granted.map(|h| h.pid).filter(|p| *p != first.pid).collect();
    pids.sort_unstable();
    pids.dedup();
    let who = match first.application_name.as_deref().filter(|a| !a.is_empty()) {
        Some(app) => format!("pid {} (\"{app}\")", first.pid),
        None => format!("pid {}", first.pid),
    };
    Some(Holding {
        who,
        held: first
            .age_seconds
            .filter(|_| first.details_visible)
            .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
        connected_only: !first.age_is_transaction,
        others: pids.len(),
    })
}

/// "held by pid …; pid …" for messages: each holding session once, with the slots it holds.
pub fn describe(holders: &[Holder]) -> String {
    describe_at_most(holders, usize::MAX)
}

/// [`describe`], naming at most `most` sessions and counting the rest: with `--slots 1000`
/// a full lock would otherwise make one line of a thousand holders.
pub fn describe_at_most(holders: &[Holder], most: usize) -> String {
    let mut sessions: Vec<(&Holder, Vec<u16>)> = Vec::new();
    for h in holders.iter().filter(|h| h.granted) {
        match sessions.iter_mut().find(|(first, _)| first.pid == h.pid) {
            Some((_, slots)) => slots.extend(h.slot),
            None => sessions.push((h, h.slot.into_iter().collect())),
        }
    }
    if sessions.is_empty() {
        return "held by a session that was gone by the time heimdall looked".to_owned();
    }
    let mut named: Vec<String> = sessions
        .iter()
        .take(most)
        .map(|(h, slots)| h.describe(slots))
        .collect();
    if sessions.len() > most {
        named.push(format!(
            "and {} more sessions (heimdall status lists them all)",
            sessions.len() - most
        ));
    }
    format!("held by {}", named.join("; "))
}

/// `0-6, 8, 10-999`: sorted slot numbers, runs written as ranges.
fn ranges(slots: &[u16]) -> String {
    let mut slots = slots.to_vec();
    slots.sort_unstable();
    slots.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < slots.len() {
        let start = slots[i];
        while i + 1 < slots.len() && slots[i + 1] == slots[i] + 1 {
            i += 1;
        }
        out.push(if slots[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", slots[i])
        });
        i += 1;
    }
    out.join(", ")
}

/// The select list of both questions, a column for each of [`Holder`]'s fields and two for how
/// the server sees this connection (`our_addr`, `server_port`; see [`parse_all`]). [`parse`]
/// reads them by these names.
const COLUMNS: &str = "l.pid, l.mode, l.granted, l.classid::int8 AS classid, \
     l.objid::int8 AS objid, l.objsubid, a.application_name, host(a.client_addr) AS client_addr, \
     to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS backend_start, \
     extract(epoch FROM now() - coalesce(a.xact_start, a.backend_start))::float8 AS age_seconds, \
     a.backend_start IS NOT NULL AS details_visible, \
     pg_catalog.host(pg_catalog.inet_client_addr()) AS our_addr, \
     pg_catalog.inet_server_port() AS server_port, a.xact_start IS NOT NULL AS in_transaction";

/// The sessions holding or queued for any of `lock`'s keys on this database. A failure here only
/// costs the message its detail, so it is logged and yields an empty list.
pub fn of(session: &mut Session, lock: &LockTarget) -> Vec<Holder> {
    of_after(session, lock, "")
}

/// [`of`], in one message after the statements `before` (each ended by `;`), which answer no
/// rows: a round trip less where something must run first.
pub fn of_after(session: &mut Session, lock: &LockTarget, before: &str) -> Vec<Holder> {
    match query_after(session, lock, before) {
        Ok(holders) => holders,
        Err(e) => {
            log::debug(format!("cannot look up the holders: {e}"));
            Vec::new()
        }
    }
}

pub fn query(session: &mut Session, lock: &LockTarget) -> Result<Vec<Holder>, String> {
    query_after(session, lock, "")
}

fn query_after(
    session: &mut Session,
    lock: &LockTarget,
    before: &str,
) -> Result<Vec<Holder>, String> {
    let keys: Vec<String> = lock
        .slot_keys()
        .iter()
        .map(|k| k.pg_locks_condition("l"))
        .collect();
    let sql = format!(
        "{before}SELECT {COLUMNS} FROM pg_catalog.pg_lock_status() l \
         LEFT JOIN pg_catalog.pg_stat_get_activity(NULL) a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ({}) \
         ORDER BY l.granted DESC, a.backend_start",
        keys.join(" OR ")
    );
    let rows = session.rows(&sql).map_err(|e| describe_pg_error(&e))?;
    let mut holders = parse_all(session, &rows);
    if lock.slots > 1 {
        let keys = lock.slot_keys();
        for h in &mut holders {
            h.slot = keys
                .iter()
                .position(|k| *k == h.key)
                .and_then(|i| u16::try_from(i).ok());
        }
    }
    Ok(holders)
}

/// How many of the `places` waiting places of a `--queue` bound on the lock `key` some session
/// holds on this database: how many runs wait (see `sql::place_sql`).
pub fn places_taken(session: &mut Session, key: LockKey, places: u16) -> Result<usize, String> {
    let sql = places_taken_sql(key, places);
    let row = session.first_row(&sql).map_err(|e| describe_pg_error(&e))?;
    row.get::<usize>("taken")
        .ok_or_else(|| format!("unexpected answer to the places' count: {row:?}"))
}

fn places_taken_sql(key: LockKey, places: u16) -> String {
    let each: Vec<String> = (0..places)
        .map(|i| key.place(i).pg_locks_condition("l"))
        .collect();
    let eq = "OPERATOR(pg_catalog.=)";
    format!(
        "SELECT pg_catalog.count(*) AS taken FROM pg_catalog.pg_locks l \
         WHERE l.locktype {eq} 'advisory' AND l.granted AND l.database {eq} \
         (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname {eq} pg_catalog.current_database()) \
         AND ({})",
        each.join(" OR ")
    )
}

/// `; 2 waiting`, and with `--queue N` the bound: `; 1 waiting (--queue 2: 1 of 2 places
/// taken)`, `; 2 waiting (--queue 2: full, a run would not queue)`. Empty with none and no bound.
pub fn describe_waiting(waiting: usize, queue: Option<u16>) -> String {
    match queue {
        None if waiting == 0 => String::new(),
        None => format!("; {waiting} waiting"),
        Some(n) if waiting >= usize::from(n) => {
            format!("; {waiting} waiting (--queue {n}: full, a run would not queue)")
        }
        Some(n) => format!("; {waiting} waiting (--queue {n}: {waiting} of {n} places taken)"),
    }
}

/// Every advisory lock held through heimdall on this database, recognised by the
/// application_name heimdall sets (`heimdall NS/NAME @HOST pid PID`).
pub fn heimdall_locks(session: &mut Session) -> Result<Vec<Holder>, String> {
    let sql = format!(
        "SELECT {COLUMNS} FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND a.application_name LIKE '{}' \
         ORDER BY a.application_name, l.classid, l.objid",
        appname::LIKE
    );
    let rows = session.rows(&sql).map_err(|e| describe_pg_error(&e))?;
    Ok(parse_all(session, &rows))
}

/// The holders in `rows`. Each row also carries how the server sees this connection: a server
/// port other than the one heimdall dialled means a pooler or proxy in between, and then a
/// holder with the same client address as ours came through it too.
fn parse_all(session: &Session, rows: &[Row]) -> Vec<Holder> {
    let proxied = rows.first().is_some_and(|row| {
        let server_port = row.get::<u16>("server_port");
        session.dialled_port.is_some()
            && server_port.is_some()
            && server_port != session.dialled_port
    });
    rows.iter()
        .filter_map(|row| {
            let mut holder = parse(row)?;
            holder.via_proxy = proxied
                && holder.client_addr.is_some()
                && holder.client_addr.as_deref() == row.text("our_addr");
            Some(holder)
        })
        .collect()
}

/// One row of [`COLUMNS`].
fn parse(row: &Row) -> Option<Holder> {
    let classid: i64 = row.get("classid")?;
    let objid: i64 = row.get("objid")?;
    let key = match row.text("objsubid")? {
        "2" => LockKey::Pair(classid as u32 as i32, objid as u32 as i32),
        _ => LockKey::Single((classid << 32) | objid),
    };
    Some(Holder {
        pid: row.get("pid")?,
        key,
        slot: None,
        mode: if row.text("mode") == Some("ShareLock") {
            Mode::Shared
        } else {
            Mode::Exclusive
        },
        granted: row.is_true("granted"),
        application_name: row.string("application_name"),
        client_addr: row.string("client_addr"),
        backend_start: row.string("backend_start"),
        age_seconds: row.get("age_seconds"),
        age_is_transaction: row.is_true("in_transaction"),
        details_visible: row.is_true("details_visible"),
        via_proxy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_places_count_leaves_nothing_to_the_search_path() {
        let sql = places_taken_sql(LockKey::Pair(1, 2), 3);
        assert_eq!(sql.matches("objsubid").count(), 3, "{sql}");
        assert_eq!(crate::db::unqualified(&sql), Vec::<&str>::new(), "{sql}");
        assert_eq!(describe_waiting(0, None), "");
        assert_eq!(describe_waiting(2, None), "; 2 waiting");
        assert_eq!(
            describe_waiting(1, Some(2)),
            "; 1 waiting (--queue 2: 1 of 2 places taken)"
        );
        assert_eq!(
            describe_waiting(2, Some(2)),
            "; 2 waiting (--queue 2: full, a run would not queue)"
        );
    }

    #[test]
    fn slots_are_written_as_ranges() {
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[8, 0, 1, 2, 3, 4, 5, 6, 10, 11]), "0-6, 8, 10-11");
        assert_eq!(ranges(&[1, 1, 2]), "1-2");
    }
}
