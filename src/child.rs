//! The command: spawned in its own process group, signalled as a group, and reaped only after
//! heimdall is done signalling it. Nothing here knows about the lock or the database.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};

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

/// A running command, the leader of its own process group.
pub struct Child {
    inner: std::process::Child,
    pub pid: i32,
}

/// Starts the command with inherited stdio (its output streams as it is written) and the extra
/// environment, in a new process group whose id is the command's pid. With `announce`, the
/// child itself says "started the command as pid N" on stderr just before it executes the
/// command, so that the line always comes before the command's first output.
pub fn spawn(
    command: &[OsString],
    env: &[(&str, String)],
    unset: &[&str],
    announce: bool,
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
    // SAFETY: getpid and prctl are async-signal-safe, and the closure allocates nothing.
    let parent = unsafe { libc::getpid() };
    unsafe {
        cmd.pre_exec(move || {
            // If heimdall is SIGKILLed (OOM killer, kill -9), the kernel kills the command too,
            // so it never runs on without the lock. The signal is tied to the thread that spawns,
            // which is heimdall's main thread and lives until heimdall exits.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // heimdall may have died between fork and prctl; then nobody would deliver the signal.
            if libc::getppid() != parent {
                libc::_exit(crate::exit::INTERNAL.into());
            }
            if announce {
                announce_pid();
            }
            Ok(())
        });
    }
    // `program::check` has found the program already; this is for what only exec can tell.
    let inner = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => fail(Failure::NotFound, crate::program::not_found(program)),
        _ => fail(
            Failure::CannotExecute,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        ),
    })?;
    let pid = inner.id() as i32;
    Ok(Child { inner, pid })
}

/// Writes "heimdall: started the command as pid N" to stderr from the forked child, before
/// exec: with a stack buffer and one write(2), as only async-signal-safe calls are allowed
/// between fork and exec. One write of less than PIPE_BUF bytes is not interleaved with others.
fn announce_pid() {
    const PREFIX: &[u8] = b"heimdall: started the command as pid ";
    let mut line = [0u8; 64];
    line[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut len = PREFIX.len();
    // SAFETY: getpid is async-signal-safe and cannot fail.
    let pid = unsafe { libc::getpid() };
    let mut digits = [0u8; 12];
    let mut n = pid.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..count].iter().rev() {
        line[len] = *d;
        len += 1;
    }
    line[len] = b'\n';
    len += 1;
    // SAFETY: write is async-signal-safe; the buffer is valid for `len` bytes. A failed write
    // only loses the message.
    unsafe { libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len) };
}

impl Child {
    /// Sends `signal` to the command's whole process group. A group that is already gone is not
    /// an error. Only called before the leader is reaped: until then its pid, and so the group
    /// id, cannot be reused by an unrelated process.
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

    /// Blocks until the leader has exited, without reaping it, so the group id stays reserved
    /// while heimdall cleans up the rest of the group.
    pub fn wait_exited(pid: i32) -> io::Result<()> {
        loop {
            // SAFETY: siginfo_t is plain data; waitid writes into it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// True while any process in the group other than a zombie is alive.
    ///
    /// heimdall is a child subreaper (see [`become_subreaper`]), so every process the command
    /// leaves behind is heimdall's descendant, and the topmost live ones are heimdall's own
    /// children once the command has exited. Looking at those few processes is much cheaper
    /// than reading every process in /proc, which is the fallback when the kernel does not list
    /// children.
    pub fn group_alive(&self) -> bool {
        self.reap_orphans();
        match own_children() {
            Some(children) => children
                .into_iter()
                .any(|pid| in_group_and_alive(pid, self.pid)),
            None => group_members(self.pid) > 0,
        }
    }

    /// Reaps orphans that were reparented to heimdall and have exited, leaving the command's
    /// leader for [`Child::reap`]: a subreaper that did not would collect zombies.
    fn reap_orphans(&self) {
        loop {
            // SAFETY: siginfo_t is plain data; waitid writes into it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
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
            if rc != 0 || pid == 0 || pid == self.pid {
                return;
            }
            // SAFETY: `pid` is an exited child of ours that is not the leader.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        }
    }

    /// Reaps the leader and reports how it ended.
    pub fn reap(mut self) -> io::Result<ChildEnd> {
        self.inner.wait().map(ChildEnd::from)
    }
}

/// Makes orphaned descendants of the command heimdall's children rather than init's, so that
/// heimdall can find what the command left behind (see [`Child::group_alive`]).
pub fn become_subreaper() {
    // SAFETY: prctl with these arguments has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        crate::log::debug(format!(
            "PR_SET_CHILD_SUBREAPER: {}",
            io::Error::last_os_error()
        ));
    }
}

/// heimdall's children, from every thread's `children` file; `None` when the kernel does not
/// provide them (CONFIG_PROC_CHILDREN).
fn own_children() -> Option<Vec<i32>> {
    let mut children = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let text = std::fs::read_to_string(task.ok()?.path().join("children")).ok()?;
        children.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    Some(children)
}

fn in_group_and_alive(pid: i32, pgid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat_state_and_group(&stat)
            .is_some_and(|(state, group)| group == pgid && state != "Z" && state != "X")
    })
}

/// The state and process group from a /proc/PID/stat line: the fields after the command name,
/// which is in parentheses and may contain anything.
fn stat_state_and_group(stat: &str) -> Option<(&str, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let _ppid = fields.next();
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Counts the live (non-zombie) processes whose process group is `pgid`, from all of /proc.
pub fn group_members(pgid: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        entry.file_name().to_str()?.parse::<u32>().ok()?;
        std::fs::read_to_string(entry.path().join("stat")).ok()
    })
    .filter(|stat| {
        stat_state_and_group(stat)
            .is_some_and(|(state, group)| group == pgid && state != "Z" && state != "X")
    })
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_give_state_and_group_even_with_odd_command_names() {
        let stat = "4211 (a) b (c)) S 1 4200 4200 0 -1 4194560 0 0";
        assert_eq!(stat_state_and_group(stat), Some(("S", 4200)));
        assert_eq!(stat_state_and_group("garbage"), None);
    }
}
