//! The one table of exit codes.
//!
//! Every number heimdall can exit with is defined here, and the same table is shown by `--help`
//! (see [`TABLE`]), in the man page and in the README. Codes of heimdall's own stay away from 1 and 2 (used by
//! most commands), 124–127 (the `timeout`/`env` conventions, which we follow) and 128+N (death by
//! signal N), so that a scheduler can always tell "busy" from "failed" from "the job failed".

/// The default code for "the lock is held elsewhere; the command did not run" (`EX_TEMPFAIL`).
pub const BUSY_DEFAULT: u8 = 75;
/// The lock was lost while the command ran, and the command was stopped.
pub const LOCK_LOST: u8 = 76;
/// A replacer (`--replace`, `heimdall stop`) asked for the lock: the command was stopped, and
/// the lock let go once it was gone.
pub const REPLACED: u8 = 79;
/// Could not connect, authenticate or query before the command ran (`EX_UNAVAILABLE`).
pub const UNAVAILABLE: u8 = 69;
/// Refused an unsafe server: a hot standby, or a pooler in statement mode (`EX_CONFIG`).
pub const UNSAFE_SERVER: u8 = 78;
/// `--timeout` expired and the command was stopped (as coreutils `timeout`).
pub const TIMED_OUT: u8 = 124;
/// heimdall itself failed.
pub const INTERNAL: u8 = 125;
/// The command was found but could not be executed.
pub const CANNOT_EXECUTE: u8 = 126;
/// The command was not found.
pub const NOT_FOUND: u8 = 127;
/// Usage error: a bad flag, a malformed URL, an invalid value, a missing command.
pub const USAGE: u8 = 2;
/// Death by signal N is reported as `SIGNAL_BASE + N`, as shells do.
pub const SIGNAL_BASE: u8 = 128;

/// One row of the exit-status table.
pub struct Row {
    /// The code, or how it is formed (`128+N`).
    pub code: &'static str,
    /// The flag that changes it, if one does.
    pub flag: Option<&'static str>,
    /// What it means, in Markdown (the README's words; help and man drop the backticks).
    pub meaning: &'static str,
}

/// Every exit status, in the order `--help`, the man page's EXIT STATUS and the README's
/// table show them. The README's table is checked against this one by a unit test.
pub const TABLE: [Row; 12] = [
    Row {
        code: "the command's own",
        flag: None,
        meaning: "the command ran and exited with that status",
    },
    Row {
        code: "128+N",
        flag: None,
        meaning: "the command was killed by signal N (or heimdall was, before it started the command); or heimdall received a fatal signal N that it does not forward (SIGALRM, SIGXCPU, …) and stopped the command",
    },
    Row {
        code: "75",
        flag: Some("--busy-exit-code"),
        meaning: "the lock is held elsewhere (a `--replace` run or `heimdall stop` whose holder did not stop in time or is not heimdall; a `--wait` run that gave way to a replacer), or a run of it started within `--min-interval`; the command did not run",
    },
    Row {
        code: "76",
        flag: None,
        meaning: "the lock was lost while the command ran: the command was stopped, or it had just finished and may have overlapped with another run (the message says which)",
    },
    Row {
        code: "79",
        flag: None,
        meaning: "a replacer (`--replace` or `heimdall stop`) asked for the lock: the command was stopped, and the lock let go once it was gone",
    },
    Row {
        code: "69",
        flag: None,
        meaning: "could not connect, authenticate or query before the command ran",
    },
    Row {
        code: "78",
        flag: None,
        meaning: "refused an unsafe server (a hot standby, or a connection pooler in statement mode); the command did not run",
    },
    Row {
        code: "124",
        flag: None,
        meaning: "`--timeout` expired and the command was stopped",
    },
    Row {
        code: "125",
        flag: None,
        meaning: "heimdall itself failed",
    },
    Row {
        code: "126",
        flag: None,
        meaning: "the command was found but could not be executed",
    },
    Row {
        code: "127",
        flag: None,
        meaning: "the command was not found",
    },
    Row {
        code: "2",
        flag: None,
        meaning: "usage error: bad flag, malformed URL, invalid value, missing command",
    },
];

impl Row {
    /// The meaning as plain text for `--help` and the man page, naming the flag that changes
    /// the code.
    pub fn plain_meaning(&self) -> String {
        let text = self.meaning.replace('`', "");
        match self.flag {
            Some(flag) => format!("{text} (see {flag})"),
            None => text,
        }
    }

    /// The README's row: `| 75 (`--busy-exit-code`) | the lock is held elsewhere; ... |`.
    #[cfg(test)]
    fn markdown(&self) -> String {
        let flag = self.flag.map_or_else(String::new, |f| format!(" (`{f}`)"));
        format!("| {}{flag} | {} |", self.code, self.meaning)
    }
}

/// The exit-status block at the end of `--help`; one row a line, which the help reflows.
pub fn help_table() -> String {
    let rows: Vec<String> = TABLE
        .iter()
        .map(|row| format!("  {:<17}  {}", row.code, row.plain_meaning()))
        .collect();
    format!("Exit status:\n{}", rows.join("\n"))
}

/// Why heimdall ends: a structured outcome, turned into a number only by [`Outcome::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The command (or heimdall itself, before the command started) died of this signal.
    Signaled(i32),
    /// The lock is held elsewhere; carries the configured busy code.
    Busy(u8),
    /// `--min-interval`: a run of the lock started within it, so this one did not; carries the
    /// configured busy code.
    Skipped(u8),
    /// The lock is held elsewhere and the `--queue` bound's places are all taken, so this run
    /// did not wait; carries the busy code, which it exits with.
    QueueFull(u8),
    /// The lock was lost while the command ran.
    LockLost,
    /// A replacer asked for the lock, and the command was stopped for it.
    Replaced,
    /// `--timeout` expired.
    TimedOut,
}

impl Outcome {
    pub fn code(self) -> u8 {
        match self {
            // A status outside 0..=255 cannot come from exit(2) on Unix; keep the low byte as the
            // shell would rather than invent a meaning.
            Outcome::Exited(status) => (status & 0xff) as u8,
            Outcome::Signaled(signal) => SIGNAL_BASE.wrapping_add(signal as u8),
            Outcome::Busy(code) | Outcome::Skipped(code) | Outcome::QueueFull(code) => code,
            Outcome::LockLost => LOCK_LOST,
            Outcome::Replaced => REPLACED,
            Outcome::TimedOut => TIMED_OUT,
        }
    }
}

/// `the command exited with status 4`: the command's end, as a lock-loss message names it.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::domain::ending::ChildEnd;
        match *self {
            Outcome::Exited(code) => write!(f, "the command {}", ChildEnd::Exited(code)),
            Outcome::Signaled(signal) => write!(f, "the command {}", ChildEnd::Signaled(signal)),
            Outcome::TimedOut => f.write_str("the command was stopped by --timeout"),
            Outcome::Busy(_)
            | Outcome::Skipped(_)
            | Outcome::QueueFull(_)
            | Outcome::LockLost
            | Outcome::Replaced => f.write_str("the command did not finish"),
        }
    }
}

/// A failure of heimdall's own, with the exit code its class of failure is documented to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Usage,
    Unavailable,
    UnsafeServer,
    Internal,
    CannotExecute,
    NotFound,
}

impl Failure {
    pub fn code(self) -> u8 {
        match self {
            Failure::Usage => USAGE,
            Failure::Unavailable => UNAVAILABLE,
            Failure::UnsafeServer => UNSAFE_SERVER,
            Failure::Internal => INTERNAL,
            Failure::CannotExecute => CANNOT_EXECUTE,
            Failure::NotFound => NOT_FOUND,
        }
    }
}

/// An error tagged with the class of failure that decides heimdall's exit code. It displays as
/// the error it wraps, so the tag never shows up in messages.
#[derive(Debug)]
struct Classified {
    failure: Failure,
    inner: anyhow::Error,
}

impl std::fmt::Display for Classified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.inner, f)
    }
}

impl std::error::Error for Classified {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner.source()
    }
}

/// Extension for attaching a [`Failure`] class to any error, so that `main` can find the exit code
/// in the error chain without every layer knowing about numbers.
pub trait Classify<T> {
    fn classify(self, failure: Failure) -> anyhow::Result<T>;
}

impl<T, E> Classify<T> for Result<T, E>
where
    E: Into<anyhow::Error>,
{
    fn classify(self, failure: Failure) -> anyhow::Result<T> {
        self.map_err(|e| {
            anyhow::Error::new(Classified {
                failure,
                inner: e.into(),
            })
        })
    }
}

/// Builds a classified error from a message: `fail(Failure::Usage, format!(...))`.
pub fn fail(failure: Failure, message: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(Classified {
        failure,
        inner: anyhow::anyhow!("{message}"),
    })
}

/// The exit code for an error: the outermost [`Failure`] in its chain, else "heimdall failed".
pub fn code_for_error(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|cause| cause.downcast_ref::<Classified>())
        .map_or(INTERNAL, |c| c.failure.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_numbers_are_pinned() {
        assert_eq!(BUSY_DEFAULT, 75);
        assert_eq!(LOCK_LOST, 76);
        assert_eq!(UNAVAILABLE, 69);
        assert_eq!(UNSAFE_SERVER, 78);
        assert_eq!(TIMED_OUT, 124);
        assert_eq!(INTERNAL, 125);
        assert_eq!(CANNOT_EXECUTE, 126);
        assert_eq!(NOT_FOUND, 127);
        assert_eq!(USAGE, 2);
    }

    #[test]
    fn outcomes_map_to_their_codes() {
        assert_eq!(Outcome::Exited(0).code(), 0);
        assert_eq!(Outcome::Exited(42).code(), 42);
        assert_eq!(Outcome::Signaled(15).code(), 143);
        assert_eq!(Outcome::Signaled(9).code(), 137);
        assert_eq!(Outcome::Busy(75).code(), 75);
        assert_eq!(Outcome::Busy(0).code(), 0);
        assert_eq!(Outcome::Skipped(75).code(), 75);
        assert_eq!(Outcome::QueueFull(75).code(), 75);
        assert_eq!(Outcome::LockLost.code(), 76);
        assert_eq!(Outcome::Replaced.code(), 79);
        assert_eq!(Outcome::TimedOut.code(), 124);
    }

    #[test]
    fn the_commands_end_is_said_with_the_signals_name() {
        assert_eq!(
            Outcome::Exited(4).to_string(),
            "the command exited with status 4"
        );
        assert_eq!(
            Outcome::Signaled(libc::SIGBUS).to_string(),
            "the command was killed by SIGBUS"
        );
        assert_eq!(
            Outcome::Signaled(libc::SIGPWR).to_string(),
            "the command was killed by SIGPWR"
        );
        assert_eq!(
            Outcome::Signaled(libc::SIGRTMIN() + 1).to_string(),
            format!("the command was killed by signal {}", libc::SIGRTMIN() + 1)
        );
    }

    #[test]
    fn failures_map_to_their_codes() {
        assert_eq!(Failure::Usage.code(), 2);
        assert_eq!(Failure::Unavailable.code(), 69);
        assert_eq!(Failure::UnsafeServer.code(), 78);
        assert_eq!(Failure::Internal.code(), 125);
        assert_eq!(Failure::CannotExecute.code(), 126);
        assert_eq!(Failure::NotFound.code(), 127);
    }

    #[test]
    fn the_outermost_failure_in_a_chain_decides_the_code() {
        let err: anyhow::Result<()> = Err(anyhow::anyhow!("boom"));
        let err = err.classify(Failure::Unavailable).unwrap_err();
        assert_eq!(code_for_error(&err), 69);
        assert_eq!(
            format!("{err:#}"),
            "boom",
            "the class never shows in the message"
        );
        let wrapped = err.context("while connecting");
        assert_eq!(code_for_error(&wrapped), 69);
        assert_eq!(format!("{wrapped:#}"), "while connecting: boom");
        assert_eq!(code_for_error(&fail(Failure::Usage, "bad")), 2);
        assert_eq!(code_for_error(&anyhow::anyhow!("unclassified")), 125);
    }

    #[test]
    fn the_table_lists_every_code() {
        for code in [
            BUSY_DEFAULT,
            LOCK_LOST,
            UNAVAILABLE,
            UNSAFE_SERVER,
            TIMED_OUT,
            INTERNAL,
            CANNOT_EXECUTE,
            NOT_FOUND,
            USAGE,
        ] {
            assert!(
                TABLE.iter().any(|row| row.code == code.to_string()),
                "{code} missing from the table"
            );
        }
        assert!(
            TABLE
                .iter()
                .any(|row| row.code == format!("{SIGNAL_BASE}+N"))
        );
    }

    #[test]
    fn the_readme_shows_the_same_exit_table() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Exit status\n")
            .nth(1)
            .expect("README has an Exit status section");
        let rows: Vec<&str> = section
            .lines()
            .skip_while(|line| !line.starts_with('|'))
            .take_while(|line| line.starts_with('|'))
            .skip(2)
            .collect();
        let ours: Vec<String> = TABLE.iter().map(Row::markdown).collect();
        assert_eq!(
            rows, ours,
            "README.md's exit table differs from exit::TABLE"
        );
    }

    #[test]
    fn help_shows_each_code_once_with_its_meaning() {
        let help = help_table();
        assert!(help.starts_with("Exit status:\n"), "{help}");
        assert!(help.contains("  75                 the lock is held elsewhere (a --replace run or heimdall stop whose holder did not stop in time or is not heimdall; a --wait run that gave way to a replacer), or a run of it started within --min-interval; the command did not run (see --busy-exit-code)"), "{help}");
        assert!(
            help.contains("  124                --timeout expired"),
            "{help}"
        );
        assert_eq!(help.lines().count(), TABLE.len() + 1);
    }
}
