//! A wait that a person watches: while `--wait` waits for a busy lock and stderr is a terminal
//! (not under `-q`), one status line says how long this run has waited and its limit, which
//! lock, who holds it and for how long; redrawn about once a second, gone when the wait ends.
//!
//! The wait itself blocks the main thread (in the server's lock queue, or asleep between a
//! lease's polls), so a thread of its own keeps the time. It only hands each frame to `log`,
//! whose writer thread draws it: a terminal that stops reading never holds up the wait, nor the
//! lock once it comes. Who holds the lock is asked once, before the wait; how long they have
//! held it is counted on from there, without asking the server again.
//!
//! Not responsible for the wait (`advisory/wait.rs`, `lease/`) nor for how a line reaches the
//! terminal (`log/status.rs`).

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::domain::lock::{LockTarget, Wait};
use crate::log;

/// How often the line is redrawn: its counters are whole seconds.
const REDRAW: Duration = Duration::from_secs(1);

/// Who holds the lock, as the line shows them.
pub struct Holding {
    /// `pid 4211 ("heimdall billing/nightly @web-3 pid 99")`, `"…" (lease version 3)`.
    pub who: String,
    /// How long they had held the lock when asked; `None` when the server would not say.
    pub held: Option<Duration>,
    /// `held` is how long their connection has been open, not their lock (another
    /// application's session, outside a transaction).
    pub connected_only: bool,
    /// Other holders (shared mode, slots), counted.
    pub others: usize,
}

/// The status line while it is drawn; dropping it (when the wait ends, however it ends)
/// erases the line.
pub struct WaitLine {
    stop: Option<Sender<()>>,
    ticker: Option<JoinHandle<()>>,
}

impl WaitLine {
    /// Whether a line would be seen, so that the holders are asked only then.
    pub fn wanted() -> bool {
        log::live_status()
    }

    /// Starts drawing the line for a wait on `lock` that began at `started`, held by
    /// `holding` as asked at `asked`. `None` when nobody would see it, or no thread can be
    /// started (the wait goes on without a line).
    pub fn start(
        lock: &LockTarget,
        holding: Option<Holding>,
        asked: Instant,
        wait: Wait,
        started: Instant,
    ) -> Option<WaitLine> {
        if !Self::wanted() {
            return None;
        }
        let lock = match lock.slots {
            1 => lock.short(),
            n => format!("{} ({n} slots)", lock.short()),
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let ticker = std::thread::Builder::new()
            .name("wait-line".into())
            .spawn(move || {
                loop {
                    let now = Instant::now();
                    let since_asked = now - asked;
                    log::status(&render(
                        &lock,
                        holding.as_ref(),
                        since_asked,
                        wait,
                        now - started,
                    ));
                    // On the whole seconds of the wait, whenever this frame was drawn.
                    let into = started.elapsed().as_nanos() % REDRAW.as_nanos();
                    let next = REDRAW - Duration::from_nanos(into as u64);
                    match stopped.recv_timeout(next) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            })
            .ok()?;
        Some(WaitLine {
            stop: Some(stop),
            ticker: Some(ticker),
        })
    }
}

impl Drop for WaitLine {
    fn drop(&mut self) {
        // The ticker never blocks on the terminal: it stops at once, and draws no frame after
        // the erase.
        drop(self.stop.take());
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        log::clear_status();
    }
}

/// `waiting 41s of 10m for lock billing/nightly, held 3m 12s by pid 4211 ("…")`, where
/// `since_asked` is how long ago `holding` was asked and `waited` this run's wait. What a
/// person looks for first comes first: a narrow terminal cuts the end.
fn render(
    lock: &str,
    holding: Option<&Holding>,
    since_asked: Duration,
    wait: Wait,
    waited: Duration,
) -> String {
    let mut line = match wait {
        Wait::Up(limit) => format!("waiting {} of {}", seconds(waited), seconds(limit)),
        Wait::Forever => format!("waiting {}, no limit", seconds(waited)),
    };
    line.push_str(&format!(" for lock {lock}"));
    if let Some(holding) = holding {
        let age = holding.held.map(|held| seconds(held + since_asked));
        line.push_str(&match (age, holding.connected_only) {
            (Some(age), false) => format!(", held {age} by {}", holding.who),
            (Some(age), true) => format!(", held by {}, connected {age} ago", holding.who),
            (None, _) => format!(", held by {}", holding.who),
        });
        if holding.others > 0 {
            line.push_str(&format!(" and {} more", holding.others));
        }
    }
    line
}

/// A duration in whole seconds, as humantime writes it: `41s`, `3m 12s`.
fn seconds(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_the_wait_the_lock_and_the_holder_with_its_age_counted_on() {
        let secs = Duration::from_secs;
        let holding = Holding {
            who: "pid 4211 (\"heimdall a/b @web-3 pid 99\")".to_owned(),
            held: Some(secs(190)),
            connected_only: false,
            others: 0,
        };
        assert_eq!(
            render(
                "a/b",
                Some(&holding),
                secs(2),
                Wait::Up(secs(600)),
                secs(41)
            ),
            "waiting 41s of 10m for lock a/b, held 3m 12s by pid 4211 (\"heimdall a/b @web-3 pid 99\")"
        );
        let other = Holding {
            who: "pid 7".to_owned(),
            held: Some(secs(60)),
            connected_only: true,
            others: 2,
        };
        assert_eq!(
            render(
                "key 5",
                Some(&other),
                secs(0),
                Wait::Forever,
                Duration::from_millis(1500)
            ),
            "waiting 1s, no limit for lock key 5, held by pid 7, connected 1m ago and 2 more"
        );
        assert_eq!(
            render("a/b", None, secs(0), Wait::Up(secs(5)), secs(0)),
            "waiting 0s of 5s for lock a/b"
        );
    }
}
