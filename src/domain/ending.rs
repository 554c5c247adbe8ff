//! How the command ended, and the names of signals: the one wording of a command's end, in
//! heimdall's log lines, its lock-loss messages and the exit table (`exit.rs`).

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// `exited with status 3`, `was killed by SIGTERM`: the one wording of a command's end, in
/// heimdall's log lines and in its lock-loss messages.
impl std::fmt::Display for ChildEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildEnd::Exited(code) => write!(f, "exited with status {code}"),
            ChildEnd::Signaled(signal) => write!(f, "was killed by {}", signal_name(*signal)),
        }
    }
}

/// `SIGTERM`, or `signal 42` for one without a name (the real-time signals).
pub fn signal_name(signal: i32) -> String {
    // signal-hook's table is POSIX's; these two are Linux's own.
    let linux = match signal {
        libc::SIGPWR => Some("SIGPWR"),
        libc::SIGSTKFLT => Some("SIGSTKFLT"),
        _ => None,
    };
    linux
        .or_else(|| signal_hook::low_level::signal_name(signal))
        .map_or_else(|| format!("signal {signal}"), str::to_owned)
}
