//! Re-entrancy, proved: a heimdall started inside a job that already holds the same lock runs
//! its command directly, but only once it has proved that. The environment alone proves
//! nothing: it can be copied to an unrelated process, or outlive the run in a daemon the job
//! started. Two facts are checked instead:
//!
//! - the heimdall named by `HEIMDALL_PID` is an ancestor of this process (the parent chain in
//!   /proc: `process/procfs.rs`), so this process is part of its job;
//! - the backend named by `HEIMDALL_BACKEND_PID` still holds a granted advisory lock on these
//!   keys in this database, in the mode the environment says, in the transaction that began at
//!   `HEIMDALL_LOCK_SINCE` (`pg_lock_status()`, `pg_stat_activity`); in lease mode, the lease
//!   row in the same table still carries the outer run's version (`HEIMDALL_FENCING_TOKEN`)
//!   unexpired (the queries: `hold/proof.rs`).
//!
//! A proof that fails is an ordinary run, which takes the lock itself. A proof that holds
//! decides between running directly and refusing: an exclusive run inside a shared holder
//! could only wait for its own parent.
//!
//! Not responsible for the cheaper environment check that makes a run a candidate
//! (`environ::already_held`, through `config`).

use anyhow::Result;

use crate::config::Settings;
use crate::db::{Session, describe_pg_error};
use crate::domain::lock::Mode;
use crate::domain::outer::Outer;
use crate::environ::{
    ENV_BACKEND_PID, ENV_DATABASE, ENV_FENCING_TOKEN, ENV_KEY, ENV_LOCK_HELD, ENV_LOCK_SINCE,
    ENV_MODE, ENV_PID, ENV_SLOTS,
};
use crate::exit::Outcome;
use crate::hold::proof;
use crate::log;
use crate::process::{child, procfs};
use crate::supervise::Supervisor;

/// What a run inside another heimdall's job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nested {
    /// Not nested in a holder of this lock, or not proved to be: an ordinary run.
    No,
    /// Proved to run inside a holder of this lock that covers this run: run directly.
    Held,
    /// Proved to run inside a shared holder, and exclusive itself: refuse.
    InsideShared,
}

/// Whether the heimdall that started this one holds this very lock: its environment says so
/// ([`Settings::reentrant`]) and the proof holds on `session`.
pub fn nested(settings: &Settings, session: &mut Session) -> Nested {
    let Some(outer) = settings.reentrant else {
        return Nested::No;
    };
    if !proven(settings, &outer, session) {
        Nested::No
    } else if outer.mode == Mode::Shared && settings.mode == Mode::Exclusive {
        Nested::InsideShared
    } else {
        Nested::Held
    }
}

/// Whether `outer` is proved to hold the lock for this process, in the mode it says (see the
/// module docs). A failed query is no proof.
fn proven(settings: &Settings, outer: &Outer, session: &mut Session) -> bool {
    if !procfs::is_ancestor(outer.heimdall_pid) {
        log::info(format!(
            "the environment says heimdall pid {} holds this lock, but it is not an ancestor of this process; taking the lock normally",
            outer.heimdall_pid
        ));
        return false;
    }
    let table = settings.lease.as_ref().map(|l| &l.table);
    let Some(sql) = proof::query(outer, &settings.lock, table) else {
        log::info(
            "the environment does not say what holds this lock for the heimdall that started this one; taking the lock normally",
        );
        return false;
    };
    let held = session.first_row(&sql).map(|row| row.is_true("held"));
    match held {
        Ok(true) => true,
        Ok(false) => {
            log::info(
                "the heimdall that started this one no longer holds the lock; taking the lock normally",
            );
            false
        }
        Err(e) => {
            log::info(format!(
                "cannot check whether the outer heimdall's backend holds the lock ({}); taking the lock normally",
                describe_pg_error(&e)
            ));
            false
        }
    }
}

/// A heimdall inside a command that already holds this lock runs the command directly: taking
/// the lock again from a second session would wait for itself, or report busy.
pub fn run_directly(settings: &Settings, supervisor: &Supervisor) -> Result<Outcome> {
    log::info(format!(
        "lock {} is already held by the heimdall that started this one ({}); running the command directly",
        settings.lock.describe(),
        why_trusted(settings),
    ));
    let child = supervisor.start(|mark| child::spawn(&settings.command, &[], &[], mark))?;
    supervisor.supervise(child, &settings.limits, None, &settings.lock.describe())
}

/// An exclusive run inside a command that holds the same lock shared, proved, can never get
/// it: the outer heimdall keeps its share until this run, part of its command, has ended.
/// Says so; the run ends as a busy one.
pub fn refuse_inside_shared_parent(settings: &Settings) -> Outcome {
    log::warn(format!(
        "lock {} is held in shared mode by the heimdall that started this one ({ENV_MODE}=shared); an exclusive run inside it would wait for its own parent, so not running the command (take the outer lock without --shared, or this one with --shared)",
        settings.lock.describe()
    ));
    Outcome::Busy(settings.busy_exit_code)
}

/// Why a re-entrant run trusts its environment, for its log line.
fn why_trusted(settings: &Settings) -> String {
    let holds = match &settings.lease {
        Some(lease) => format!(
            "the lease in {} still carries {ENV_FENCING_TOKEN}",
            lease.table
        ),
        None => format!("{ENV_BACKEND_PID} holds the keys since {ENV_LOCK_SINCE}"),
    };
    format!(
        "{ENV_LOCK_HELD}, {ENV_KEY}, {ENV_SLOTS}, {ENV_MODE} and {ENV_DATABASE} say so, {ENV_PID} is an ancestor and {holds}"
    )
}
