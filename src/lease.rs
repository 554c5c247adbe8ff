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
//!
//! Not responsible for the watchdog's timing or for stopping the job: the supervisor does that,
//! from the renewals this module reports.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::Wait;
use crate::config::LockTarget;
use crate::db::{Conn, DURABLE_COMMIT, describe_pg_error};
use crate::exit::{Failure, fail};
use crate::log;
use crate::watchdog::LossReason;

/// The smallest time between two renewals heimdall will accept from the arithmetic above.
mod table;

pub use table::LeaseTable;

const MIN_BUDGET: Duration = Duration::from_secs(1);

/// How often to renew, and how long without a successful renewal the job may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub ttl: Duration,
    pub renew_every: Duration,
    /// From the moment the last successful renewal was sent: past this, the supervisor stops
    /// the job (TERM, then KILL after kill-after).
    pub budget: Duration,
}

impl LeaseTiming {
    pub fn new(ttl: Duration, kill_after: Duration) -> std::result::Result<LeaseTiming, String> {
        let margin = (ttl / 10).max(Duration::from_secs(1));
        let budget = ttl
            .checked_sub(kill_after)
            .and_then(|d| d.checked_sub(margin))
            .filter(|b| *b >= MIN_BUDGET)
            .ok_or_else(|| {
                format!(
                    "--lease-ttl {} is too short: it must exceed --kill-after ({}) + a safety margin ({}) + 1s, so the job is stopped before the lease can expire; raise --lease-ttl or lower --kill-after",
                    humantime::format_duration(ttl),
                    humantime::format_duration(kill_after),
                    humantime::format_duration(margin),
                )
            })?;
        // Two renewals fit in the budget, so one lost renewal alone never stops the job.
        let renew_every = (ttl / 3).min(budget / 2);
        Ok(LeaseTiming {
            ttl,
            renew_every,
            budget,
        })
    }
}

/// A lease held: the connection it is renewed on, and the row's version.
pub struct Lease {
    conn: Conn,
    table: LeaseTable,
    ttl_ms: u128,
    key: String,
    /// The row's version: the fencing token.
    pub version: i64,
    pub slot: u16,
    /// When the acquiring statement was sent: the budget runs from here until the first renewal.
    pub sent: Instant,
}

/// Someone else's lease on one of the keys.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    pub key: String,
    /// `namespace/name` or `key K`.
    pub name: String,
    pub holder: String,
    pub version: i64,
    pub expires_in_seconds: Option<f64>,
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
}

/// Why the command did not run, for the message.
pub struct LeaseBusy {
    pub holders: Vec<LeaseHolder>,
    /// How long heimdall waited, when it did.
    pub waited: Option<Duration>,
}

/// How long a waiter first sleeps between attempts, and at most.
const POLL_FIRST: Duration = Duration::from_millis(100);
const POLL_MOST: Duration = Duration::from_secs(2);

/// Takes a lease on one of `lock`'s slots, or says who holds them. With `wait`, polls with
/// jittered exponential backoff until the deadline: a lease has no queue to wait in.
pub fn acquire(
    mut conn: Conn,
    mode: &crate::config::LeaseMode,
    lock: &LockTarget,
    holder: &str,
    wait: Option<Wait>,
) -> Result<LeaseAcquire> {
    let started = Instant::now();
    let deadline = match wait {
        None => Some(started),
        Some(Wait::Forever) => None,
        Some(Wait::Up(d)) => Some(started.checked_add(d).unwrap_or(started)),
    };
    let mut pause = POLL_FIRST;
    let mut jitter = u64::from(std::process::id());
    loop {
        if let Some(taken) = try_once(&mut conn, &mode.table, lock, holder, mode.timing)? {
            if wait.is_some() {
                log::info(format!(
                    "waited {} ms for the lease",
                    started.elapsed().as_millis()
                ));
            }
            return Ok(LeaseAcquire::Held(Box::new(Lease {
                conn,
                table: mode.table.clone(),
                ttl_ms: mode.timing.ttl.as_millis(),
                key: taken.key,
                version: taken.version,
                slot: taken.slot,
                sent: taken.sent,
            })));
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(LeaseAcquire::Busy(LeaseBusy {
                holders: holders(&mut conn, &mode.table, lock),
                waited: wait.map(|_| started.elapsed()),
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

/// One attempt on every slot in order; the first row inserted or taken over is the lease. The
/// returned `Lease` lacks its connection and table, which the caller fills in.
fn try_once(
    conn: &mut Conn,
    table: &LeaseTable,
    lock: &LockTarget,
    holder: &str,
    timing: LeaseTiming,
) -> Result<Option<Taken>> {
    let name = lock.short();
    for slot in 0..lock.slots {
        let key = slot_key(lock, slot);
        let sql = acquire_sql(table, &key, &name, holder, timing.ttl.as_millis());
        let sent = Instant::now();
        let row = match conn.first_row(&sql) {
            Ok(row) => row,
            Err(e) if e.code().is_some_and(|c| c.code() == "42P01") => {
                create_table(conn, table)?;
                conn.first_row(&sql).map_err(|e| unavailable(&e, table))?
            }
            Err(e) => return Err(unavailable(&e, table)),
        };
        if let Some(version) = row.first().and_then(|v| v.as_deref()) {
            let version = version.parse().map_err(|_| {
                fail(
                    Failure::Internal,
                    format!("unexpected lease version {version:?}"),
                )
            })?;
            return Ok(Some(Taken {
                key,
                version,
                slot,
                sent,
            }));
        }
    }
    Ok(None)
}

/// A row this run inserted or took over.
struct Taken {
    key: String,
    version: i64,
    slot: u16,
    sent: Instant,
}

/// A string literal that means the same whatever `standard_conforming_strings` says.
fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `clock_timestamp() + ttl`, on the server's clock, schema-qualified throughout.
fn expiry(ttl_ms: u128) -> String {
    format!(
        "pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) \
         pg_catalog.make_interval(secs => {ttl_ms}::float8 OPERATOR(pg_catalog./) 1000)"
    )
}

/// The key of a slot's row: the advisory keys heimdall would use, so `--key`, `--hash` and
/// `--slots` name the same leases as they name advisory locks.
fn slot_key(lock: &LockTarget, slot: u16) -> String {
    lock.key.slot(slot).to_string()
}

/// Insert the row, or take it over when it has expired: one statement, on the server's clock,
/// committed durably (a grant lost in a crash would let the next holder in beside this one).
fn acquire_sql(table: &LeaseTable, key: &str, name: &str, holder: &str, ttl_ms: u128) -> String {
    format!(
        "{DURABLE_COMMIT}; \
         INSERT INTO {t} AS l (lock_key, version, lock_name, holder, acquired_at, expires_at) \
         VALUES ({key}, 1, {name}, {holder}, pg_catalog.clock_timestamp(), {expiry}) \
         ON CONFLICT (lock_key) DO UPDATE SET version = l.version OPERATOR(pg_catalog.+) 1, \
         lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder, \
         acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at \
         WHERE l.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp() \
         RETURNING l.version",
        t = table.sql,
        key = literal(key),
        name = literal(name),
        holder = literal(holder),
        expiry = expiry(ttl_ms),
    )
}

fn unavailable(e: &postgres::Error, table: &LeaseTable) -> anyhow::Error {
    fail(
        Failure::Unavailable,
        format!(
            "cannot take the lease in {}: {}",
            table.sql,
            describe_pg_error(e)
        ),
    )
}

/// Creates the table on first use. A role without the privilege gets the DDL to hand a DBA.
fn create_table(conn: &mut Conn, table: &LeaseTable) -> Result<()> {
    let ddl = table.ddl();
    match conn.rows(&ddl) {
        Ok(_) => Ok(()),
        // Runs that start together all find the table missing and race to create it: IF NOT
        // EXISTS does not stop the losers from tripping over the winner's catalog rows
        // (unique_violation) or table (duplicate_table). The table is there either way.
        Err(e)
            if e.code()
                .is_some_and(|c| ["23505", "42P07"].contains(&c.code())) =>
        {
            Ok(())
        }
        Err(e) => Err(fail(
            Failure::Unavailable,
            format!(
                "the lease table {} does not exist, and this role cannot create it ({}); ask a DBA to run: {}",
                table.sql,
                describe_pg_error(&e),
                ddl.split_whitespace().collect::<Vec<_>>().join(" ")
            ),
        )),
    }
}

/// The live leases on `lock`'s keys, for the busy message: a failure here only costs the
/// message its detail.
pub fn holders(conn: &mut Conn, table: &LeaseTable, lock: &LockTarget) -> Vec<LeaseHolder> {
    lock_holders(conn, table, lock).unwrap_or_else(|e| {
        log::debug(format!("cannot look up the lease holders: {e}"));
        Vec::new()
    })
}

/// The live leases on `lock`'s keys, for `status`, which must not call a lock free because it
/// could not read the table.
pub fn lock_holders(
    conn: &mut Conn,
    table: &LeaseTable,
    lock: &LockTarget,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    let keys: Vec<String> = (0..lock.slots)
        .map(|s| literal(&slot_key(lock, s)))
        .collect();
    let filter = format!(
        "lock_key OPERATOR(pg_catalog.=) ANY (ARRAY[{}])",
        keys.join(", ")
    );
    live(conn, table, &filter)
}

/// One boolean: does one of `lock`'s slots carry a live lease of version `token`? The proof of
/// re-entrancy in lease mode (see `reentry`).
pub fn holds_query(table: &LeaseTable, lock: &LockTarget, token: i64) -> String {
    let keys: Vec<String> = (0..lock.slots)
        .map(|s| literal(&slot_key(lock, s)))
        .collect();
    format!(
        "SELECT EXISTS (SELECT FROM {table} WHERE lock_key OPERATOR(pg_catalog.=) ANY (ARRAY[{}]) \
         AND version OPERATOR(pg_catalog.=) {token} \
         AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp())",
        keys.join(", ")
    )
}

/// Every live lease in the table, for `list`.
pub fn all_holders(
    conn: &mut Conn,
    table: &LeaseTable,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    live(conn, table, "true")
}

fn live(
    conn: &mut Conn,
    table: &LeaseTable,
    filter: &str,
) -> std::result::Result<Vec<LeaseHolder>, String> {
    let sql = format!(
        "SELECT lock_key, lock_name, holder, version, pg_catalog.date_part('epoch', expires_at \
         OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()) FROM {table} WHERE {filter} \
         AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp() \
         ORDER BY lock_name, lock_key"
    );
    let rows = conn.rows(&sql).map_err(|e| describe_pg_error(&e))?;
    Ok(rows
        .iter()
        .map(|r| {
            let text = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
            LeaseHolder {
                key: text(0),
                name: text(1),
                holder: text(2),
                version: text(3).parse().unwrap_or_default(),
                expires_in_seconds: text(4).parse().ok(),
            }
        })
        .collect())
}

impl crate::watchdog::Guard for Lease {
    /// Extends the expiry, only if the row still carries this holder's version.
    fn check(&mut self) -> std::result::Result<(), LossReason> {
        self.update(&expiry(self.ttl_ms))
    }

    /// Expires the lease now, if it is still ours, and closes the connection.
    fn release(mut self: Box<Self>) -> std::result::Result<(), LossReason> {
        let result = self.update("pg_catalog.clock_timestamp()");
        self.conn.close();
        result
    }
}

impl Lease {
    fn update(&mut self, expires_at: &str) -> std::result::Result<(), LossReason> {
        // Durably: a renewal lost in a crash would leave the earlier expiry, before the end
        // of the budget heimdall counts from this renewal.
        let sql = format!(
            "{DURABLE_COMMIT}; \
             UPDATE {} SET expires_at = {expires_at} WHERE lock_key OPERATOR(pg_catalog.=) {} \
             AND version OPERATOR(pg_catalog.=) {} RETURNING version",
            self.table.sql,
            literal(&self.key),
            self.version
        );
        match self.conn.rows(&sql) {
            Ok(rows) if !rows.is_empty() => Ok(()),
            Ok(_) => Err(LossReason::LeaseTakenOver {
                version: self.version,
            }),
            Err(e) => Err(LossReason::Connection(describe_pg_error(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_is_stopped_a_margin_before_the_lease_can_expire() {
        let t = LeaseTiming::new(Duration::from_secs(30), Duration::from_secs(10)).unwrap();
        assert_eq!(t.budget, Duration::from_secs(17));
        assert_eq!(t.renew_every, Duration::from_millis(8500));
        // budget + kill_after + margin = ttl
        assert_eq!(
            t.budget + Duration::from_secs(10) + Duration::from_secs(3),
            t.ttl
        );
        let short = LeaseTiming::new(Duration::from_secs(5), Duration::from_secs(1)).unwrap();
        assert_eq!(short.budget, Duration::from_secs(3));
        assert!(LeaseTiming::new(Duration::from_secs(10), Duration::from_secs(10)).is_err());
    }

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"E'a\'b\\c'");
    }
}
