//! Marking the job's processes with something they cannot overwrite, so that the keeper finds
//! every one of them after heimdall is gone: a process can rewrite its environment (perl's
//! `$0`, `setproctitle`: `HEIMDALL_PID` is then gone from `/proc/PID/environ`) and leave the
//! process group and session (`setsid`), but not these two marks, which a job gets together:
//!
//! - **an inherited descriptor**, always: the read end of a pipe that is unique to the run
//!   (`pipe:[INODE]` in `/proc/PID/fd`), put at 64 or the lowest free number above it by the
//!   forked child before it executes the command (one `fcntl`). It goes wherever the job's
//!   processes go, from their first instruction, unless one closes it: daemons that close
//!   every descriptor, and programs started through Python's `subprocess` (which closes them by
//!   default), lose it. It is a leaked descriptor to tools that check (LVM prints a warning).
//! - **a cgroup of the job's own** (`keeper/cgroup.rs`), where one can be created: as root, or as a
//!   user with a delegated cgroup. The keeper moves the command into it once it runs, in
//!   parallel with the job, since a move waits for an RCU grace period (10–15 ms) that the
//!   spawn must not wait for. Leaving a cgroup takes write access to another cgroup's
//!   `cgroup.procs`, which only root has.
//!
//! Until the move completes, a process the command started is found by the descriptor, the
//! process group and `HEIMDALL_PID`; the keeper then moves those too (`keeper/cgroup.rs`). What
//! escapes both marks is a process that, within those first milliseconds, leaves the group,
//! clears its environment *and* closes every descriptor, before the keeper moves it.
//!
//! This file is heimdall's side: the descriptor. Not responsible for killing: see `keeper/reach.rs`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::log;

/// Where the job's descriptor mark goes, or the lowest free number above.
pub const MARK_FD: RawFd = 64;

/// The read end of a pipe whose write end is closed: reading it gives EOF, nothing else.
pub struct Mark(OwnedFd);

/// What the forked child does with the mark, before exec: a plain descriptor number, so that
/// it allocates nothing. -1 for none.
#[derive(Clone, Copy, Debug)]
pub struct InChild(RawFd);

impl InChild {
    pub const NONE: InChild = InChild(-1);

    /// Runs in the forked child: puts the marking descriptor where exec keeps it (the original
    /// is close-on-exec). A failure only leaves the mark off.
    ///
    /// # Safety
    /// Only async-signal-safe calls: fcntl.
    pub unsafe fn apply(self) {
        if self.0 >= 0 {
            // SAFETY: fcntl on a descriptor we own; F_DUPFD fails with EINVAL when MARK_FD is
            // at or above the descriptor limit, then any free number will do.
            unsafe {
                if libc::fcntl(self.0, libc::F_DUPFD, MARK_FD) < 0 {
                    libc::fcntl(self.0, libc::F_DUPFD, 3);
                }
            }
        }
    }
}

impl Mark {
    /// A fresh marking descriptor; `None` if there is no descriptor left (heimdall has checked
    /// its limit before), with a warning.
    pub fn prepare() -> Option<Mark> {
        match rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC) {
            // The write end is dropped: reading the mark gives EOF.
            Ok((read, _)) => Some(Mark(read)),
            Err(e) => {
                log::warn(format!(
                    "cannot mark the job's processes ({e}); if heimdall is killed, its keeper finds them only by cgroup, process group and environment"
                ));
                None
            }
        }
    }

    pub fn in_child(&self) -> InChild {
        InChild(self.0.as_raw_fd())
    }

    /// The pipe's inode, by which the keeper recognises it in `/proc/PID/fd`.
    pub fn inode(&self) -> Option<u64> {
        rustix::fs::fstat(&self.0).ok().map(|st| st.st_ino)
    }
}
