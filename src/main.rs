//! heimdall: run a command while holding a PostgreSQL advisory lock, so that it runs on at most
//! one machine at a time and never without its lock.

// The promise "never runs without its lock" rests on Linux: the keeper holds a copy of the
// connection (SCM_RIGHTS) until the job is gone when heimdall dies, and finds the job's
// processes in /proc; PR_SET_CHILD_SUBREAPER keeps the command's daemonised descendants under
// heimdall; PR_SET_PDEATHSIG is a second line. Without them a killed heimdall would free the
// lock while the job runs on, so a build elsewhere stops here instead of producing a binary with
// a weaker guarantee nobody asked for.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "heimdall supports Linux only: it needs /proc, prctl(PR_SET_CHILD_SUBREAPER) and \
     prctl(PR_SET_PDEATHSIG) to keep its promise that the command never runs without the lock \
     (README, Install)"
);

mod cli;
mod config;
mod conninfo;
mod db;
mod docs;
mod domain;
mod environ;
mod exit;
mod hold;
mod inspect;
mod log;
mod process;
mod reentry;
mod report;
mod supervise;

use std::process::ExitCode;

use anyhow::Result;

use crate::cli::{Invocation, RunCli};
use crate::config::{LockTarget, Settings};
use crate::exit::{Classify, Outcome};
use crate::process::{child, fdlimit, keeper, program};
use crate::report::Recorder;
use crate::supervise::Supervisor;
use crate::supervise::watchdog::Watchdog;

fn main() -> ExitCode {
    install_panic_hook();
    log::init();
    let result = match cli::parse(std::env::args_os().collect()) {
        Invocation::Run(cli) => Ok(run_and_report(*cli)),
        Invocation::Status(cli) => inspect::status(cli),
        Invocation::List(cli) => inspect::list(cli),
        Invocation::Key(cli) => inspect::key(cli),
        Invocation::LeaseDdl(cli) => inspect::lease_ddl(cli),
        Invocation::Completions(cli) => {
            docs::completions(cli.shell).map(|()| 0).map_err(Into::into)
        }
        Invocation::Man(_) => docs::man_page().map(|()| 0).map_err(Into::into),
        Invocation::Exit(code) => return ExitCode::from(code),
    };
    keeper::finish();
    let code = match result {
        Ok(code) => code,
        Err(err) => {
            log::error(format!("{err:#}"));
            exit::code_for_error(&err)
        }
    };
    log::flush(log::EXIT_LIMIT);
    ExitCode::from(code)
}

/// A run, then what monitoring wants to know about it (`--metrics-file`, `--report`), whatever
/// the outcome. Prints the run's error itself, so it never follows the report.
fn run_and_report(cli: RunCli) -> u8 {
    let mut report = Recorder::begin(cli.metrics_file.clone(), cli.report);
    let result = LockTarget::from_args(&cli.lock).and_then(|lock| {
        report.label(&lock);
        run(Settings::from_cli(cli, lock)?, &mut report)
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
    program::check(&settings.command)?;
    fdlimit::check()?;
    // Before the first thread (the signal thread, the connect thread): see keeper::start.
    keeper::start()
        .map_err(|e| anyhow::anyhow!("cannot start the keeper process: {e}"))
        .classify(exit::Failure::Internal)?;
    log::start_writer();
    let supervisor = Supervisor::install()?;
    child::become_subreaper();

    let sockets_before = keeper::sockets();
    let mut conn = settings.connection.open()?;
    if let [socket] = keeper::hand_over_new_sockets(&sockets_before)[..] {
        conn.socket = Some(socket);
    }
    match reentry::nested(&settings, &mut conn) {
        reentry::Nested::No => {}
        reentry::Nested::Held => {
            drop(conn);
            return run_reentrant(&settings, &supervisor);
        }
        reentry::Nested::InsideShared => {
            environ::refuse_inside_shared_parent(&settings);
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
    }

    let mut held = match report.acquiring(|| hold::take(&settings, conn, &supervisor))? {
        Ok(held) => held,
        Err(busy) => {
            log::warn(busy);
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
    };
    hold::hold_off(&settings, &mut held)?;

    let env = environ::for_command(&settings, &held);
    let unset = environ::removed_for_command(&settings);
    let child = supervisor.start(|| child::spawn(&settings.command, &env, &unset))?;
    let watchdog = Watchdog::start(held.guard, hold::pace(&settings), supervisor.events())?;
    let limits = hold::limits(&settings, held.lease_sent);
    let outcome = supervisor.supervise(child, &limits, &settings.lock.describe())?;
    Ok(report
        .releasing(|| hold::finish(&settings, &supervisor, watchdog, outcome, held.acquired_at)))
}

/// A heimdall inside a command that already holds this lock runs the command directly: taking
/// the lock again from a second session would wait for itself, or report busy.
fn run_reentrant(settings: &Settings, supervisor: &Supervisor) -> Result<Outcome> {
    log::info(format!(
        "lock {} is already held by the heimdall that started this one ({}); running the command directly",
        settings.lock.describe(),
        environ::reentry_proof(settings),
    ));
    let child = supervisor.start(|| child::spawn(&settings.command, &[], &[]))?;
    supervisor.supervise(
        child,
        &hold::limits(settings, None),
        &settings.lock.describe(),
    )
}

/// A bug must still end in one line and a documented code, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        keeper::stop_job_now();
        log::error(format!("internal error: {info}"));
        log::exit(exit::INTERNAL);
    }));
}
