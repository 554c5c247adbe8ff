//! The advisory lock, held: the connection whose transaction holds it, checked by the watchdog
//! (a heartbeat) and released by committing. What `acquire` hands over.

use std::os::fd::BorrowedFd;

use super::{ServerUp, request_sql};
use crate::db::sqlstate::{self, SqlState};
use crate::db::{Row, Session, connection_ended, describe_pg_error};
use crate::domain::appname;
use crate::domain::guard::{Guard, LossReason, RunEnd};
use crate::domain::key::LockKey;
use crate::hold::record::{self, Started};
use crate::log;

/// A connection that holds the lock.
pub struct Lock {
    pub(super) session: Session,
    pub slot: u16,
    pub backend_pid: i32,
    /// A transaction id assigned while this session held the lock: larger than any token an
    /// earlier holder of the lock got.
    pub fencing_token: i64,
    /// `now()` in the holding transaction, its start: the heartbeat's proof that the
    /// transaction holding the lock is still the one it talks to.
    pub(super) holding_since: String,
    /// The same instant as seconds since the epoch: with the backend pid, what identifies the
    /// holding transaction to a nested heimdall proving re-entrancy (`pg_stat_activity.xact_start`).
    pub holding_since_epoch: String,
    /// When the server came up, read while taking the lock (for the lock-delay).
    pub server_up: Option<ServerUp>,
    /// The run's row in the run record, whose end the release writes.
    pub(super) record: Option<Started>,
    /// The heartbeat: [`STILL_HOLDING`] and, on slot 0, whether a replacer asks for the lock
    /// (`request_sql::replacer_column`).
    pub(super) heartbeat: String,
    /// The backend of the last request ignored because its role may not stop this run: said
    /// once, not at every heartbeat.
    pub(super) ignored: Option<i32>,
}

/// The heartbeat and the release both ask this: the backend and the transaction that took the
/// lock must still be the ones answering. A pooler that moved the client to another server
/// connection changes the pid; one that ended the transaction changes `now()`, the
/// transaction's start.
///
/// `pg_is_in_recovery()` is volatile, and that is why it is here: a proxy that routes
/// statements one by one (pgpool-II with load balancing) sends a lone SELECT of stable functions
/// to a standby, even inside a transaction, but one that calls a volatile function to the
/// primary, where the holding transaction is. If a standby answers all the same, it says so.
///
/// Its columns are named after the functions (`pg_backend_pid`, `now`, `pg_is_in_recovery`);
/// the text itself is what tests and a DBA's `pg_stat_activity` see every few seconds, so it
/// carries no aliases.
pub(super) const STILL_HOLDING: &str =
    "SELECT pg_catalog.pg_backend_pid(), pg_catalog.now(), pg_catalog.pg_is_in_recovery()";

/// The heartbeat of the lock held on slot `slot` of `key`: [`STILL_HOLDING`], and on slot 0
/// (the key a replacer waits for; `--replace` takes no `--slots`) whether a replacer asks for
/// it, in the same round trip.
pub(super) fn heartbeat_sql(key: LockKey, slot: u16) -> String {
    if slot == 0 {
        format!("{STILL_HOLDING}, {}", request_sql::replacer_column(key))
    } else {
        STILL_HOLDING.to_owned()
    }
}

impl Guard for Lock {
    /// One watchdog check: a single cheap round trip. Returns why the lock must count as lost,
    /// if it must.
    fn check(&mut self) -> std::result::Result<(), LossReason> {
        let row = self
            .session
            .first_row(&self.heartbeat)
            .map_err(|e| LossReason::Connection(self.session.loss_reason(&e)))?;
        self.still_holding(&row)?;
        match row.get::<i32>("replacer") {
            None => Ok(()),
            Some(pid) => match self.replacer(pid) {
                Some(by) => Err(LossReason::Replaced { by }),
                None => Ok(()),
            },
        }
    }

    /// Commits the holding transaction, which releases the lock, and closes the connection.
    /// Closing alone would release it too; committing first hands it to a waiter without
    /// waiting for the backend to exit. The same message proves the lock was still held when
    /// the command finished, and writes the run's end into the record. Returns why not, if it
    /// was not.
    fn release(mut self: Box<Self>, end: &RunEnd) -> std::result::Result<(), LossReason> {
        let rows = match self.record.take() {
            None => self
                .session
                .rows(&format!("{STILL_HOLDING}; COMMIT"))
                .map_err(|e| LossReason::Connection(self.session.loss_reason(&e)))?,
            Some(started) => self.release_ending(&started, end)?,
        };
        let held = self.still_holding(&rows.into_iter().next().unwrap_or_default());
        self.session.close();
        held?;
        log::info("lock released");
        Ok(())
    }

    fn socket(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the session's socket stays open as long as the session, which this borrow
        // cannot outlive.
        self.session
            .socket
            .map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
    }
}

impl Lock {
    /// The release with the run's end, behind a savepoint: a record that cannot be written (a
    /// table dropped meanwhile) must not cost the proof that the lock was held, so the end is
    /// rolled back alone, and the proof and the commit sent again.
    fn release_ending(
        &mut self,
        started: &Started,
        end: &RunEnd,
    ) -> std::result::Result<Vec<Row>, LossReason> {
        // Only this transaction, on this backend, may count as holding the lock when the end
        // is written; a pooler that moved the session elsewhere makes it a lost run.
        let held = format!(
            "pg_catalog.pg_backend_pid() OPERATOR(pg_catalog.=) {} AND {} OPERATOR(pg_catalog.=) {}",
            self.backend_pid,
            crate::db::epoch_seconds_sql("pg_catalog.now()"),
            self.holding_since_epoch,
        );
        // The end is no safety matter (the start, which the rule counts, is durable already):
        // the commit need not wait for the disk, as the release without a record does not.
        let sql = format!(
            "{STILL_HOLDING}; SET LOCAL synchronous_commit = off; SAVEPOINT heimdall_end; {}; \
             RELEASE SAVEPOINT heimdall_end; COMMIT",
            record::sql::end(started, end, &held)
        );
        let lost =
            |session: &Session, e: postgres::Error| LossReason::Connection(session.loss_reason(&e));
        match self.session.rows(&sql) {
            // No transaction block for the savepoint: the holding transaction had ended (a
            // pooler that ended it), and the proof ran outside it.
            Err(e) if sqlstate::any_of(&e, &[SqlState::NO_ACTIVE_SQL_TRANSACTION]) => {
                Err(LossReason::TransactionEnded)
            }
            Err(e) if !connection_ended(&e) && e.as_db_error().is_some() => {
                log::warn(format!(
                    "cannot record the end of the run in {}: {}",
                    started.table,
                    describe_pg_error(&e)
                ));
                let again = format!("ROLLBACK TO SAVEPOINT heimdall_end; {STILL_HOLDING}; COMMIT");
                self.session
                    .rows(&again)
                    .map_err(|e| lost(&self.session, e))
            }
            answer => answer.map_err(|e| lost(&self.session, e)),
        }
    }

    /// Who the session with backend `pid`, which asks for the lock, is; None when its role may
    /// not stop this run (see `request_sql::replacer_name_sql`), whose request is then ignored.
    /// Asked only once a request was seen; a failure costs only the name.
    fn replacer(&mut self, pid: i32) -> Option<String> {
        let row = match self.session.rows(&request_sql::replacer_name_sql(pid)) {
            Ok(rows) => rows.last().cloned(),
            Err(e) => {
                log::debug(format!(
                    "cannot name the replacer: {}",
                    describe_pg_error(&e)
                ));
                None
            }
        };
        let app = row.as_ref().and_then(|r| r.text("application_name"));
        let who = appname::who(app, pid);
        if row.is_some_and(|r| !r.is_true("may_stop")) {
            if self.ignored != Some(pid) {
                self.ignored = Some(pid);
                log::warn(format!(
                    "ignoring the request of {who} to stop this run: its role could not end this session with pg_terminate_backend"
                ));
            }
            return None;
        }
        Some(who)
    }

    /// What [`STILL_HOLDING`]'s answer says of the lock.
    fn still_holding(&self, row: &Row) -> std::result::Result<(), LossReason> {
        match row.get::<i32>("pg_backend_pid") {
            Some(pid) if row.is_true("pg_is_in_recovery") => Err(LossReason::Standby { pid }),
            Some(pid) if pid != self.backend_pid => Err(LossReason::OtherBackend {
                now: pid,
                holder: self.backend_pid,
            }),
            Some(_) if row.text("now") != Some(self.holding_since.as_str()) => {
                Err(LossReason::TransactionEnded)
            }
            Some(_) => Ok(()),
            None => Err(LossReason::NoRow),
        }
    }
}
