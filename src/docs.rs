//! Documentation generated from the clap definitions, so it cannot drift from the binary: shell
//! completions and the manual page, with the exit-status and environment sections the man page
//! needs.

use std::io::{self, Write};

use clap::{Command, CommandFactory};

use crate::cli::{
    RunCli, Sub, possible_values, print_stdout, subcommand_names, without_trailing_blanks,
};
use crate::conninfo;
use crate::environ;
use crate::exit;

/// The run command with the subcommands attached, for documentation only: parsing keeps them
/// apart so that a wrapped command is never taken for a subcommand.
fn documented() -> Command {
    Sub::ALL.into_iter().fold(
        RunCli::command()
            .disable_help_subcommand(true)
            .subcommand_negates_reqs(true)
            .args_conflicts_with_subcommands(true),
        |cmd, sub| cmd.subcommand(sub.command().name(sub.name())),
    )
}

pub fn completions(shell: clap_complete::Shell) -> io::Result<()> {
    let mut cmd = documented();
    // Generate into memory: clap_complete panics on a write error, such as a closed pipe.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "heimdall", &mut script);
    print_stdout(&script)
}

pub fn man_page() -> io::Result<()> {
    let cmd = documented();
    let man = clap_mangen::Man::new(RunCli::command());
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    page.write_all(synopsis().as_bytes())?;
    page.write_all(DESCRIPTION.as_bytes())?;
    man.render_options_section(&mut page)?;
    page.write_all(subcommands_section(&cmd).as_bytes())?;
    page.write_all(examples_section().as_bytes())?;
    page.write_all(exit_status_section().as_bytes())?;
    page.write_all(environment_section(&cmd).as_bytes())?;
    page.write_all(SEE_ALSO.as_bytes())?;
    man.render_version_section(&mut page)?;
    // clap_mangen ends the title line with a blank.
    print_stdout(without_trailing_blanks(&String::from_utf8_lossy(&page)))
}

/// What heimdall does and what it promises; the NAME line says it in one breath, this in
/// full. One roff line per paragraph.
const DESCRIPTION: &str = r".SH DESCRIPTION
heimdall connects to PostgreSQL, takes an advisory lock named by a namespace and a name (or explicit keys, \fB\-\-key\fR), runs the command while it holds the lock, and exits with the command's exit code. When the lock is held elsewhere, the command does not run and heimdall exits 75 (\fB\-\-busy\-exit\-code\fR), or, with \fB\-\-wait\fR, queues for it.
.PP
Its promise: a command wrapped in heimdall runs on at most one machine at a time, and never runs without its lock. The lock is taken before the command starts and checked while it runs (\fB\-\-heartbeat\fR); if it is lost, heimdall stops the command and exits 76. The connection that holds the lock is closed only after the command and everything it started are gone, and if heimdall itself is killed, its keeper process stops the command first.
.PP
It is made for jobs that cron, systemd timers, Kubernetes CronJobs and CI start on many machines sharing one PostgreSQL, directly or through PgBouncer or pgpool\-II. Standard output belongs to the command; heimdall's own messages go to standard error, one line each, prefixed \fBheimdall:\fR.
";

/// clap_mangen's synopsis lists every flag and ends `<COMMAND> [subcommands]`; the forms a
/// user types say more.
fn synopsis() -> String {
    let subs: Vec<String> = subcommand_names()
        .map(|name| format!("\\fB{}\\fR", escape(name)))
        .collect();
    format!(
        r".SH SYNOPSIS
\fBheimdall\fR [\fIOPTIONS\fR] \fB\-\-namespace\fR \fINS\fR \fB\-\-name\fR \fINAME\fR [\fB\-\-\fR] \fICOMMAND\fR [\fIARGS\fR...]
.br
\fBheimdall\fR [\fIOPTIONS\fR] \fB\-\-key\fR \fIKEY\fR [\fB\-\-\fR] \fICOMMAND\fR [\fIARGS\fR...]
.br
\fBheimdall\fR {} [\fIOPTIONS\fR]
.PP
heimdall's options come before the command, which starts at the first word that does not begin
with \-, or after \-\-. Everything from the command on is passed to it untouched.
",
        subs.join("|")
    )
}

/// Each subcommand with its options, in this page: there are no separate pages such as
/// heimdall-status(1) to point at.
fn subcommands_section(cmd: &Command) -> String {
    let mut roff = String::from(".SH SUBCOMMANDS\nOnly as heimdall's first argument.\n");
    for sub in cmd.get_subcommands() {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        roff.push_str(&format!(
            ".SS \"heimdall {} [OPTIONS]\"\n{}\n",
            sub.get_name(),
            escape(&about)
        ));
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let value = match arg.get_value_names() {
                Some([name, ..]) if arg.get_action().takes_values() => {
                    format!(" \\fI{}\\fR", escape(name))
                }
                _ => String::new(),
            };
            let name = match (arg.get_short(), arg.get_long()) {
                (Some(s), Some(l)) => format!("\\fB\\-{s}\\fR, \\fB\\-\\-{}\\fR{value}", escape(l)),
                (None, Some(l)) => format!("\\fB\\-\\-{}\\fR{value}", escape(l)),
                _ => format!("\\fI{}\\fR", arg.get_id().as_str().to_uppercase()),
            };
            let mut help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            let possible = possible_values(arg);
            if !possible.is_empty() {
                help = format!(
                    "{}. One of: {}.",
                    help.trim_end_matches('.'),
                    possible.join(", ")
                );
            }
            roff.push_str(&format!(".TP\n{name}\n{}\n", escape(&help)));
        }
    }
    roff.push_str(".SS \"heimdall help [SUBCOMMAND]\"\nThe long help of heimdall, or of a subcommand; \\fB\\-h\\fR gives a one-screen summary.\n");
    roff
}

/// The common jobs, as a person would copy them: cron, systemd, --wait, --slots, status.
fn examples_section() -> String {
    let mut roff = String::from(".SH EXAMPLES\n");
    for (text, code) in EXAMPLES {
        roff.push_str(&format!(".PP\n{}\n.PP\n.RS 4\n.nf\n", escape(text)));
        for line in code.lines() {
            roff.push_str(&escape(line));
            roff.push('\n');
        }
        roff.push_str(".fi\n.RE\n");
    }
    roff
}

const EXAMPLES: &[(&str, &str)] = &[
    (
        "A crontab on every host of a fleet: one host runs the nightly job, the others skip it without a word (-q), so cron mails nothing for a skipped run; --min-interval 12h (half the period) skips it too on a host whose cron fires after the night's run has finished. CRON_TZ pins the schedule to UTC, so that hosts in different time zones agree on the night.",
        "CRON_TZ=UTC
HEIMDALL_DATABASE_URL=postgres://cron@db.internal/app
0 2 * * * heimdall -q --min-interval 12h --namespace billing --name nightly-invoices -- /usr/local/bin/send-invoices",
    ),
    (
        "A systemd service and its timer: a skipped run (exit 75) is not a failure of the unit.",
        "# heimdall-invoices.service
[Service]
Type=oneshot
EnvironmentFile=/etc/heimdall/invoices.env
ExecStart=/usr/local/bin/heimdall --namespace billing --name nightly-invoices -- /usr/local/bin/send-invoices
SuccessExitStatus=75

# heimdall-invoices.timer
[Timer]
OnCalendar=*-*-* 02:00:00 UTC",
    ),
    (
        "Wait for the lock instead of skipping: at most 10 minutes, then exit 75. --wait alone waits as long as it takes. Deploys queue and run one at a time, first come, first served.",
        "heimdall --wait 10m --namespace deploy --name production -- ./deploy.sh
heimdall --wait --namespace deploy --name production -- ./deploy.sh",
    ),
    (
        "A counting semaphore: at most 3 report renderers at once across the fleet; each learns its slot (0, 1 or 2) in HEIMDALL_SLOT.",
        "heimdall --slots 3 --namespace reports --name render -- ./render.sh",
    ),
    (
        "Ask, without running anything, whether the lock is free (exit 0; with --slots N, while fewer than N are taken) or held (exit 75), and by whom.",
        "heimdall status --namespace billing --name nightly-invoices",
    ),
];

const SEE_ALSO: &str =
    ".SH \"SEE ALSO\"\nflock(1), timeout(1), psql(1), crontab(5), systemd.timer(5)\n";

/// The table from `exit.rs`, as roff.
fn exit_status_section() -> String {
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for row in &exit::TABLE {
        roff.push_str(&format!(
            ".TP\n\\fB{}\\fR\n{}\n",
            escape(row.code),
            escape(&row.plain_meaning())
        ));
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
    roff.push_str(&format!(
        ".PP\nSet for the command: {}.\n",
        environ::documented_list(|var| format!("\\fB{}\\fR", escape(var)))
    ));
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
