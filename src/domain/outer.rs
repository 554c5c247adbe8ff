//! The outer heimdall that an inner one may be running under, as the inner one's environment
//! describes it (`environ.rs` reads it): still to be proved (`run/reentry.rs`).

use super::lock::Mode;

/// The outer heimdall an inner one may be running under, from its environment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outer {
    pub heimdall_pid: i32,
    /// The mode the outer run holds the lock in.
    pub mode: Mode,
    /// The backend that holds an advisory lock; absent in lease mode.
    pub backend_pid: Option<i32>,
    /// The outer run's fencing token: in lease mode, the version its lease row must carry.
    pub fencing_token: Option<i64>,
    /// When the outer run's holding transaction began, in microseconds since the epoch.
    pub lock_since: Option<i64>,
}
