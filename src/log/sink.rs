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

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

const STDERR: RawFd = libc::STDERR_FILENO;

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
        // SAFETY: stat is plain data, for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a valid stat buffer; a bad descriptor only fails.
        if unsafe { libc::fstat(STDERR, &mut st) } != 0 {
            return Sink::Discard;
        }
        // SAFETY: isatty only inspects the descriptor.
        let terminal = unsafe { libc::isatty(STDERR) } == 1;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => Sink::Socket,
            // A pipe or FIFO without a reader cannot be opened without blocking (ENXIO); then
            // poll reports the error at once and the write fails, or, should a reader open the
            // FIFO again, succeeds.
            libc::S_IFIFO => reopen().unwrap_or(Sink::Polled),
            libc::S_IFCHR if terminal => reopen().unwrap_or(Sink::Polled),
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
                Sink::Plain => write(STDERR, bytes),
                Sink::Reopened(fd) => write(fd.as_raw_fd(), bytes),
                Sink::Socket => send_dontwait(bytes),
                Sink::Polled => {
                    if !wait_writable(STDERR, deadline) {
                        return false;
                    }
                    write(STDERR, &bytes[..bytes.len().min(libc::PIPE_BUF)])
                }
            };
            match n {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let fd = self.own_fd().unwrap_or(STDERR);
                    if !wait_writable(fd, deadline) {
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
fn reopen() -> io::Result<Sink> {
    // SAFETY: a NUL-terminated path; open returns a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c"/proc/self/fd/2".as_ptr(),
            libc::O_WRONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and belongs to nobody else.
    Ok(Sink::Reopened(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn write(fd: RawFd, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: `bytes` is valid for its length; a bad descriptor only fails.
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn send_dontwait(bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: as for write; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
    let n = unsafe {
        libc::send(
            STDERR,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Waits until `fd` has room for a write or `deadline` passes (false). A reader that has gone
/// counts as room: the write then fails at once.
fn wait_writable(fd: RawFd, deadline: Option<Instant>) -> bool {
    loop {
        let timeout = match deadline {
            None => -1,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                // Rounded up, so that a wait never ends just before its deadline and spins.
                i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
            }
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, timeout) } {
            n if n > 0 => return true,
            0 => return false,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_full_pipe_gives_up_at_the_deadline_instead_of_blocking() {
        let mut fds = [-1; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(
            unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) },
            0
        );
        // SAFETY: both were just created; the read end stays open and unread.
        let (_reader, writer) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
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
