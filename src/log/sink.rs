//! Where heimdall's and the keeper's messages are written: stderr, in a way that a reader who
//! stops reading (a wedged logger, a full journald stream, `| less` in another window) can never
//! block what protects the lock. A write waits for room only until a deadline, and only where
//! the caller can afford it (see `log/mod.rs`: heimdall writes from a thread of its own; the keeper
//! writes after it has acted).
//!
//! fd 2 itself is never made non-blocking: `O_NONBLOCK` lives on the open file description, which
//! heimdall shares with its command and its parent, whose own writes would then fail with EAGAIN.
//! Instead, per kind of stderr (decided once, by [`Sink::for_stderr`]):
//!
//! - a pipe, FIFO or terminal is opened again through `/proc/self/fd/2`, which gives heimdall an
//!   open file description of its own on the same pipe or terminal, with `O_NONBLOCK`;
//! - a socket (journald's stream: systemd's `StandardError=journal`) cannot be opened that way,
//!   but `send(MSG_DONTWAIT)` makes a single write non-blocking without touching the flags;
//! - a regular file, `/dev/null` and other devices do not wait for a reader: written as they are
//!   (reopening a file would also lose the shared offset that `>>` and `>` rely on);
//! - a pipe, FIFO or terminal that cannot be opened again (another user's pipe: `sudo -u app
//!   heimdall … 2>&1 | logger`; no descriptor left) is written only after `poll` says there is
//!   room, which a concurrent writer can still take first (see [`Sink::Polled`]).
//!
//! Lines of up to `PIPE_BUF` (4096) bytes go into a pipe whole or not at all, never interleaved
//! with the command's output; a longer line goes in pieces as room appears, and a deadline that
//! passes meanwhile leaves it cut short.

use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use rustix::net::SendFlags;

/// How messages reach stderr; see the module docs.
#[derive(Debug)]
pub enum Sink {
    /// Nothing is written: fd 2 is not open (`log::init` opens /dev/null on a closed one).
    Discard,
    /// A non-blocking open file description of fd 2's pipe, FIFO or terminal, heimdall's own.
    Reopened(OwnedFd),
    /// fd 2 is a socket: `send(MSG_DONTWAIT | MSG_NOSIGNAL)`.
    Socket,
    /// fd 2 never waits for a reader (a file, `/dev/null`): plain writes.
    Plain,
    /// A pipe, FIFO or terminal that could not be opened again: `poll` for room, then one write
    /// of at most `PIPE_BUF` bytes. The command, writing to the same pipe between the two calls,
    /// can still make that write wait for a reader.
    Polled,
}

impl Sink {
    /// The sink for fd 2 as it is now. Call once, early: the reopened descriptor is close-on-exec
    /// and must outlive every thread that logs (the keeper keeps it too: `detach` in
    /// `keeper/watch.rs`).
    pub fn for_stderr() -> Sink {
        let Ok(st) = rustix::fs::fstat(io::stderr()) else {
            return Sink::Discard;
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Socket => Sink::Socket,
            // A pipe or FIFO without a reader cannot be opened without blocking (ENXIO); then
            // poll reports the error at once and the write fails, or, should a reader open the
            // FIFO again, succeeds.
            FileType::Fifo => reopen().unwrap_or(Sink::Polled),
            FileType::CharacterDevice if io::stderr().is_terminal() => {
                reopen().unwrap_or(Sink::Polled)
            }
            _ => Sink::Plain,
        }
    }

    /// The descriptor the keeper must keep open, if any.
    pub fn own_fd(&self) -> Option<RawFd> {
        match self {
            Sink::Reopened(fd) => Some(fd.as_raw_fd()),
            _ => None,
        }
    }

    /// Writes all of `bytes`, waiting for room until `deadline` (`None`: as long as it takes).
    /// Returns false if anything was left unwritten.
    pub fn write_all(&self, mut bytes: &[u8], deadline: Option<Instant>) -> bool {
        while !bytes.is_empty() {
            let n = match self {
                Sink::Discard => return false,
                Sink::Plain => rustix::io::write(io::stderr(), bytes),
                Sink::Reopened(fd) => rustix::io::write(fd, bytes),
                // MSG_NOSIGNAL turns SIGPIPE into EPIPE.
                Sink::Socket => rustix::net::send(
                    io::stderr(),
                    bytes,
                    SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
                ),
                Sink::Polled => {
                    if !wait_writable(io::stderr(), deadline) {
                        return false;
                    }
                    let most = bytes.len().min(libc::PIPE_BUF);
                    rustix::io::write(io::stderr(), &bytes[..most])
                }
            };
            match n {
                Ok(n) => bytes = &bytes[n..],
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    let room = match self {
                        Sink::Reopened(fd) => wait_writable(fd, deadline),
                        _ => wait_writable(io::stderr(), deadline),
                    };
                    if !room {
                        return false;
                    }
                }
                // EPIPE, EIO, EBADF, ENOSPC...: the message is lost, nothing else.
                Err(_) => return false,
            }
        }
        true
    }
}

/// A new open file description of fd 2's pipe, FIFO or terminal, non-blocking. Not the
/// controlling terminal: a heimdall without one must not acquire it by writing a message.
fn reopen() -> rustix::io::Result<Sink> {
    let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    rustix::fs::open("/proc/self/fd/2", flags, Mode::empty()).map(Sink::Reopened)
}

/// Waits until `fd` has room for a write or `deadline` passes (false). A reader that has gone
/// counts as room: the write then fails at once.
fn wait_writable(fd: impl AsFd, deadline: Option<Instant>) -> bool {
    loop {
        let timeout = match deadline {
            None => None,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                // Rounded up, so that a wait never ends just before its deadline and spins.
                let millis = u64::try_from(left.as_millis() + 1).unwrap_or(u64::MAX);
                Timespec::try_from(Duration::from_millis(millis)).ok()
            }
        };
        let mut pfd = [PollFd::new(&fd, PollFlags::OUT)];
        match rustix::event::poll(&mut pfd, timeout.as_ref()) {
            Ok(n) if n > 0 => return true,
            Ok(_) => return false,
            Err(Errno::INTR) => {}
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_pipe_gives_up_at_the_deadline_instead_of_blocking() {
        use rustix::pipe::PipeFlags;
        // The read end stays open and unread.
        let (_reader, writer) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK).unwrap();
        let sink = Sink::Reopened(writer);
        while sink.write_all(&[b'x'; 4096], Some(Instant::now())) {}
        let started = Instant::now();
        let wrote = sink.write_all(
            b"a line\n",
            Instant::now().checked_add(Duration::from_millis(50)),
        );
        assert!(!wrote);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
