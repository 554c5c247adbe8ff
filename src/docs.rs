//! Documentation generated from the clap definitions, so it cannot drift from the binary: shell
//! completions and the manual page, with the exit-status and environment sections the man page
//! needs.

use std::io::{self, Write};

use clap::{Command, CommandFactory};

use crate::cli::{CompletionsCli, KeyCli, ListCli, ManCli, RunCli, StatusCli};
use crate::conninfo;
use crate::exit;

/// The run command with the subcommands attached, for documentation only: parsing keeps them
/// apart so that a wrapped command is never taken for a subcommand.
fn documented() -> Command {
    RunCli::command()
        .disable_help_subcommand(true)
        .subcommand_negates_reqs(true)
        .args_conflicts_with_subcommands(true)
        .subcommand(StatusCli::command().name("status"))
        .subcommand(ListCli::command().name("list"))
        .subcommand(KeyCli::command().name("key"))
        .subcommand(CompletionsCli::command().name("completions"))
        .subcommand(ManCli::command().name("man"))
}

pub fn completions(shell: clap_complete::Shell) -> io::Result<()> {
    let mut cmd = documented();
    // Generate into memory: clap_complete panics on a write error, such as a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "heimdall", &mut script);
    write_stdout(&script)
}

pub fn man_page() -> io::Result<()> {
    let cmd = documented();
    let man = clap_mangen::Man::new(cmd.clone());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    man.render_options_section(&mut page)?;
    man.render_subcommands_section(&mut page)?;
    page.write_all(exit_status_section().as_bytes())?;
    page.write_all(environment_section(&cmd).as_bytes())?;
    page.write_all(SEE_ALSO.as_bytes())?;
    man.render_version_section(&mut page)?;
    write_stdout(&page)
}

/// A reader that stops early (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

const SEE_ALSO: &str = ".SH \"SEE ALSO\"\nflock(1), timeout(1), psql(1), and README.md, which documents every mode with examples.\n";

/// The table from `exit.rs`, as roff.
fn exit_status_section() -> String {
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for line in exit::HELP_TABLE.lines().skip(1) {
        let line = line.trim_start();
        // Continuation lines of a row start with spaces only in the help text.
        match line.split_once("  ") {
            Some((code, meaning)) if !code.is_empty() => {
                roff.push_str(&format!(
                    ".TP\n\\fB{}\\fR\n{}\n",
                    escape(code),
                    escape(meaning.trim())
                ));
            }
            _ => roff.push_str(&format!("{}\n", escape(line))),
        }
    }
    roff
}

/// Every environment variable heimdall reads (the env twins of its flags, then libpq's) and
/// those it sets for the command.
fn environment_section(cmd: &Command) -> String {
    let mut roff = String::from(".SH ENVIRONMENT\n");
    for arg in cmd.get_arguments() {
        if let Some(var) = arg.get_env() {
            roff.push_str(&format!(
                ".TP\n\\fB{}\\fR\nthe default for \\fB--{}\\fR\n",
                escape(&var.to_string_lossy()),
                arg.get_long().unwrap_or_default()
            ));
        }
    }
    roff.push_str(".TP\n\\fBDATABASE_URL\\fR\nused when neither --database nor HEIMDALL_DATABASE_URL is given\n");
    let libpq: Vec<&str> = conninfo::SUPPORTED
        .iter()
        .filter_map(|(_, var)| *var)
        .collect();
    roff.push_str(&format!(
        ".TP\n\\fB{}\\fR\nlibpq's connection variables, for anything the connection string leaves out\n",
        libpq.join(", ")
    ));
    roff.push_str(
        ".PP\nSet for the command: \\fBHEIMDALL_NAMESPACE\\fR, \\fBHEIMDALL_NAME\\fR, \\fBHEIMDALL_KEY\\fR, \\fBHEIMDALL_SLOT\\fR (with --slots), \\fBHEIMDALL_LOCK_HELD\\fR=1, \\fBHEIMDALL_FENCING_TOKEN\\fR, \\fBHEIMDALL_LOCK_DATABASE\\fR, \\fBHEIMDALL_LOCK_MODE\\fR, \\fBHEIMDALL_SLOTS\\fR.\n",
    );
    roff
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\e").replace('-', "\\-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_command_is_consistent() {
        documented().debug_assert();
    }

    #[test]
    fn man_sections_cover_exit_codes_and_environment() {
        let exit = exit_status_section();
        for code in ["75", "76", "69", "78", "124", "125", "126", "127"] {
            assert!(
                exit.contains(&format!("\\fB{code}\\fR")),
                "{code} missing:\n{exit}"
            );
        }
        let env = environment_section(&documented());
        for var in [
            "HEIMDALL_DATABASE_URL",
            "HEIMDALL_BUSY_EXIT_CODE",
            "HEIMDALL_HEARTBEAT",
            "PGHOST",
            "PGSSLMODE",
        ] {
            assert!(env.contains(&escape(var)), "{var} missing:\n{env}");
        }
    }
}
