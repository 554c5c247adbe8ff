//! The keeper: a tiny process, forked before heimdall starts any thread, that makes sure no
//! process of the job outlives the lock when heimdall itself dies without cleaning up (SIGKILL,
//! the OOM killer, a crash).
//!
//! heimdall and the keeper share a socket pair. heimdall tells the keeper the job's marking
//! descriptor (`process/mark.rs`) before it spawns the command, the command's process group once the
//! command runs, that the job is gone once it is, and hands it a duplicate of the database
//! connection's socket. The keeper gives the job a cgroup of its own where it can
//! (`cgroup.rs`): it creates it when the spawn is announced and moves the command in once it
//! runs, while heimdall goes on, and removes it at the end. When heimdall's end of the socket
//! closes (heimdall exited or died) while the job still runs, the keeper SIGKILLs every
//! process of the job it can find (`reach.rs`), waits until they are gone, and only then closes
//! its copy of the connection, so the server cannot release the lock before the job is gone.
//! On a clean run heimdall ends its session itself (the server releases the lock at once) and
//! the keeper just lets go of stderr, removes the cgroup and exits.
//!
//! The keeper acts first and speaks after: a message to a stderr whose reader stopped reading
//! must not hold up the kill (see `log/sink.rs`), and it is written only once the lock is released.
//!
//! Not responsible for stopping the job while heimdall lives (the supervisor does), nor for
//! processes that escaped every mark, or that belong to another user (see docs/failures.md, "What
//! happens when heimdall itself dies").

mod cgroup;
mod reach;
mod watch;

use std::ffi::CStr;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use rustix::process::{Pid, Signal};

use super::mark::{self, InChild, Mark};
use super::reap;
use crate::environ;
use crate::log;

/// heimdall's end of the socket pair; none without a keeper.
static SOCKET: Mutex<Option<OwnedFd>> = Mutex::new(None);
/// The job's process group while it may have live processes, else 0.
static JOB: AtomicI32 = AtomicI32::new(0);
/// The job's marking descriptor, from just before the spawn until the spawn is over.
static MARK: Mutex<Option<Mark>> = Mutex::new(None);

/// The keeper's process name, so that an outer keeper waits for an inner one instead of
/// killing it before it has done its work (with heimdall's executable: see `reach.rs`).
const NAME: &CStr = c"heimdall-keeper";
/// How long the keeper waits for SIGKILLed processes to disappear (as the supervisor does).
const AFTER_KILL: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

const MSG_SOCKETS: u8 = b'S';
/// The command is about to be spawned: the keeper creates the job's cgroup, and until the
/// process group is known finds the job's processes by descriptor and `HEIMDALL_PID`.
const MSG_SPAWNING: u8 = b'P';
/// Lease mode: the job must be gone by this CLOCK_MONOTONIC time (ns), or the lease may expire.
const MSG_DEADLINE: u8 = b'D';
const MSG_JOB: u8 = b'G';
const MSG_GONE: u8 = b'R';
/// The inode of the job's marking descriptor (a pipe).
const MSG_MARK: u8 = b'M';

/// Forks the keeper. Must run before heimdall has any thread: the child of a multi-threaded
/// fork may only call async-signal-safe functions, and the keeper allocates.
pub fn start() -> io::Result<()> {
    let (heimdall_end, keeper_end) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // Pids fit in pid_t (at most 2^22 on Linux).
    let heimdall = std::process::id() as libc::pid_t;
    // SAFETY: heimdall is single-threaded here (see above), so the child may do anything.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(heimdall_end);
            watch::keep(keeper_end, heimdall)
        }
        pid => {
            drop(keeper_end);
            *lock(&SOCKET) = Some(heimdall_end);
            reap::set_keeper(pid);
            Ok(())
        }
    }
}

/// Hands the keeper a duplicate of each of `sockets`, the connection's (see
/// `db::socket::opened_since`): if heimdall dies, the keeper holds the connection, and with it
/// the lock, until the job is gone. Handing over an extra one would only keep it open a little
/// longer if heimdall dies.
pub fn hand_over(sockets: &[RawFd]) {
    if sockets.is_empty() {
        log::debug("keeper: found no new connection socket to hand over");
        return;
    }
    log::debug(format!("keeper: handing over sockets {sockets:?}"));
    // SAFETY: each is the socket of the open connection, which its session owns and keeps open
    // while this sends a duplicate of it.
    let fds: Vec<BorrowedFd> = sockets
        .iter()
        .map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) })
        .collect();
    send(&[MSG_SOCKETS], &fds);
}

/// The command is about to start: marks the job (`process/mark.rs`) and tells the keeper how to find
/// it, so that if heimdall dies before [`job_started`], the keeper still finds what the command
/// started; the keeper creates the job's cgroup meanwhile.
pub fn job_spawning() {
    let mark = Mark::prepare();
    if let Some(inode) = mark.as_ref().and_then(Mark::inode) {
        log::debug(format!(
            "keeper: the command's processes inherit descriptor {} (or the next free one), pipe:[{inode}]",
            mark::MARK_FD
        ));
        let mut msg = vec![MSG_MARK];
        msg.extend_from_slice(&inode.to_ne_bytes());
        send(&msg, &[]);
    }
    *lock(&MARK) = mark;
    crate::db::set_job_alive(true);
    send(&[MSG_SPAWNING], &[]);
}

/// What the command's forked child does with the job's mark before exec.
pub fn child_mark() -> InChild {
    lock(&MARK).as_ref().map_or(InChild::NONE, Mark::in_child)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lease mode: the job must be gone by `deadline`, when the lease could expire. heimdall's own
/// supervisor stops it before then; the keeper kills it at `deadline` in case heimdall cannot
/// (stopped with SIGSTOP, or wedged), since a lease, unlike an advisory lock, does not stay
/// held for a heimdall that is alive but silent.
pub fn job_deadline(deadline: Instant) {
    let now_ns = monotonic_ns();
    let left = deadline.saturating_duration_since(Instant::now());
    let at = now_ns.saturating_add(i64::try_from(left.as_nanos()).unwrap_or(i64::MAX));
    let mut msg = vec![MSG_DEADLINE];
    msg.extend_from_slice(&at.to_ne_bytes());
    send(&msg, &[]);
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `Instant` uses on Linux, read the same way by
/// heimdall and the keeper.
fn monotonic_ns() -> i64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// The command runs as the leader of process group `pgid`: the keeper moves it into the job's
/// cgroup, if there is one. Closes heimdall's copy of the marking descriptor, which only the
/// spawn needed.
pub fn job_started(pgid: i32) {
    JOB.store(pgid, Ordering::Relaxed);
    lock(&MARK).take();
    let mut msg = vec![MSG_JOB];
    msg.extend_from_slice(&pgid.to_ne_bytes());
    send(&msg, &[]);
}

/// Every process of the job is gone (or none started: the spawn failed): from now on the keeper
/// has nothing to kill, and must not signal a process group id that may be reused.
pub fn job_gone() {
    JOB.store(0, Ordering::Relaxed);
    crate::db::set_job_alive(false);
    send(&[MSG_GONE], &[]);
    // A spawn that failed leaves the mark untaken.
    lock(&MARK).take();
    if keeper_died() {
        // The keeper would have removed the job's cgroup as it exited; now nobody else can.
        cgroup::remove_for(std::process::id());
    }
}

/// Whether the keeper has died while heimdall runs (someone killed it): reaped already, or
/// exited and not yet reaped. An error (ECHILD: reaped meanwhile) counts as died.
fn keeper_died() -> bool {
    match reap::keeper() {
        Some(pid) => reap::exited(pid).unwrap_or(true),
        None => lock(&SOCKET).is_some(),
    }
}

/// Ends the keeper as heimdall exits: closes heimdall's end of the socket and waits for the
/// keeper to exit. A keeper left to exit on its own a moment later would, under an outer
/// heimdall, count as a leftover of the outer job. If the job still runs (heimdall failed),
/// the keeper kills it first, while heimdall still holds the connection.
pub fn finish() {
    let socket = lock(&SOCKET).take();
    let pid = reap::take_keeper();
    let Some(socket) = socket else {
        return;
    };
    drop(socket);
    // Only under an outer heimdall (which set HEIMDALL_PID for its job) could the keeper, still
    // exiting, count as a leftover; otherwise it ends on its own, and heimdall's exit does not
    // wait for it (about a millisecond per run, and up to a grace period more for a job that
    // ended while the keeper was moving it into its cgroup: see `cgroup.rs`). So only a nested
    // heimdall pays that, at the exit of a job shorter than the move.
    if let Some(pid) = pid.and_then(Pid::from_raw)
        && std::env::var_os(environ::ENV_PID).is_some()
    {
        // EINTR or ECHILD (the SIGCHLD handler reaped it first) both mean there is nothing left
        // to wait for.
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}

/// For heimdall's own failures (a panic, an internal error): SIGKILLs the job's process group
/// at once. The keeper, which still believes the job runs, does the rest once heimdall exits.
pub fn stop_job_now() {
    if let Some(pgid) = Pid::from_raw(JOB.load(Ordering::Relaxed)) {
        let _ = rustix::process::kill_process_group(pgid, Signal::KILL);
    }
}

/// One message to the keeper, with descriptors attached. Errors are ignored: a keeper that is
/// gone cannot be helped, and the supervisor still stops the job while heimdall lives.
fn send(msg: &[u8], fds: &[BorrowedFd<'_>]) {
    let socket = lock(&SOCKET);
    let Some(socket) = socket.as_ref() else {
        return;
    };
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        control.push(SendAncillaryMessage::ScmRights(fds));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    );
    if let Err(e) = sent {
        log::debug(format!("keeper: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepers_name_fits_the_kernels_sixteen_bytes() {
        assert!(NAME.to_bytes_with_nul().len() <= 16);
    }
}
