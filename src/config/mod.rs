//! Turns the command line and the environment into validated, typed settings, once: the lock,
//! where to connect ([`Dial`]), and every timing the later steps need, computed here (the
//! watchdog's [`Pace`], the supervisor's static [`Limits`], the lock-delay, the server's
//! keepalive). Nothing downstream parses strings or reads the environment again.
//!
//! No I/O beyond reading the environment (and, through `conninfo`, the password file): it does
//! not connect (`db` does), and what it needs to know of the system, the host's name and the OS
//! user, it asks its caller's [`System`] for, only when it needs it.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{LockArgs, OutputArgs, RunCli};
use crate::domain::key::LockKey;
use crate::domain::lease_table::{LeaseTable, RunTable};
use crate::domain::lock::{LockTarget, Mode, Wait};
use crate::domain::outer::Outer;
use crate::domain::timing::{self, Heartbeat, LeaseTiming, Limits, Pace, ServerKeepalive};
use crate::environ;
use crate::exit::{Classify, Failure};
use crate::log::Level;

mod dial;

pub use dial::Dial;

/// What configuring needs to know of the system, asked only when needed: the host's name (for
/// heimdall's application_name) and the OS user's name and home directory (libpq's defaults: a
/// password-database lookup, which may mean NSS, LDAP or a network round trip).
pub struct System<'a> {
    pub host_name: &'a dyn Fn() -> String,
    pub os_user: &'a dyn Fn() -> (Option<String>, Option<PathBuf>),
}

/// Which lock the command line names.
pub fn lock_target(args: &LockArgs) -> Result<LockTarget> {
    let (key, names) = match (args.key, &args.namespace, &args.name) {
        (Some(key), _, _) => (key, None),
        (None, Some(ns), Some(name)) => (
            LockKey::derive(args.hash, ns, name),
            Some((ns.clone(), name.clone())),
        ),
        // clap enforces the pair unless --key is given; keep the message for safety.
        _ => {
            return Err(anyhow::anyhow!(
                "--namespace and --name are required unless --key is given"
            ))
            .classify(Failure::Usage);
        }
    };
    Ok(LockTarget {
        key,
        names,
        slots: args.slots,
    })
}

/// How much heimdall says.
pub fn level(args: &OutputArgs) -> Level {
    if args.quiet {
        Level::Quiet
    } else if args.debug || args.verbose >= 2 {
        Level::Debug
    } else if args.verbose == 1 {
        Level::Verbose
    } else {
        Level::Normal
    }
}

/// Everything a run needs.
#[derive(Debug)]
pub struct Settings {
    pub dial: Dial,
    /// What the command gets as `HEIMDALL_DATABASE_URL`: the `--database` string (flag or
    /// environment) without its password, so a heimdall it starts locks on the same database.
    /// `None` when heimdall's settings came from `DATABASE_URL` or `PG*`, which the command
    /// inherits as they are.
    pub database_for_command: Option<String>,
    pub lock: LockTarget,
    pub mode: Mode,
    /// `None`: do not wait for a busy lock.
    pub wait: Option<Wait>,
    /// `--queue N`: at most N runs wait at once; `None` without a wait.
    pub queue: Option<u16>,
    /// `--replace`: ask the holder to stop, and wait for the lock (`wait` is then bounded by
    /// default; see `timing::takeover_bound`).
    pub replace: bool,
    pub command: Vec<OsString>,
    /// What to add if the command's program is not found (see `RunCli::command_note`).
    pub command_note: Option<String>,
    pub busy_exit_code: u8,
    /// How the watchdog keeps what holds the lock.
    pub pace: Pace,
    /// When the supervisor stops the command on its own.
    pub limits: Limits,
    /// The GUCs that make the server drop a cut-off holder's session soon after its job is
    /// gone (`domain::timing`); empty without a heartbeat, and in lease mode.
    pub server_keepalive: ServerKeepalive,
    /// How long after a server came up the command may start (`--lock-delay`, else the bound
    /// of the server's keepalive); zero in lease mode, without a heartbeat, or with
    /// `--lock-delay 0`.
    pub lock_delay: Duration,
    /// Keep the lock at least this long after taking it.
    pub min_hold: Option<Duration>,
    /// The environment says this heimdall runs inside a command that already holds the same
    /// lock, the same way, and names that command's heimdall and its mode; still to be proved
    /// (`run/reentry.rs`).
    pub reentrant: Option<Outer>,
    /// `--lease-table`: hold a lease row instead of an advisory lock.
    pub lease: Option<LeaseMode>,
    /// `--run-table`, `--min-interval`: the run record, and the rule it is kept for.
    pub record: Option<RecordMode>,
    pub level: Level,
}

/// The run record: where it is kept, and the interval a run must leave since the last start.
#[derive(Debug, Clone)]
pub struct RecordMode {
    pub table: RunTable,
    /// `--min-interval`: start only if no run of the lock started within this long, by the
    /// server's clock.
    pub min_interval: Option<Duration>,
    /// This host's name, as the record names who ran the job (with heimdall's pid).
    pub host: String,
}

/// The run record the command line asks for: `--run-table`, or `--min-interval` with the
/// default table; one row per lock, so not for locks held by several runs at once.
fn record_mode(cli: &RunCli, lock: &LockTarget, system: &System<'_>) -> Result<Option<RecordMode>> {
    let table = match (&cli.record.run_table, cli.min_interval) {
        (None, None) => return Ok(None),
        (Some(table), _) => table.clone(),
        (None, Some(_)) => RunTable::parse_for("--run-table", crate::cli::DEFAULT_RUN_TABLE)
            .map_err(anyhow::Error::msg)
            .classify(Failure::Internal)?,
    };
    let flag = if cli.min_interval.is_some() {
        "--min-interval"
    } else {
        "--run-table"
    };
    let several = if cli.shared {
        Some("--shared")
    } else if lock.slots > 1 {
        Some("--slots")
    } else {
        None
    };
    if let Some(several) = several {
        return Err(anyhow::anyhow!(
            "{flag} cannot be combined with {several}: the record keeps one run of a lock at a time, and {several} lets several run at once"
        ))
        .classify(Failure::Usage);
    }
    Ok(Some(RecordMode {
        table,
        min_interval: cli.min_interval,
        host: (system.host_name)(),
    }))
}

/// Lease mode's table and timing.
#[derive(Debug, Clone)]
pub struct LeaseMode {
    pub table: LeaseTable,
    pub timing: LeaseTiming,
}

impl Settings {
    /// `lock` is `cli.lock`, parsed: the run's report is labelled with it even when the rest
    /// of the settings fail.
    pub fn from_cli(cli: RunCli, lock: LockTarget, system: &System<'_>) -> Result<Settings> {
        let heartbeat = (!cli.heartbeat.is_zero()).then(|| Heartbeat {
            interval: cli.heartbeat,
            timeout: cli
                .heartbeat_timeout
                .filter(|t| !t.is_zero())
                .unwrap_or(cli.heartbeat),
        });
        let dial = Dial::from_args(&cli.conn, &lock.short(), heartbeat, system)?;
        let database_for_command =
            dial::given(&cli.conn).and(dial.info.database_without_password.clone());
        let mode = if cli.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let record = record_mode(&cli, &lock, system)?;
        let lease = match cli.lease.lease_table {
            None => None,
            Some(_) if mode == Mode::Shared => {
                return Err(anyhow::anyhow!(
                    "--shared is not supported with --lease-table: a lease has one holder"
                ))
                .classify(Failure::Usage);
            }
            Some(table) => Some(LeaseMode {
                table,
                timing: LeaseTiming::new(cli.lease_ttl, cli.kill_after)
                    .map_err(anyhow::Error::msg)
                    .classify(Failure::Usage)?,
            }),
        };
        let table = lease.as_ref().map(|l| &l.table);
        let reentrant = environ::already_held(&lock, table, &dial.info.describe(), |name| {
            std::env::var(name).ok()
        });
        let (pace, server_keepalive, lock_delay) = match &lease {
            // A lease's renewals are its heartbeat; its row survives a restart, so it needs no
            // lock-delay, and no session of it holds anything for the server to drop.
            Some(lease) => (
                Pace::Renewal(lease.timing.renew_every),
                Vec::new(),
                Duration::ZERO,
            ),
            None => (
                Pace::Heartbeat(heartbeat),
                timing::server_settings(heartbeat, cli.kill_after),
                cli.lock_delay.unwrap_or_else(|| {
                    timing::release_bound(heartbeat, cli.kill_after).unwrap_or_default()
                }),
            ),
        };
        let wait = cli.wait.filter(|w| *w != Wait::Up(Duration::ZERO));
        let queue = match cli.replace {
            // A fleet's HEIMDALL_QUEUE means nothing to a replacer, which waits ahead of any
            // bound; --queue given with --replace is a mistake to point out (below).
            true if !cli.lock.queue_on_command_line => None,
            true => cli.lock.queue,
            false => queue(&cli.lock, wait, lease.is_some())?,
        };
        let wait = if cli.replace {
            replace_conflicts(mode, &lock, queue, cli.min_interval)?;
            Some(wait.unwrap_or(Wait::Up(timing::takeover_bound(heartbeat, cli.kill_after))))
        } else {
            wait
        };
        Ok(Settings {
            dial,
            database_for_command,
            lock,
            mode,
            wait,
            queue,
            replace: cli.replace,
            command: cli.command,
            command_note: cli.command_note,
            busy_exit_code: cli.busy_exit_code,
            pace,
            limits: Limits {
                timeout: cli.timeout.filter(|t| !t.is_zero()),
                kill_after: cli.kill_after,
                lease_budget: lease.as_ref().map(|l| l.timing.budget),
            },
            server_keepalive,
            lock_delay,
            min_hold: cli.min_hold.filter(|d| !d.is_zero()),
            reentrant,
            lease,
            record,
            level: level(&cli.output),
        })
    }
}

/// `--replace` means one run replacing one holder: a shared lock, slots or a bound on the
/// waiters give it no clear meaning, and with `--min-interval` the replacer would stop the
/// running job only to be refused by the interval that job's start began. One line each, the
/// usage code.
fn replace_conflicts(
    mode: Mode,
    lock: &LockTarget,
    queue: Option<u16>,
    min_interval: Option<Duration>,
) -> Result<()> {
    let other = if mode == Mode::Shared {
        Some("--shared: shared holders run together, so there is no one run to replace")
    } else if lock.slots > 1 {
        Some("--slots: a semaphore's holders run together, so there is no one run to replace")
    } else if queue.is_some() {
        Some(
            "--queue: a replacer waits ahead of every bound, and makes the runs queued ahead of it give way",
        )
    } else if min_interval.is_some() {
        Some(
            "--min-interval: the run it stops started within the interval, so it would stop the job and then run nothing",
        )
    } else {
        None
    };
    match other {
        None => Ok(()),
        Some(why) => {
            Err(anyhow::anyhow!("--replace is not supported with {why}")).classify(Failure::Usage)
        }
    }
}

/// The `--queue` bound of a run that waits. A bound on the waiters means nothing to a run that
/// does not wait: given on the command line, that is a mistake to point out; through
/// `HEIMDALL_QUEUE`, which a fleet may set for every job, it is no error, since such a run never
/// adds a waiter. Lease mode cannot keep the bound in this version: its waiters poll, with no
/// session to count them by.
fn queue(args: &LockArgs, wait: Option<Wait>, lease: bool) -> Result<Option<u16>> {
    match (args.queue, wait) {
        (None, _) => Ok(None),
        (Some(n), None) if args.queue_on_command_line => Err(anyhow::anyhow!(
            "--queue {n} bounds the runs that wait for the lock, and this run does not wait: add --wait (or --wait=DURATION), or drop --queue"
        ))
        .classify(Failure::Usage),
        (Some(_), None) => Ok(None),
        (Some(_), Some(_)) if lease => Err(anyhow::anyhow!(
            "--queue (HEIMDALL_QUEUE) is not supported with --lease-table in this version: a lease's waiters poll, and hold no session to count them by; use an advisory lock, or --wait alone"
        ))
        .classify(Failure::Usage),
        (Some(n), Some(_)) => Ok(Some(n)),
    }
}
