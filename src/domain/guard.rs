//! What holds the lock while the command runs, as every layer sees it: the [`Guard`] trait that
//! the advisory lock's session and a lease both implement, and why what held the lock must
//! count as lost ([`LossReason`]). The watchdog checks a guard; `run` releases it, with the
//! run's end ([`RunEnd`]) for the run record.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// What holds the lock while the command runs.
pub trait Guard: Send + 'static {
    /// One check: a heartbeat on the holding session, or a lease renewal. Returns why the lock
    /// must count as lost, if it must.
    fn check(&mut self) -> Result<(), LossReason>;
    /// Releases the lock, proving on the way that it was still held; why not, if it was not.
    /// With a run record, the same message writes `end` (as lost, when the lock was not held).
    fn release(self: Box<Self>, end: &RunEnd) -> Result<(), LossReason>;
    /// The socket of a session whose end would end the lock, to watch between checks.
    fn socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// How a run ended, for the run record: written by the message that releases the lock.
#[derive(Debug, Clone, Copy)]
pub struct RunEnd {
    /// heimdall's exit status for the run.
    pub exit_code: u8,
    /// `ran`, `signaled`, `timeout` or `lost`.
    pub outcome: &'static str,
    /// When the command ended: the lock may be kept longer (`--min-hold`).
    pub at: Instant,
}

/// Why what held the lock must count as lost. Shown after "lost lock ...: ".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    /// The check failed on the server or the connection, in the server's words.
    Connection(String),
    /// The session now talks to another backend than the one that holds the lock.
    OtherBackend { now: i32, holder: i32 },
    /// A hot standby answered the check: a proxy routed it away from the holding backend.
    Standby { pid: i32 },
    /// The transaction that held the lock has ended.
    TransactionEnded,
    /// The check's statement answered no row.
    NoRow,
    /// The lease row no longer carries this run's version.
    LeaseTakenOver { version: i64 },
    /// The check in flight got no answer within this long.
    NoAnswer(Duration),
    /// A replacer (`--replace`, `heimdall stop`) asks for the lock: `by` names it (`host web-3,
    /// pid 4211`). The lock is still held; it is let go once the job is gone.
    Replaced { by: String },
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LossReason::Connection(why) => f.write_str(why),
            LossReason::OtherBackend { now, holder } => write!(
                f,
                "the session now talks to backend pid {now}, not {holder} which holds the lock (a connection pooler that does not keep a transaction on one server connection?)"
            ),
            LossReason::Standby { pid } => write!(
                f,
                "the heartbeat was answered by a hot standby (backend pid {pid}), not by the primary that holds the lock: a proxy that balances reads (pgpool-II with load_balance_mode?) sent it there, so the lock cannot be confirmed"
            ),
            LossReason::TransactionEnded => f.write_str(
                "the transaction that held the lock has ended (a connection pooler that ended it?)",
            ),
            LossReason::NoRow => f.write_str("the heartbeat got no row back"),
            LossReason::LeaseTakenOver { version } => write!(
                f,
                "the lease row no longer carries version {version} (another holder took it over)"
            ),
            LossReason::Replaced { by } => write!(f, "replaced by {by}"),
            LossReason::NoAnswer(limit) => write!(
                f,
                "no answer to the last check within {}",
                humantime::format_duration(*limit)
            ),
        }
    }
}
