//! Taking what will hold the lock while the command runs: the advisory lock (`lock`) or, with
//! `--lease-table`, a lease (`lease`), and saying who holds it when it is busy; then, once the
//! command is over, confirming it, keeping it for `--min-hold` and letting it go ([`finish`]).
//! Everything between treats both alike, through [`Guard`] and the watchdog.

use std::time::Instant;

use anyhow::Result;

use crate::config::Settings;
use crate::db::Conn;
use crate::exit::Outcome;
use crate::log;
use crate::supervise::watchdog::{Guard, LossReason, Pace, Watchdog};
use crate::supervise::{LeaseBudget, Limits, Supervisor};

pub mod advisory;
pub mod lease;

use advisory::delay::{self, ServerUp};
use advisory::{Acquire, Busy, holders, keepalive};
use lease::{LeaseAcquire, LeaseBusy};

/// The lock, held.
pub struct Held {
    pub guard: Box<dyn Guard>,
    pub slot: u16,
    pub fencing_token: i64,
    /// The backend that holds an advisory lock; none for a lease.
    pub backend_pid: Option<i32>,
    /// The start of the transaction that holds an advisory lock, in seconds since the epoch.
    pub lock_since: Option<String>,
    /// Lease mode: when the acquiring statement was sent, where the lease's budget starts.
    pub lease_sent: Option<Instant>,
    /// When heimdall knew it held the lock, where `--min-hold` counts from.
    pub acquired_at: Instant,
    /// When the server came up, for the lock-delay; none for a lease, or when unknown.
    pub server_up: Option<ServerUp>,
}

/// Takes the lock or the lease on `conn`; `Err` carries the busy message.
pub fn take(
    settings: &Settings,
    conn: Conn,
    supervisor: &Supervisor,
) -> Result<std::result::Result<Held, String>> {
    if let Some(mode) = &settings.lease {
        let holder = &settings.connection.application_name;
        return Ok(
            match lease::acquire(
                conn,
                &settings.connection,
                mode,
                &settings.lock,
                holder,
                settings.wait,
            )? {
                LeaseAcquire::Held(lease) => {
                    log::info(format!(
                        "acquired lease {}{} in {} (version {}, the fencing token; ttl {}, renewed every {})",
                        settings.lock.describe(),
                        slot_words(settings, lease.slot),
                        mode.table,
                        lease.version,
                        humantime::format_duration(mode.timing.ttl),
                        humantime::format_duration(mode.timing.renew_every),
                    ));
                    Ok(Held {
                        slot: lease.slot,
                        fencing_token: lease.version,
                        backend_pid: None,
                        lock_since: None,
                        lease_sent: Some(lease.sent),
                        acquired_at: Instant::now(),
                        server_up: None,
                        guard: lease,
                    })
                }
                LeaseAcquire::Busy(busy) => Err(lease_busy_message(settings, &busy)),
            },
        );
    }
    let request = advisory::Request {
        connection: &settings.connection,
        lock: &settings.lock,
        mode: settings.mode,
        wait: settings.wait,
        keepalive: &keepalive::server_settings(settings.heartbeat, settings.kill_after),
        server_up: !delay::length(settings).is_zero(),
    };
    Ok(
        match advisory::acquire(conn, &request, |token| supervisor.set_cancel(token))? {
            Acquire::Held(session) => {
                let key = settings.lock.key.slot(session.slot);
                let (classid, objid, objsubid) = key.pg_locks_ids();
                log::info(format!(
                    "acquired lock {}{} on backend pid {} (pg_locks: classid={classid} objid={objid} objsubid={objsubid}; fencing token {})",
                    settings.lock.describe(),
                    slot_words(settings, session.slot),
                    session.backend_pid,
                    session.fencing_token,
                ));
                Ok(Held {
                    slot: session.slot,
                    fencing_token: session.fencing_token,
                    backend_pid: Some(session.backend_pid),
                    lock_since: Some(session.holding_since_epoch.clone()),
                    lease_sent: None,
                    acquired_at: Instant::now(),
                    server_up: session.server_up.clone(),
                    guard: session,
                })
            }
            Acquire::Busy(busy) => Err(busy_message(settings, &busy)),
            Acquire::Cancelled => supervisor.exit_cancelled(),
        },
    )
}

/// Between taking the lock and starting the command: the lock-delay after a server that came up
/// recently (see `lockdelay`). An error when the lock went meanwhile; the command did not run.
pub fn hold_off(settings: &Settings, held: &mut Held) -> Result<()> {
    delay::hold_off(
        delay::length(settings),
        held.server_up.as_ref(),
        held.guard.as_mut(),
        &settings.lock.describe(),
    )
}

/// How the watchdog keeps what holds the lock.
pub fn pace(settings: &Settings) -> Pace {
    match &settings.lease {
        Some(mode) => Pace::Renewal(mode.timing.renew_every),
        None => Pace::Heartbeat(settings.heartbeat),
    }
}

/// What the supervisor watches the command against; a lease's budget starts when its acquiring
/// statement was sent.
pub fn limits(settings: &Settings, lease_sent: Option<Instant>) -> Limits {
    let lease = settings.lease.as_ref().zip(lease_sent);
    Limits {
        timeout: settings.timeout,
        kill_after: settings.kill_after,
        // A lease's renewals are its heartbeat.
        heartbeat: settings.heartbeat.filter(|_| lease.is_none()),
        lease: lease.map(|(mode, sent)| LeaseBudget {
            budget: mode.timing.budget,
            acquired_sent: sent,
        }),
    }
}

/// After the command: confirm the lock was still ours, keep it for `--min-hold`, release it. A
/// lock lost after the last heartbeat shows only here; the command may have overlapped with
/// another run, and that must not pass as a success.
pub fn finish(
    settings: &Settings,
    supervisor: &Supervisor,
    watchdog: Watchdog,
    outcome: Outcome,
    acquired_at: Instant,
) -> Outcome {
    if outcome == Outcome::LockLost {
        return outcome;
    }
    let lost = |reason: LossReason| {
        log::error(format!(
            "lost lock {} before the command finished ({outcome}): {reason}; another run may have overlapped with it",
            settings.lock.describe(),
        ));
        Outcome::LockLost
    };
    let mut guard = match watchdog.stop() {
        Ok(guard) => guard,
        Err(reason) => return lost(reason),
    };
    let hold_until = settings
        .min_hold
        .and_then(|min| acquired_at.checked_add(min))
        .filter(|until| *until > Instant::now());
    let Some(until) = hold_until else {
        return match guard.release() {
            Ok(()) => outcome,
            Err(reason) => lost(reason),
        };
    };
    // Confirm the command ran under the lock before the extra hold, so a loss during the hold
    // is not mistaken for one during the command.
    if let Err(reason) = guard.check() {
        return lost(reason);
    }
    log::info(format!(
        "holding the lock {} ms more for --min-hold",
        until.saturating_duration_since(Instant::now()).as_millis()
    ));
    supervisor.hold_until(until);
    if let Err(reason) = guard.release() {
        log::info(format!(
            "the lock went during --min-hold ({reason}); the command had finished under it"
        ));
    }
    outcome
}

fn slot_words(settings: &Settings, slot: u16) -> String {
    if settings.lock.slots > 1 {
        format!(" slot {slot}")
    } else {
        String::new()
    }
}

/// How many holding sessions a busy message names; the rest are counted.
const BUSY_NAMES_AT_MOST: usize = 10;

fn busy_message(settings: &Settings, busy: &Busy) -> String {
    let who = holders::describe_at_most(&busy.holders, BUSY_NAMES_AT_MOST);
    not_running(settings, &who, busy.waited, busy.ended_by.as_deref())
}

fn lease_busy_message(settings: &Settings, busy: &LeaseBusy) -> String {
    let who = if busy.holders.is_empty() {
        "held by a lease that was gone by the time heimdall looked".to_owned()
    } else {
        let each: Vec<String> = busy.holders.iter().map(|h| h.describe()).collect();
        format!("held by lease {}", each.join("; "))
    };
    not_running(settings, &who, busy.waited, None)
}

fn not_running(
    settings: &Settings,
    who: &str,
    waited: Option<std::time::Duration>,
    ended_by: Option<&str>,
) -> String {
    let lock = settings.lock.describe();
    match (waited, ended_by) {
        (None, _) => format!("lock {lock} is {who}; not running the command"),
        (Some(waited), None) => format!(
            "lock {lock} is still {who} after waiting {:.1}s; not running the command",
            waited.as_secs_f64()
        ),
        (Some(waited), Some(ended_by)) => format!(
            "lock {lock} is still {who} after waiting {:.1}s: {ended_by}; not running the command",
            waited.as_secs_f64()
        ),
    }
}
