//! heimdall: run a command while holding a PostgreSQL advisory lock, so that it runs on at most
//! one machine at a time and never without its lock.

mod child;
mod cli;
mod config;
mod conninfo;
mod exit;
mod key;
mod lock;
mod log;
mod pgpass;
mod supervise;
mod watchdog;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use crate::cli::Cli;
use crate::config::Settings;
use crate::exit::Outcome;
use crate::lock::Acquire;
use crate::supervise::{Limits, Supervisor};
use crate::watchdog::Watchdog;

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(err),
    };
    match run(cli) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(err) => {
            log::error(format!("{err:#}"));
            ExitCode::from(exit::code_for_error(&err))
        }
    }
}

/// parse → configure → connect → lock → spawn → supervise → release → outcome.
fn run(cli: Cli) -> Result<Outcome> {
    let settings = Settings::from_cli(cli)?;
    log::set_level(settings.level);
    for warning in &settings.conn.warnings {
        log::warn(warning);
    }
    let supervisor = Supervisor::install()?;

    let client = lock::connect(&settings)?;
    let where_ = settings.conn.describe();
    let mut session = match lock::try_acquire(client, settings.lock.key, &where_)? {
        Acquire::Held(session) => session,
        Acquire::Busy => {
            log::warn(format!(
                "lock {} is held by another session; not running the command",
                settings.lock.describe()
            ));
            return Ok(Outcome::Busy(settings.busy_exit_code));
        }
    };
    session.verify(&where_)?;
    let (classid, objid, objsubid) = settings.lock.key.pg_locks_ids();
    log::info(format!(
        "acquired lock {} on backend pid {} (pg_locks: classid={classid} objid={objid} objsubid={objsubid})",
        settings.lock.describe(),
        session.backend_pid
    ));

    let child = supervisor.start(|| {
        child::spawn(
            &settings.command,
            &child_env(&settings),
            &unset_env(&settings),
        )
    })?;
    log::info(format!("started the command as pid {}", child.pid));
    let watchdog = Watchdog::start(*session, settings.heartbeat, supervisor.events())?;
    let limits = Limits {
        timeout: settings.timeout,
        kill_after: settings.kill_after,
        heartbeat: settings.heartbeat,
    };
    let outcome = supervisor.supervise(child, &limits, &settings.lock.describe())?;
    if outcome == Outcome::LockLost {
        return Ok(outcome);
    }
    // A lock lost after the last heartbeat shows only now; the command may have overlapped
    // with another run, and that must not pass as a success.
    if let Err(reason) = watchdog.stop().and_then(|session| session.release()) {
        log::error(format!(
            "lost lock {} before the command finished ({}): {reason}; another run may have overlapped with it",
            settings.lock.describe(),
            outcome_words(outcome)
        ));
        return Ok(Outcome::LockLost);
    }
    Ok(outcome)
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

/// What the command learns about its lock.
fn child_env(settings: &Settings) -> Vec<(&'static str, String)> {
    let mut env = vec![("HEIMDALL_KEY", settings.lock.key.to_string())];
    if let Some((ns, name)) = &settings.lock.names {
        env.push(("HEIMDALL_NAMESPACE", ns.clone()));
        env.push(("HEIMDALL_NAME", name.clone()));
    }
    env
}

/// With `--key`, names inherited from an outer heimdall would describe another lock.
fn unset_env(settings: &Settings) -> Vec<&'static str> {
    if settings.lock.names.is_none() {
        vec!["HEIMDALL_NAMESPACE", "HEIMDALL_NAME"]
    } else {
        Vec::new()
    }
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
        log::error(format!("internal error: {info}"));
        std::process::exit(exit::INTERNAL.into());
    }));
}
