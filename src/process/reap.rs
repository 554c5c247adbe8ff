//! heimdall's own children and their reaping. As the subreaper, heimdall inherits every orphaned
//! descendant of the command; two of its children are not orphans: the command's leader, which
//! the supervisor reaps itself so that its group id stays reserved meanwhile, and the keeper,
//! which must not be mistaken for a leftover of the job. Both are recorded here, below the
//! command (`child.rs`) and the keeper (`keeper/`), which both read them.
//!
//! A child's pid stays reserved until it is reaped, so a pid read from the children list can be
//! signalled safely only while nobody reaps: [`hold`] keeps reaping off meanwhile.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard};

use rustix::process::{Pid, WaitId, WaitIdOptions, WaitOptions};

use super::procfs;
use crate::log;

/// Held while reaping and while signalling heimdall's own children one by one.
static REAPING: Mutex<()> = Mutex::new(());

/// The command's leader once it runs (0 before), which orphan reaping leaves to the
/// supervisor. Set and read only with [`REAPING`] held, so that a leader that exits at once
/// cannot be reaped by a SIGCHLD that raced with its start.
static LEADER: AtomicI32 = AtomicI32::new(0);

/// The keeper's pid, 0 without one, or once it has been reaped: its pid may then be reused, by a
/// process of the job even, which must not be mistaken for the keeper.
static KEEPER: AtomicI32 = AtomicI32::new(0);

/// Keeps reaping off while the guard lives, so the pids [`live_children`] gives stay this
/// process's children.
pub fn hold() -> MutexGuard<'static, ()> {
    REAPING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records the keeper, just forked.
pub fn set_keeper(pid: i32) {
    KEEPER.store(pid, Ordering::Relaxed);
}

/// The keeper's pid, while it has not been reaped.
pub fn keeper() -> Option<i32> {
    Some(KEEPER.load(Ordering::Relaxed)).filter(|&p| p != 0)
}

/// The keeper's pid, forgotten: heimdall is letting it go.
pub fn take_keeper() -> Option<i32> {
    Some(KEEPER.swap(0, Ordering::Relaxed)).filter(|&p| p != 0)
}

/// Records the command's leader. Call with [`hold`]'s guard held from before the spawn: a
/// command that exits at once must not be reaped as an orphan meanwhile.
pub fn set_leader(pid: i32) {
    LEADER.store(pid, Ordering::Relaxed);
}

/// Whether `pid`, a child of ours, has exited; it stays unreaped.
pub fn exited(pid: i32) -> io::Result<bool> {
    peek_exited(pid, WaitIdOptions::NOHANG)
}

/// Blocks until `pid`, a child of ours, has exited, without reaping it, so its group id stays
/// reserved while heimdall cleans up the rest of the group.
pub fn wait_exited(pid: i32) -> io::Result<()> {
    loop {
        match peek_exited(pid, WaitIdOptions::empty()) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// `waitid(P_PID, pid, WEXITED | WNOWAIT | flags)`: whether `pid` has exited, leaving it
/// unreaped so that its pid, and so its process group id, stays ours. Without `WNOHANG`
/// it blocks until then.
fn peek_exited(pid: i32, flags: WaitIdOptions) -> io::Result<bool> {
    let pid = Pid::from_raw(pid).ok_or(io::ErrorKind::InvalidInput)?;
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | flags;
    Ok(rustix::process::waitid(WaitId::Pid(pid), options)?.is_some())
}

/// Reaps every exited child of heimdall's except the command's leader, and returns their pids.
/// (`waitid(P_ALL)` is libc's here: rustix's answer to it does not say which child.)
/// heimdall is a subreaper, so the orphans of a long job that starts many short background
/// processes end up here; reaping them as they exit (on SIGCHLD) keeps them from filling the
/// process table. A keeper reaped here has died while heimdall runs: that is said once.
pub fn reap_orphans() -> Vec<i32> {
    let _reaping = hold();
    let leader = LEADER.load(Ordering::Relaxed);
    let mut reaped = Vec::new();
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t for waitid to fill; WNOWAIT only peeks, and the
        // reaping below happens under REAPING.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid for the WEXITED states waitid reports.
        let pid = unsafe { info.si_pid() };
        // The leader, if it has exited, is the one child this reports until it is reaped; the
        // supervisor reaps it promptly, and the next SIGCHLD or check reaps the rest.
        if rc != 0 || pid == 0 || pid == leader {
            return reaped;
        }
        if let Some(child) = Pid::from_raw(pid) {
            let _ = rustix::process::waitpid(Some(child), WaitOptions::NOHANG);
        }
        if KEEPER
            .compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            log::warn(format!(
                "the keeper process (pid {pid}) died; if heimdall is killed now, only the command's own process gets the parent-death signal"
            ));
        }
        reaped.push(pid);
    }
}

/// heimdall's live (not zombie) children other than the keeper and `leader`. Call with
/// [`hold`]'s guard held when the pids are to be signalled.
pub fn live_children(leader: i32) -> Vec<i32> {
    let keeper = keeper();
    procfs::own_children()
        .into_iter()
        .filter(|&pid| pid != leader && Some(pid) != keeper)
        .filter(|&pid| procfs::stat(pid).is_some_and(|f| !f.gone()))
        .collect()
}
