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

mod child;
mod cli;
mod config;
mod conninfo;
mod docs;
mod exit;
mod hold;
mod holders;
mod inspect;
mod keepalive;
mod keeper;
mod key;
mod lease;
mod lock;
mod log;
mod pgpass;
mod program;
mod reentry;
mod report;
mod supervise;
mod tls;
mod watchdog;

use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::Result;

use crate::cli::{Invocation, ReportFormat, RunCli};
use crate::config::{
    ENV_BACKEND_PID, ENV_DATABASE, ENV_FENCING_TOKEN, ENV_KEY, ENV_LOCK_HELD, ENV_MODE, ENV_PID,
    ENV_SLOTS, Settings,
};
use crate::exit::{Classify, Outcome};
use crate::supervise::{LeaseBudget, Limits, Supervisor};
use crate::watchdog::Watchdog;

fn main() -> ExitCode {
    install_panic_hook();
    log::ensure_std_fds();
    let result = match cli::parse(std::env::args_os().collect()) {
        Invocation::Run(cli) => run_and_report(*cli),
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
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            log::error(format!("{err:#}"));
            ExitCode::from(exit::code_for_error(&err))
        }
    }
}

/// A run, then what monitoring wants to know about it (`--metrics-file`, `--report`), whatever
/// the outcome. Prints the run's error itself, so it never follows the report.
fn run_and_report(cli: RunCli) -> Result<u8> {
    let metrics_file = cli.metrics_file.clone();
    let report = cli.report;
    let (namespace, name) = (
        cli.lock.namespace.clone().unwrap_or_default(),
        cli.lock.name.clone().unwrap_or_default(),
    );
    let keys = config::LockTarget::from_args(&cli.lock)
        .map(|l| l.key.to_string())
        .unwrap_or_default();
    let mut facts = report::Facts {
        started: Some(SystemTime::now()),
        ..Default::default()
    };
    let result = run(cli, &mut facts);
    facts.ended = Some(SystemTime::now());
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
    if metrics_file.is_none() && report.is_none() {
        return Ok(exit_code);
    }
    let summary = report::Report {
        namespace: &namespace,
        name: &name,
        keys: &keys,
        kind: report::Kind::of(result.as_ref().ok().copied()),
        exit_code,
        facts: &facts,
    };
    if let Some(path) = metrics_file
        && let Err(e) = report::write_atomically(&path, &summary.prometheus())
    {
        log::error(format!("{e:#}"));
    }
    if report == Some(ReportFormat::Json) {
        log::line(summary.json());
    }
    Ok(exit_code)
}

/// parse → configure → connect → lock → spawn → supervise → release → outcome.
fn run(cli: RunCli, facts: &mut report::Facts) -> Result<Outcome> {
    let settings = Settings::from_cli(cli)?;
    log::set_level(settings.level);
    // Before connecting: with --wait, the lock may come hours later.
    program::check(&settings.command)?;
    // Before the first thread (the signal thread, the connect thread): see keeper::start.
    keeper::start()
        .map_err(|e| anyhow::anyhow!("cannot start the keeper process: {e}"))
        .classify(exit::Failure::Internal)?;
    let supervisor = Supervisor::install()?;
    child::become_subreaper();

    let sockets_before = keeper::sockets();
    let mut conn = settings.connection.open()?;
    keeper::hand_over_new_sockets(&sockets_before);
    if let Some(outer) = settings.reentrant
        && reentry::proven(
            outer,
            &settings.lock,
            settings.mode,
            settings.lease.as_ref().map(|l| &l.table),
            &mut conn,
        )
    {
        drop(conn);
        return run_reentrant(&settings, &supervisor);
    }
    if held_shared_by_parent(&settings) {
        log::warn(format!(
            "lock {} is held in shared mode by the heimdall that started this one ({ENV_MODE}=shared); an exclusive run inside it would wait for its own parent, so not running the command (take the outer lock without --shared, or this one with --shared)",
            settings.lock.describe()
        ));
        return Ok(Outcome::Busy(settings.busy_exit_code));
    }

    facts.asked = Some(SystemTime::now());
    let held = match hold::take(&settings, conn, &supervisor)? {
        Ok(held) => held,
        Err(busy) => {
            log::warn(busy);
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
    };
    let acquired_at = Instant::now();
    facts.acquired = Some(SystemTime::now());

    let env = child_env(&settings, &held);
    let announce = log::enabled(log::Level::Verbose);
    let child = supervisor
        .start(|| child::spawn(&settings.command, &env, &unset_env(&settings), announce))?;
    let watchdog = Watchdog::start(held.guard, hold::pace(&settings), supervisor.events())?;
    let limits = limits(&settings, held.lease_sent);
    let outcome = supervisor.supervise(child, &limits, &settings.lock.describe())?;
    let outcome = finish(&settings, &supervisor, watchdog, outcome, acquired_at);
    facts.released = Some(SystemTime::now());
    Ok(outcome)
}

/// After the command: confirm the lock was still ours, keep it for `--min-hold`, release it. A
/// lock lost after the last heartbeat shows only here; the command may have overlapped with
/// another run, and that must not pass as a success.
fn finish(
    settings: &Settings,
    supervisor: &Supervisor,
    watchdog: Watchdog,
    outcome: Outcome,
    acquired_at: Instant,
) -> Outcome {
    if outcome == Outcome::LockLost {
        return outcome;
    }
    let lost = |reason: String| {
        log::error(format!(
            "lost lock {} before the command finished ({}): {reason}; another run may have overlapped with it",
            settings.lock.describe(),
            outcome_words(outcome)
        ));
        Outcome::LockLost
    };
    let mut guard = match watchdog.stop() {
        Ok(guard) => guard,
        Err(reason) => return lost(reason),
    };
    let hold_until = settings
        .min_hold
        .and_then(|min| acquired_at.checked_add(min))
        .filter(|until| *until > Instant::now());
    let Some(until) = hold_until else {
        return match guard.release() {
            Ok(()) => outcome,
            Err(reason) => lost(reason),
        };
    };
    // Confirm the command ran under the lock before the extra hold, so a loss during the hold
    // is not mistaken for one during the command.
    if let Err(reason) = guard.check() {
        return lost(reason);
    }
    log::info(format!(
        "holding the lock {} ms more for --min-hold",
        until.saturating_duration_since(Instant::now()).as_millis()
    ));
    supervisor.hold_until(until);
    if let Err(reason) = guard.release() {
        log::info(format!(
            "the lock went during --min-hold ({reason}); the command had finished under it"
        ));
    }
    outcome
}

/// A heimdall inside a command that already holds this lock runs the command directly: taking
/// the lock again from a second session would wait for itself, or report busy.
fn run_reentrant(settings: &Settings, supervisor: &Supervisor) -> Result<Outcome> {
    log::info(format!(
        "lock {} is already held by the heimdall that started this one ({ENV_LOCK_HELD}, {ENV_KEY}, {ENV_SLOTS}, {ENV_MODE} and {ENV_DATABASE} say so, {ENV_PID} is an ancestor and {ENV_BACKEND_PID} holds the keys); running the command directly",
        settings.lock.describe()
    ));
    let child = supervisor.start(|| child::spawn(&settings.command, &[], &[], false))?;
    supervisor.supervise(child, &limits(settings, None), &settings.lock.describe())
}

/// An exclusive run inside a command that holds the same lock shared can never get it: the
/// outer heimdall keeps its share until this run, part of its command, has ended.
fn held_shared_by_parent(settings: &Settings) -> bool {
    settings.mode == config::Mode::Exclusive
        && config::already_held(
            &settings.lock,
            config::Mode::Shared,
            &settings.connection,
            |name| std::env::var(name).ok(),
        )
        .is_some()
}

fn limits(settings: &Settings, lease_sent: Option<Instant>) -> Limits {
    let lease = settings.lease.as_ref().zip(lease_sent);
    Limits {
        timeout: settings.timeout,
        kill_after: settings.kill_after,
        // A lease's renewals are its heartbeat.
        heartbeat: settings.heartbeat.filter(|_| lease.is_none()),
        lease: lease.map(|(mode, sent)| LeaseBudget {
            budget: mode.timing.budget,
            acquired_sent: sent,
        }),
    }
}

/// What the command learns about its lock; the key, database, mode and slot count also let a
/// heimdall that the command starts recognise the lock as already held.
fn child_env(settings: &Settings, held: &hold::Held) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (ENV_KEY, settings.lock.key.to_string()),
        (ENV_LOCK_HELD, "1".to_owned()),
        (ENV_DATABASE, settings.connection.conn.describe()),
        (ENV_MODE, settings.mode.name().to_owned()),
        (ENV_SLOTS, settings.lock.slots.to_string()),
        (ENV_FENCING_TOKEN, held.fencing_token.to_string()),
        (ENV_PID, std::process::id().to_string()),
    ];
    if let Some(backend_pid) = held.backend_pid {
        env.push((ENV_BACKEND_PID, backend_pid.to_string()));
    }
    if let Some((ns, name)) = &settings.lock.names {
        env.push(("HEIMDALL_NAMESPACE", ns.clone()));
        env.push(("HEIMDALL_NAME", name.clone()));
    }
    if settings.lock.slots > 1 {
        env.push(("HEIMDALL_SLOT", held.slot.to_string()));
    }
    // The lock database's password stays with heimdall (README, Security notes).
    if let Some(database) = &settings.connection.database_for_command {
        env.push(("HEIMDALL_DATABASE_URL", database.clone()));
    }
    env
}

/// With `--key`, names inherited from an outer heimdall would describe another lock; without
/// slots, so would an inherited slot.
fn unset_env(settings: &Settings) -> Vec<&'static str> {
    let mut unset = Vec::new();
    if settings.lock.names.is_none() {
        unset.extend(["HEIMDALL_NAMESPACE", "HEIMDALL_NAME"]);
    }
    if settings.lock.slots == 1 {
        unset.push("HEIMDALL_SLOT");
    }
    // A lease has no backend; an inherited one would name another lock's.
    if settings.lease.is_some() {
        unset.push(ENV_BACKEND_PID);
    }
    unset
}

fn outcome_words(outcome: Outcome) -> String {
    match outcome {
        Outcome::Exited(code) => format!("the command exited with status {code}"),
        Outcome::Signaled(signal) => format!(
            "the command was killed by {}",
            supervise::signal_name(signal)
        ),
        Outcome::TimedOut => "the command was stopped by --timeout".to_owned(),
        Outcome::Busy(_) | Outcome::LockLost => "the command did not finish".to_owned(),
    }
}

/// A bug must still end in one line and a documented code, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        keeper::stop_job_now();
        log::error(format!("internal error: {info}"));
        std::process::exit(exit::INTERNAL.into());
    }));
}
