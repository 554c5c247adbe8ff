//! A lease held: renewing it while the command runs, and expiring it at the end.
//!
//! A lease lives in its row, not in a connection, so a connection that closes between two
//! renewals (a role's `idle_session_timeout`, a pooler's `client_idle_timeout`, a restarted
//! pooler) loses nothing: the renewal reconnects and tries again, for as long as the budget
//! allows. What counts is the arithmetic of the module docs of `lease`: a renewal counts only
//! when an `UPDATE … WHERE version = ours` answered with the row, on whatever connection, and
//! the budget runs from the moment its renewal round began, which is no later than the sending
//! of the statement that succeeded. So the supervisor, counting from the same moment, stops the
//! job a margin before the server can let anyone else in, however many reconnects it took.
//!
//! Not responsible for when renewals happen (the watchdog) or for stopping the job (the
//! supervisor).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::sql;
use crate::config::Dial;
use crate::db::{self, Session, describe_pg_error};
use crate::domain::appname;
use crate::domain::guard::{Guard, LossReason, RunEnd};
use crate::domain::lease_table::LeaseTable;
use crate::domain::timing::LeaseTiming;
use crate::hold::record::{self, Started};
use crate::log;

/// The pause after a failed attempt that follows another failed one, at first and at most; the
/// first retry after a single failure is immediate (a connection closed while idle).
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MOST: Duration = Duration::from_secs(1);

/// A lease held: the row's key and version, and how to reach it.
pub struct Lease {
    /// `None` once it failed, until a reconnect succeeds.
    session: Option<Session>,
    /// What a reconnect connects with.
    dial: Dial,
    table: LeaseTable,
    key: String,
    ttl_ms: u128,
    budget: Duration,
    /// When the round of the last successful renewal began (at first, when the acquiring
    /// statement was sent): no attempt is made after this plus the budget.
    renewed: Instant,
    /// The row's version: the fencing token.
    pub version: i64,
    pub slot: u16,
    /// When the acquiring statement was sent: the budget runs from here until the first renewal.
    pub sent: Instant,
    /// The run's row in the run record, whose end the release writes.
    record: Option<Started>,
}

/// What acquiring took: the row and when the statement that took it was sent, and the run's
/// row in the record.
pub struct Taken {
    pub key: String,
    pub version: i64,
    pub slot: u16,
    pub sent: Instant,
    pub record: Option<Started>,
}

impl Lease {
    pub(super) fn new(
        session: Session,
        dial: &Dial,
        table: &LeaseTable,
        timing: LeaseTiming,
        taken: Taken,
    ) -> Lease {
        Lease {
            session: Some(session),
            dial: dial.clone(),
            table: table.clone(),
            key: taken.key,
            ttl_ms: timing.ttl.as_millis(),
            budget: timing.budget,
            renewed: taken.sent,
            version: taken.version,
            slot: taken.slot,
            sent: taken.sent,
            record: taken.record,
        }
    }

    /// Sets the row's expiry while it carries our version, retrying on a new connection after
    /// any failure until `renewed + budget`: the row is the lease, not the session. With `end`,
    /// the same statement writes the run's end into the record. Answers the takeover request
    /// the row carries for another holder, if any (`sql::update`'s `replacer`).
    fn update(
        &mut self,
        expires_at: &str,
        end: Option<&RunEnd>,
    ) -> Result<Option<String>, LossReason> {
        let deadline = self.renewed + self.budget;
        let mine = sql::Mine {
            table: &self.table,
            key: &self.key,
            version: self.version,
            holder: &self.dial.application_name,
        };
        let mut sql = match (end, &self.record) {
            (Some(end), Some(started)) => sql::update_ending(&mine, expires_at, |held| {
                record::sql::end(started, end, held)
            }),
            _ => sql::update(&mine, expires_at),
        };
        let mut why = "the connection was lost".to_owned();
        let mut pause = Duration::ZERO;
        let round = Instant::now();
        loop {
            if let Some(session) = self.session.as_mut() {
                match session.rows(&sql) {
                    Ok(rows) if rows.is_empty() => {
                        return Err(LossReason::LeaseTakenOver {
                            version: self.version,
                        });
                    }
                    Ok(rows) => {
                        // After a failure in this round, say how long it took.
                        if !pause.is_zero() {
                            log::info(format!(
                                "reconnected and renewed the lease in {} ms",
                                round.elapsed().as_millis()
                            ));
                        }
                        let replacer = rows.last().and_then(|r| r.string("replacer"));
                        return Ok(replacer);
                    }
                    // The record's end failed on its own (a table dropped meanwhile, say): the
                    // lease must still go, and its release prove it was held.
                    Err(e)
                        if end.is_some()
                            && !db::connection_ended(&e)
                            && e.as_db_error().is_some() =>
                    {
                        log::warn(format!(
                            "cannot record the end of the run: {}",
                            describe_pg_error(&e)
                        ));
                        sql = sql::update(&mine, expires_at);
                        continue;
                    }
                    Err(e) => {
                        why = describe_pg_error(&e);
                        // Whatever failed, a fresh session is the surest way on.
                        if let Some(session) = self.session.take() {
                            session.close();
                        }
                    }
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now() + pause);
            if remaining.is_zero() {
                return Err(LossReason::Connection(why));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).clamp(RETRY_FIRST, RETRY_MOST);
            log::info(format!(
                "the lease's statement failed ({why}); reconnecting, {} ms left of the budget",
                remaining.as_millis()
            ));
            match connect_within(&self.dial, remaining) {
                Ok(session) => self.session = Some(session),
                Err(e) => why = format!("cannot reconnect: {e:#}"),
            }
        }
    }
}

/// Connects, giving up after `limit` whatever the connect timeout says: a reconnect must not
/// outlast the lease's budget. A connect that overruns is left to finish on its own thread.
fn connect_within(dial: &Dial, limit: Duration) -> anyhow::Result<Session> {
    let (tx, rx) = mpsc::channel();
    let dial = dial.clone();
    std::thread::Builder::new()
        .name("lease-connect".into())
        .spawn(move || {
            let _ = tx.send(db::connect(&dial));
        })?;
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "no connection within the {} left of the budget",
            humantime::format_duration(limit)
        ))
    })
}

impl Guard for Lease {
    /// Extends the expiry, only if the row still carries this holder's version.
    fn check(&mut self) -> Result<(), LossReason> {
        // The watchdog counts this renewal from just before this call; so does the lease.
        let round = Instant::now();
        let expires_at = sql::expiry(self.ttl_ms);
        let replacer = self.update(&expires_at, None)?;
        self.renewed = round;
        match replacer {
            None => Ok(()),
            // The lease is renewed and still ours: it is let go once the job is gone.
            Some(by) => Err(LossReason::Replaced {
                by: appname::who(Some(&by), 0),
            }),
        }
    }

    /// Expires the lease now, if it is still ours, and closes the connection; the run's end
    /// goes into the record in the same statement.
    fn release(mut self: Box<Self>, end: &RunEnd) -> Result<(), LossReason> {
        let result = self.update(crate::hold::sql::CLOCK, Some(end));
        if let Some(session) = self.session.take() {
            session.close();
        }
        result.map(|_| ())
    }
}
