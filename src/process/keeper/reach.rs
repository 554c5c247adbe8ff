//! The keeper's kill: finding every process of the job once heimdall cannot stop it, and
//! SIGKILLing them until none is left. A process belongs to the job if it is in the command's
//! process group, in the job's cgroup (or one below it), holds the job's marking descriptor
//! (see `process/mark.rs`), or carries this heimdall's `HEIMDALL_PID` in the environment it started
//! with.
//!
//! Another heimdall's keeper among them (a nested run of another lock, whose keeper is stopping
//! its own job) gets time to finish before it is killed too: a keeper is recognised by what it
//! cannot fake, the heimdall executable (`/proc/PID/exe`, the same file as ours) together with
//! its name. A process that only calls itself `heimdall-keeper` is killed at once.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::{AFTER_KILL, NAME, POLL};
use crate::environ::ENV_PID;
use crate::process::procfs;

/// How long an inner keeper gets to stop its own job (which takes it at most [`AFTER_KILL`])
/// before it is killed like the rest.
const KEEPER_GRACE: Duration = Duration::from_secs(AFTER_KILL.as_secs() + 1);

/// What the keeper knows about the job.
#[derive(Debug, Default)]
pub struct Job {
    /// The command's process group, 0 until known.
    pub pgid: i32,
    /// The job's cgroup directory.
    pub cgroup: Option<PathBuf>,
    /// The marking descriptor's link text in /proc/PID/fd, `pipe:[INODE]`.
    pub descriptor: Option<String>,
}

/// SIGKILLs every process of `job` until none is left, or [`AFTER_KILL`] has passed (after the
/// grace of a keeper that was spared): then returns false, for the caller to say so once it has
/// acted. `heimdall` is the pid whose `HEIMDALL_PID` the job carries.
pub fn kill_job(job: &Job, heimdall: i32) -> bool {
    let marker = format!("\0{ENV_PID}={heimdall}\0").into_bytes();
    let me = std::process::id() as libc::pid_t;
    let own_exe = exe_id(me);
    let started = Instant::now();
    let mut spared_a_keeper = false;
    loop {
        // pgid 0 (the group not known yet) would name the keeper's own group.
        if let Some(group) = Pid::from_raw(job.pgid.max(0)) {
            let _ = rustix::process::kill_process_group(group, Signal::KILL);
        }
        // heimdall itself, while it lives (stopped, in lease mode), is not the job.
        let spare = if std::os::unix::process::parent_id() as i32 == heimdall {
            heimdall
        } else {
            0
        };
        let in_cgroup = job
            .cgroup
            .as_deref()
            .map(cgroup_members)
            .unwrap_or_default();
        let grace_over = started.elapsed() >= KEEPER_GRACE;
        let mut alive = false;
        for (pid, fields) in procfs::processes() {
            if pid == me || pid == spare || fields.gone() {
                continue;
            }
            let member = (job.pgid > 0 && fields.pgrp == job.pgid)
                || in_cgroup.contains(&pid)
                || job.descriptor.as_deref().is_some_and(|d| holds(pid, d))
                || carries(pid, &marker);
            if !member {
                continue;
            }
            alive = true;
            if !grace_over && is_keeper(pid, own_exe) {
                spared_a_keeper = true;
                continue;
            }
            if let Some(pid) = Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(pid, Signal::KILL);
            }
        }
        if !alive {
            return true;
        }
        let limit = if spared_a_keeper {
            KEEPER_GRACE + AFTER_KILL
        } else {
            AFTER_KILL
        };
        if started.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// The pids in `dir`'s cgroup and every cgroup below it.
fn cgroup_members(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(cgroup_members(&entry.path()));
        }
    }
    pids
}

/// Whether `pid` has a descriptor open on the object `/proc/PID/fd` shows as `link`.
fn holds(pid: i32, link: &str) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == link))
}

/// Whether the environment `pid` started with holds `marker` (`\0NAME=VALUE\0`).
fn carries(pid: i32, marker: &[u8]) -> bool {
    let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut framed = Vec::with_capacity(environ.len() + 2);
    framed.push(0);
    framed.extend_from_slice(&environ);
    framed.push(0);
    framed.windows(marker.len()).any(|w| w == marker)
}

/// The executable's device and inode: the same file as ours, even once it has been replaced
/// on disk (the link then still leads to the old file).
fn exe_id(pid: i32) -> Option<(u64, u64)> {
    fs::metadata(format!("/proc/{pid}/exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Another heimdall's keeper: heimdall's own executable, and the keeper's name. A process can
/// take any name, but not run our executable without being heimdall.
fn is_keeper(pid: i32, own_exe: Option<(u64, u64)>) -> bool {
    let named = fs::read(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.strip_suffix(b"\n") == Some(NAME.to_bytes()));
    named && own_exe.is_some() && exe_id(pid) == own_exe
}

/// What the keeper says when processes outlived [`kill_job`], after it has let the lock go.
pub fn survivors_message() -> String {
    format!(
        "processes of the command survived SIGKILL for {}s (uninterruptible sleep?); the keeper released the lock anyway",
        AFTER_KILL.as_secs()
    )
}
