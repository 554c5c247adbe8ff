//! Marking the job's processes with something they cannot overwrite, so that the keeper finds
//! every one of them after heimdall is gone: a process can rewrite its environment (perl's
//! `$0`, `setproctitle`: `HEIMDALL_PID` is then gone from `/proc/PID/environ`) and leave the
//! process group and session (`setsid`), but not these:
//!
//! - **a cgroup of the job's own** (`heimdall-PID`, a child of heimdall's own cgroup in the v2
//!   hierarchy), where heimdall may create one: as root, or as a user with a delegated cgroup
//!   (a systemd user service with `Delegate=yes`). Every process the job starts is born in it,
//!   and leaving it takes write access to another cgroup's `cgroup.procs`, which only root has.
//!   The command is born in it (`clone3` with `CLONE_INTO_CGROUP`, see `child/launch.rs`; on an
//!   older kernel it moves itself in before it executes), so nothing it starts is ever outside.
//! - otherwise **an inherited descriptor**: the read end of a pipe that is unique to the run
//!   (`pipe:[INODE]` in `/proc/PID/fd`), at 64 or the lowest free number above it. It goes
//!   wherever the job's processes go, unless one closes it: daemons that close every
//!   descriptor, and programs started through Python's `subprocess` (which closes them by
//!   default), lose it. It is a leaked descriptor to tools that check (LVM prints a warning).
//!
//! Not responsible for killing: see `reach.rs`.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::log;

/// Where the job's descriptor mark goes, or the lowest free number above.
pub const MARK_FD: RawFd = 64;

/// The job's mark, prepared before the command is spawned.
pub enum Mark {
    /// The job's cgroup: its directory, which the command is born in, and its `cgroup.procs`,
    /// for a kernel that cannot do that.
    Cgroup {
        path: PathBuf,
        dir: OwnedFd,
        procs: OwnedFd,
    },
    /// The read end of a pipe whose write end is closed: reading it gives EOF, nothing else.
    Descriptor(OwnedFd),
}

/// What the forked child does with the mark, before exec: plain descriptor numbers, so that
/// it allocates nothing. -1 for none.
#[derive(Clone, Copy, Debug)]
pub struct InChild {
    /// The cgroup's directory, to be born in (`clone3`).
    dir: RawFd,
    /// Its `cgroup.procs`, to move in where the kernel cannot do the above.
    procs: RawFd,
    descriptor: RawFd,
}

impl InChild {
    pub const NONE: InChild = InChild {
        dir: -1,
        procs: -1,
        descriptor: -1,
    };

    /// The job's cgroup directory, for `clone3(CLONE_INTO_CGROUP)`.
    pub fn cgroup(self) -> Option<RawFd> {
        (self.dir >= 0).then_some(self.dir)
    }

    /// Runs in the forked child: joins the job's cgroup unless it was `born_in_cgroup`, or
    /// puts the marking descriptor where exec keeps it (the original is close-on-exec). A
    /// failure only leaves the mark off; the parent checks the cgroup afterwards
    /// ([`Mark::check`]).
    ///
    /// # Safety
    /// Only async-signal-safe calls: write and fcntl.
    pub unsafe fn apply(self, born_in_cgroup: bool) {
        if self.procs >= 0 && !born_in_cgroup {
            // SAFETY: a valid buffer of one byte; a failed write only leaves the mark off.
            unsafe { libc::write(self.procs, b"0".as_ptr().cast(), 1) };
        }
        if self.descriptor >= 0 {
            // SAFETY: fcntl on a descriptor we own; F_DUPFD fails with EINVAL when MARK_FD is
            // at or above the descriptor limit, then any free number will do.
            unsafe {
                if libc::fcntl(self.descriptor, libc::F_DUPFD, MARK_FD) < 0 {
                    libc::fcntl(self.descriptor, libc::F_DUPFD, 3);
                }
            }
        }
    }
}

impl Mark {
    /// A cgroup for the job where heimdall may create one, else a marking descriptor; `None`
    /// if neither can be had (no descriptor left: heimdall has checked its limit before).
    pub fn prepare(heimdall: u32) -> Option<Mark> {
        match cgroup(heimdall) {
            Ok(mark) => return Some(mark),
            Err(why) => log::debug(format!("no cgroup for the job: {why}")),
        }
        match descriptor() {
            Ok(mark) => Some(mark),
            Err(e) => {
                log::warn(format!(
                    "cannot mark the job's processes ({e}); if heimdall is killed, its keeper finds them only by process group and environment"
                ));
                None
            }
        }
    }

    pub fn in_child(&self) -> InChild {
        match self {
            Mark::Cgroup { dir, procs, .. } => InChild {
                dir: dir.as_raw_fd(),
                procs: procs.as_raw_fd(),
                descriptor: -1,
            },
            Mark::Descriptor(fd) => InChild {
                descriptor: fd.as_raw_fd(),
                ..InChild::NONE
            },
        }
    }

    /// What the keeper gets: the cgroup's directory (a descriptor it keeps), or the marking
    /// descriptor's inode.
    pub fn for_keeper(&self) -> (Option<RawFd>, Option<u64>) {
        match self {
            Mark::Cgroup { dir, .. } => (Some(dir.as_raw_fd()), None),
            Mark::Descriptor(fd) => (None, inode(fd.as_raw_fd())),
        }
    }

    /// After the spawn: says where the job runs, and warns if the command is not in its
    /// cgroup (a kernel without `clone3`, where the child moves itself, and that failed).
    pub fn check(&self, pid: i32) {
        match self {
            Mark::Cgroup { path, .. } => {
                let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok();
                let inside = own.as_deref().is_none_or(|text| {
                    text.lines()
                        .find_map(|l| l.strip_prefix("0::"))
                        .map(|cgroup| cgroup.trim_start_matches('/'))
                        .is_some_and(|cgroup| !cgroup.is_empty() && path.ends_with(cgroup))
                });
                if inside {
                    log::info(format!("the command runs in cgroup {}", path.display()));
                } else {
                    log::warn(format!(
                        "the command did not join its cgroup {}; if heimdall is killed, its keeper finds its processes by process group and environment only",
                        path.display()
                    ));
                }
            }
            Mark::Descriptor(_) => log::info(format!(
                "no cgroup for the command; its processes inherit descriptor {MARK_FD} (or the next free one), by which the keeper finds them if heimdall is killed"
            )),
        }
    }

    /// The cgroup's path, for removing it once the job is gone.
    pub fn cgroup_path(&self) -> Option<&Path> {
        match self {
            Mark::Cgroup { path, .. } => Some(path),
            Mark::Descriptor(_) => None,
        }
    }
}

/// Creates `heimdall-PID` below heimdall's own cgroup and opens what the command and the keeper
/// need. Fails where this user may not create it (no cgroup v2 hierarchy, read-only, not
/// delegated) or may not move a process into it: that takes write access to `cgroup.procs`
/// of both the new cgroup and the common ancestor, heimdall's own (as the kernel checks for
/// delegated hierarchies).
fn cgroup(heimdall: u32) -> io::Result<Mark> {
    let own = own_cgroup_dir()
        .ok_or_else(|| io::Error::other("no cgroup v2 hierarchy in /proc/self/mountinfo"))?;
    if !writable(&own.join("cgroup.procs")) {
        return Err(io::Error::other(format!(
            "{} is not writable",
            own.join("cgroup.procs").display()
        )));
    }
    let path = own.join(format!("heimdall-{heimdall}"));
    match fs::create_dir(&path) {
        // A leftover of a heimdall with this pid whose keeper died with it: empty, or busy.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir(&path)?;
            fs::create_dir(&path)?;
        }
        other => other?,
    }
    let opened = open(&path, libc::O_RDONLY | libc::O_DIRECTORY)
        .and_then(|dir| Ok((dir, open(&path.join("cgroup.procs"), libc::O_WRONLY)?)));
    match opened {
        Ok((dir, procs)) => Ok(Mark::Cgroup { path, dir, procs }),
        Err(e) => {
            let _ = fs::remove_dir(&path);
            Err(e)
        }
    }
}

/// The read end of a fresh pipe, its write end closed.
fn descriptor() -> io::Result<Mark> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and belong to nobody else; the write end is dropped.
    let (read, _) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(Mark::Descriptor(read))
}

fn inode(fd: RawFd) -> Option<u64> {
    // SAFETY: stat is plain data; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer; a bad descriptor only fails.
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st.st_ino)
}

/// heimdall's own cgroup as a directory: the v2 hierarchy's mount point (from mountinfo) and
/// the path in `/proc/self/cgroup`'s `0::` line, relative to that mount's root.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    // Outside our cgroup namespace's root: nothing we can name.
    if own.contains("/..") {
        return None;
    }
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs_type) = line.split_once(" - ")?;
        if !fs_type.starts_with("cgroup2 ") {
            return None;
        }
        let fields: Vec<&str> = mount.split(' ').collect();
        let (root, point) = (unescape(fields.get(3)?), unescape(fields.get(4)?));
        let relative = Path::new(own).strip_prefix(&root).ok()?;
        Some(PathBuf::from(point).join(relative))
    })
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
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

fn open(path: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated path; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(c_path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes the job's cgroup and any left below it (an inner heimdall's, whose keeper died):
/// deepest first, as rmdir takes only empty cgroups. Processes that just exited may keep it
/// populated for a moment, so each removal is retried briefly.
pub fn remove_cgroup(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                log::debug(format!("cannot remove cgroup {}: {e}", path.display()));
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
