//! Waiting in PostgreSQL's own lock queue for a busy lock (`--wait`): first come, first served
//! with one slot; with `--slots`, a short, jittered wait on one slot at a time. With `--queue N`,
//! a wait first takes one of N places (`sql::place_sql`), in the transaction that waits, so the
//! place goes with the wait; a run that finds every place taken does not wait at all.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::request_sql::{request_sql, superseded_sql};
use super::sql::{
    BEGIN, ROLLBACK_ALL, SLICE, WATCH_CLIENT, attempt_sql, functions, place_sql, queued_wait_sql,
    take_sql,
};
use super::{end_transaction, parse_field, protocol_error, run_protocol};
use crate::db::sqlstate::SqlState;
use crate::db::{Row, Session, connection_ended, describe_pg_error};
use crate::domain::lock::{LockTarget, Mode};
use crate::exit::{Classify, Failure};
use crate::log;

/// With `--slots` and `--wait`, heimdall queues on one slot for a short, jittered while, then
/// tries every slot again: PostgreSQL cannot wait for the first of several locks.
const SLOT_WAIT_MIN: Duration = Duration::from_millis(50);
const SLOT_WAIT_SPREAD_MS: u64 = 200;

/// How a wait in the server's queue ended.
pub(super) enum WaitEnd {
    /// Granted on this slot; with the settle step's answer when it rode along (see
    /// [`wait_in_queue`]'s `settle`).
    Granted(u16, Option<Vec<Row>>),
    /// heimdall's own `--wait` deadline.
    Deadline,
    /// The server ended it (a role's statement_timeout), and why.
    EndedBy(String),
    /// Every place of the `--queue` bound (this many) was taken: nothing waited.
    Full(u16),
}

/// Waits in PostgreSQL's lock queue (first come, first served) under `lock_timeout`, inside a
/// transaction of its own each round: an aborted wait aborts the transaction, and the next round
/// rolls it back first. With `queue`, at most that many runs wait at once. With `replace`, the
/// transaction that waits asks for the lock first (`request_sql::request_sql`), so the holder's heartbeat
/// sees a replacer for as long as the wait lasts, and no longer.
///
/// `warm_up`, statements whose answers nothing reads, run once, before the first wait begins:
/// see `sql::warm_up_sql`.
#[allow(clippy::too_many_arguments)]
pub(super) fn wait_in_queue(
    session: &mut Session,
    lock: &LockTarget,
    mode: Mode,
    queue: Option<u16>,
    replace: bool,
    deadline: Option<Instant>,
    settle: Option<&str>,
    warm_up: Option<&str>,
) -> Result<WaitEnd> {
    if let Some(places) = queue.filter(|_| lock.slots > 1) {
        return wait_for_a_slot_in_place(session, lock, mode, places, deadline);
    }
    let function = functions(mode).wait_xact;
    let mut round: u64 = 0;
    loop {
        let Some((slot, limit)) = next_slice(lock.slots, &mut round, deadline) else {
            return Ok(WaitEnd::Deadline);
        };
        let key = lock.key.slot(slot);
        // With a bound, the place is taken in the statement that waits, before it blocks.
        let wait = match queue {
            Some(places) => queued_wait_sql(key, mode, places),
            None => format!("SELECT {function}({})", key.sql_args()),
        };
        let request = if replace {
            request_sql(lock.key)
        } else {
            String::new()
        };
        let warm_up = match warm_up.filter(|_| round == 1) {
            Some(statements) => format!("{statements} "),
            None => String::new(),
        };
        let mut sql = format!(
            "{BEGIN}; {}{WATCH_CLIENT} {warm_up}{request}{wait}",
            lock_timeout(limit)
        );
        // One slot, no queue: the key is known, so the settle step rides in the same message
        // and runs the moment the wait is granted (one round trip less in a handoff), after the
        // question whether a replacer waits behind (`takeover::superseded`). They run only if
        // the wait succeeded: the first failing statement of a message skips the rest.
        let settle = settle.filter(|_| lock.slots == 1 && queue.is_none());
        if let Some(settle) = settle {
            sql = format!("{sql} AS {WAITED}; {}; {settle}", superseded_sql(lock.key));
        }
        match session.rows(&sql) {
            Ok(rows) => {
                return Ok(match queue {
                    Some(places) if !rows.last().is_some_and(|r| r.is_true("granted")) => {
                        WaitEnd::Full(places)
                    }
                    _ => WaitEnd::Granted(slot, settle.map(|_| after_the_wait(rows))),
                });
            }
            // A cancel, or the statement timeout, can also land in the settle step, after it
            // took the session-level lock: that lock must not outlive the failure (a pooler
            // that rolls back and reuses the server connection would keep it).
            Err(e) if settle.is_some() && !connection_ended(&e) => {
                if let Err(e) = session.rows(ROLLBACK_ALL) {
                    log::debug(format!("ROLLBACK: {}", describe_pg_error(&e)));
                }
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) {
                    return Ok(WaitEnd::Deadline);
                }
                return ended(session, &e);
            }
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                end_transaction(session);
                if lock.slots > 1 {
                    let rows =
                        run_protocol(session, &take_sql(lock, mode), "cannot take the lock")?;
                    match slot_taken(&rows)? {
                        None => end_transaction(session),
                        Some(slot) => return Ok(WaitEnd::Granted(slot, None)),
                    }
                    continue;
                }
                return Ok(WaitEnd::Deadline);
            }
            Err(e) => return ended(session, &e),
        }
    }
}

/// `--slots` with `--queue`: the place is taken first, and the transaction that took it stays
/// open for the whole wait (a pooler keeps the client on its server connection meanwhile); each
/// slice waits inside a savepoint, whose rollback ends the slice but keeps the place.
fn wait_for_a_slot_in_place(
    session: &mut Session,
    lock: &LockTarget,
    mode: Mode,
    places: u16,
    deadline: Option<Instant>,
) -> Result<WaitEnd> {
    let sql = format!("{BEGIN}; SELECT {} AS place", place_sql(lock.key, places));
    let rows = run_protocol(session, &sql, "cannot take a place in the queue")?;
    if rows.last().and_then(|r| r.text("place")).is_none() {
        return Ok(WaitEnd::Full(places));
    }
    let function = functions(mode).wait_xact;
    let mut round: u64 = 0;
    loop {
        let Some((slot, limit)) = next_slice(lock.slots, &mut round, deadline) else {
            return Ok(WaitEnd::Deadline);
        };
        // Released once granted, so that the settle step runs in the transaction itself.
        let sql = format!(
            "SAVEPOINT {SLICE}; {}{WATCH_CLIENT} SELECT {function}({}); RELEASE SAVEPOINT {SLICE}",
            lock_timeout(limit),
            lock.key.slot(slot).sql_args()
        );
        match session.rows(&sql) {
            Ok(_) => return Ok(WaitEnd::Granted(slot, None)),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                let sql = format!(
                    "ROLLBACK TO SAVEPOINT {SLICE}; RELEASE SAVEPOINT {SLICE}; {}",
                    attempt_sql(lock, mode)
                );
                let rows = run_protocol(session, &sql, "cannot take the lock")?;
                if let Some(slot) = slot_taken(&rows)? {
                    return Ok(WaitEnd::Granted(slot, None));
                }
            }
            Err(e) => return ended(session, &e),
        }
    }
}

/// The next round of a wait with `slots` slots until `deadline`: which slot to queue on, and for
/// how long; `None` once the deadline has passed. With one slot, one blocking call does it all.
/// With several, a short, jittered slice on one, then every slot is looked at again.
fn next_slice(
    slots: u16,
    round: &mut u64,
    deadline: Option<Instant>,
) -> Option<(u16, Option<Duration>)> {
    let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
    if remaining == Some(Duration::ZERO) {
        return None;
    }
    *round += 1;
    if slots == 1 {
        return Some((0, remaining));
    }
    let round = *round;
    let jitter = u64::from(std::process::id());
    let spread =
        (jitter.wrapping_mul(2_654_435_761).wrapping_add(round * 97)) % SLOT_WAIT_SPREAD_MS;
    let slice = SLOT_WAIT_MIN + Duration::from_millis(spread);
    let slot = ((jitter + round) % u64::from(slots)) as u16;
    Some((slot, Some(remaining.map_or(slice, |r| r.min(slice)))))
}

/// The name of the wait's own answer column when the settle step rides along.
const WAITED: &str = "waited";

/// The settle step's rows: those after the wait's own answer (the `WATCH_CLIENT` setting
/// answers a row on PostgreSQL 14 and later only, so rows are found by name, not counted).
fn after_the_wait(mut rows: Vec<Row>) -> Vec<Row> {
    match rows.iter().position(|r| r.has(WAITED)) {
        Some(i) => rows.split_off(i + 1),
        None => Vec::new(),
    }
}

/// `SET LOCAL lock_timeout` for a wait of at most `limit`: 0 means no limit, and a limit under
/// 1 ms would round to 0.
fn lock_timeout(limit: Option<Duration>) -> String {
    let ms = limit.map_or(0, |l| l.as_millis().max(1));
    format!("SET LOCAL lock_timeout = {ms};")
}

/// The slot [`attempt_sql`]'s answer took, if any.
fn slot_taken(rows: &[Row]) -> Result<Option<u16>> {
    let answer = rows.last().cloned().unwrap_or_default();
    match parse_field::<i32>(&answer, "slot", "the lock's answer")? {
        -1 => Ok(None),
        slot => Ok(Some(
            u16::try_from(slot).map_err(|_| protocol_error(&answer))?,
        )),
    }
}

/// A wait that failed otherwise than by its own `lock_timeout`.
fn ended(session: &mut Session, e: &postgres::Error) -> Result<WaitEnd> {
    // A role's statement_timeout ends the wait: that is "busy", not a failure.
    if e.code() == Some(&SqlState::QUERY_CANCELED) {
        end_transaction(session);
        let setting = session
            .first_row("SHOW statement_timeout")
            .ok()
            .and_then(|r| r.string("statement_timeout"))
            .unwrap_or_else(|| "?".to_owned());
        return Ok(WaitEnd::EndedBy(format!(
            "the server's statement_timeout ({setting}) ended the wait; raise it for this role, or use --wait=DURATION below it"
        )));
    }
    Err(anyhow::anyhow!("{}", describe_pg_error(e)))
        .context("cannot wait for the lock")
        .classify(Failure::Unavailable)
}
