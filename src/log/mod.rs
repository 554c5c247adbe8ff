//! heimdall's own messages: one line each, on stderr, prefixed `heimdall: `. Stdout belongs to
//! the command. The verbosity is set once at start-up.
//!
//! "One line each" holds whatever a message quotes: a lock name, a server's error, a typed
//! option may carry a newline, a carriage return or a terminal escape sequence, which would
//! forge a line of heimdall's own (`heimdall: lock released`) or rewrite one on a terminal.
//! Every line is escaped here, once, on its way out ([`escape`]).
//!
//! Writing can never fail heimdall, nor hold it up: a stderr that is closed, a pipe whose
//! reader is gone (a dead logger, a restarted journald), or one whose reader is alive but no
//! longer reads (a wedged logger, `| less` in another window) loses messages and nothing else.
//! `eprintln!` would panic on the first two and block on the third; a panic must never be what
//! ends a run while the command runs, and a heimdall blocked in write(2) would never stop its
//! command after losing the lock.
//!
//! So once a run has started its keeper, a thread of its own writes heimdall's messages
//! ([`start_writer`]): every other thread only queues a line and goes on with what protects the
//! lock. The queue is bounded; lines that do not fit are counted and reported once writing
//! resumes. Before that thread exists (start-up, the other subcommands) and in the keeper,
//! which has no thread, a line is written at once but waits for room at most [`DIRECT_LIMIT`]
//! (see `sink.rs` for how a write avoids blocking). Whatever is still queued when heimdall
//! exits gets [`EXIT_LIMIT`] ([`flush`], [`exit`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

mod sink;
mod status;

use sink::Sink;

pub use status::{clear_status, live_status, status};

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

/// How long a line written at once may wait for room on stderr.
pub const DIRECT_LIMIT: Duration = Duration::from_secs(2);
/// How long an exiting heimdall waits for its queued lines to be written. By then the lock is
/// released and the job gone; this only delays the exit status.
pub const EXIT_LIMIT: Duration = Duration::from_secs(2);
/// The queue's bound: a wedged stderr costs at most this much memory.
const QUEUE_BYTES: usize = 256 * 1024;

static SINK: OnceLock<Sink> = OnceLock::new();

/// Lines waiting for the writer thread.
struct Queue {
    lines: VecDeque<String>,
    bytes: usize,
    /// Lines that did not fit since the last report of them.
    dropped: u64,
    /// Lines are queued for the writer thread, not written at once ([`start_writer`]).
    started: bool,
    /// The writer thread exists: it is started with the first line or status to write, so a
    /// run that says nothing never pays for it.
    spawned: bool,
    /// The writer thread is writing a line it has taken off the queue.
    writing: bool,
    /// The terminal's live status line (`status.rs`): what to draw next, once the lines are
    /// written, and whether one is on the screen, to be erased before the next line.
    status: status::Status,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    lines: VecDeque::new(),
    bytes: 0,
    dropped: 0,
    started: false,
    spawned: false,
    writing: false,
    status: status::Status::NONE,
});
/// Signalled when a line is queued (for the writer) and when the queue empties (for [`flush`]).
static CHANGED: Condvar = Condvar::new();

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
/// interleave mid-line: queued for the writer thread once it runs, else at once (see the
/// module docs).
pub fn line(text: impl std::fmt::Display) {
    let text = format!("{}\n", escape(&without_errno(&text.to_string())));
    let mut queue = queue();
    if !queue.started {
        drop(queue);
        sink().write_all(text.as_bytes(), Instant::now().checked_add(DIRECT_LIMIT));
        return;
    }
    if queue.bytes + text.len() > QUEUE_BYTES {
        queue.dropped += 1;
        return;
    }
    if !spawn_writer(&mut queue) {
        drop(queue);
        sink().write_all(text.as_bytes(), Instant::now().checked_add(DIRECT_LIMIT));
        return;
    }
    queue.bytes += text.len();
    queue.lines.push_back(text);
    CHANGED.notify_all();
}

/// `text` without the ` (os error N)` that Rust's I/O errors end with: the words before it
/// ("No such file or directory") are what a person reads, the number is noise. Messages are
/// meant to say what failed in words of their own; this catches whatever still quotes an I/O
/// error as it is.
fn without_errno(text: &str) -> std::borrow::Cow<'_, str> {
    const MARK: &str = " (os error ";
    if !text.contains(MARK) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let after = &rest[at + MARK.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && after[digits..].starts_with(')') {
            out.push_str(&rest[..at]);
            rest = &after[digits + 1..];
        } else {
            out.push_str(&rest[..at + MARK.len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
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
/// (`2>&-`), then decides how stderr is written (`sink.rs`). Otherwise the next descriptor
/// heimdall opens, the database connection say, would take that number, and a log line would
/// be written into it.
pub fn init() {
    for fd in 0..=2 {
        // SAFETY: fcntl(F_GETFD) only inspects the descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: open with a NUL-terminated path; the lowest free number is `fd` itself,
            // since the lower ones are open (checked in order).
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    sink();
}

/// The descriptor of stderr's sink that a forked keeper must keep open, if any.
pub fn sink_fd() -> Option<std::os::fd::RawFd> {
    sink().own_fd()
}

fn sink() -> &'static Sink {
    SINK.get_or_init(Sink::for_stderr)
}

fn queue() -> MutexGuard<'static, Queue> {
    QUEUE.lock().unwrap_or_else(|e| e.into_inner())
}

/// From now on every line goes to the writer thread, which starts with the first line (or
/// status) to write. Call after the keeper is forked (it must be forked before any thread).
pub fn start_writer() {
    queue().started = true;
}

/// Starts the writer thread unless it runs already; called with the queue held, so the thread
/// waits for what the caller queues. If it cannot start, lines go back to being written at
/// once: answers false.
fn spawn_writer(queue: &mut Queue) -> bool {
    if queue.spawned {
        return true;
    }
    let spawned = std::thread::Builder::new()
        .name("log".into())
        .spawn(write_queued);
    queue.spawned = spawned.is_ok();
    if !queue.spawned {
        queue.started = false;
    }
    queue.spawned
}

/// The writer thread: takes lines off the queue and writes them, waiting for a slow or stuck
/// reader as long as it takes.
fn write_queued() {
    block_sigttou();
    let mut queue = queue();
    loop {
        let text = if let Some(text) = queue.lines.pop_front() {
            queue.bytes -= text.len();
            queue.status.before_line(text)
        } else if queue.dropped > 0 {
            let dropped = std::mem::take(&mut queue.dropped);
            queue.status.before_line(format!(
                "heimdall: {dropped} messages were dropped: stderr was not being read\n"
            ))
        } else if let Some(frame) = queue.status.next_frame() {
            frame
        } else {
            queue.writing = false;
            CHANGED.notify_all();
            queue = CHANGED.wait(queue).unwrap_or_else(|e| e.into_inner());
            continue;
        };
        queue.writing = true;
        drop(queue);
        sink().write_all(text.as_bytes(), None);
        queue = self::queue();
    }
}

/// A heimdall in a terminal's background process group, with `stty tostop`, would be stopped
/// by SIGTTOU at its first message, watchdog and all. With SIGTTOU blocked in the thread that
/// writes, the terminal takes the write instead (the kernel stops only a writer that would
/// receive the signal).
fn block_sigttou() {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the calls only
    // change this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Waits until every queued line is written, or `limit` has passed.
pub fn flush(limit: Duration) {
    let deadline = Instant::now().checked_add(limit);
    let mut queue = queue();
    while queue.started && (queue.writing || !queue.lines.is_empty() || queue.status.pending()) {
        let left = deadline.map_or(limit, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return;
        }
        queue = CHANGED
            .wait_timeout(queue, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Exits with `code` once the queued lines are written, or [`EXIT_LIMIT`] has passed. A status
/// line on the screen is erased: the shell's prompt must not follow it.
pub fn exit(code: u8) -> ! {
    status::end();
    flush(EXIT_LIMIT);
    std::process::exit(code.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_numbers_are_left_out() {
        assert_eq!(
            without_errno("cannot open x: No such file or directory (os error 2); y (os error 13)"),
            "cannot open x: No such file or directory; y"
        );
        assert_eq!(
            without_errno("(os error x) (os error 1"),
            "(os error x) (os error 1"
        );
        assert!(matches!(
            without_errno("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

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
