//! The keeper process itself, from its fork to its exit: it detaches from heimdall, takes in
//! what heimdall tells it about the job (`keeper/mod.rs` sends it), gives the job its cgroup
//! (`cgroup.rs`), and when heimdall's end of the socket closes while the job may run, or a
//! lease's deadline passes unanswered, kills the job (`reach.rs`) before it lets the lock go,
//! and says so only then.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

use super::cgroup::{self, Cgroup};
use super::{
    MSG_DEADLINE, MSG_GONE, MSG_JOB, MSG_MARK, MSG_SOCKETS, MSG_SPAWNING, NAME, monotonic_ns, reach,
};
use crate::log;

/// The most descriptors one message from heimdall carries: the connection's sockets.
const MOST_FDS: usize = 32;

/// The keeper's life: wait for heimdall's end of the socket to close, then make sure the job
/// is gone. Never returns.
pub fn keep(sock: OwnedFd, heimdall: i32) -> ! {
    detach(sock.as_raw_fd());
    let mut job = reach::Job::default();
    let mut running = false;
    let mut deadline: Option<i64> = None;
    // Created when the spawn is announced, removed as the keeper exits.
    let mut job_cgroup: Option<Cgroup> = None;
    // Copies of the connection's socket: the lock is released when the last one closes.
    let mut connection: Vec<OwnedFd> = Vec::new();
    let mut buf = [0u8; 16];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MOST_FDS))];
    loop {
        if let Some(at) = deadline {
            match wait_readable(&sock, at) {
                Readable::Yes => {}
                Readable::Interrupted => continue,
                Readable::DeadlinePassed => {
                    let gone = reach::kill_job(&job, heimdall);
                    log::error(format!(
                        "heimdall (pid {heimdall}) did not renew the lease in time (stopped?); the keeper killed the command before the lease could expire"
                    ));
                    if !gone {
                        log::error(reach::survivors_message());
                    }
                    (job, running, deadline) = (reach::Job::default(), false, None);
                    continue;
                }
            }
        }
        let mut control = RecvAncillaryBuffer::new(&mut space);
        // MSG_CMSG_CLOEXEC keeps received descriptors out of anything the keeper might run (it
        // runs nothing).
        let received = rustix::net::recvmsg(
            &sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let n = match received {
            Err(Errno::INTR) => continue,
            Ok(msg) if msg.bytes > 0 => msg.bytes,
            // heimdall's end is closed (or the socket failed, which comes to the same).
            _ => break,
        };
        let fds: Vec<OwnedFd> = control
            .drain()
            .flat_map(|message| match message {
                RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                _ => Vec::new(),
            })
            .collect();
        match buf[0] {
            MSG_SOCKETS => connection.extend(fds),
            MSG_MARK if n >= 9 => {
                let mut inode = [0u8; 8];
                inode.copy_from_slice(&buf[1..9]);
                job.descriptor = Some(format!("pipe:[{}]", u64::from_ne_bytes(inode)));
            }
            MSG_SPAWNING => {
                running = true;
                if job_cgroup.is_none() {
                    job_cgroup = Cgroup::create(heimdall)
                        .inspect_err(|why| {
                            log::debug(format!("keeper: no cgroup for the job: {why}"))
                        })
                        .ok();
                }
                job.cgroup = job_cgroup.as_ref().map(|c| c.path.clone());
            }
            MSG_JOB if n >= 5 => {
                job.pgid = i32::from_ne_bytes([buf[1], buf[2], buf[3], buf[4]]);
                running = true;
                if let Some(cgroup) = &job_cgroup {
                    cgroup.start_moving(job.pgid, heimdall);
                }
            }
            MSG_DEADLINE if n >= 9 => {
                let mut at = [0u8; 8];
                at.copy_from_slice(&buf[1..9]);
                deadline = Some(i64::from_ne_bytes(at));
            }
            MSG_GONE => (job, running, deadline) = (reach::Job::default(), false, None),
            _ => {}
        }
    }
    if running {
        let gone = reach::kill_job(&job, heimdall);
        // The job is gone: let the lock go now, before anything is written.
        drop(connection);
        log::error(format!(
            "heimdall (pid {heimdall}) ended while its command ran; the keeper killed the command's processes, then released the lock"
        ));
        if !gone {
            log::error(reach::survivors_message());
        }
    }
    if let Some(job_cgroup) = job_cgroup {
        // Whoever reads stderr to its end must not wait for the removal, which waits for a
        // move still in flight (`cgroup.rs`); a debug line about a failed removal is lost.
        release_stderr();
        cgroup::remove(&job_cgroup.path);
    }
    // SAFETY: _exit ends the process without running anything of heimdall's.
    unsafe { libc::_exit(0) }
}

/// Points stderr, and the sink's own copy of it, at /dev/null: the keeper's last hold on the
/// pipe or terminal heimdall's caller reads goes, while the descriptor numbers stay valid for a
/// thread that still writes.
fn release_stderr() {
    // SAFETY: open, dup2 and close on descriptors of the keeper's; a failure leaves stderr open,
    // which only delays whoever reads it.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        for fd in [Some(libc::STDERR_FILENO), log::sink_fd()]
            .into_iter()
            .flatten()
        {
            libc::dup2(null, fd);
        }
        libc::close(null);
    }
}

enum Readable {
    Yes,
    Interrupted,
    DeadlinePassed,
}

/// Waits until `sock` has a message (or EOF), or the CLOCK_MONOTONIC time `at` passes.
fn wait_readable(sock: &OwnedFd, at: i64) -> Readable {
    let left_ms = at.saturating_sub(monotonic_ns()) / 1_000_000;
    if left_ms <= 0 {
        return Readable::DeadlinePassed;
    }
    let left = Duration::from_millis(left_ms.unsigned_abs());
    let timeout = Timespec::try_from(left).ok();
    match rustix::event::poll(&mut [PollFd::new(sock, PollFlags::IN)], timeout.as_ref()) {
        Ok(0) => Readable::DeadlinePassed,
        Ok(_) => Readable::Yes,
        Err(Errno::INTR) => Readable::Interrupted,
        // poll failing otherwise would be a bug; reading then blocks as before the deadline.
        Err(_) => Readable::Yes,
    }
}

/// Makes the keeper independent of what happens to heimdall: its own process group (a signal
/// to heimdall's group, ^C or `kill -- -PGID`, must not take it along), every catchable signal
/// blocked, no descriptor of heimdall's but stderr (and its non-blocking copy, `log/sink.rs`) and its
/// socket, and `/` as its directory.
fn detach(sock: RawFd) {
    let _ = rustix::process::setpgid(None, None);
    let _ = rustix::thread::set_name(NAME);
    // Blocked rather than ignored: one rt_sigprocmask instead of one rt_sigaction per signal
    // (55), with the same effect for a process that runs nothing: a blocked signal stays
    // pending and never acts (SIGKILL and SIGSTOP cannot be blocked; the faults are left out so
    // that a fault of the keeper's still ends it). SIGCHLD is left alone as before.
    // SAFETY: sigset_t is plain data, initialised by sigfillset before use; the call changes
    // only this (single-threaded) process's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for signal in [
            libc::SIGCHLD,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut set, signal);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    if let Ok(null) = rustix::fs::open("/dev/null", OFlags::RDWR, Mode::empty()) {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
    }
    let _ = rustix::process::chdir("/");
    let keep = [sock, log::sink_fd().unwrap_or(sock)];
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| fd > 2 && !keep.contains(&fd))
        .collect();
    for fd in open {
        // SAFETY: nothing in the keeper uses these descriptors (the directory handle that
        // listed them is closed already; closing a stale number fails harmlessly).
        unsafe { libc::close(fd) };
    }
}
