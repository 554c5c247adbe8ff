//! Stopping the job: SIGTERM and SIGCONT to the whole job, SIGKILL after `--kill-after`, until
//! nothing of it is left; and reaping the leader once it is gone.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGCONT, SIGKILL, SIGTERM};

use crate::domain::ending::ChildEnd;
use crate::domain::timing::Limits;
use crate::exit::Outcome;
use crate::log;
use crate::process::child::Child;
use crate::process::keeper;

/// How often heimdall looks whether a process group it is stopping is gone.
const GROUP_POLL: Duration = Duration::from_millis(10);
/// How long heimdall waits for SIGKILLed processes to disappear before it gives up on them.
const AFTER_KILL: Duration = Duration::from_secs(5);

/// The lock is gone while the command runs: another machine may take it at any moment, so the
/// command must stop now.
pub(super) fn lock_lost(
    child: Child,
    limits: &Limits,
    lock: &str,
    started: Instant,
    reason: &str,
) -> Result<Outcome> {
    log::error(format!(
        "lost lock {lock} after the command ran {:.1}s: {reason}; stopping the command",
        started.elapsed().as_secs_f64()
    ));
    stop_job(child, limits.kill_after, "the lock was found lost")?;
    Ok(Outcome::LockLost)
}

/// A replacer asks for the lock (`--replace`, `heimdall stop`): the command stops as on a lost
/// lock, but the lock is still held, and is let go only once the job is gone (the guard is
/// dropped after this returns).
pub(super) fn replaced(
    child: Child,
    limits: &Limits,
    lock: &str,
    started: Instant,
    by: &str,
) -> Result<Outcome> {
    log::warn(format!(
        "replaced by {by}: stopping the command after it ran {:.1}s; lock {lock} is let go once it has stopped",
        started.elapsed().as_secs_f64()
    ));
    stop_job(
        child,
        limits.kill_after,
        "the replacer asked; letting go of the lock",
    )?;
    Ok(Outcome::Replaced)
}

/// Stops the job ([`stop_group`]), reaps the leader, and says how long after `what` (which
/// began now) it ended.
fn stop_job(mut child: Child, kill_after: Duration, what: &str) -> Result<()> {
    let since = Instant::now();
    stop_group(&mut child, kill_after);
    let end = end_job(child)?;
    log::info(format!(
        "command {end} {} ms after {what}",
        since.elapsed().as_millis()
    ));
    Ok(())
}

/// SIGTERM and SIGCONT (so a stopped job can act on the TERM) to the whole job, then SIGKILL
/// to whatever is left after `kill_after`; returns when the job is gone. Until the leader is
/// reaped its pid reserves the group id; after that the group is signalled only while the last
/// look ([`Child::job_alive`]) found members in it, which also keep the id from being reused.
pub(super) fn stop_group(child: &mut Child, kill_after: Duration) {
    log::info(format!("sending SIGTERM to process group {}", child.pid));
    child.signal_group(SIGTERM);
    child.signal_group(SIGCONT);
    // Each process outside the group gets SIGTERM once, when heimdall first sees it: a second
    // SIGTERM makes some programs skip their clean shutdown.
    let mut termed = Vec::new();
    let term = |child: &Child| child.signal_children(&[SIGTERM, SIGCONT], &mut termed);
    if wait_job_gone(child, kill_after, term) {
        return;
    }
    log::warn(format!(
        "process group {} still running {} after SIGTERM; sending SIGKILL",
        child.pid,
        humantime::format_duration(kill_after)
    ));
    let kill = |child: &Child| {
        child.signal_group(SIGKILL);
        child.signal_children(&[SIGKILL], &mut Vec::new());
    };
    if !wait_job_gone(child, AFTER_KILL, kill) {
        log::warn(format!(
            "process group {} survived SIGKILL for {}s (uninterruptible sleep?)",
            child.pid,
            AFTER_KILL.as_secs()
        ));
    }
}

/// Polls until the job is gone or `limit` has passed, calling `signal` first and then on every
/// round: what a dying process leaves behind is reparented to heimdall and must be signalled
/// too.
fn wait_job_gone(child: &mut Child, limit: Duration, mut signal: impl FnMut(&Child)) -> bool {
    let deadline = Instant::now().checked_add(limit);
    loop {
        signal(child);
        if !job_alive(child) {
            return true;
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::sleep(GROUP_POLL);
    }
}

/// Whether anything of the job lives; when heimdall cannot tell, it assumes so.
pub(super) fn job_alive(child: &mut Child) -> bool {
    child.job_alive().unwrap_or_else(|e| {
        log::debug(format!("cannot tell whether the command is gone: {e}"));
        true
    })
}

/// Reaps the leader and, if nothing of the job is left, tells the keeper so.
pub(super) fn end_job(mut child: Child) -> Result<ChildEnd> {
    let gone = !job_alive(&mut child);
    let end = child.reap().context("cannot reap the command")?;
    if gone {
        keeper::job_gone();
    }
    Ok(end)
}
