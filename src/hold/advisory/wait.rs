//! Waiting in PostgreSQL's own lock queue for a busy lock (`--wait`): first come, first served
//! with one slot; with `--slots`, a short, jittered wait on one slot at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::sql::{BEGIN, WATCH_CLIENT, functions, take_sql};
use super::{end_transaction, parse_field, protocol_error, run_protocol};
use crate::db::sqlstate::SqlState;
use crate::db::{Session, describe_pg_error};
use crate::domain::lock::{LockTarget, Mode};
use crate::exit::{Classify, Failure};

/// With `--slots` and `--wait`, heimdall queues on one slot for a short, jittered while, then
/// tries every slot again: PostgreSQL cannot wait for the first of several locks.
const SLOT_WAIT_MIN: Duration = Duration::from_millis(50);
const SLOT_WAIT_SPREAD_MS: u64 = 200;

/// How a wait in the server's queue ended.
pub(super) enum WaitEnd {
    Granted(u16),
    /// heimdall's own `--wait` deadline.
    Deadline,
    /// The server ended it (a role's statement_timeout), and why.
    EndedBy(String),
}

/// Waits in PostgreSQL's lock queue (first come, first served) under `lock_timeout`, inside a
/// transaction of its own each round: an aborted wait aborts the transaction, and the next round
/// rolls it back first.
pub(super) fn wait_in_queue(
    session: &mut Session,
    lock: &LockTarget,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<WaitEnd> {
    let function = functions(mode).wait_xact;
    let jitter = u64::from(std::process::id());
    let mut round: u64 = 0;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            return Ok(WaitEnd::Deadline);
        }
        // With one slot, one blocking call does it all. With several, queue on one slot for a
        // short, jittered while, then look at every slot again.
        let (slot, limit) = if lock.slots == 1 {
            (0, remaining)
        } else {
            round += 1;
            let spread =
                (jitter.wrapping_mul(2_654_435_761).wrapping_add(round * 97)) % SLOT_WAIT_SPREAD_MS;
            let slice = SLOT_WAIT_MIN + Duration::from_millis(spread);
            let slot = ((jitter + round) % u64::from(lock.slots)) as u16;
            (slot, Some(remaining.map_or(slice, |r| r.min(slice))))
        };
        // lock_timeout 0 means no limit; a limit under 1 ms would round to 0.
        let timeout_ms = limit.map_or(0, |l| l.as_millis().max(1));
        let sql = format!(
            "{BEGIN}; SET LOCAL lock_timeout = {timeout_ms};{WATCH_CLIENT} SELECT {function}({})",
            lock.key.slot(slot).sql_args()
        );
        match session.rows(&sql) {
            Ok(_) => return Ok(WaitEnd::Granted(slot)),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                end_transaction(session);
                if lock.slots > 1 {
                    let rows =
                        run_protocol(session, &take_sql(lock, mode), "cannot take the lock")?;
                    let answer = rows.first().cloned().unwrap_or_default();
                    match parse_field::<i32>(&answer, "slot", "the lock's answer")? {
                        -1 => end_transaction(session),
                        slot => {
                            return Ok(WaitEnd::Granted(
                                u16::try_from(slot).map_err(|_| protocol_error(&answer))?,
                            ));
                        }
                    }
                    continue;
                }
                return Ok(WaitEnd::Deadline);
            }
            // A role's statement_timeout ends the wait: that is "busy", not a failure.
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
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
            Err(e) => {
                return Err(anyhow::anyhow!("{}", describe_pg_error(&e)))
                    .context("cannot wait for the lock")
                    .classify(Failure::Unavailable);
            }
        }
    }
}
