//! The keeper: a tiny process, forked before heimdall starts any thread, that makes sure no
//! process of the job outlives the lock when heimdall itself dies without cleaning up (SIGKILL,
//! the OOM killer, a crash).
//!
//! heimdall and the keeper share a socket pair. heimdall tells the keeper the job's marking
//! descriptor (`mark.rs`) before it spawns the command, the command's process group once the
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
//! must not hold up the kill (see `sink.rs`), and it is written only once the lock is released.
//!
//! Not responsible for stopping the job while heimdall lives (the supervisor does), nor for
//! processes that escaped every mark, or that belong to another user (see the README, "What
//! happens when heimdall itself dies").

mod cgroup;
mod mark;
mod reach;
mod watch;

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

pub use mark::InChild;
use mark::Mark;

use crate::log;

/// heimdall's end of the socket pair, -1 without a keeper.
static SOCKET: AtomicI32 = AtomicI32::new(-1);
/// The keeper's pid, 0 without one.
static PID: AtomicI32 = AtomicI32::new(0);
/// The job's process group while it may have live processes, else 0.
static JOB: AtomicI32 = AtomicI32::new(0);
/// The job's marking descriptor, from just before the spawn until the spawn is over.
static MARK: Mutex<Option<Mark>> = Mutex::new(None);

/// The keeper's process name, so that an outer keeper waits for an inner one instead of
/// killing it before it has done its work (with heimdall's executable: see `reach.rs`).
const NAME: &[u8] = b"heimdall-keeper\0";
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
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Pids fit in pid_t (at most 2^22 on Linux).
    let heimdall = std::process::id() as libc::pid_t;
    // SAFETY: heimdall is single-threaded here (see above), so the child may do anything.
    match unsafe { libc::fork() } {
        -1 => {
            let err = io::Error::last_os_error();
            // SAFETY: both descriptors are ours and used nowhere else.
            unsafe {
                libc::close(fds[0]);
                libc::close(fds[1]);
            }
            Err(err)
        }
        0 => {
            // SAFETY: heimdall's end belongs to heimdall.
            unsafe { libc::close(fds[0]) };
            watch::keep(fds[1], heimdall)
        }
        pid => {
            // SAFETY: the keeper's end belongs to the keeper.
            unsafe { libc::close(fds[1]) };
            SOCKET.store(fds[0], Ordering::Relaxed);
            PID.store(pid, Ordering::Relaxed);
            Ok(())
        }
    }
}

/// The keeper's pid, so that heimdall does not count it as a leftover of the job.
pub fn pid() -> Option<i32> {
    Some(PID.load(Ordering::Relaxed)).filter(|&p| p != 0)
}

/// Called for every child heimdall reaps: once the keeper is gone its pid may be reused, by a
/// process of the job even, which must then not be mistaken for the keeper.
pub fn reaped(pid: i32) {
    if pid != 0
        && PID
            .compare_exchange(pid, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        log::warn(format!(
            "the keeper process (pid {pid}) died; if heimdall is killed now, only the command's own process gets the parent-death signal"
        ));
    }
}

/// The socket descriptors heimdall has open now: call before connecting, and hand the keeper
/// the ones that are new afterwards ([`hand_over_new_sockets`]).
pub fn sockets() -> Vec<RawFd> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| is_connected_stream(fd))
        .collect()
}

/// Hands the keeper a duplicate of every connected stream socket opened since `before`, and
/// returns them: the `postgres` crate does not expose its socket, and a connect opens exactly
/// one that stays (failed attempts on other hosts are closed). Handing over an extra one would
/// only keep it open a little longer if heimdall dies.
pub fn hand_over_new_sockets(before: &[RawFd]) -> Vec<RawFd> {
    let new: Vec<RawFd> = sockets()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .collect();
    if new.is_empty() {
        log::debug("keeper: found no new connection socket to hand over");
        return new;
    }
    log::debug(format!("keeper: handing over sockets {new:?}"));
    send(&[MSG_SOCKETS], &new);
    new
}

/// The command is about to start: marks the job (`mark.rs`) and tells the keeper how to find
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
    // SAFETY: timespec is plain data; clock_gettime writes into it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC always exists on Linux; `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
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
    match pid() {
        Some(pid) => crate::child::exited(pid).unwrap_or(true),
        None => SOCKET.load(Ordering::Relaxed) >= 0,
    }
}

/// Ends the keeper as heimdall exits: closes heimdall's end of the socket and waits for the
/// keeper to exit. A keeper left to exit on its own a moment later would, under an outer
/// heimdall, count as a leftover of the outer job. If the job still runs (heimdall failed),
/// the keeper kills it first, while heimdall still holds the connection.
pub fn finish() {
    let sock = SOCKET.swap(-1, Ordering::Relaxed);
    let pid = PID.swap(0, Ordering::Relaxed);
    if sock < 0 {
        return;
    }
    // SAFETY: the descriptor is ours, and no longer published in SOCKET.
    unsafe { libc::close(sock) };
    // Only under an outer heimdall (which set HEIMDALL_PID for its job) could the keeper, still
    // exiting, count as a leftover; otherwise it ends on its own, and heimdall's exit does not
    // wait for it (about a millisecond per run, and up to a grace period more for a job that
    // ended while the keeper was moving it into its cgroup: see `cgroup.rs`). So only a nested
    // heimdall pays that, at the exit of a job shorter than the move.
    if pid > 0 && std::env::var_os(crate::environ::ENV_PID).is_some() {
        // SAFETY: `pid` is our child; a null status pointer is allowed. EINTR or ECHILD (the
        // SIGCHLD handler reaped it first) both mean there is nothing left to wait for.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    }
}

/// For heimdall's own failures (a panic, an internal error): SIGKILLs the job's process group
/// at once. The keeper, which still believes the job runs, does the rest once heimdall exits.
pub fn stop_job_now() {
    let pgid = JOB.load(Ordering::Relaxed);
    if pgid != 0 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
}

fn is_connected_stream(fd: RawFd) -> bool {
    // SAFETY: stat is plain data; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid stat buffer for fstat to fill; a bad descriptor only fails.
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return false;
    }
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for getsockopt to write an int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    };
    if rc != 0 || kind != libc::SOCK_STREAM {
        return false;
    }
    // SAFETY: sockaddr_storage is plain data and large enough for any address.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` describe a writable buffer of that size.
    unsafe { libc::getpeername(fd, (&raw mut addr).cast(), &mut len) == 0 }
}

/// One message to the keeper, with descriptors attached. Errors are ignored: a keeper that is
/// gone cannot be helped, and the supervisor still stops the job while heimdall lives.
fn send(msg: &[u8], fds: &[RawFd]) {
    let sock = SOCKET.load(Ordering::Relaxed);
    if sock < 0 {
        return;
    }
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut libc::c_void,
        iov_len: msg.len(),
    };
    let fds_len = std::mem::size_of_val(fds) as u32;
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE only computes a size.
        unsafe { libc::CMSG_SPACE(fds_len) as usize }
    };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer has CMSG_SPACE(fds_len) bytes, room for one header and
        // the descriptors, so CMSG_FIRSTHDR is non-null and CMSG_DATA has fds_len bytes.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fds_len) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fds_len as usize,
            );
        }
    }
    // SAFETY: `hdr` is fully initialised above.
    let rc = unsafe { libc::sendmsg(sock, &hdr, libc::MSG_NOSIGNAL) };
    if rc < 0 {
        log::debug(format!("keeper: {}", io::Error::last_os_error()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepers_name_fits_the_kernels_sixteen_bytes() {
        assert!(NAME.len() <= 16 && NAME.ends_with(b"\0"));
    }
}
