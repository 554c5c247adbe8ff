//! Forking and executing the command, born straight into the job's cgroup where there is one.
//!
//! Moving a process into a cgroup after it exists (writing to `cgroup.procs`) takes the
//! kernel's cgroup_threadgroup_rwsem for writing, which waits for an RCU grace period: 12–17 ms
//! per run measured here, before the command could start, with the lock held. `clone3` with
//! `CLONE_INTO_CGROUP` (Linux 5.7) creates the process in the cgroup instead, for 0.2 ms.
//! The standard library cannot do that, so this does what its spawn did: a child in a process
//! group of its own, with heimdall's environment plus the command's variables, the signal mask
//! emptied and SIGPIPE's default action restored (Rust ignores SIGPIPE), then `execvpe`, which
//! searches `PATH` and runs a script without `#!` with `/bin/sh`, as `execvp` does. An exec that
//! fails sends its errno back over a close-on-exec pipe.
//!
//! On a kernel without `clone3` (before 5.3) this forks; without `CLONE_INTO_CGROUP` (before
//! 5.7) it forks and the child moves itself in (`keeper::InChild`), paying the grace period.
//!
//! Between fork and exec the child calls only async-signal-safe functions, allocates nothing
//! and writes nothing but the errno of a failed exec to its own pipe.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::keeper::InChild;

/// `CLONE_INTO_CGROUP`, a 64-bit flag (the libc crate's constant is an overflowing c_int).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The kernel's `struct clone_args` (the same on every architecture: all fields are u64).
#[repr(C, align(8))]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What the child needs, built before the fork: it may not allocate after it.
struct Prepared {
    argv: Vec<CString>,
    envp: Vec<CString>,
}

/// Starts `command` with heimdall's environment, `env` set and `unset` removed, and returns
/// its pid once it has executed (or exec's error), born in the job's cgroup if `mark` has one
/// (see `keeper::InChild`).
pub fn launch(
    command: &[OsString],
    env: &[(&str, String)],
    unset: &[&str],
    mark: InChild,
) -> io::Result<i32> {
    let prepared = prepare(command, env, unset)?;
    let argv = pointers(&prepared.argv);
    let envp = pointers(&prepared.envp);
    // Pids fit in pid_t (at most 2^22 on Linux).
    let parent = std::process::id() as libc::pid_t;
    let (read_end, write_end) = pipe()?;

    let pid = match fork(mark.cgroup()) {
        Ok(Forked::Child { born_in_cgroup }) => {
            // SAFETY: in the forked child, with everything it needs built before the fork.
            unsafe { exec_child(&argv, &envp, parent, mark, born_in_cgroup, write_end) }
        }
        Ok(Forked::Parent(pid)) => pid,
        Err(e) => {
            close(read_end);
            close(write_end);
            return Err(e);
        }
    };
    close(write_end);
    let failed = read_errno(read_end);
    close(read_end);
    if let Some(errno) = failed {
        // SAFETY: `pid` is our child, which exits at once after reporting; reaping it here
        // keeps the orphan reaper (held off by the caller) from meeting it.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(pid)
}

fn prepare(command: &[OsString], env: &[(&str, String)], unset: &[&str]) -> io::Result<Prepared> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let argv = command
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<io::Result<Vec<_>>>()?;
    let replaced = |name: &OsStr| {
        unset.iter().any(|u| OsStr::new(u) == name)
            || env.iter().any(|(k, _)| OsStr::new(k) == name)
    };
    let mut envp = Vec::new();
    for (name, value) in std::env::vars_os().filter(|(name, _)| !replaced(name)) {
        let mut pair = name.into_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        envp.push(cstring(&pair)?);
    }
    for (name, value) in env {
        envp.push(cstring(format!("{name}={value}").as_bytes())?);
    }
    Ok(Prepared { argv, envp })
}

/// NULL-terminated pointers into `strings`, for execvpe.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

enum Forked {
    /// In the child; whether it was born in the cgroup asked for.
    Child {
        born_in_cgroup: bool,
    },
    Parent(i32),
}

/// `clone3`, into `cgroup` if given; a plain `fork` where the kernel has no `clone3`, or no
/// `CLONE_INTO_CGROUP`.
fn fork(cgroup: Option<RawFd>) -> io::Result<Forked> {
    let mut args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(fd) = cgroup {
        args.flags = CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: a valid clone_args of the size given; without CLONE_VM the child gets a copy of
    // the address space and returns here with 0, as from fork.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw mut args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match rc {
        0 => Ok(Forked::Child {
            born_in_cgroup: cgroup.is_some(),
        }),
        pid if pid > 0 => Ok(Forked::Parent(pid as i32)),
        _ => {
            let err = io::Error::last_os_error();
            // ENOSYS: no clone3 (before 5.3); E2BIG or EINVAL: a clone_args too new for it
            // (before 5.7, no CLONE_INTO_CGROUP).
            if !matches!(
                err.raw_os_error(),
                Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
            ) {
                return Err(err);
            }
            // SAFETY: fork has no memory-safety preconditions; the child only calls
            // async-signal-safe functions (see exec_child).
            match unsafe { libc::fork() } {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(Forked::Child {
                    born_in_cgroup: false,
                }),
                pid => Ok(Forked::Parent(pid)),
            }
        }
    }
}

/// The forked child: set up, then execute the command; on failure report errno over `report`
/// and exit 127.
///
/// # Safety
/// Must run in a freshly forked child; `argv` and `envp` are NULL-terminated arrays of valid
/// C strings.
unsafe fn exec_child(
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    parent: libc::pid_t,
    mark: InChild,
    born_in_cgroup: bool,
    report: RawFd,
) -> ! {
    // SAFETY: only async-signal-safe calls on plain data and our own descriptors.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if libc::setpgid(0, 0) != 0 {
            fail(report);
        }
        // If heimdall is SIGKILLed (OOM killer, kill -9), the kernel kills the command too,
        // so it never runs on without the lock. The signal is tied to the thread that spawns,
        // which is heimdall's main thread and lives until heimdall exits. It reaches only this
        // process, and a set-user-ID program loses it at exec: the keeper covers the rest.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(report);
        }
        // heimdall may have died between fork and prctl; then nobody would deliver the signal.
        if libc::getppid() != parent {
            libc::_exit(crate::exit::INTERNAL.into());
        }
        mark.apply(born_in_cgroup);
        libc::execvpe(argv[0], argv.as_ptr(), envp.as_ptr());
        fail(report)
    }
}

/// Sends errno to the parent and exits.
///
/// # Safety
/// In the forked child only.
unsafe fn fail(report: RawFd) -> ! {
    // SAFETY: errno is readable; write and _exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(report, (&raw const errno).cast(), size_of::<libc::c_int>());
        libc::_exit(127)
    }
}

fn pipe() -> io::Result<(RawFd, RawFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

fn close(fd: RawFd) {
    // SAFETY: a descriptor of ours, used nowhere else.
    unsafe { libc::close(fd) };
}

/// The errno a failed exec sent, or None once the pipe closes without one (exec succeeded).
fn read_errno(fd: RawFd) -> Option<i32> {
    let mut errno: libc::c_int = 0;
    loop {
        // SAFETY: reads at most the size of `errno` into it.
        let n = unsafe { libc::read(fd, (&raw mut errno).cast(), size_of::<libc::c_int>()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return (n == size_of::<libc::c_int>() as isize).then_some(errno);
    }
}
