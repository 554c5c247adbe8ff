//! heimdall: run a command while holding a PostgreSQL advisory lock, so that it runs on at most
//! one machine at a time and never without its lock.
//!
//! `main` parses the command line, dispatches to a run (`run/`), a read-only subcommand
//! (`inspect.rs`) or the documentation (`docs.rs`), and turns the result into an exit code.
//! ARCHITECTURE.md shows the layers below.

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
mod report;
mod run;
mod supervise;

use std::process::ExitCode;

use crate::cli::Invocation;
use crate::process::keeper;

fn main() -> ExitCode {
    install_panic_hook();
    log::init();
    let result = match cli::parse(std::env::args_os().collect()) {
        Invocation::Run(cli) => Ok(run::run_and_report(*cli)),
        Invocation::Status(cli) => inspect::status(cli),
        Invocation::Stop(cli) => inspect::stop(cli),
        Invocation::List(cli) => inspect::list(cli),
        Invocation::Key(cli) => inspect::key(cli),
        Invocation::LeaseDdl(cli) => inspect::lease_ddl(cli),
        Invocation::RunDdl(cli) => inspect::run_ddl(cli),
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

/// A bug must still end in one line and a documented code, not a backtrace.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        keeper::stop_job_now();
        log::error(format!("internal error: {info}"));
        log::exit(exit::INTERNAL);
    }));
}
