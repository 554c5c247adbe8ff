//! The watchdog: while the command runs, one thread owns the session that holds the lock and
//! checks it every heartbeat interval. It reports each check to the supervisor, which owns the
//! deadline: a check that errors, or gets no answer in time, means the lock is lost.
//!
//! It never reconnects: a new session is not the same lock.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::Heartbeat;
use crate::lock::Session;
use crate::supervise::Event;

pub struct Watchdog {
    stop: Sender<()>,
    done: mpsc::Receiver<Result<Session, String>>,
    thread: JoinHandle<()>,
    /// How long [`Watchdog::stop`] waits for a check in flight to finish.
    stop_limit: Duration,
}

impl Watchdog {
    /// Takes the session and, with a heartbeat, starts checking it. Without one, the thread
    /// only keeps the session until it is stopped.
    pub fn start(
        session: Session,
        heartbeat: Option<Heartbeat>,
        events: Sender<Event>,
    ) -> anyhow::Result<Watchdog> {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut session = session;
                let interval = heartbeat.map_or(Duration::MAX, |hb| hb.interval);
                // Anything but a timeout means stopped, or the supervisor is gone: hand the
                // session back.
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval) {
                    let sent = Instant::now();
                    let _ = events.send(Event::HeartbeatSent);
                    match session.check() {
                        Ok(()) => {
                            let _ = events.send(Event::HeartbeatOk(sent.elapsed()));
                        }
                        Err(reason) => {
                            // The session is worthless now; dropping it closes the connection.
                            let _ = events.send(Event::LockLost(reason.clone()));
                            let _ = done_tx.send(Err(reason));
                            return;
                        }
                    }
                }
                let _ = done_tx.send(Ok(session));
            })
            .context("cannot start the watchdog thread")?;
        let stop_limit =
            heartbeat.map_or(Duration::from_secs(1), |hb| hb.timeout) + Duration::from_secs(1);
        Ok(Watchdog {
            stop: stop_tx,
            done: done_rx,
            thread,
            stop_limit,
        })
    }

    /// Stops checking and returns the session; or why the lock counts as lost: a check failed,
    /// or the check in flight got no answer in time (then exiting closes the connection).
    pub fn stop(self) -> Result<Session, String> {
        let _ = self.stop.send(());
        match self.done.recv_timeout(self.stop_limit) {
            Ok(result) => {
                let _ = self.thread.join();
                result
            }
            Err(_) => Err(format!(
                "no answer to the heartbeat within {}",
                humantime::format_duration(self.stop_limit)
            )),
        }
    }
}
