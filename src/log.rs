//! heimdall's own messages: one line each, on stderr, prefixed `heimdall: `. Stdout belongs to
//! the command. The verbosity is set once at start-up.
//!
//! Writing can never fail heimdall: a stderr that is closed, or a pipe whose reader is gone
//! (a dead logger, a restarted journald), loses the message and nothing else. `eprintln!`
//! would panic instead, and a panic must never be what ends a run while the command runs.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// `-q`: errors only.
    Quiet = 0,
    /// Errors, warnings and the busy notice.
    Normal = 1,
    /// `-v`: where it connected, the keys, timings, signals.
    Verbose = 2,
    /// `-vv` / `--debug`: everything.
    Debug = 3,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Normal as u8);

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    LEVEL.load(Ordering::Relaxed) >= level as u8
}

/// Prints at `level` or more verbose. Errors use [`error`], which always prints.
pub fn at(level: Level, message: impl std::fmt::Display) {
    if enabled(level) {
        line(format_args!("heimdall: {message}"));
    }
}

pub fn error(message: impl std::fmt::Display) {
    line(format_args!("heimdall: {message}"));
}

/// Writes one line to stderr as a single write, so lines of heimdall and of the command do not
/// interleave mid-line; EPIPE, EIO, EBADF and the rest are ignored (see the module docs).
pub fn line(text: impl std::fmt::Display) {
    let text = format!("{text}\n");
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

pub fn warn(message: impl std::fmt::Display) {
    at(Level::Normal, message);
}

pub fn info(message: impl std::fmt::Display) {
    at(Level::Verbose, message);
}

pub fn debug(message: impl std::fmt::Display) {
    at(Level::Debug, message);
}

/// Opens /dev/null on any of stdin, stdout and stderr that heimdall was started without
/// (`2>&-`). Otherwise the next descriptor heimdall opens, the database connection say, would
/// take that number, and a log line would be written into it.
pub fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: open with a NUL-terminated path; the lowest free number is `fd` itself,
            // since the lower ones are open (checked in order).
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}
