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
/// environment, in a new process group whose id is the command's pid.
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
            Ok(())
        });
    }
    let inner = cmd.spawn().map_err(|e| {
        let name = program.to_string_lossy();
        match e.kind() {
            io::ErrorKind::NotFound if crate::cli::SUBCOMMANDS.contains(&name.as_ref()) => fail(
                Failure::NotFound,
                format!(
                    "command not found: {name} (heimdall's own '{name}' subcommand must be the first argument: heimdall {name} ...)"
                ),
            ),
            io::ErrorKind::NotFound => {
                fail(Failure::NotFound, format!("command not found: {name}"))
            }
            _ => fail(Failure::CannotExecute, format!("cannot run {name}: {e}")),
        }
    })?;
    let pid = inner.id() as i32;
    Ok(Child { inner, pid })
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
    pub fn group_alive(&self) -> bool {
        group_members(self.pid) > 0
    }

    /// Reaps the leader and reports how it ended.
    pub fn reap(mut self) -> io::Result<ChildEnd> {
        self.inner.wait().map(ChildEnd::from)
    }
}

/// Counts the live (non-zombie) processes whose process group is `pgid`, from /proc.
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
        // Fields after the command name, which is in parentheses and may contain anything.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let _ppid = fields.next();
        let pgrp = fields.next().and_then(|p| p.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
    .count()
}
