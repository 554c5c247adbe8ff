//! The terminal's live status line (a `--wait` that a person watches): one line without a
//! newline, redrawn in place (`\r`, then erase to the end of the line) and erased before any
//! other line of heimdall's is written, so it is always the last line on the screen and never
//! stays behind. Only while heimdall's writer thread runs, with stderr a terminal and not under
//! `-q`: cron mail and CI logs never see a control sequence.
//!
//! Whoever draws (a thread that ticks) only leaves the newest frame here; the writer thread
//! writes it when it has no line to write. So a terminal that stops reading (Ctrl-S, a
//! suspended `less`) holds up the writer alone, and the frames it could not take are replaced,
//! never piled up.

use std::io::IsTerminal;
use std::time::Duration;

use super::{CHANGED, Level, enabled, escape, queue};

/// Back to the start of the line, and erase it to its end (ECMA-48 CR, EL).
const ERASE: &str = "\r\x1b[K";

/// How long erasing waits for the terminal to take the erase: what follows (the command's own
/// output) should start on a clean line, but a terminal that does not read must not hold up
/// the command for long.
const ERASE_LIMIT: Duration = Duration::from_millis(500);

/// The status line's state, kept with the queue of lines.
#[derive(Debug)]
pub struct Status {
    /// The frame to write next; [`ERASE`] alone when the line is to go.
    next: Option<String>,
    /// A frame is on the screen.
    shown: bool,
    /// heimdall is exiting: nothing more is drawn.
    ended: bool,
}

impl Status {
    pub const NONE: Status = Status {
        next: None,
        shown: false,
        ended: false,
    };

    /// `line`, preceded by an erase when a frame is on the screen (the next frame redraws it
    /// below the line).
    pub fn before_line(&mut self, line: String) -> String {
        if std::mem::take(&mut self.shown) {
            format!("{ERASE}{line}")
        } else {
            line
        }
    }

    /// The frame for the writer to write now, if any.
    pub fn next_frame(&mut self) -> Option<String> {
        let frame = self.next.take()?;
        self.shown = frame != ERASE;
        Some(frame)
    }

    /// A frame or an erase waits to be written.
    pub fn pending(&self) -> bool {
        self.next.is_some()
    }

    fn erase(&mut self) {
        self.next = self.shown.then(|| ERASE.to_owned());
    }
}

/// Whether a status line would be seen: the writer thread runs (a run, after its keeper is
/// forked), stderr is a terminal, and `-q` is not given.
pub fn live_status() -> bool {
    enabled(Level::Normal) && queue().started && std::io::stderr().is_terminal()
}

/// Draws `text`, prefixed `heimdall: `, as the status line, cut to the terminal's width (a
/// line that wrapped could not be erased whole). Nothing when [`live_status`] says no.
pub fn status(text: &str) {
    if !live_status() {
        return;
    }
    let text = escape(&format!("heimdall: {text}")).into_owned();
    let frame = format!("{ERASE}{}", fit(&text, columns()));
    let mut queue = queue();
    if !queue.status.ended && super::spawn_writer(&mut queue) {
        queue.status.next = Some(frame);
        CHANGED.notify_all();
    }
}

/// Erases the status line, if one is on the screen or about to be, and waits until the
/// terminal has taken the erase (and any line before it), at most [`ERASE_LIMIT`].
pub fn clear_status() {
    let mut queue = queue();
    queue.status.erase();
    if queue.status.pending() {
        CHANGED.notify_all();
        drop(queue);
        super::flush(ERASE_LIMIT);
    }
}

/// At exit: the line goes, and nothing more is drawn.
pub(super) fn end() {
    let mut queue = queue();
    queue.status.erase();
    queue.status.ended = true;
    CHANGED.notify_all();
}

/// The terminal's width (stderr's, then `$COLUMNS`), else 80.
fn columns() -> usize {
    terminal_size::terminal_size_of(std::io::stderr())
        .map(|(terminal_size::Width(columns), _)| usize::from(columns))
        .filter(|c| *c > 0)
        .or_else(|| {
            std::env::var("COLUMNS")
                .ok()
                .and_then(|c| c.trim().parse().ok())
                .filter(|c| *c > 0)
        })
        .unwrap_or(80)
}

/// `text` cut to fit in `columns - 1` columns (the last one left free: a terminal that wraps
/// at the margin would move the cursor to a new line), ending `...` when cut. A character
/// beyond ASCII counts as two columns, as the widest do.
fn fit(text: &str, columns: usize) -> String {
    let room = columns.saturating_sub(1).max(4);
    let width = |c: char| if c.is_ascii() { 1 } else { 2 };
    if text.chars().map(width).sum::<usize>() <= room {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        if used + width(c) > room - 3 {
            break;
        }
        used += width(c);
        out.push(c);
    }
    out.push_str("...");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_cut_to_the_terminal_leaving_the_last_column_free() {
        assert_eq!(fit("heimdall: waiting", 80), "heimdall: waiting");
        assert_eq!(fit("heimdall: waiting for lock a/b", 16), "heimdall: wa...");
        assert_eq!(fit("ééééé", 8), "éé...");
        for columns in [0, 1, 5, 40] {
            assert!(fit(&"x".repeat(100), columns).len() < columns.max(5));
        }
    }

    #[test]
    fn a_frame_on_the_screen_is_erased_before_a_line_and_by_an_erase() {
        let mut status = Status::NONE;
        assert_eq!(status.before_line("a\n".into()), "a\n");
        status.next = Some(format!("{ERASE}heimdall: waiting"));
        assert_eq!(
            status.next_frame().as_deref(),
            Some("\r\x1b[Kheimdall: waiting")
        );
        assert_eq!(status.before_line("b\n".into()), "\r\x1b[Kb\n");
        assert_eq!(status.before_line("c\n".into()), "c\n");
        // Nothing on the screen: nothing to erase.
        status.erase();
        assert!(!status.pending());
        status.next = Some(format!("{ERASE}x"));
        status.next_frame();
        status.erase();
        assert_eq!(status.next_frame().as_deref(), Some(ERASE));
        assert!(!status.shown);
    }
}
