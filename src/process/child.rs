//! The command: spawned in its own process group, signalled as a group, and reaped only after
//! heimdall is done signalling it. Nothing here knows about the lock or the database.

use anyhow::Result;
use rustix::io::Errno;
use rustix::process::{Pid, Signal};
use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::OnceLock;

use super::mark::InChild;
use super::{program, reap};
use crate::domain::ending::ChildEnd;
use crate::exit::{Failure, fail};
use crate::log;

/// A running command, the leader of its own process group.
pub struct Child {
    inner: std::process::Child,
    pub pid: i32,
    /// How the leader ended, once [`Child::job_alive`] has reaped it.
    end: Option<ChildEnd>,
}

/// The signal mask heimdall started with, saved by [`block_signals`].
static INHERITED_MASK: OnceLock<SigSet> = OnceLock::new();
/// The signals heimdall takes (blocked by [`block_signals`]), whose action the command gets
/// back as the default.
static TAKEN: OnceLock<SigSet> = OnceLock::new();

/// A `sigset_t` (plain data, no pointers) that may sit in a static.
struct SigSet(libc::sigset_t);
// SAFETY: a sigset_t is a bit array; sharing a read-only copy between threads is sound.
unsafe impl Sync for SigSet {}
// SAFETY: as above.
unsafe impl Send for SigSet {}

/// Blocks `set` in the calling thread (and so in the threads it starts later), and remembers
/// the mask from before, which the command gets back (see `spawn`): the supervisor takes its
/// signals with `sigwaitinfo` instead of handlers (`supervise/mod.rs`).
pub fn block_signals(set: &libc::sigset_t) -> io::Result<()> {
    // SAFETY: sigset_t is plain data; pthread_sigmask writes the old mask into `old` and
    // changes only this thread's mask.
    let old = unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, set, &mut old);
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        old
    };
    // The first call saw the mask heimdall inherited; a later one would see heimdall's own.
    let _ = INHERITED_MASK.set(SigSet(old));
    let _ = TAKEN.set(SigSet(*set));
    Ok(())
}

/// In the forked child, before exec: the default action for every signal heimdall takes, and
/// the mask heimdall inherited. heimdall forwards those signals, so the command must be able
/// to act on them even where heimdall started with one ignored (a background job of a
/// non-interactive shell ignores SIGINT and SIGQUIT, and a shell cannot trap a signal ignored
/// when it started): as when heimdall had handlers for them, which exec resets to the default.
/// Async-signal-safe (`sigismember`, `sigaction`, one `rt_sigprocmask`, reads of initialised
/// statics).
fn restore_signals() {
    if let Some(SigSet(taken)) = TAKEN.get() {
        for signal in 1..=libc::SIGRTMAX() {
            // SAFETY: `taken` is an initialised sigset_t; setting SIG_DFL changes only the
            // child's disposition (SIGKILL and SIGSTOP are never in the set).
            unsafe {
                if libc::sigismember(taken, signal) == 1 {
                    libc::signal(signal, libc::SIG_DFL);
                }
            }
        }
    }
    if let Some(SigSet(mask)) = INHERITED_MASK.get() {
        // SAFETY: `mask` is an initialised sigset_t; this changes only the child's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut()) };
    }
}

/// Starts the command with `std::process::Command`: inherited stdio (its output streams as it
/// is written), the extra environment, a new process group whose id is the command's pid, and
/// the job's marking descriptor (`mark`, from `keeper::child_mark`). The job's cgroup, where there is one,
/// is the keeper's business, after the spawn: it costs the spawn nothing.
///
/// Nothing is written between fork and exec: the child would die of SIGPIPE on a stderr whose
/// reader is gone (std restores SIGPIPE's default action for it), or block on one whose reader
/// stopped reading, and the command would never run. So "started the command as pid N" (`-v`)
/// comes from heimdall after the spawn, through its log thread, and may follow the command's
/// first lines of output.
pub fn spawn(
    command: &[OsString],
    env: &[(&str, String)],
    unset: &[&str],
    mark: InChild,
) -> Result<Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| fail(Failure::Usage, "no command given"))?;
    let mut cmd = Command::new(program);
    cmd.args(args).process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in unset {
        cmd.env_remove(k);
    }
    let parent = rustix::process::getpid();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: prctl and getppid (rustix's raw system calls), _exit and the mark's fcntl
    // are, and the closure allocates nothing and writes nothing.
    unsafe {
        cmd.pre_exec(move || {
            // If heimdall is SIGKILLed (OOM killer, kill -9), the kernel kills the command too,
            // so it never runs on without the lock. The signal is tied to the thread that spawns,
            // which is heimdall's main thread and lives until heimdall exits. It reaches only
            // this process, and a set-user-ID program loses it at exec: the keeper
            // (`keeper/`) covers the rest.
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // heimdall may have died between fork and prctl; then nobody would deliver the signal.
            if rustix::process::getppid() != Some(parent) {
                libc::_exit(crate::exit::INTERNAL.into());
            }
            mark.apply();
            // The command starts with the mask heimdall inherited (std emptied the child's mask
            // before this hook), not the one heimdall's signal thread needs, and with the
            // default action for the signals heimdall forwards.
            restore_signals();
            Ok(())
        });
    }
    // `program::check` has found the program already; this is for what only exec can tell.
    let inner = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => fail(Failure::NotFound, program::not_found(program)),
        _ => fail(
            Failure::CannotExecute,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        ),
    })?;
    let pid = inner.id() as i32;
    log::info(format!("started the command as pid {pid}"));
    Ok(Child {
        inner,
        pid,
        end: None,
    })
}

impl Child {
    /// Sends `signal` to the command's process group. A group that is already gone is not an
    /// error. Until the leader is reaped its pid, and so the group id, cannot be reused; after
    /// that, only while a member lives, which is when [`Child::job_alive`] says to signal.
    pub fn signal_group(&self, signal: i32) {
        let sent = match (Pid::from_raw(self.pid), Signal::from_named_raw(signal)) {
            (Some(group), Some(named)) => rustix::process::kill_process_group(group, named),
            _ => Err(Errno::INVAL),
        };
        match sent {
            Ok(()) | Err(Errno::SRCH) => {}
            Err(err) => log::debug(format!("kill(-{}, {signal}): {err}", self.pid)),
        }
    }

    /// Sends `signals` to the processes that left the group but were reparented to heimdall
    /// (the subreaper) when their parent died, such as a `setsid` daemon, skipping those in
    /// `done` and adding the rest to it. Their own children become heimdall's in turn once they
    /// die, so calling this again until [`Child::job_alive`] says no reaches every descendant.
    pub fn signal_children(&self, signals: &[i32], done: &mut Vec<i32>) {
        let _reaping = reap::hold();
        for pid in reap::live_children(self.pid) {
            if done.contains(&pid) {
                continue;
            }
            done.push(pid);
            // `pid` is an unreaped child of ours, and nobody reaps while reaping is held off,
            // so the pid cannot have been reused.
            let Some(child) = Pid::from_raw(pid) else {
                continue;
            };
            for named in signals.iter().filter_map(|&s| Signal::from_named_raw(s)) {
                let _ = rustix::process::kill_process(child, named);
            }
        }
    }

    /// True while any process of the job lives: the leader; once the leader has exited (it is
    /// then reaped here), any member of its process group (`kill(-pgid, 0)`), whatever its
    /// parent; and any live child of heimdall's other than the keeper, which as the subreaper
    /// inherits every orphaned descendant, in the group or not.
    ///
    /// No scan of /proc: the group is one syscall, heimdall's children a few small files.
    pub fn job_alive(&mut self) -> io::Result<bool> {
        if self.end.is_none() {
            if !reap::exited(self.pid)? {
                return Ok(true);
            }
            self.end = Some(end_of(self.inner.wait()?));
        }
        reap::reap_orphans();
        let group = Pid::from_raw(self.pid).ok_or(io::ErrorKind::InvalidInput)?;
        if rustix::process::test_kill_process_group(group).is_ok() {
            return Ok(true);
        }
        let _reaping = reap::hold();
        Ok(!reap::live_children(self.pid).is_empty())
    }

    /// How the leader ended, reaping it if [`Child::job_alive`] has not.
    pub fn reap(mut self) -> io::Result<ChildEnd> {
        match self.end {
            Some(end) => Ok(end),
            None => self.inner.wait().map(end_of),
        }
    }
}

/// How a reaped command ended.
fn end_of(status: ExitStatus) -> ChildEnd {
    match (status.code(), status.signal()) {
        (Some(code), _) => ChildEnd::Exited(code),
        (None, Some(signal)) => ChildEnd::Signaled(signal),
        // Neither exited nor signalled is impossible for a reaped process; never call it a
        // success.
        (None, None) => ChildEnd::Exited(crate::exit::INTERNAL.into()),
    }
}

/// Spawns through `spawn` with orphan reaping held off, and records the leader. If the command
/// cannot be executed, the standard library reaps the failed child itself and must find it
/// unreaped; and a command that exits at once must not be reaped as an orphan.
pub fn spawn_leader(spawn: impl FnOnce() -> Result<Child>) -> Result<Child> {
    let _reaping = reap::hold();
    let child = spawn()?;
    reap::set_leader(child.pid);
    Ok(child)
}

/// Makes orphaned descendants of the command heimdall's children rather than init's, so that
/// heimdall can find what the command left behind (see [`Child::job_alive`]).
pub fn become_subreaper() {
    // The kernel takes a flag where rustix takes a pid: any pid sets it.
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        log::debug(format!("PR_SET_CHILD_SUBREAPER: {e}"));
    }
}
