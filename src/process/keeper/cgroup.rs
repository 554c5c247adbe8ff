//! The job's cgroup, the keeper's work from start to end: it creates `heimdall-PID` below
//! heimdall's own cgroup in the v2 hierarchy when heimdall is about to spawn the command, moves
//! the command into it once heimdall says the command runs, and removes it when it exits.
//!
//! Moving a process into a cgroup (a write to `cgroup.procs`) takes the kernel's
//! cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period: 10–15 ms for a
//! move on an idle system, 0.06 ms for moves that follow one another closely. The spawn does
//! not wait for that, nor does heimdall's exit: a thread of the keeper's makes the move while
//! the job runs (a job that ends first only makes it fail, with ESRCH). The command may start
//! processes before its own move completes; the same thread then moves every process of
//! heimdall's tree that is still in heimdall's own cgroup (the command's descendants, and the
//! orphans heimdall inherits as the subreaper), until a look finds none left. Until then the
//! other marks find them (`process/mark.rs`). A process that already moved itself to another cgroup
//! (an inner heimdall's job, `systemd-run --scope`) is left where it is.
//!
//! Not responsible for deciding what is killed (`reach.rs`).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::Access;

use crate::log;
use crate::process::procfs;

/// How many times the keeper looks for processes still outside the cgroup, at most: each look
/// that moves some is followed by another, for what they started meanwhile.
const SWEEPS: usize = 8;

/// The job's cgroup, created.
pub struct Cgroup {
    pub path: PathBuf,
    /// Its `cgroup.procs`, open for writing.
    procs: File,
    /// heimdall's own cgroup as `/proc/PID/cgroup` names it, where the job's processes are
    /// born: a process still there is moved, one anywhere else left alone.
    born_in: String,
}

impl Cgroup {
    /// Creates `heimdall-PID` below heimdall's own cgroup (the keeper's too: it was forked
    /// from heimdall) and opens its `cgroup.procs`. Fails where this user may not create it (no
    /// cgroup v2 hierarchy, read-only, not delegated) or may not move a process into it: that
    /// takes write access to the `cgroup.procs` of both the new cgroup and the common ancestor,
    /// heimdall's own (as the kernel checks for delegated hierarchies).
    pub fn create(heimdall: i32) -> io::Result<Cgroup> {
        let (born_in, own) = own_cgroup()
            .ok_or_else(|| io::Error::other("no cgroup v2 hierarchy in /proc/self/mountinfo"))?;
        if !writable(&own.join("cgroup.procs")) {
            return Err(io::Error::other(format!(
                "{} is not writable",
                own.join("cgroup.procs").display()
            )));
        }
        let path = job_dir(&own, heimdall);
        match fs::create_dir(&path) {
            // A leftover of a heimdall with this pid whose keeper died with it: empty, or busy.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_dir(&path)?;
                fs::create_dir(&path)?;
            }
            other => other?,
        }
        match open_for_writing(&path.join("cgroup.procs")) {
            Ok(procs) => Ok(Cgroup {
                path,
                procs,
                born_in,
            }),
            Err(e) => {
                let _ = fs::remove_dir(&path);
                Err(e)
            }
        }
    }

    /// Starts moving the command, the leader of process group `leader`, and then what it
    /// started meanwhile, into the cgroup, on a thread of its own: see the module docs.
    pub fn start_moving(&self, leader: i32, heimdall: i32) {
        let (procs, born_in, path) = match self.procs.try_clone() {
            Ok(procs) => (procs, self.born_in.clone(), self.path.clone()),
            Err(e) => return log::debug(format!("keeper: cannot move the command: {e}")),
        };
        let spawned = std::thread::Builder::new()
            .name("move".into())
            .stack_size(64 * 1024)
            .spawn(move || move_job(&procs, &born_in, &path, leader, heimdall));
        if let Err(e) = spawned {
            log::debug(format!(
                "keeper: cannot start the thread that moves the command: {e}"
            ));
        }
    }
}

fn move_job(procs: &File, born_in: &str, path: &Path, leader: i32, heimdall: i32) {
    let started = Instant::now();
    match write_pid(procs, leader) {
        Ok(()) => {}
        // The command ended before it could be moved: nothing to do.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return,
        Err(e) => {
            return log::warn(format!(
                "cannot move the command into its cgroup {} ({e}); if heimdall is killed, its keeper finds the command's processes by descriptor, process group and environment",
                path.display()
            ));
        }
    }
    let moved = sweep(procs, born_in, leader, heimdall);
    log::debug(format!(
        "keeper: moved the command (pid {leader}) and {moved} process(es) it had started into cgroup {} in {:?}",
        path.display(),
        started.elapsed()
    ));
}

/// Moves the processes of heimdall's tree that are still in heimdall's own cgroup: repeatedly,
/// as one not yet moved may start others meanwhile, until a look moves none. Returns how many
/// it moved.
fn sweep(procs: &File, born_in: &str, leader: i32, heimdall: i32) -> usize {
    let keeper = std::process::id() as i32;
    let mut tried = vec![leader];
    for _ in 0..SWEEPS {
        // heimdall gone, its pid may be reused: its tree is not the job's any more.
        if std::os::unix::process::parent_id() as i32 != heimdall {
            break;
        }
        let mut moved_any = false;
        for pid in procfs::descendants(heimdall, keeper) {
            if tried.contains(&pid) || cgroup_of(pid).as_deref() != Some(born_in) {
                continue;
            }
            tried.push(pid);
            moved_any |= write_pid(procs, pid).is_ok();
        }
        if !moved_any {
            break;
        }
    }
    tried.len() - 1
}

fn write_pid(mut procs: &File, pid: i32) -> io::Result<()> {
    procs.write_all(pid.to_string().as_bytes())
}

/// The cgroup of `pid` in the v2 hierarchy, as `/proc/PID/cgroup`'s `0::` line names it.
fn cgroup_of(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Our own cgroup, as `/proc/self/cgroup`'s `0::` line names it and as a directory: the v2
/// hierarchy's mount point (from mountinfo) joined with that name relative to the mount's root.
fn own_cgroup() -> Option<(String, PathBuf)> {
    let own = cgroup_of(std::process::id() as i32)?;
    // Outside our cgroup namespace's root: nothing we can name.
    if own.contains("/..") {
        return None;
    }
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let dir = info.lines().find_map(|line| {
        let (mount, fs_type) = line.split_once(" - ")?;
        if !fs_type.starts_with("cgroup2 ") {
            return None;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let (root, point) = (unescape(fields.get(3)?), unescape(fields.get(4)?));
        let relative = Path::new(&own).strip_prefix(&root).ok()?;
        Some(PathBuf::from(point).join(relative))
    })?;
    Some((own, dir))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn writable(path: &Path) -> bool {
    rustix::fs::access(path, Access::WRITE_OK).is_ok()
}

/// Opens for writing (close-on-exec, as std opens every file).
fn open_for_writing(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().write(true).open(path)
}

/// Removes the cgroup of the job of heimdall `heimdall` (this process or its parent), if it is
/// there: for heimdall itself, when its keeper died before it could.
pub fn remove_for(heimdall: u32) {
    if let Some((_, own)) = own_cgroup() {
        remove(&job_dir(&own, heimdall));
    }
}

/// The job's cgroup directory below heimdall's own, `own`.
fn job_dir(own: &Path, heimdall: impl std::fmt::Display) -> PathBuf {
    own.join(format!("heimdall-{heimdall}"))
}

/// Removes the job's cgroup and any left below it (an inner heimdall's, whose keeper died):
/// deepest first, as rmdir takes only empty cgroups. Processes that just exited may keep it
/// populated for a moment, so each removal is retried briefly. A move in flight holds the
/// kernel's cgroup mutex, so this waits for it.
pub fn remove(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove(&entry.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                log::debug(format!(
                    "keeper: cannot remove cgroup {}: {e}",
                    path.display()
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"/mnt/a\040b\134c"), r"/mnt/a b\c");
        assert_eq!(unescape(r"/odd\04"), r"/odd\04");
    }
}
