//! The watchdog: while the command runs, one thread owns what holds the lock (the session of an
//! advisory lock, or a lease) and checks it on a schedule. It reports each check to the
//! supervisor, which owns the deadline: a check that errors, or a deadline that passes, means
//! the lock is lost.
//!
//! It never reconnects: a new session is not the same lock.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Heartbeat;
use crate::supervise::Event;

/// What holds the lock while the command runs.
pub trait Guard: Send + 'static {
    /// One check: a heartbeat on the holding session, or a lease renewal. Returns why the lock
    /// must count as lost, if it must.
    fn check(&mut self) -> Result<(), LossReason>;
    /// Releases the lock, proving on the way that it was still held; why not, if it was not.
    fn release(self: Box<Self>) -> Result<(), LossReason>;
}

/// Why what held the lock must count as lost. Shown after "lost lock ...: ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    /// The check failed on the server or the connection, in the server's words.
    Connection(String),
    /// The session now talks to another backend than the one that holds the lock.
    OtherBackend { now: i32, holder: i32 },
    /// The transaction that held the lock has ended.
    TransactionEnded,
    /// The check's statement answered no row.
    NoRow,
    /// The lease row no longer carries this run's version.
    LeaseTakenOver { version: i64 },
    /// The check in flight got no answer within this long.
    NoAnswer(Duration),
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::Connection(why) => f.write_str(why),
            LossReason::OtherBackend { now, holder } => write!(
                f,
                "the session now talks to backend pid {now}, not {holder} which holds the lock (a connection pooler that does not keep a transaction on one server connection?)"
            ),
            LossReason::TransactionEnded => f.write_str(
                "the transaction that held the lock has ended (a connection pooler that ended it?)",
            ),
            LossReason::NoRow => f.write_str("the heartbeat got no row back"),
            LossReason::LeaseTakenOver { version } => write!(
                f,
                "the lease row no longer carries version {version} (another holder took it over)"
            ),
            LossReason::NoAnswer(limit) => write!(
                f,
                "no answer to the last check within {}",
                humantime::format_duration(*limit)
            ),
        }
    }
}

/// How the watchdog checks.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Heartbeats on an advisory lock's session, each answered within the heartbeat timeout;
    /// `None`: no checks (`--heartbeat 0`), the thread only keeps the session.
    Heartbeat(Option<Heartbeat>),
    /// Lease renewals this often; the supervisor counts the lease's budget from each successful
    /// renewal's sending.
    Renewal(Duration),
}

/// How long [`Watchdog::stop`] waits for a renewal in flight.
const RENEWAL_STOP_LIMIT: Duration = Duration::from_secs(5);

pub struct Watchdog {
    stop: Sender<()>,
    done: mpsc::Receiver<Result<Box<dyn Guard>, LossReason>>,
    thread: JoinHandle<()>,
    /// How long [`Watchdog::stop`] waits for a check in flight to finish.
    stop_limit: Duration,
}

impl Watchdog {
    /// Takes the guard and starts checking it at `pace`.
    pub fn start(
        guard: Box<dyn Guard>,
        pace: Pace,
        events: Sender<Event>,
    ) -> anyhow::Result<Watchdog> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let interval = match pace {
            Pace::Heartbeat(hb) => hb.map_or(Duration::MAX, |hb| hb.interval),
            Pace::Renewal(every) => every,
        };
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut guard = guard;
                // Anything but a timeout means stopped, or the supervisor is gone: hand the
                // guard back.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval) {
                    let sent = Instant::now();
                    if matches!(pace, Pace::Heartbeat(_)) {
                        let _ = events.send(Event::HeartbeatSent);
                    }
                    match guard.check() {
                        Ok(()) => {
                            let _ = events.send(match pace {
                                Pace::Heartbeat(_) => Event::HeartbeatOk(sent.elapsed()),
                                Pace::Renewal(_) => Event::Renewed(sent),
                            });
                        }
                        Err(reason) => {
                            // The guard is worthless now; dropping it closes the connection.
                            let _ = events.send(Event::LockLost(reason.to_string()));
                            let _ = done_tx.send(Err(reason));
                            return;
                        }
                    }
                }
                let _ = done_tx.send(Ok(guard));
            })
            .context("cannot start the watchdog thread")?;
        let stop_limit = match pace {
            Pace::Heartbeat(hb) => hb.map_or(Duration::from_secs(1), |hb| hb.timeout),
            Pace::Renewal(_) => RENEWAL_STOP_LIMIT,
        } + Duration::from_secs(1);
        Ok(Watchdog {
            stop: stop_tx,
            done: done_rx,
            thread,
            stop_limit,
        })
    }

    /// Stops checking and returns the guard; or why the lock counts as lost: a check failed,
    /// or the check in flight got no answer in time (then exiting closes the connection).
    pub fn stop(self) -> Result<Box<dyn Guard>, LossReason> {
        let _ = self.stop.send(());
        match self.done.recv_timeout(self.stop_limit) {
            Ok(result) => {
                let _ = self.thread.join();
                result
            }
            Err(_) => Err(LossReason::NoAnswer(self.stop_limit)),
        }
    }
}
