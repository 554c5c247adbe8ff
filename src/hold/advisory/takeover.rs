//! Takeover: a run with `--replace`, or `heimdall stop`, asks the holder of the lock to stop its
//! command and let go, and waits for the lock in the server's queue meanwhile.
//!
//! The holder sits inside an open transaction, where PostgreSQL delivers no NOTIFY, so the
//! request travels through what its heartbeat already reads: the replacer holds, in the
//! transaction that waits, a shared advisory lock on the lock's request key
//! ([`LockKey::request`]), and the holder's heartbeat looks for it in `pg_locks`
//! (`request_sql::replacer_column`). The request goes with the wait: granted, given up, or the
//! replacer gone, its transaction ends and the request with it. `pg_locks` is read live on
//! every call, where `pg_stat_activity` answers a transaction from its first look, and no pooler
//! rewrites it: a transaction pooler keeps the wait's transaction on one server connection.
//!
//! A waiter granted the lock while a replacer waits behind it does not run ([`superseded`]):
//! it would be asked to stop at its first heartbeat, and a command started to be killed at
//! once is the worst outcome. Not responsible for the holder's side (`lock.rs` asks, the
//! supervisor stops the job) nor for messages (`hold/mod.rs`, `inspect`).

use std::time::{Duration, Instant};

use anyhow::Result;

use super::holders::{self, Holder};
use super::request_sql::{asker_name_sql, superseded_sql};
use super::wait::{WaitEnd, wait_in_queue};
use super::{end_transaction, run_protocol};
use crate::db::{Row, Session};
use crate::domain::appname;
use crate::domain::key::LockKey;
use crate::domain::lock::{LockTarget, Mode};

/// Asked of a waiter just granted the lock on `key`, in the transaction that waited: who asks
/// for the lock behind it, if anyone (a replacer, or `heimdall stop`).
pub fn superseded(session: &mut Session, key: LockKey) -> Result<Option<String>> {
    let rows = run_protocol(session, &superseded_sql(key), "cannot take the lock")?;
    Ok(asked_in(session, rows.last()))
}

/// Who asks for the lock, by `row`, the answer of [`superseded_sql`]: nobody, or the session
/// named by [`asker`].
pub fn asked_in(session: &mut Session, row: Option<&Row>) -> Option<String> {
    let pid = row?.get::<i32>("superseded_by")?;
    Some(asker(session, pid))
}

/// Who the session `pid` is, for the message of a run that gives way to it: its
/// `application_name` when the server still knows it.
fn asker(session: &mut Session, pid: i32) -> String {
    let rows = session.rows(&asker_name_sql(pid)).unwrap_or_default();
    appname::who(rows.last().and_then(|r| r.text("application_name")), pid)
}

/// Why a replacer's wait ended without the lock, by who still holds it.
pub fn no_answer(holders: &[Holder]) -> String {
    let granted: Vec<&Holder> = holders.iter().filter(|h| h.granted).collect();
    if granted.is_empty() {
        "the holder let go only as the wait ended".to_owned()
    } else if granted.iter().all(|h| is_heimdall(h)) {
        "the holder did not stop or respond in time (a heimdall older than --replace does not answer; a newer one stops within its --heartbeat, then its command's stop, up to its --kill-after): give --wait more time".to_owned()
    } else {
        "the holder is not a heimdall run (a psql session, an application), which cannot be asked to stop".to_owned()
    }
}

/// Whether the session is a heimdall run, by its application_name.
pub fn is_heimdall(holder: &Holder) -> bool {
    holder
        .application_name
        .as_deref()
        .and_then(appname::parse)
        .is_some()
}

/// How `heimdall stop` ended.
pub enum StopEnd {
    /// Nothing held the lock.
    Free,
    /// Held by sessions that are not heimdall's: reported, never asked nor terminated.
    NotHeimdall(Vec<Holder>),
    /// The holders (as they were) let go, after this long.
    Stopped(Vec<Holder>, Duration),
    /// Still held when the wait ended, after this long, and why.
    TimedOut(Vec<Holder>, Duration, String),
}

/// `heimdall stop`: asks the heimdall runs holding `lock` (one slot) to stop, and waits up to
/// `limit` until they have let go. The lock is taken for a moment and let go at once: what
/// waits behind the request runs as it would have.
pub fn stop(session: &mut Session, lock: &LockTarget, limit: Duration) -> Result<StopEnd> {
    let before = holders::query(session, lock).map_err(|e| {
        anyhow::anyhow!("cannot look up the holders: {e}").context("cannot stop the holder")
    })?;
    let granted: Vec<Holder> = before.into_iter().filter(|h| h.granted).collect();
    if granted.is_empty() {
        return Ok(StopEnd::Free);
    }
    if !granted.iter().all(is_heimdall) {
        return Ok(StopEnd::NotHeimdall(granted));
    }
    let started = Instant::now();
    let deadline = started.checked_add(limit);
    let end = wait_in_queue(
        session,
        lock,
        Mode::Exclusive,
        None,
        true,
        deadline,
        None,
        None,
    )?;
    let waited = started.elapsed();
    end_transaction(session);
    Ok(match end {
        WaitEnd::Granted(..) => StopEnd::Stopped(granted, waited),
        WaitEnd::EndedBy(why) => StopEnd::TimedOut(granted, waited, why),
        WaitEnd::Deadline | WaitEnd::Full(_) => {
            let now = holders::of(session, lock);
            let why = no_answer(&now);
            StopEnd::TimedOut(now, waited, why)
        }
    })
}
