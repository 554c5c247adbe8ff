//! heimdall's own messages: one line each, on stderr, prefixed `heimdall: `. Stdout belongs to
//! the command. The verbosity is set once at start-up.
//!
//! "One line each" holds whatever a message quotes: a lock name, a server's error, a typed
//! option may carry a newline, a carriage return or a terminal escape sequence, which would
//! forge a line of heimdall's own (`heimdall: lock released`) or rewrite one on a terminal.
//! Every line is escaped here, once, on its way out ([`escape`]).
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
    let text = format!("{}\n", escape(&text.to_string()));
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// `text` with every character that could end a line, move the cursor or start a terminal
/// escape written as a JSON escape (`\n`, `\r`, `\t`, `\u001b`): C0 and C1 controls, DEL, the
/// Unicode line and paragraph separators and the invisible direction marks that reorder what a
/// terminal shows. JSON's own spelling, so that a JSON line stays valid JSON with the same
/// value (serde_json leaves DEL, C1 and U+2028 raw). A backslash is left alone: nothing is
/// escaped twice, and escaping an escaped line changes nothing.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_once_and_json_stays_json() {
        let raw = "a\nb\rc\td\x1b[2Ke\x7f\u{9b}f\u{2028}g\u{202e}h\\i é";
        let once = escape(raw);
        assert_eq!(
            once,
            "a\\nb\\rc\\td\\u001b[2Ke\\u007f\\u009bf\\u2028g\\u202eh\\i é"
        );
        assert_eq!(escape(&once), once, "escaping twice changes nothing");
        assert!(matches!(escape("plain é"), std::borrow::Cow::Borrowed(_)));
        let json = serde_json::json!({ "name": raw }).to_string();
        let value: serde_json::Value = serde_json::from_str(&escape(&json)).unwrap();
        assert_eq!(value["name"], raw, "the escaped JSON means the same");
    }
}
