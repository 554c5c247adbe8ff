//! A run, as a recipe: configure → connect → hold → run → release → report. Each step is one
//! named call; the steps themselves live in the layers below.

use anyhow::Result;

use crate::cli::RunCli;
use crate::config::{self, Settings};
use crate::db::{self, Session};
use crate::exit::{self, Classify, Outcome};
use crate::hold::{self, Taken};
use crate::log;
use crate::process::{child, fdlimit, identity, keeper, program};
use crate::report::Recorder;
use crate::supervise::Supervisor;
use crate::supervise::watchdog::Watchdog;

mod environ;
mod finish;
mod reentry;

use reentry::Nested;

/// A run, then what monitoring wants to know about it (`--metrics-file`, `--report`), whatever
/// the outcome. Prints the run's error itself, so it never follows the report.
pub fn run_and_report(cli: RunCli) -> u8 {
    let mut report = Recorder::begin(cli.metrics_file.clone(), cli.report);
    let result = config::lock_target(&cli.lock).and_then(|lock| {
        report.label(&lock);
        run(
            Settings::from_cli(cli, lock, &identity::SYSTEM)?,
            &mut report,
        )
    });
    report.ended();
    // The error line comes before the report, so that the report is the last line on stderr.
    let exit_code = match &result {
        Ok(outcome) => outcome.code(),
        Err(err) => {
            // Whatever failed, nothing of the job may run on once heimdall has exited.
            keeper::stop_job_now();
            log::error(format!("{err:#}"));
            exit::code_for_error(err)
        }
    };
    report.publish(result.ok(), exit_code);
    exit_code
}

/// configure → connect → lock → spawn → supervise → release → outcome.
fn run(settings: Settings, report: &mut Recorder) -> Result<Outcome> {
    log::set_level(settings.level);
    // Before connecting: with --wait, the lock may come hours later.
    program::check(&settings.command, settings.command_note.as_deref())?;
    fdlimit::check()?;
    // Before the first thread (the signal thread, the connect thread): see keeper::start.
    keeper::start()
        .map_err(|e| anyhow::anyhow!("cannot start the keeper process: {e}"))
        .classify(exit::Failure::Internal)?;
    // Before the first thread, the log writer: see supervise::block_signals.
    crate::supervise::block_signals()?;
    log::start_writer();
    let supervisor = Supervisor::install()?;
    child::become_subreaper();

    let mut session = connect(&settings)?;
    match reentry::nested(&settings, &mut session) {
        Nested::No => {}
        Nested::Held => {
            drop(session);
            return reentry::run_directly(&settings, &supervisor);
        }
        Nested::InsideShared => return Ok(reentry::refuse_inside_shared_parent(&settings)),
    }

    let on_wait = |canceller| supervisor.set_cancel(canceller);
    let taken = report.acquiring(
        || hold::take(&settings, session, on_wait),
        |taken| matches!(taken, Taken::Held(_)),
    )?;
    let mut held = match taken {
        Taken::Held(held) => held,
        Taken::Busy(busy) => {
            log::warn(busy);
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
        Taken::Skipped(skipped) => {
            log::warn(skipped);
            return Ok(Outcome::Skipped(settings.busy_exit_code));
        }
        Taken::QueueFull(full) => {
            log::warn(full);
            return Ok(Outcome::QueueFull(settings.busy_exit_code));
        }
        Taken::Cancelled => supervisor.exit_cancelled(),
    };
    hold::hold_off(&settings, &mut held)?;

    let env = environ::for_command(&settings, &held);
    let child =
        supervisor.start(|mark| child::spawn(&settings.command, &env.set, &env.unset, mark))?;
    let watchdog = Watchdog::start(held.guard, settings.pace, supervisor.events())?;
    let (lease_sent, lock) = (held.by.lease_sent(), settings.lock.describe());
    let outcome = supervisor.supervise(child, &settings.limits, lease_sent, &lock)?;
    Ok(report
        .releasing(|| finish::finish(&settings, &supervisor, watchdog, outcome, held.acquired_at)))
}

/// Connects, and hands the keeper a copy of the connection's socket: if heimdall dies, the
/// keeper holds the lock until the job is gone.
fn connect(settings: &Settings) -> Result<Session> {
    let before = db::socket::connected();
    let mut session = db::open(&settings.dial)?;
    let new = db::socket::opened_since(&before);
    keeper::hand_over(&new);
    if let [socket] = new[..] {
        session.socket = Some(socket);
    }
    Ok(session)
}
