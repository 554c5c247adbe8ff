//! The keeper: a tiny process, forked before heimdall starts any thread, that makes sure no
//! process of the job outlives the lock when heimdall itself dies without cleaning up (SIGKILL,
//! the OOM killer, a crash).
//!
//! heimdall and the keeper share a socket pair. heimdall tells the keeper the command's process
//! group once the command runs, that the job is gone once it is, and hands it a duplicate of
//! the database connection's socket. When heimdall's end closes (heimdall exited or died)
//! while the job still runs, the keeper SIGKILLs the process group and every process it can see
//! that carries this heimdall's `HEIMDALL_PID` in its environment, waits until they are gone,
//! and only then exits. Its exit closes the last copy of the connection's socket, so the server
//! cannot release the lock before the job is gone. On a clean run heimdall ends its session
//! itself (the lock is released by the server at once) and the keeper just exits.
//!
//! Not responsible for stopping the job while heimdall lives (the supervisor does), nor for
//! processes that left the group *and* cleared their environment, or that belong to another
//! user (see the README, "What happens when heimdall itself dies").

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::environ::ENV_PID;
use crate::log;

/// heimdall's end of the socket pair, -1 without a keeper.
static SOCKET: AtomicI32 = AtomicI32::new(-1);
/// The keeper's pid, 0 without one.
static PID: AtomicI32 = AtomicI32::new(0);
/// The job's process group while it may have live processes, else 0.
static JOB: AtomicI32 = AtomicI32::new(0);

/// The keeper's process name, so that an outer keeper waits for an inner one instead of
/// killing it before it has done its work.
const NAME: &[u8] = b"heimdall-keeper\0";
/// How long the keeper waits for SIGKILLed processes to disappear (as the supervisor does).
const AFTER_KILL: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

const MSG_SOCKETS: u8 = b'S';
/// The command is about to be spawned: until its process group is known, the keeper finds its
/// processes by `HEIMDALL_PID` alone.
const MSG_SPAWNING: u8 = b'P';
/// Lease mode: the job must be gone by this CLOCK_MONOTONIC time (ns), or the lease may expire.
const MSG_DEADLINE: u8 = b'D';
const MSG_JOB: u8 = b'G';
const MSG_GONE: u8 = b'R';

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
            keep(fds[1], heimdall)
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

/// The command is about to start: if heimdall dies before [`job_started`], the keeper still
/// finds what the command started by its environment.
pub fn job_spawning() {
    send(&[MSG_SPAWNING], &[]);
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

/// The command runs as the leader of process group `pgid`.
pub fn job_started(pgid: i32) {
    JOB.store(pgid, Ordering::Relaxed);
    let mut msg = vec![MSG_JOB];
    msg.extend_from_slice(&pgid.to_ne_bytes());
    send(&msg, &[]);
}

/// Every process of the job is gone: from now on the keeper has nothing to kill, and must not
/// signal a process group id that may be reused.
pub fn job_gone() {
    JOB.store(0, Ordering::Relaxed);
    send(&[MSG_GONE], &[]);
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
    // wait for it (about a millisecond per run).
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

/// The keeper's life: wait for heimdall's end of the socket to close, then make sure the job
/// is gone. Never returns.
fn keep(sock: RawFd, heimdall: i32) -> ! {
    detach(sock);
    let mut job = 0;
    let mut spawning = false;
    let mut deadline: Option<i64> = None;
    // Descriptors received are kept open, unread, until the keeper exits.
    let mut buf = [0u8; 16];
    let mut control = [0u8; 256];
    loop {
        if let Some(at) = deadline {
            match wait_readable(sock, at) {
                Readable::Yes => {}
                Readable::Interrupted => continue,
                Readable::DeadlinePassed => {
                    log::error(format!(
                        "heimdall (pid {heimdall}) did not renew the lease in time (stopped?); the keeper is killing the command before the lease can expire"
                    ));
                    kill_job(job, heimdall);
                    (job, spawning, deadline) = (0, false, None);
                    continue;
                }
            }
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; its pointers refer to the buffers above.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = control.len() as _;
        // SAFETY: `hdr` describes writable buffers; MSG_CMSG_CLOEXEC keeps received
        // descriptors out of anything the keeper might run (it runs nothing).
        let n = unsafe { libc::recvmsg(sock, &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        match buf[0] {
            MSG_SPAWNING => spawning = true,
            MSG_JOB if n >= 5 => job = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]),
            MSG_DEADLINE if n >= 9 => {
                let mut at = [0u8; 8];
                at.copy_from_slice(&buf[1..9]);
                deadline = Some(i64::from_ne_bytes(at));
            }
            MSG_GONE => (job, spawning, deadline) = (0, false, None),
            _ => {}
        }
    }
    if job != 0 || spawning {
        log::error(format!(
            "heimdall (pid {heimdall}) ended while its command ran; the keeper is killing the command's processes before the lock can be released"
        ));
        kill_job(job, heimdall);
    }
    // SAFETY: _exit ends the process without running anything of heimdall's.
    unsafe { libc::_exit(0) }
}

enum Readable {
    Yes,
    Interrupted,
    DeadlinePassed,
}

/// Waits until `sock` has a message (or EOF), or the CLOCK_MONOTONIC time `at` passes.
fn wait_readable(sock: RawFd, at: i64) -> Readable {
    let left_ms = at.saturating_sub(monotonic_ns()) / 1_000_000;
    if left_ms <= 0 {
        return Readable::DeadlinePassed;
    }
    let mut fd = libc::pollfd {
        fd: sock,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one valid pollfd.
    let rc = unsafe { libc::poll(&mut fd, 1, left_ms.min(i64::from(i32::MAX)) as libc::c_int) };
    match rc {
        0 => Readable::DeadlinePassed,
        n if n > 0 => Readable::Yes,
        _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {
            Readable::Interrupted
        }
        // poll failing otherwise would be a bug; reading then blocks as before the deadline.
        _ => Readable::Yes,
    }
}

/// Makes the keeper independent of what happens to heimdall: its own process group (a signal
/// to heimdall's group, ^C or `kill -- -PGID`, must not take it along), every catchable signal
/// ignored, no descriptor of heimdall's but stderr and its socket, and `/` as its directory.
fn detach(sock: RawFd) {
    // SAFETY: these calls have no memory-safety preconditions; the name is NUL-terminated.
    unsafe {
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_NAME, NAME.as_ptr());
        for signal in 1..=libc::SIGRTMAX() {
            if ![
                libc::SIGKILL,
                libc::SIGSTOP,
                libc::SIGCHLD,
                libc::SIGSEGV,
                libc::SIGBUS,
                libc::SIGILL,
                libc::SIGFPE,
                libc::SIGABRT,
            ]
            .contains(&signal)
            {
                libc::signal(signal, libc::SIG_IGN);
            }
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
        }
        let _ = libc::chdir(c"/".as_ptr());
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| fd > 2 && fd != sock)
        .collect();
    for fd in open {
        // SAFETY: nothing in the keeper uses these descriptors (the directory handle that
        // listed them is closed already; closing a stale number fails harmlessly).
        unsafe { libc::close(fd) };
    }
}

/// SIGKILLs the process group and every process that carries `HEIMDALL_PID=<heimdall>`, until
/// none is left or [`AFTER_KILL`] has passed. An inner heimdall's keeper (a nested run of
/// another lock) is waited for, not killed: it is stopping that run's job.
fn kill_job(pgid: i32, heimdall: i32) {
    let marker = format!("\0{ENV_PID}={heimdall}\0").into_bytes();
    let me = std::process::id() as libc::pid_t;
    let deadline = Instant::now().checked_add(AFTER_KILL);
    loop {
        // pgid 0 (the group not known yet) would name the keeper's own group.
        if pgid > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        let mut alive = false;
        for (pid, fields) in crate::child::processes() {
            if pid == me || fields.state == "Z" || fields.state == "X" {
                continue;
            }
            if pgid > 0 && fields.pgrp == pgid {
                alive = true;
            } else if carries(pid, &marker) {
                alive = true;
                if !is_keeper(pid) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if !alive {
            return;
        }
        if deadline.is_none_or(|d| Instant::now() >= d) {
            log::error(format!(
                "processes of the command survived SIGKILL for {}s (uninterruptible sleep?); releasing the lock anyway",
                AFTER_KILL.as_secs()
            ));
            return;
        }
        std::thread::sleep(POLL);
    }
}

/// Whether the environment `pid` started with holds `marker` (`\0NAME=VALUE\0`).
fn carries(pid: i32, marker: &[u8]) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut framed = Vec::with_capacity(environ.len() + 2);
    framed.push(0);
    framed.extend_from_slice(&environ);
    framed.push(0);
    framed.windows(marker.len()).any(|w| w == marker)
}

fn is_keeper(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.strip_suffix(b"\n") == Some(&NAME[..NAME.len() - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keepers_name_fits_the_kernels_sixteen_bytes() {
        assert!(NAME.len() <= 16 && NAME.ends_with(b"\0"));
    }
}
