//! Taking what will hold the lock while the command runs: the advisory lock (`advisory/`) or,
//! with `--lease-table`, a lease (`lease/`), and saying who holds it when it is busy; then the
//! lock-delay after a server that came up recently ([`hold_off`]). What is taken is a
//! [`Guard`] either way, which the watchdog checks and `run` releases; the proof that an outer
//! heimdall holds the lock is asked here too (`proof.rs`). The run record (`record/`, with
//! `--run-table` and `--min-interval`) is written by the statements that take and release the
//! lock; the tables heimdall keeps follow one set of rules (`table.rs`).
//!
//! Not responsible for signals or the command: a wait in the server's queue is cancelled
//! through the `on_wait` hook that [`take`] is given.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::Settings;
use crate::db::Session;
use crate::db::cancel::Canceller;
use crate::domain::guard::Guard;
use crate::domain::lease_table::LeaseTable;
use crate::log;

pub mod advisory;
pub mod lease;
pub mod proof;
pub mod record;
mod sql;
pub mod table;
mod waiting;

use advisory::delay::{self, ServerUp};
use advisory::{Acquire, Busy, holders};
use lease::{LeaseAcquire, LeaseBusy, LeaseSkip};
use record::LastRun;

/// The lock, held.
pub struct Held {
    pub guard: Box<dyn Guard>,
    pub slot: u16,
    pub fencing_token: i64,
    /// When heimdall knew it held the lock, where `--min-hold` counts from.
    pub acquired_at: Instant,
    /// What holds it, and what only that kind knows.
    pub by: HeldBy,
}

/// What holds the lock.
pub enum HeldBy {
    /// The transaction of a backend.
    Advisory {
        backend_pid: i32,
        /// The start of the holding transaction, in seconds since the epoch.
        lock_since: String,
        /// When the server came up, for the lock-delay; none when unknown.
        server_up: Option<ServerUp>,
    },
    /// A lease row in `table`.
    Lease {
        table: LeaseTable,
        /// When the acquiring statement was sent: where the lease's budget starts.
        sent: Instant,
    },
}

impl HeldBy {
    /// Lease mode: where the lease's first budget starts.
    pub fn lease_sent(&self) -> Option<Instant> {
        match self {
            HeldBy::Lease { sent, .. } => Some(*sent),
            HeldBy::Advisory { .. } => None,
        }
    }
}

/// What [`take`] came to.
pub enum Taken {
    Held(Held),
    /// The lock is held elsewhere: the message, naming who holds it.
    Busy(String),
    /// `--min-interval`: a run of the lock started within it. The message, saying when, where
    /// and how it ended.
    Skipped(String),
    /// A signal cancelled the wait in the server's queue, and the session is closed in order:
    /// heimdall ends as the signal says.
    Cancelled,
    /// Every place of the `--queue` bound was taken, so this run did not wait: the message.
    QueueFull(String),
}

/// Takes the lock or the lease on `session`. `on_wait` is the cancel hook: it gets a canceller
/// before heimdall blocks in the server's lock queue (so that a signal can cancel the wait) and
/// `None` once the wait is over, and then answers whether a signal cancelled it.
pub fn take(
    settings: &Settings,
    session: Session,
    on_wait: impl Fn(Option<Canceller>) -> bool,
) -> Result<Taken> {
    if let Some(mode) = &settings.lease {
        let acquired = lease::acquire(
            session,
            &settings.dial,
            mode,
            &settings.lock,
            settings.wait,
            settings.record.as_ref(),
            settings.replace,
        )?;
        return Ok(match acquired {
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
                Taken::Held(Held {
                    slot: lease.slot,
                    fencing_token: lease.version,
                    acquired_at: Instant::now(),
                    by: HeldBy::Lease {
                        table: mode.table.clone(),
                        sent: lease.sent,
                    },
                    guard: lease,
                })
            }
            LeaseAcquire::Busy(busy) => Taken::Busy(lease_busy_message(settings, &busy)),
            LeaseAcquire::Skipped(skip) => Taken::Skipped(lease_skip_message(settings, &skip)),
        });
    }
    let request = advisory::Request {
        dial: &settings.dial,
        lock: &settings.lock,
        mode: settings.mode,
        wait: settings.wait,
        queue: settings.queue,
        keepalive: &settings.server_keepalive,
        server_up: !settings.lock_delay.is_zero(),
        record: settings.record.as_ref(),
        replace: settings.replace,
    };
    Ok(match advisory::acquire(session, &request, on_wait)? {
        Acquire::Held(lock) => {
            let key = settings.lock.key.slot(lock.slot);
            let (classid, objid, objsubid) = key.pg_locks_ids();
            log::info(format!(
                "acquired lock {}{} on backend pid {} (pg_locks: classid={classid} objid={objid} objsubid={objsubid}; fencing token {})",
                settings.lock.describe(),
                slot_words(settings, lock.slot),
                lock.backend_pid,
                lock.fencing_token,
            ));
            Taken::Held(Held {
                slot: lock.slot,
                fencing_token: lock.fencing_token,
                acquired_at: Instant::now(),
                by: HeldBy::Advisory {
                    backend_pid: lock.backend_pid,
                    lock_since: lock.holding_since_epoch.clone(),
                    server_up: lock.server_up.clone(),
                },
                guard: lock,
            })
        }
        Acquire::Busy(busy) => Taken::Busy(busy_message(settings, &busy)),
        Acquire::Skipped(last) => Taken::Skipped(skip_message(settings, last.as_ref(), None)),
        Acquire::Cancelled => Taken::Cancelled,
        Acquire::QueueFull(places) => Taken::QueueFull(queue_full_message(settings, places)),
        Acquire::Superseded(by) => Taken::Busy(format!(
            "lock {}: superseded by a replacer, {by}, that waits for it; not running the command",
            settings.lock.describe()
        )),
    })
}

/// Between taking the lock and starting the command: the lock-delay after a server that came up
/// recently (see `advisory/delay.rs`). An error when the lock went meanwhile; the command did
/// not run.
pub fn hold_off(settings: &Settings, held: &mut Held) -> Result<()> {
    let HeldBy::Advisory { server_up, .. } = &held.by else {
        // A lease survives a restart: no delay.
        return Ok(());
    };
    delay::hold_off(
        settings.lock_delay,
        server_up.as_ref(),
        held.guard.as_mut(),
        &settings.lock.describe(),
    )
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

/// `2 runs already wait for lock billing/nightly; not queueing (--queue 2)`: all it took to
/// know is that every place was taken.
fn queue_full_message(settings: &Settings, places: u16) -> String {
    let runs = match places {
        1 => "1 run already waits".to_owned(),
        n => format!("{n} runs already wait"),
    };
    format!(
        "{runs} for lock {}; not queueing (--queue {places})",
        settings.lock.short()
    )
}

fn lease_busy_message(settings: &Settings, busy: &LeaseBusy) -> String {
    let who = if busy.holders.is_empty() {
        "held by a lease that was gone by the time heimdall looked".to_owned()
    } else {
        let each: Vec<String> = busy.holders.iter().map(|h| h.describe()).collect();
        format!("held by lease {}", each.join("; "))
    };
    not_running(settings, &who, busy.waited, busy.why)
}

fn lease_skip_message(settings: &Settings, skip: &LeaseSkip) -> String {
    let lease = skip.lease.as_ref().map(|(holder, age)| {
        format!(
            "the lease was last taken {} ago by \"{holder}\"",
            humantime::format_duration(Duration::from_secs(age.max(0.0) as u64))
        )
    });
    skip_message(settings, skip.last.as_ref(), lease)
}

/// `lock a/b (keys 1,2): last run started 4m 12s ago on web-3 (pid 4242), exited 0 after
/// 2.1s; --min-interval 30m; not running the command`. `otherwise` when the record has no run
/// of the lock (lease mode, whose lease row decides too).
fn skip_message(settings: &Settings, last: Option<&LastRun>, otherwise: Option<String>) -> String {
    let what = match (last, otherwise) {
        // The lock was held to decide: the last run is not running.
        (Some(last), _) => format!("last run {}", last.describe(false)),
        (None, Some(otherwise)) => otherwise,
        (None, None) => "a run started within the interval".to_owned(),
    };
    let interval = settings
        .record
        .as_ref()
        .and_then(|r| r.min_interval)
        .map_or_else(String::new, |d| {
            format!("; --min-interval {}", humantime::format_duration(d))
        });
    format!(
        "lock {}: {what}{interval}; not running the command",
        settings.lock.describe()
    )
}

fn not_running(
    settings: &Settings,
    who: &str,
    waited: Option<Duration>,
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
