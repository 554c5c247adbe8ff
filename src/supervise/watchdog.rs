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

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

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
        let (stop_rx, stop_tx) = pipe().context("cannot start the watchdog")?;
        let (done_tx, done_rx) = mpsc::channel();
        let interval = match pace {
            Pace::Heartbeat(hb) => hb.map_or(Duration::MAX, |hb| hb.interval),
            Pace::Renewal(every) => every,
        };
        // A lease does not go with its session, so only an advisory lock's socket is watched;
        // and not with `--heartbeat 0`, which switches the watchdog off.
        let socket = match pace {
            Pace::Heartbeat(Some(_)) => guard.socket(),
            Pace::Heartbeat(None) | Pace::Renewal(_) => None,
        };
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut guard = guard;
                let mut due = Instant::now().checked_add(interval);
                let mut watch = socket;
                loop {
                    match wait(stop_rx.as_raw_fd(), watch, due) {
                        Wake::Stop => break,
                        Wake::Due => {
                            due = Instant::now().checked_add(interval);
                            watch = socket;
                        }
                        // Something arrived unasked on an idle session: the server ending it,
                        // as a rule. Check now; if the check passes it was harmless, and the
                        // socket is left alone until the next beat, so it cannot spin.
                        Wake::Session => watch = None,
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
                            let _ = events.send(Event::LockLost(reason.to_string()));
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
    /// (then exiting closes the connection).
    pub fn stop(self) -> Result<Box<dyn Guard>, LossReason> {
        drop(self.stop);
        match self.done.recv_timeout(self.stop_limit) {
            Ok(result) => {
                let _ = self.thread.join();
                result.map_err(|(reason, _guard)| reason)
            }
            Err(_) => Err(LossReason::NoAnswer(self.stop_limit)),
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
fn wait(stop: RawFd, socket: Option<RawFd>, due: Option<Instant>) -> Wake {
    loop {
        let timeout_ms = match due {
            None => -1,
            Some(due) => {
                let left = due.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wake::Due;
                }
                // Rounded up, so the wake-up is never early; capped at poll's int.
                i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // A negative descriptor is ignored by poll.
                fd: socket.unwrap_or(-1),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two valid pollfd structs, and its length is passed.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // poll failing otherwise would be a bug; fall back to the schedule alone.
            log::debug(format!("watchdog: poll: {}", io::Error::last_os_error()));
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if fds[0].revents != 0 {
            return Wake::Stop;
        }
        if fds[1].revents != 0 {
            return Wake::Session;
        }
        if rc == 0 {
            return Wake::Due;
        }
    }
}

/// A pipe whose read end wakes the watchdog: (read, write), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
