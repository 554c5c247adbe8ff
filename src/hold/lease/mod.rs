//! Lease mode (`--lease-table`): the lock is a row in a table instead of an advisory lock, so a
//! holder needs the server only for one short autocommit statement every few seconds, and
//! thousands of holders can share a pooler's few server connections.
//!
//! The row for a key carries a version (the fencing token) and an expiry on the server's clock.
//! Acquiring is one statement: insert the row, or take it over when its expiry has passed,
//! raising the version. Renewing extends the expiry only while the row still carries this
//! holder's version; releasing expires it the same way. No statement leaves session state
//! behind, so every pooler mode works, statement pooling included.
//!
//! Safety does not depend on clocks agreeing. The server lets another holder in only after
//! `expiry = T_exec + ttl`, where `T_exec` is when it ran the last successful renewal, which is
//! after heimdall sent it (`T_sent`). heimdall stops the job by `T_sent + budget + kill_after`
//! on its own monotonic clock, with `budget = ttl - kill_after - margin`: that is `margin` before
//! the earliest moment the server can hand the lease to anyone. The margin covers the two clocks
//! running at different rates over one ttl (NTP keeps that under 500 ppm: 15 ms over 30 s) and
//! the time heimdall's supervisor takes to act; it is a tenth of the ttl, at least one second.
//! A renewal whose connection has closed reconnects and tries again within the budget (see
//! `held`); it counts from the start of its round, before any of its statements was sent, and
//! only once an update found the row still carrying this holder's version.
//!
//! Not responsible for the watchdog's timing or for stopping the job: the supervisor does that,
//! from the renewals this module reports.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::{Dial, LeaseMode, RecordMode};
use crate::db::{Row, Session, describe_pg_error};
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::{LockTarget, Wait};
use crate::domain::timing::LeaseTiming;
use crate::exit::{Failure, fail};
use crate::hold::record::{self, LastRun, Said, Started};
use crate::hold::table as tables;
use crate::hold::waiting::{Holding, WaitLine};
use crate::log;

mod held;
mod sql;
pub mod table;
pub mod takeover;

pub use held::Lease;

use held::Taken;
use table::SHAPE;

use sql::{Grant, slot_key};

/// Someone else's lease on one of the keys.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    pub key: String,
    /// `namespace/name` or `key K`.
    pub name: String,
    pub holder: String,
    pub version: i64,
    pub expires_in_seconds: Option<f64>,
    /// How long this holder has held the lease.
    pub held_seconds: Option<f64>,
}

impl LeaseHolder {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "lock": self.name,
            "keys": self.key,
            "holder": self.holder,
            "version": self.version,
            "expires_in_seconds": self.expires_in_seconds,
        })
    }

    pub fn describe(&self) -> String {
        match self.expires_in_seconds {
            Some(s) => format!(
                "\"{}\" (lease version {}, expires in {:.1}s unless renewed)",
                self.holder, self.version, s
            ),
            None => format!("\"{}\" (lease version {})", self.holder, self.version),
        }
    }
}

pub enum LeaseAcquire {
    Held(Box<Lease>),
    Busy(LeaseBusy),
    /// `--min-interval`: the lease is free, but a run started within the interval.
    Skipped(LeaseSkip),
}

/// Why the command did not run for `--min-interval`: the last run, from the record; or, when
/// the record has none, who took the lease last and how long ago (seconds).
pub struct LeaseSkip {
    pub last: Option<LastRun>,
    pub lease: Option<(String, f64)>,
}

/// One attempt's outcome.
enum Attempt {
    Taken(Taken),
    Busy,
    Skipped(LeaseSkip),
}

/// Why the command did not run, for the message.
pub struct LeaseBusy {
    pub holders: Vec<LeaseHolder>,
    /// How long heimdall waited, when it did.
    pub waited: Option<Duration>,
    /// Why the wait ended without the lease, when more can be said (`--replace`).
    pub why: Option<&'static str>,
}

/// How long a waiter first sleeps between attempts, and at most.
const POLL_FIRST: Duration = Duration::from_millis(100);
pub(crate) const POLL_MOST: Duration = Duration::from_secs(2);

/// Takes a lease on one of `lock`'s slots, or says who holds them. With `wait`, polls with
/// jittered exponential backoff until the deadline: a lease has no queue to wait in. With
/// `record`, the statement that takes the lease writes the run's start too, and with
/// `--min-interval` takes nothing within the interval: then the run is skipped, however long
/// it may wait. With `replace`, every poll asks the live lease to let go (`takeover.rs`).
/// The row's holder is the connection's `application_name`.
pub fn acquire(
    mut session: Session,
    dial: &Dial,
    mode: &LeaseMode,
    lock: &LockTarget,
    wait: Option<Wait>,
    record: Option<&RecordMode>,
    replace: bool,
) -> Result<LeaseAcquire> {
    let holder = dial.application_name.as_str();
    let started = Instant::now();
    // Without --wait, one attempt.
    let deadline = wait.map_or(Some(started), |wait| wait.deadline(started));
    let mut pause = POLL_FIRST;
    let mut jitter = u64::from(std::process::id());
    // The tables' shapes are checked by the first statement, once per run.
    let mut check = true;
    // The status line of a wait that a person watches, once the first attempt has failed.
    let mut line = None;
    // `--replace`: whether a request was written, to withdraw once the wait ends.
    let mut asked = false;
    loop {
        let attempt = Try {
            table: &mode.table,
            lock,
            holder,
            timing: mode.timing,
            check,
            record,
        }
        .once(&mut session);
        let first = std::mem::take(&mut check);
        match attempt? {
            Attempt::Taken(taken) => {
                drop(line.take());
                if wait.is_some() {
                    log::info(format!(
                        "waited {} ms for the lease",
                        started.elapsed().as_millis()
                    ));
                }
                if asked {
                    takeover::withdraw(&mut session, &mode.table, &taken.key, holder);
                    log::info(format!(
                        "took over lease {} in {} ms (--replace)",
                        lock.describe(),
                        started.elapsed().as_millis()
                    ));
                }
                let lease = Lease::new(session, dial, &mode.table, mode.timing, taken);
                return Ok(LeaseAcquire::Held(Box::new(lease)));
            }
            Attempt::Skipped(skip) => return Ok(LeaseAcquire::Skipped(skip)),
            Attempt::Busy if replace => {
                let key = slot_key(lock, 0);
                asked |= takeover::ask(&mut session, &mode.table, &key, holder)?;
            }
            Attempt::Busy => {}
        }
        if first && let Some(wait) = wait.filter(|_| WaitLine::wanted()) {
            let holding = holding(&holders(&mut session, &mode.table, lock));
            line = WaitLine::start(lock, holding, Instant::now(), wait, started);
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            drop(line.take());
            if asked {
                takeover::withdraw(&mut session, &mode.table, &slot_key(lock, 0), holder);
            }
            return Ok(LeaseAcquire::Busy(LeaseBusy {
                holders: holders(&mut session, &mode.table, lock),
                waited: wait.map(|_| started.elapsed()),
                why: replace.then_some(takeover::NO_ANSWER),
            }));
        }
        // ±25% jitter, so waiters started together do not poll together.
        jitter = jitter
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let spread = pause.as_millis() as u64 / 2;
        let sleep = pause - Duration::from_millis(spread / 2)
            + Duration::from_millis((jitter >> 33) % spread.max(1));
        let sleep = deadline.map_or(sleep, |d| sleep.min(d.saturating_duration_since(now)));
        std::thread::sleep(sleep);
        pause = (pause * 2).min(POLL_MOST);
    }
}

/// One attempt on every slot in order; the first row inserted or taken over is the lease.
struct Try<'a> {
    table: &'a LeaseTable,
    lock: &'a LockTarget,
    holder: &'a str,
    timing: LeaseTiming,
    /// The first statement also checks the tables' shapes.
    check: bool,
    record: Option<&'a RecordMode>,
}

impl Try<'_> {
    fn once(&self, session: &mut Session) -> Result<Attempt> {
        let name = self.lock.short();
        for slot in 0..self.lock.slots {
            let key = slot_key(self.lock, slot);
            let grant = Grant {
                key: &key,
                name: &name,
                holder: self.holder,
                ttl_ms: self.timing.ttl.as_millis(),
            };
            let first = self.check && slot == 0;
            let record = self.record.map(|r| (r, self.lock));
            let sql = sql::acquire(self.table, &grant, first, record);
            let sent = Instant::now();
            let row = self.answer(session, &sql)?;
            if !row.is_true("fits") {
                return Err(SHAPE.misfit(session, self.table, || {
                    "the lease table's columns changed while heimdall looked".to_owned()
                }));
            }
            let said = self.record.map(|_| Said::of(&row));
            if let (Some(Said::Misfit), Some(mode)) = (&said, self.record) {
                return Err(record::table::SHAPE.misfit(session, &mode.table, || {
                    "the run table's columns changed while heimdall looked".to_owned()
                }));
            }
            if let Some(version) = row.text("version") {
                let version = version.parse().map_err(|_| {
                    fail(
                        Failure::Internal,
                        format!("unexpected lease version {version:?}"),
                    )
                })?;
                let record = match (said, self.record) {
                    (Some(Said::Started(run)), Some(mode)) => Some(Started {
                        table: mode.table.clone(),
                        key: key.clone(),
                        run,
                    }),
                    (None, _) => None,
                    _ => {
                        return Err(fail(
                            Failure::Internal,
                            format!("the lease was taken, but its run not recorded: {row:?}"),
                        ));
                    }
                };
                return Ok(Attempt::Taken(Taken {
                    key,
                    version,
                    slot,
                    sent,
                    record,
                }));
            }
            if row.is_true("skipped") {
                let last = match said {
                    Some(Said::Skipped(last)) => last,
                    _ => None,
                };
                let lease = row.string("lease_holder").map(|holder| {
                    let age = row.get("lease_age").unwrap_or_default();
                    (holder, age)
                });
                return Ok(Attempt::Skipped(LeaseSkip { last, lease }));
            }
        }
        Ok(Attempt::Busy)
    }

    /// The acquiring statement's answer. A missing table (the lease table, or the run table)
    /// is created, and the statement tried again.
    fn answer(&self, session: &mut Session, sql: &str) -> Result<Row> {
        let mut created = false;
        loop {
            match session.first_row(sql) {
                Ok(row) => return Ok(row),
                Err(e) if tables::missing(&e) && !created => {
                    created = true;
                    SHAPE.ensure(session, self.table)?;
                    if let Some(mode) = self.record {
                        record::table::SHAPE.ensure(session, &mode.table)?;
                    }
                }
                Err(e) => return Err(self.unavailable(session, &e)),
            }
        }
    }

    /// A failed acquiring statement. A table of the wrong shape makes statements fail too (a
    /// missing column, no unique index for `ON CONFLICT`): then that is the message, with the
    /// DDL.
    fn unavailable(&self, session: &mut Session, e: &postgres::Error) -> anyhow::Error {
        let failed = || {
            format!(
                "cannot take the lease in {}: {}",
                self.table.sql(),
                describe_pg_error(e)
            )
        };
        if crate::db::connection_ended(e) {
            return fail(Failure::Unavailable, failed());
        }
        let tables = [(&SHAPE, self.table)]
            .into_iter()
            .chain(self.record.map(|r| (&record::table::SHAPE, &r.table)));
        for (shape, table) in tables {
            if let Ok(problems) = shape.check(session, table)
                && !problems.is_empty()
            {
                return fail(Failure::Unavailable, shape.misfit_message(table, &problems));
            }
        }
        fail(Failure::Unavailable, failed())
    }
}

/// The first lease, for the status line of a wait that a person watches.
fn holding(leases: &[LeaseHolder]) -> Option<Holding> {
    let first = leases.first()?;
    Some(Holding {
        who: format!("\"{}\" (lease version {})", first.holder, first.version),
        held: first
            .held_seconds
            .and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
        connected_only: false,
        others: leases.len() - 1,
    })
}

/// The live leases on `lock`'s keys, for the busy message: a failure here only costs the
/// message its detail. The acquiring statement has checked the table.
pub fn holders(session: &mut Session, table: &LeaseTable, lock: &LockTarget) -> Vec<LeaseHolder> {
    live(session, table, Some(lock)).unwrap_or_else(|e| {
        log::debug(format!("cannot look up the lease holders: {e}"));
        Vec::new()
    })
}

/// The live leases on `lock`'s keys, for `status`, which must not call a lock free because it
/// could not read the table, nor read a table that cannot hold leases safely.
pub fn lock_holders(
    session: &mut Session,
    table: &LeaseTable,
    lock: &LockTarget,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    SHAPE.checked(session, table)?;
    live(session, table, Some(lock))
}

/// One boolean: does one of `lock`'s slots carry a live lease of version `token`? The proof of
/// re-entrancy in lease mode (see `reentry`).
pub fn holds_query(table: &LeaseTable, lock: &LockTarget, token: i64) -> String {
    sql::holds(table, lock, token)
}

/// Every live lease in the table, for `list`.
pub fn all_holders(
    session: &mut Session,
    table: &LeaseTable,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    SHAPE.checked(session, table)?;
    live(session, table, None)
}

fn live(
    session: &mut Session,
    table: &LeaseTable,
    lock: Option<&LockTarget>,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    let rows = session.rows(&sql::live(table, lock)).map_err(|e| {
        format!(
            "cannot read the lease table {table}: {}",
            describe_pg_error(&e)
        )
    })?;
    Ok(rows
        .iter()
        .map(|r| LeaseHolder {
            key: r.string("lock_key").unwrap_or_default(),
            name: r.string("lock_name").unwrap_or_default(),
            holder: r.string("holder").unwrap_or_default(),
            version: r.get("version").unwrap_or_default(),
            expires_in_seconds: r.get("expires_in"),
            held_seconds: r.get("held_for"),
        })
        .collect())
}
