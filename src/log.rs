//! heimdall's own messages: one line each, on stderr, prefixed `heimdall: `. Stdout belongs to
//! the command. The verbosity is set once at start-up.

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
        eprintln!("heimdall: {message}");
    }
}

pub fn error(message: impl std::fmt::Display) {
    eprintln!("heimdall: {message}");
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
