//! Takeover in lease mode (`--replace`, `heimdall stop --lease-table`): the replacer writes its
//! request into the live lease's row (`replacer`, `replace_until`), refreshed at every poll of
//! its wait, and the holder's renewal, which already updates that row, reads it back
//! (`sql::update`'s `replacer`). While a request stands, no other waiter takes the lease once it
//! is let go (`sql::acquire`): a lease has no queue, so the replacer simply comes first, and a
//! waiter never starts a command only to be asked to stop at its first renewal.
//!
//! The request's columns are not part of the table's required shape: an older table gets them
//! from the first replacer (`ALTER TABLE … ADD COLUMN IF NOT EXISTS`, [`table::takeover_columns_ddl`],
//! printed by `heimdall lease-ddl` for a DBA), and older heimdalls ignore them.

use std::time::{Duration, Instant};

use anyhow::Result;

use super::{LeaseHolder, POLL_MOST, holders, sql, table};
use crate::db::sqlstate::SqlState;
use crate::db::{Session, describe_pg_error};
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::LockTarget;
use crate::exit::{Failure, fail};
use crate::log;

/// How long a request stands without a refresh: two of the longest pauses between polls, and a
/// second. A replacer that gave up or died stops asking by itself within this.
const REQUEST_STANDS: Duration = Duration::from_secs(2 * POLL_MOST.as_secs() + 1);

/// Asks the live lease on `key` (held by another) to let go, as `replacer`; adds the request's
/// columns to a table that has none yet. Whether a live lease was asked.
pub fn ask(session: &mut Session, table: &LeaseTable, key: &str, replacer: &str) -> Result<bool> {
    let request = sql::request(table, key, replacer, REQUEST_STANDS.as_millis());
    let mut added = false;
    loop {
        match session.rows(&request) {
            Ok(rows) => return Ok(!rows.is_empty()),
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_COLUMN) && !added => {
                added = true;
                let ddl = table::takeover_columns_ddl(table);
                log::info(format!("adding the takeover request's columns: {ddl}"));
                if let Err(e) = session.rows(&ddl) {
                    return Err(fail(
                        Failure::Unavailable,
                        format!(
                            "cannot ask the holder of the lease to stop: the lease table {table} has no takeover columns, and adding them failed ({}); have its owner run: {ddl}",
                            describe_pg_error(&e)
                        ),
                    ));
                }
            }
            Err(e) => {
                return Err(fail(
                    Failure::Unavailable,
                    format!(
                        "cannot ask the holder of the lease to stop: {}",
                        describe_pg_error(&e)
                    ),
                ));
            }
        }
    }
}

/// Withdraws `replacer`'s request on `key`: it took the lease, or gave up. A failure only
/// leaves the request to lapse by itself.
pub fn withdraw(session: &mut Session, table: &LeaseTable, key: &str, replacer: &str) {
    if let Err(e) = session.rows(&sql::withdraw(table, key, replacer)) {
        log::debug(format!(
            "cannot withdraw the takeover request: {}",
            describe_pg_error(&e)
        ));
    }
}

/// Why a replacer's wait ended without the lease.
pub const NO_ANSWER: &str = "the holder did not stop or respond in time (a heimdall older than --replace does not answer; a newer one stops at its next renewal, then its command's stop, up to its --kill-after): give --wait more time";

/// How `heimdall stop --lease-table` ended.
pub enum LeaseStop {
    /// No live lease on the lock.
    Free,
    /// The holders (as they were) let go, after this long.
    Stopped(Vec<LeaseHolder>, Duration),
    /// Still held when the wait ended, after this long.
    TimedOut(Vec<LeaseHolder>, Duration),
}

/// `heimdall stop` in lease mode: asks the live lease on `lock` (one slot) to let go, as
/// `me`, and polls until it has or `limit` has passed; then withdraws the request, so that
/// the waiters that it held off may take the lease.
pub fn stop(
    session: &mut Session,
    table: &LeaseTable,
    lock: &LockTarget,
    me: &str,
    limit: Duration,
) -> Result<LeaseStop> {
    let key = sql::slot_key(lock, 0);
    let before = holders(session, table, lock);
    if before.is_empty() {
        return Ok(LeaseStop::Free);
    }
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    let end = loop {
        if !ask(session, table, &key, me)? && holders(session, table, lock).is_empty() {
            break LeaseStop::Stopped(before, started.elapsed());
        }
        if started.elapsed() >= limit {
            break LeaseStop::TimedOut(holders(session, table, lock), started.elapsed());
        }
        std::thread::sleep(pause.min(limit.saturating_sub(started.elapsed())));
        pause = (pause * 2).min(POLL_MOST);
    };
    withdraw(session, table, &key, me);
    Ok(end)
}
