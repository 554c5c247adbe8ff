//! The file-descriptor limit, checked once before anything is opened that needs a descriptor:
//! with too few, something deep inside (the `postgres` crate's runtime, the spawn's error pipe,
//! the keeper's hand-over of the connection) would fail halfway, as a panic or a misleading
//! error after the lock was taken. One clear line before the lock is better.

use anyhow::Result;

use crate::exit::{Failure, fail};

/// Descriptors a run may have open at once besides those it started with: the keeper's socket
/// pair, the signal pipe, the connection's socket and runtime (three), the job's marking pipe
/// (two), the spawn's error pipe (two), a /proc directory and file, with room
/// for what TLS, name lookups and `--metrics-file` open for a moment. 13 at most were measured
/// (`strace` of a run with `-vv --report json --metrics-file`).
pub const NEEDED: usize = 16;

/// Fails unless [`NEEDED`] more descriptors can be opened, by opening and closing them (the
/// lowest free numbers count, wherever the inherited ones sit).
pub fn check() -> Result<()> {
    // Copies of stdin (opened by log::init if it was closed), closed as they drop.
    let mut probes = Vec::with_capacity(NEEDED);
    while probes.len() < NEEDED {
        match rustix::io::fcntl_dupfd_cloexec(std::io::stdin(), 0) {
            Ok(fd) => probes.push(fd),
            Err(_) => break,
        }
    }
    let short = probes.len() < NEEDED;
    drop(probes);
    if !short {
        return Ok(());
    }
    let (limit, open) = limit_and_open();
    Err(fail(
        Failure::Internal,
        format!(
            "too few file descriptors: the limit (ulimit -n) is {limit} and {open} are open, but heimdall needs {NEEDED} more; raise the limit to at least {} (ulimit -n, systemd's LimitNOFILE=, prlimit --nofile)",
            open + NEEDED
        ),
    ))
}

/// The soft limit, and how many descriptors are open below it, counted without opening one
/// (/proc/self/fd would need one).
fn limit_and_open() -> (u64, usize) {
    // None: unlimited.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    let highest = i32::try_from(limit.min(65536)).unwrap_or(65536);
    let open = (0..highest)
        // SAFETY: F_GETFD only inspects the descriptor.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .count();
    (limit, open)
}
