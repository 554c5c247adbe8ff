//! The command: spawned in its own process group, signalled as a group, and reaped only after
//! heimdall is done signalling it. Nothing here knows about the lock or the database.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::Result;

use crate::exit::{Failure, fail};

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

impl From<ExitStatus> for ChildEnd {
    fn from(status: ExitStatus) -> ChildEnd {
        match (status.code(), status.signal()) {
            (Some(code), _) => ChildEnd::Exited(code),
            (None, Some(signal)) => ChildEnd::Signaled(signal),
            // Neither exited nor signalled is impossible for a reaped process; never call it a
            // success.
            (None, None) => ChildEnd::Exited(crate::exit::INTERNAL.into()),
        }
    }
}

/// `exited with status 3`, `was killed by SIGTERM`: the one wording of a command's end, in
/// heimdall's log lines and in its lock-loss messages.
impl std::fmt::Display for ChildEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildEnd::Exited(code) => write!(f, "exited with status {code}"),
            ChildEnd::Signaled(signal) => write!(f, "was killed by {}", signal_name(*signal)),
        }
    }
}

/// `SIGTERM`, or `signal 42` for one without a name (the real-time signals).
pub fn signal_name(signal: i32) -> String {
    // signal-hook's table is POSIX's; these two are Linux's own.
    let linux = match signal {
        libc::SIGPWR => Some("SIGPWR"),
        libc::SIGSTKFLT => Some("SIGSTKFLT"),
        _ => None,
    };
    linux
        .or_else(|| signal_hook::low_level::signal_name(signal))
        .map_or_else(|| format!("signal {signal}"), str::to_owned)
}

/// A running command, the leader of its own process group.
pub struct Child {
    inner: std::process::Child,
    pub pid: i32,
    /// How the leader ended, once [`Child::job_alive`] has reaped it.
    end: Option<ChildEnd>,
}

/// Held while reaping and while signalling heimdall's own children one by one: a child's pid
/// stays reserved until it is reaped, so a pid read from the children list can be signalled
/// safely only while nobody reaps.
static REAPING: Mutex<()> = Mutex::new(());

/// The command's leader once it runs (0 before), which orphan reaping leaves to the
/// supervisor. Set and read only with [`REAPING`] held, so that a leader that exits at once
/// cannot be reaped by a SIGCHLD that raced with its start.
static LEADER: AtomicI32 = AtomicI32::new(0);

/// Starts the command with `std::process::Command`: inherited stdio (its output streams as it
/// is written), the extra environment, a new process group whose id is the command's pid, and
/// the job's marking descriptor (`keeper::child_mark`). The job's cgroup, where there is one,
/// is the keeper's business, after the spawn: it costs the spawn nothing.
///
/// Nothing is written between fork and exec: the child would die of SIGPIPE on a stderr whose
/// reader is gone (std restores SIGPIPE's default action for it), or block on one whose reader
/// stopped reading, and the command would never run. So "started the command as pid N" (`-v`)
/// comes from heimdall after the spawn, through its log thread, and may follow the command's
/// first lines of output.
pub fn spawn(command: &[OsString], env: &[(&str, String)], unset: &[&str]) -> Result<Child> {
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
    // Pids fit in pid_t (at most 2^22 on Linux).
    let parent = std::process::id() as libc::pid_t;
    let mark = crate::process::keeper::child_mark();
    // SAFETY: the hook runs in the forked child before exec, where only async-signal-safe calls
    // are allowed: prctl, getppid, _exit and the mark's fcntl are, and the closure allocates
    // nothing and writes nothing.
    unsafe {
        cmd.pre_exec(move || {
            // If heimdall is SIGKILLed (OOM killer, kill -9), the kernel kills the command too,
            // so it never runs on without the lock. The signal is tied to the thread that spawns,
            // which is heimdall's main thread and lives until heimdall exits. It reaches only
            // this process, and a set-user-ID program loses it at exec: the keeper
            // (src/keeper.rs) covers the rest.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // heimdall may have died between fork and prctl; then nobody would deliver the signal.
            if libc::getppid() != parent {
                libc::_exit(crate::exit::INTERNAL.into());
            }
            mark.apply();
            Ok(())
        });
    }
    // `program::check` has found the program already; this is for what only exec can tell.
    let inner = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => fail(
            Failure::NotFound,
            crate::process::program::not_found(program),
        ),
        _ => fail(
            Failure::CannotExecute,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        ),
    })?;
    let pid = inner.id() as i32;
    crate::log::info(format!("started the command as pid {pid}"));
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
        // SAFETY: kill has no memory-safety preconditions.
        let rc = unsafe { libc::kill(-self.pid, signal) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::ESRCH) {
                crate::log::debug(format!("kill(-{}, {signal}): {err}", self.pid));
            }
        }
    }

    /// Sends `signals` to the processes that left the group but were reparented to heimdall
    /// (the subreaper) when their parent died, such as a `setsid` daemon, skipping those in
    /// `done` and adding the rest to it. Their own children become heimdall's in turn once they
    /// die, so calling this again until [`Child::job_alive`] says no reaches every descendant.
    pub fn signal_children(&self, signals: &[i32], done: &mut Vec<i32>) {
        let _reaping = REAPING.lock().unwrap_or_else(|e| e.into_inner());
        for pid in live_children(self.pid) {
            if done.contains(&pid) {
                continue;
            }
            done.push(pid);
            for &signal in signals {
                // SAFETY: `pid` is an unreaped child of ours, and nobody reaps while we hold
                // REAPING, so the pid cannot have been reused.
                unsafe { libc::kill(pid, signal) };
            }
        }
    }

    /// Blocks until the leader has exited, without reaping it, so the group id stays reserved
    /// while heimdall cleans up the rest of the group.
    pub fn wait_exited(pid: i32) -> io::Result<()> {
        loop {
            match peek_exited(pid, 0) {
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                other => return other.map(|_| ()),
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
            if !exited(self.pid)? {
                return Ok(true);
            }
            self.end = Some(self.inner.wait()?.into());
        }
        reap_orphans();
        // SAFETY: kill with signal 0 only checks; no memory-safety preconditions.
        if unsafe { libc::kill(-self.pid, 0) } == 0 {
            return Ok(true);
        }
        let _reaping = REAPING.lock().unwrap_or_else(|e| e.into_inner());
        Ok(!live_children(self.pid).is_empty())
    }

    /// How the leader ended, reaping it if [`Child::job_alive`] has not.
    pub fn reap(mut self) -> io::Result<ChildEnd> {
        match self.end {
            Some(end) => Ok(end),
            None => self.inner.wait().map(ChildEnd::from),
        }
    }
}

/// Spawns through `spawn` with orphan reaping held off, and records the leader. If the command
/// cannot be executed, the standard library reaps the failed child itself and must find it
/// unreaped; and a command that exits at once must not be reaped as an orphan.
pub fn spawn_leader(spawn: impl FnOnce() -> Result<Child>) -> Result<Child> {
    let _reaping = REAPING.lock().unwrap_or_else(|e| e.into_inner());
    let child = spawn()?;
    LEADER.store(child.pid, Ordering::Relaxed);
    Ok(child)
}

/// Whether `pid`, a child of ours, has exited; it stays unreaped.
pub fn exited(pid: i32) -> io::Result<bool> {
    peek_exited(pid, libc::WNOHANG)
}

/// `waitid(P_PID, pid, WEXITED | WNOWAIT | flags)`: whether `pid` has exited, leaving it
/// unreaped so that its pid, and so its process group id, stays ours. Without `WNOHANG`
/// it blocks until then.
fn peek_exited(pid: i32, flags: libc::c_int) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data; waitid writes into it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid siginfo_t for waitid to fill; WNOWAIT leaves the child unreaped.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | flags,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: si_pid is valid after a successful waitid; 0 means nothing has exited.
    Ok(unsafe { info.si_pid() } != 0)
}

/// Reaps every exited child of heimdall's except the command's leader, which the supervisor
/// reaps itself so that its group id stays reserved meanwhile. heimdall is a subreaper, so the
/// orphans of a long job that starts many short background processes end up here; reaping them
/// as they exit (on SIGCHLD) keeps them from filling the process table.
pub fn reap_orphans() {
    let _reaping = REAPING.lock().unwrap_or_else(|e| e.into_inner());
    let leader = LEADER.load(Ordering::Relaxed);
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
            return;
        }
        // SAFETY: `pid` is an exited child of ours that is not the leader.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        crate::process::keeper::reaped(pid);
    }
}

/// Makes orphaned descendants of the command heimdall's children rather than init's, so that
/// heimdall can find what the command left behind (see [`Child::job_alive`]).
pub fn become_subreaper() {
    // SAFETY: prctl with these arguments has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        crate::log::debug(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            io::Error::last_os_error()
        ));
    }
}

/// heimdall's live (not zombie) children other than the keeper and `leader`. Call with
/// [`REAPING`] held when the pids are to be signalled.
fn live_children(leader: i32) -> Vec<i32> {
    let keeper = crate::process::keeper::pid();
    own_children()
        .into_iter()
        .filter(|&pid| pid != leader && Some(pid) != keeper)
        .filter(|&pid| stat(pid).is_some_and(|f| f.state != "Z" && f.state != "X"))
        .collect()
}

/// heimdall's children, from every thread's `children` file; from all of /proc only when the
/// kernel provides none of those files (no CONFIG_PROC_CHILDREN). A thread that exits between
/// the listing and the read (the connect thread, the child-watching thread) is skipped, not
/// taken for a kernel without the files: that mistake cost a scan of every process on the host.
/// The children of an exiting thread pass to a live one, which is read too.
fn own_children() -> Vec<i32> {
    let from_tasks = || -> Option<Vec<i32>> {
        let mut children = Vec::new();
        let mut read_any = false;
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            read_any = true;
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        read_any.then_some(children)
    };
    from_tasks().unwrap_or_else(|| {
        let me = std::process::id() as i32;
        processes()
            .filter(|(_, fields)| fields.ppid == me)
            .map(|(pid, _)| pid)
            .collect()
    })
}

/// Every process in /proc with its stat fields; processes that vanish meanwhile are skipped.
pub fn processes() -> impl Iterator<Item = (i32, StatFields)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            Some((pid, stat_fields(&stat)?))
        })
}

/// The stat fields of process `pid`, None if it is gone.
pub fn stat(pid: i32) -> Option<StatFields> {
    stat_fields(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The fields of a /proc/PID/stat line that heimdall reads.
pub struct StatFields {
    pub state: String,
    pub ppid: i32,
    pub pgrp: i32,
}

/// The fields after the command name, which is in parentheses and may contain anything.
fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(StatFields { state, ppid, pgrp })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_state_and_group_even_with_odd_command_names() {
        let stat = "4211 (a) b (c)) S 1 4200 4200 0 -1 4194560 0 0";
        let fields = stat_fields(stat).unwrap();
        assert_eq!(
            (fields.state.as_str(), fields.ppid, fields.pgrp),
            ("S", 1, 4200)
        );
        assert!(stat_fields("garbage").is_none());
    }
}
