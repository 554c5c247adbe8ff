//! The keeper process itself, from its fork to its exit: it detaches from heimdall, takes in
//! what heimdall tells it about the job (`keeper/mod.rs` sends it), gives the job its cgroup
//! (`cgroup.rs`), and when heimdall's end of the socket closes while the job may run, or a
//! lease's deadline passes unanswered, kills the job (`reach.rs`) before it lets the lock go,
//! and says so only then.

use std::io;
use std::os::fd::RawFd;

use super::cgroup::{self, Cgroup};
use super::{
    MSG_DEADLINE, MSG_GONE, MSG_JOB, MSG_MARK, MSG_SOCKETS, MSG_SPAWNING, NAME, monotonic_ns, reach,
};
use crate::log;

/// The keeper's life: wait for heimdall's end of the socket to close, then make sure the job
/// is gone. Never returns.
pub fn keep(sock: RawFd, heimdall: i32) -> ! {
    detach(sock);
    let mut job = reach::Job::default();
    let mut running = false;
    let mut deadline: Option<i64> = None;
    // Created when the spawn is announced, removed as the keeper exits.
    let mut job_cgroup: Option<Cgroup> = None;
    // Copies of the connection's socket: the lock is released when the last one closes.
    let mut connection = Vec::new();
    let mut buf = [0u8; 16];
    let mut control = [0u8; 256];
    loop {
        if let Some(at) = deadline {
            match wait_readable(sock, at) {
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
        let fds = received_fds(&hdr);
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
        for fd in connection {
            // SAFETY: descriptors received for this purpose, used nowhere else.
            unsafe { libc::close(fd) };
        }
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

/// The descriptors that came with a message (SCM_RIGHTS).
fn received_fds(hdr: &libc::msghdr) -> Vec<RawFd> {
    let mut fds = Vec::new();
    // SAFETY: the CMSG macros walk the control buffer recvmsg filled, within msg_controllen;
    // each SCM_RIGHTS payload holds cmsg_len - CMSG_LEN(0) bytes of descriptors, read
    // unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / size_of::<RawFd>() {
                    fds.push(std::ptr::read_unaligned(data.add(i)));
                }
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    fds
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
/// ignored, no descriptor of heimdall's but stderr (and its non-blocking copy, `log/sink.rs`) and its
/// socket, and `/` as its directory.
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
