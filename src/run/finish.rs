//! After the command: confirming that the lock was still held when it ended, keeping it for
//! `--min-hold`, and letting it go. A lock lost after the last heartbeat shows only here.

use std::time::Instant;

use crate::config::Settings;
use crate::db;
use crate::domain::guard::{Guard, LossReason};
use crate::exit::Outcome;
use crate::hold::record;
use crate::log;
use crate::supervise::Supervisor;
use crate::supervise::watchdog::Watchdog;

/// A replacer asked for the lock and the job was stopped: the lock, still held, is let go in
/// order (committed, or the lease expired) once the job is gone, so the replacer gets it at
/// once (a lease merely dropped would stand until its expiry). A job that may live on (it
/// survived SIGKILL) keeps it: the guard is dropped, and its connection left to the keeper.
fn replaced(settings: &Settings, watchdog: Watchdog, outcome: Outcome) -> Outcome {
    let Some(guard) = watchdog.replaced() else {
        return outcome;
    };
    if db::job_alive() {
        return outcome;
    }
    if let Err(reason) = guard.release(&record::end_of(outcome, Instant::now())) {
        log::warn(format!(
            "could not let go of lock {} in order ({reason}); it goes as heimdall exits",
            settings.lock.describe()
        ));
    }
    outcome
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
    if outcome == Outcome::Replaced {
        return replaced(settings, watchdog, outcome);
    }
    // The command has ended: the end the run record gets, however long the lock is kept.
    let end = record::end_of(outcome, Instant::now());
    let lost = |reason: LossReason| {
        log::error(format!(
            "lost lock {} before the command finished ({outcome}): {reason}; another run may have overlapped with it",
            settings.lock.describe(),
        ));
        Outcome::LockLost
    };
    let release = |guard: Box<dyn Guard>| match guard.release(&end) {
        Ok(()) => outcome,
        Err(reason) => lost(reason),
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
        return release(guard);
    };
    // Confirm the command ran under the lock before the extra hold, so a loss during the hold
    // is not mistaken for one during the command. A replacer waiting by then ends the hold: the
    // lock was held (the check proved it), and the newest run is to have it.
    match guard.check() {
        Ok(()) => {}
        Err(LossReason::Replaced { by }) => {
            log::info(format!(
                "replaced by {by}: not keeping the lock for --min-hold"
            ));
            return release(guard);
        }
        Err(reason) => return lost(reason),
    }
    log::info(format!(
        "holding the lock {} ms more for --min-hold",
        until.saturating_duration_since(Instant::now()).as_millis()
    ));
    supervisor.hold_until(until);
    if let Err(reason) = guard.release(&end) {
        log::info(format!(
            "the lock went during --min-hold ({reason}); the command had finished under it"
        ));
    }
    outcome
}
