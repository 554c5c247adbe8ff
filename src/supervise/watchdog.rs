//! The watchdog: while the command runs, one thread owns what holds the lock (the session of an
//! advisory lock, or a lease) and checks it on a schedule. It reports each check to the
//! supervisor, which owns the deadline: a check that errors, or a deadline that passes, means
//! the lock is lost. Between heartbeats it watches the holding session's socket: a server that
//! ends the session (terminated, shut down, crashed, restarted) says so on the socket, and the
//! check that follows at once finds it, so the job stops within moments, not at the next beat.
//!
//! It never reconnects an advisory lock's session: a new session is not the same lock (a lease
//! is not tied to a session, and its renewals may; see `hold/lease/held.rs`). And it never lets
//! go of what holds the lock, even after a failed check: a check that cannot confirm the lock (an answer from
//! another backend, or none) does not mean the lock is gone, and closing the connection then
//! would free a lock the job still runs under. What held the lock goes back to the caller, to
//! be dropped once the job is gone.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;

use super::Event;
use crate::domain::guard::{Guard, LossReason};
use crate::domain::timing::Pace;
use crate::log;

/// How long [`Watchdog::stop`] waits for a renewal in flight.
const RENEWAL_STOP_LIMIT: Duration = Duration::from_secs(5);

/// What a failed check hands back: why, and what held the lock, to be dropped (closing its
/// connection) only once the job is gone.
pub type Lost = (LossReason, Box<dyn Guard>);

pub struct Watchdog {
    /// Writing to it (or closing it) wakes the thread and stops it.
    stop: OwnedFd,
    done: mpsc::Receiver<Result<Box<dyn Guard>, Lost>>,
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
        let (stop_rx, stop_tx) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC).context("cannot start the watchdog")?;
        let (done_tx, done_rx) = mpsc::channel();
        let interval = match pace {
            Pace::Heartbeat(hb) => hb.map_or(Duration::MAX, |hb| hb.interval),
            Pace::Renewal(every) => every,
        };
        // A lease does not go with its session, so only an advisory lock's socket is watched;
        // and not with `--heartbeat 0`, which switches the watchdog off.
        let session = matches!(pace, Pace::Heartbeat(Some(_)));
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut guard = guard;
                let mut due = Instant::now().checked_add(interval);
                let mut watch = session;
                loop {
                    let socket = guard.socket().filter(|_| watch);
                    match wait(stop_rx.as_fd(), socket, due) {
                        Wake::Stop => break,
                        Wake::Due => {
                            due = Instant::now().checked_add(interval);
                            watch = session;
                        }
                        // Something arrived unasked on an idle session: the server ending it,
                        // as a rule. Check now; if the check passes it was harmless, and the
                        // socket is left alone until the next beat, so it cannot spin.
                        Wake::Session => watch = false,
                    }
                    let sent = Instant::now();
                    if let Pace::Heartbeat(Some(hb)) = pace {
                        let _ = events.send(Event::HeartbeatSent(hb.timeout));
                    }
                    match guard.check() {
                        Ok(()) => {
                            let _ = events.send(match pace {
                                Pace::Heartbeat(_) => Event::HeartbeatOk(sent.elapsed()),
                                Pace::Renewal(_) => Event::Renewed(sent),
                            });
                        }
                        Err(reason) => {
                            let _ = events.send(match &reason {
                                LossReason::Replaced { by } => Event::Replaced(by.clone()),
                                _ => Event::LockLost(reason.to_string()),
                            });
                            // The guard goes with the answer, not here: see the module docs.
                            let _ = done_tx.send(Err((reason, guard)));
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

    /// Stops checking and returns the guard; or why the lock counts as lost: a check failed
    /// (what held the lock comes back with it), or the check in flight got no answer in time
    /// (then exiting closes the connection). A replacer's request that the last check found
    /// as the command ended on its own loses nothing: that check proved the lock held, and the
    /// guard comes back to be let go in order, at once.
    pub fn stop(self) -> Result<Box<dyn Guard>, LossReason> {
        drop(self.stop);
        match self.done.recv_timeout(self.stop_limit) {
            Ok(result) => {
                let _ = self.thread.join();
                match result {
                    Ok(guard) | Err((LossReason::Replaced { .. }, guard)) => Ok(guard),
                    Err((reason, _guard)) => Err(reason),
                }
            }
            Err(_) => Err(LossReason::NoAnswer(self.stop_limit)),
        }
    }
}

impl Watchdog {
    /// After a replacer's request (`LossReason::Replaced`) stopped the job: what holds the lock,
    /// still held, to be let go in order; `None` if the watchdog ended otherwise.
    pub fn replaced(self) -> Option<Box<dyn Guard>> {
        drop(self.stop);
        match self.done.recv_timeout(self.stop_limit) {
            Ok(Err((LossReason::Replaced { .. }, guard))) => {
                let _ = self.thread.join();
                Some(guard)
            }
            _ => None,
        }
    }
}

/// What woke the watchdog.
enum Wake {
    Stop,
    Due,
    Session,
}

/// Waits until `stop` is readable or closed, `socket` (if any) has something to read or was
/// closed by the peer, or `due` passes (never, if `None`).
fn wait(stop: BorrowedFd<'_>, socket: Option<BorrowedFd<'_>>, due: Option<Instant>) -> Wake {
    loop {
        let timeout = match due {
            None => None,
            Some(due) => {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wake::Due;
                }
                // Rounded up to the millisecond, as poll(2) counts, so the wake-up is never
                // early.
                let millis = u64::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
                Timespec::try_from(Duration::from_millis(millis)).ok()
            }
        };
        let mut fds = [
            PollFd::from_borrowed_fd(stop, PollFlags::IN),
            PollFd::from_borrowed_fd(socket.unwrap_or(stop), PollFlags::IN | PollFlags::RDHUP),
        ];
        // Without a socket to watch, the stop pipe alone.
        let watched = if socket.is_some() { 2 } else { 1 };
        let ready = match rustix::event::poll(&mut fds[..watched], timeout.as_ref()) {
            Ok(ready) => ready,
            Err(Errno::INTR) => continue,
            Err(e) => {
                // poll failing otherwise would be a bug; fall back to the schedule alone.
                log::debug(format!("watchdog: poll: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !fds[0].revents().is_empty() {
            return Wake::Stop;
        }
        if watched == 2 && !fds[1].revents().is_empty() {
            return Wake::Session;
        }
        if ready == 0 {
            return Wake::Due;
        }
    }
}
