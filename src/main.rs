//! heimdall: run a command while holding a PostgreSQL advisory lock, so that it runs on at most
//! one machine at a time and never without its lock.

mod child;
mod cli;
mod config;
mod conninfo;
mod docs;
mod exit;
mod holders;
mod inspect;
mod keeper;
mod key;
mod lock;
mod log;
mod pgpass;
mod reentry;
mod report;
mod supervise;
mod tls;
mod watchdog;

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use anyhow::Result;
use clap::Parser;

use crate::cli::{CompletionsCli, KeyCli, ListCli, ManCli, ReportFormat, RunCli, StatusCli};
use crate::config::{
    ENV_BACKEND_PID, ENV_DATABASE, ENV_KEY, ENV_LOCK_HELD, ENV_MODE, ENV_PID, ENV_SLOTS, Settings,
};
use crate::exit::{Classify, Outcome};
use crate::lock::{Acquire, Session};
use crate::supervise::{Limits, Supervisor};
use crate::watchdog::Watchdog;

fn main() -> ExitCode {
    install_panic_hook();
    log::ensure_std_fds();
    let args: Vec<OsString> = std::env::args_os().collect();
    // A subcommand only as the very first argument: anywhere else the word belongs to the
    // wrapped command, so `heimdall --name x -- status` runs a program called status.
    let result = match args.get(1).and_then(|a| a.to_str()) {
        Some("status") => parse::<StatusCli>(&args[1..]).map(inspect::status),
        Some("list") => parse::<ListCli>(&args[1..]).map(inspect::list),
        Some("key") => parse::<KeyCli>(&args[1..]).map(inspect::key),
        Some("completions") => parse::<CompletionsCli>(&args[1..])
            .map(|cli| docs::completions(cli.shell).map(|()| 0).map_err(Into::into)),
        Some("man") => {
            parse::<ManCli>(&args[1..]).map(|_| docs::man_page().map(|()| 0).map_err(Into::into))
        }
        _ => parse::<RunCli>(&args).map(run_and_report),
    };
    keeper::finish();
    match result {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(err)) => {
            log::error(format!("{err:#}"));
            ExitCode::from(exit::code_for_error(&err))
        }
        Err(code) => code,
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
    for warning in &settings.connection.conn.warnings {
        log::warn(warning);
    }
    // Before the first thread (the signal thread, the connect thread): see keeper::start.
    keeper::start()
        .map_err(|e| anyhow::anyhow!("cannot start the keeper process: {e}"))
        .classify(exit::Failure::Internal)?;
    let supervisor = Supervisor::install()?;
    child::become_subreaper();

    let sockets_before = keeper::sockets();
    let mut conn = lock::connect(&settings.connection)?;
    keeper::hand_over_new_sockets(&sockets_before);
    if let Some(outer) = settings.reentrant
        && reentry::proven(outer, &settings.lock, settings.mode, &mut conn)
    {
        drop(conn);
        return run_reentrant(&settings, &supervisor);
    }
    facts.asked = Some(SystemTime::now());
    let acquired = lock::acquire(
        conn,
        &settings.lock,
        settings.mode,
        settings.wait,
        |token| supervisor.set_cancel(token),
    )?;
    let mut session = match acquired {
        Acquire::Held(session) => session,
        Acquire::Busy(busy) => {
            log::warn(busy_message(&settings, &busy));
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
    };
    let acquired_at = Instant::now();
    facts.acquired = Some(SystemTime::now());
    let fencing_token = session.verify()?;
    log_acquired(&settings, &session, fencing_token);

    let env = child_env(&settings, &session, fencing_token);
    let child =
        supervisor.start(|| child::spawn(&settings.command, &env, &unset_env(&settings)))?;
    log::info(format!("started the command as pid {}", child.pid));
    let watchdog = Watchdog::start(*session, settings.heartbeat, supervisor.events())?;
    let outcome = supervisor.supervise(child, &limits(&settings), &settings.lock.describe())?;
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
    let mut session = match watchdog.stop() {
        Ok(session) => session,
        Err(reason) => return lost(reason),
    };
    let hold_until = settings
        .min_hold
        .and_then(|min| acquired_at.checked_add(min))
        .filter(|until| *until > Instant::now());
    let Some(until) = hold_until else {
        return match session.release() {
            Ok(()) => outcome,
            Err(reason) => lost(reason),
        };
    };
    // Confirm the command ran under the lock before the extra hold, so a loss during the hold
    // is not mistaken for one during the command.
    if let Err(reason) = session.check() {
        return lost(reason);
    }
    log::info(format!(
        "holding the lock {} ms more for --min-hold",
        until.saturating_duration_since(Instant::now()).as_millis()
    ));
    supervisor.hold_until(until);
    if let Err(reason) = session.release() {
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
    let child = supervisor.start(|| child::spawn(&settings.command, &[], &[]))?;
    supervisor.supervise(child, &limits(settings), &settings.lock.describe())
}

fn limits(settings: &Settings) -> Limits {
    Limits {
        timeout: settings.timeout,
        kill_after: settings.kill_after,
        heartbeat: settings.heartbeat,
    }
}

fn busy_message(settings: &Settings, busy: &lock::Busy) -> String {
    let who = holders::describe(&busy.holders);
    match (busy.waited, &busy.ended_by) {
        (None, _) => format!(
            "lock {} is {who}; not running the command",
            settings.lock.describe()
        ),
        (Some(waited), None) => format!(
            "lock {} is still {who} after waiting {:.1}s; not running the command",
            settings.lock.describe(),
            waited.as_secs_f64()
        ),
        (Some(waited), Some(ended_by)) => format!(
            "lock {} is still {who} after waiting {:.1}s: {ended_by}; not running the command",
            settings.lock.describe(),
            waited.as_secs_f64()
        ),
    }
}

fn log_acquired(settings: &Settings, session: &Session, fencing_token: i64) {
    let key = settings.lock.key.slot(session.slot);
    let (classid, objid, objsubid) = key.pg_locks_ids();
    let slot = if settings.lock.slots > 1 {
        format!(" slot {}", session.slot)
    } else {
        String::new()
    };
    log::info(format!(
        "acquired lock {}{slot} on backend pid {} (pg_locks: classid={classid} objid={objid} objsubid={objsubid}; fencing token {fencing_token})",
        settings.lock.describe(),
        session.backend_pid
    ));
}

/// What the command learns about its lock; the key, database, mode and slot count also let a
/// heimdall that the command starts recognise the lock as already held.
fn child_env(
    settings: &Settings,
    session: &Session,
    fencing_token: i64,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        (ENV_KEY, settings.lock.key.to_string()),
        (ENV_LOCK_HELD, "1".to_owned()),
        (ENV_DATABASE, settings.connection.conn.describe()),
        (ENV_MODE, settings.mode.name().to_owned()),
        (ENV_SLOTS, settings.lock.slots.to_string()),
        ("HEIMDALL_FENCING_TOKEN", fencing_token.to_string()),
        (ENV_PID, std::process::id().to_string()),
        (ENV_BACKEND_PID, session.backend_pid.to_string()),
    ];
    if let Some((ns, name)) = &settings.lock.names {
        env.push(("HEIMDALL_NAMESPACE", ns.clone()));
        env.push(("HEIMDALL_NAME", name.clone()));
    }
    if settings.lock.slots > 1 {
        env.push(("HEIMDALL_SLOT", session.slot.to_string()));
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

/// Parses `args` with clap; on failure prints heimdall's one-line message and gives the exit
/// code (help and version are not failures).
fn parse<T: Parser>(args: &[OsString]) -> std::result::Result<T, ExitCode> {
    T::try_parse_from(args).map_err(usage_error)
}

/// clap's own messages span several lines; heimdall's errors are one line on stderr.
fn usage_error(err: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(exit::USAGE)
        }
        _ => {
            let text = err.to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            let first_block = text.split("\n\n").next().unwrap_or(text);
            let line = first_block.split_whitespace().collect::<Vec<_>>().join(" ");
            log::error(format!("{line} (see heimdall --help)"));
            ExitCode::from(exit::USAGE)
        }
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
