//! The command line: a run's flags and the options a run shares with the subcommands, their
//! environment twins and help text (the subcommands' own in `cli/sub.rs`, value parsers in
//! `cli/values.rs`, help rendering in `cli/help.rs`). Nothing here validates combinations or
//! reads the environment beyond what clap does; see `config`.
//!
//! `heimdall [OPTIONS] [--] COMMAND...` runs a command. `status`, `list` and `key` are
//! subcommands only as heimdall's very first argument, so a wrapped command is never taken for
//! one: `heimdall --name x -- status` and `heimdall --name x status` both run a program called
//! `status`. [`parse`] (in `cli/parse.rs`) does that dispatch, `--wait DURATION`, `-h` and the
//! one-line usage errors.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Command, Parser};

use crate::domain::key::{Hash, LockKey};
use crate::domain::lease_table::{LeaseTable, RunTable};
use crate::domain::lock::Wait;
use crate::exit;
use crate::report::ReportFormat;

mod help;
mod parse;
mod sub;
mod values;
pub use help::{possible_values, print_stdout, without_trailing_blanks};
pub use parse::{Invocation, parse};
pub use sub::{
    CompletionsCli, KeyCli, LeaseDdlCli, ListCli, ManCli, RunDdlCli, StatusCli, StopCli, Sub,
    subcommand_names,
};
use values::{
    exit_code, heartbeat_duration, lease_table, long_duration, min_interval, non_empty, run_table,
    slots, wait,
};

const AFTER_HELP: &str = "\
DURATION is 30s, 5m, 1h30m, 250ms, or a number of seconds (5, 1.5).

Examples:
  # A crontab on every host: one host runs the job, the others skip it (exit 75)
  # without a word (-q), so cron mails nothing for a skipped run.
  0 2 * * * heimdall -q --namespace billing --name nightly -- ./invoices.sh
  # Queue behind a running deploy for at most 10 minutes, then exit 75.
  heimdall --wait=10m --namespace deploy --name prod -- ./deploy.sh
  # The newest deploy wins: stop the running one (it exits 79), then run.
  heimdall --replace --wait=10m --namespace deploy --name prod -- ./deploy.sh
  # Is the lock free (exit 0) or held (exit 75), and by whom?
  heimdall status --namespace billing --name nightly

Subcommands (only as the first argument; see `heimdall help status`):
  heimdall status ...   is the lock free or held, and by whom (exit 0 if a run would start, else 75)
  heimdall stop ...     ask the heimdall run holding the lock to stop, and wait until it let go
  heimdall list ...     every lock currently held through heimdall on the database
  heimdall key ...      the keys a namespace and name map to, and the pg_locks query for them
  heimdall lease-ddl    the CREATE TABLE statement of a --lease-table, for a DBA
  heimdall run-ddl      the CREATE TABLE statement of a --run-table, for a DBA
  heimdall completions bash|zsh|fish   shell completions on stdout
  heimdall man          the manual page (roff) on stdout
  heimdall help [SUBCOMMAND]   this help, or a subcommand's

Connection settings not given by --database come from the libpq environment variables (PGHOST,
PGHOSTADDR, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGPASSFILE, PGAPPNAME, PGCONNECT_TIMEOUT,
PGOPTIONS, PGSSLMODE, PGSSLNEGOTIATION, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, PGTARGETSESSIONATTRS,
PGLOADBALANCEHOSTS), then ~/.pgpass, then libpq's defaults.";

/// The last paragraph but the exit table: the command's environment (from `environ.rs`) and
/// signals.
fn after_help() -> String {
    format!(
        "{AFTER_HELP}\n\nThe command runs in its own process group with {} set. heimdall forwards \
         SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to that group and keeps the lock \
         until the command is gone.\n\n{}",
        crate::environ::documented_list(str::to_owned),
        exit::help_table()
    )
}

/// Where to connect.
#[derive(Debug, Args)]
pub struct ConnArgs {
    /// PostgreSQL to lock on: a postgres:// or postgresql:// URL, or a libpq key=value string.
    /// Falls back to $DATABASE_URL, then to the PG* variables alone.
    #[arg(
        help = "PostgreSQL URL or key=value (else PG*)",
        long_help,
        long,
        value_name = "URL|CONNINFO",
        env = "HEIMDALL_DATABASE_URL",
        hide_env_values = true
    )]
    pub database: Option<String>,

    /// The most to wait for each server to accept the connection and log in. Overrides the
    /// URL's connect_timeout and PGCONNECT_TIMEOUT; without any of them, 10s. 0: wait forever.
    #[arg(help = "most to wait to connect and log in [10s]", long_help, long, value_name = "DURATION", value_parser = long_duration, env = "HEIMDALL_CONNECT_TIMEOUT", hide_env_values = true)]
    pub connect_timeout: Option<Duration>,
}

/// Which lock.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lock's namespace (any non-empty UTF-8); hashed into the first key.
    #[arg(help = "the lock's namespace", long_help, long, value_name = "NS", required_unless_present = "key", value_parser = non_empty)]
    pub namespace: Option<String>,

    /// The lock's name within the namespace (any non-empty UTF-8); hashed into the second key.
    #[arg(help = "the lock's name within the namespace", long_help, long, value_name = "NAME", required_unless_present = "key", value_parser = non_empty)]
    pub name: Option<String>,

    /// Lock on explicit keys instead of a namespace and name: a bigint (pg_advisory_lock(bigint))
    /// or two int4 separated by a comma (pg_advisory_lock(int, int)).
    #[arg(help = "explicit keys instead of names", long_help, long, value_name = "BIGINT|INT,INT", conflicts_with_all = ["namespace", "name"], allow_hyphen_values = true)]
    pub key: Option<LockKey>,

    /// How namespace and name become keys. fnv1 gives the Go heimdall's keys, so old and new
    /// binaries exclude each other during a migration.
    #[arg(
        help = "how names become keys",
        long_help,
        long,
        value_enum,
        default_value = "siphash",
        env = "HEIMDALL_HASH",
        hide_env_values = true
    )]
    pub hash: Hash,

    /// A counting semaphore: at most N copies run at once, each holding one of N slot locks
    /// (slot i uses the second key + i). The command learns its slot in HEIMDALL_SLOT.
    #[arg(help = "at most N copies at once (1-1000)", long_help, long, value_name = "N", default_value_t = 1, value_parser = slots)]
    pub slots: u16,

    /// With --wait: at most N runs wait for this lock at once, fleet-wide. A run that finds N
    /// already waiting exits at once with the busy exit code, without running the command.
    /// --queue 1 is Temporal's BufferOne: while a job runs, one start is kept, to run as soon as
    /// the job ends, and the others are dropped. Each waiting run holds one of N places,
    /// advisory locks on keys derived from the lock's (heimdall key --queue N shows them), for
    /// as long as it waits. Without --wait, or with --lease-table, it is a usage error;
    /// HEIMDALL_QUEUE alone is ignored by a run that does not wait. For status and key: the
    /// places to count or show.
    #[arg(help = "with --wait: at most N runs wait (1-1000)", long_help, long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1000), env = "HEIMDALL_QUEUE", hide_env_values = true)]
    pub queue: Option<u16>,

    /// `--queue` was given on the command line, not only through `HEIMDALL_QUEUE` (set by
    /// `parse`): only then is it an error without `--wait`.
    #[arg(skip)]
    pub queue_on_command_line: bool,
}

/// How much heimdall says.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Say more on stderr: -v reports the connection, keys, waits, timings and signals; -vv more.
    #[arg(help = "say more on stderr (-vv: more)", long_help, short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Print nothing when the lock is busy, and no warnings; errors are still printed.
    #[arg(help = "nothing when busy, no warnings", long_help, short, long)]
    pub quiet: bool,

    /// The most verbose output (the Go heimdall's flag; same as -vv).
    #[arg(
        help = "the most output (same as -vv)",
        long_help,
        long,
        conflicts_with = "quiet"
    )]
    pub debug: bool,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall",
    version,
    about = "Run a command while holding a PostgreSQL advisory lock, on at most one machine at a time.",
    long_about = None,
    after_help = after_help(),
    // Everything from the command on is the command's: `heimdall --name x echo --name -v`.
    trailing_var_arg = true,
)]
pub struct RunCli {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(flatten)]
    pub lock: LockArgs,

    /// Wait for a busy lock instead of giving up at once: --wait alone waits as long as it takes,
    /// --wait=DURATION or --wait DURATION gives up after DURATION with the busy exit code. The word
    /// after a bare --wait is its DURATION when it reads as one (30s, 5m, 1.5, forever); otherwise
    /// the command starts there: `--wait 5s date` waits at most 5s, `--wait date` has no limit.
    /// With one slot and an advisory lock, waiters are served first come, first served
    /// (PostgreSQL's lock queue); with --slots or --lease-table they poll. 0: do not wait.
    #[arg(help = "wait for a busy lock; alone: no limit", long_help, long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = "forever", value_parser = wait, env = "HEIMDALL_WAIT", hide_env_values = true)]
    pub wait: Option<Wait>,

    /// Take the lock in shared mode: any number of shared holders run together, while an
    /// exclusive holder excludes them all (many readers versus one maintenance job).
    #[arg(
        help = "shared mode: shared holders run together",
        long_help,
        long,
        conflicts_with = "slots"
    )]
    pub shared: bool,

    /// The newest run wins: when another heimdall run holds the lock, ask it to stop its
    /// command (as on a lost lock: SIGTERM, SIGKILL after its --kill-after; it exits 79 once
    /// the job is gone), wait for the lock, then run. The wait is bounded by --wait=DURATION,
    /// else by heartbeat + heartbeat-timeout + kill-after + 10s (30s with the defaults); on
    /// expiry the busy exit code, saying why. A holder that is not heimdall (or a heimdall
    /// older than --replace) is not asked, and nothing is terminated. Waiters queued ahead of
    /// it do not run. With --lease-table too. Not with --shared, --slots or --queue.
    #[arg(help = "ask the holder to stop, then run (exit 79 there)", long_help, long, value_parser = clap::builder::BoolishValueParser::new(), env = "HEIMDALL_REPLACE", hide_env_values = true)]
    pub replace: bool,

    /// The most the command may run, e.g. 30s, 5m, 1h30m (a bare number means seconds). On
    /// expiry the command's process group gets SIGTERM, then SIGKILL after --kill-after, and
    /// heimdall exits 124. 0 or absent: no limit.
    #[arg(help = "stop the command after this (exit 124)", long_help, long, value_name = "DURATION", value_parser = long_duration)]
    pub timeout: Option<Duration>,

    /// How long a command stopped by heimdall gets between SIGTERM and SIGKILL. 0: SIGKILL at once.
    #[arg(help = "from SIGTERM to SIGKILL when stopping it", long_help, long, value_name = "DURATION", value_parser = long_duration, default_value = "10s", env = "HEIMDALL_KILL_AFTER", hide_env_values = true)]
    pub kill_after: Duration,

    /// How often to check, while the command runs, that the session holding the lock is still
    /// alive and still the same backend. If a check fails or gets no answer, the command is
    /// stopped and heimdall exits 76. 0 disables the watchdog: the command then runs on, unseen,
    /// if the lock is lost (the backend terminated, the server restarted, the network cut).
    #[arg(help = "check the lock's session this often; 0: off", long_help, long, value_name = "DURATION", value_parser = heartbeat_duration, default_value = "5s", env = "HEIMDALL_HEARTBEAT", hide_env_values = true)]
    pub heartbeat: Duration,

    /// How long one heartbeat may wait for its answer before the lock counts as lost. Default:
    /// the --heartbeat interval.
    #[arg(help = "most one check may take [--heartbeat]", long_help, long, value_name = "DURATION", value_parser = heartbeat_duration, env = "HEIMDALL_HEARTBEAT_TIMEOUT", hide_env_values = true)]
    pub heartbeat_timeout: Option<Duration>,

    /// After a server (re)start, crash or failover, a job that lost the lock there may run on
    /// until its heimdall notices: a lock taken less than DURATION after the server came up (by
    /// its clock) is held, but the command starts only DURATION after that moment. Default:
    /// heartbeat + heartbeat-timeout + kill-after + 2s (22s); none with --heartbeat 0. 0: off.
    /// Not used with --lease-table: a lease survives a restart.
    #[arg(help = "after a server restart, wait to run [22s]", long_help, long, value_name = "DURATION", value_parser = long_duration, env = "HEIMDALL_LOCK_DELAY", hide_env_values = true)]
    pub lock_delay: Option<Duration>,

    /// Exit code when the lock is held elsewhere and the command did not run (0-255).
    #[arg(help = "exit code when the lock is busy", long_help, long, value_name = "N", default_value_t = exit::BUSY_DEFAULT, value_parser = exit_code, env = "HEIMDALL_BUSY_EXIT_CODE", hide_env_values = true)]
    pub busy_exit_code: u8,

    #[command(flatten)]
    pub lease: LeaseArgs,

    /// How long a lease lives without renewal (with --lease-table). heimdall renews it every
    /// min(ttl/3, budget/2) (8.5s with the defaults), where budget = ttl - kill-after - max(1s,
    /// ttl/10), and stops the command once a budget has passed without a successful renewal, so
    /// before the lease could expire. The budget must be at least 1s.
    #[arg(help = "a lease lives this long unrenewed [30s]", long_help, long, value_name = "DURATION", value_parser = long_duration, default_value = "30s", env = "HEIMDALL_LEASE_TTL", hide_env_values = true)]
    pub lease_ttl: Duration,

    /// Keep the lock at least this long after it was taken, even if the command finished
    /// sooner, so a host whose cron fires a few seconds late does not run a short job again. The
    /// command's exit status is reported as it is. 0 or absent: release at once.
    #[arg(help = "keep the lock at least this long", long_help, long, value_name = "DURATION", value_parser = long_duration, env = "HEIMDALL_MIN_HOLD", hide_env_values = true)]
    pub min_hold: Option<Duration>,

    /// Start the command only if no run of this lock started within DURATION, measured on the
    /// database server's clock, so that no host's clock matters; otherwise exit with the busy
    /// code, saying when the last run started, where, and how it ended. For a job that every
    /// host of a fleet runs on the same schedule: about half the schedule's period (30m for an
    /// hourly job). Each run's start is recorded in the run table (see --run-table) in the
    /// transaction that takes the lock, before the command starts, so a run that is killed
    /// still counts. Not with --shared or --slots. Must be more than 0.
    #[arg(help = "run only if no run started within this", long_help, long, value_name = "DURATION", value_parser = min_interval, allow_hyphen_values = true, env = "HEIMDALL_MIN_INTERVAL", hide_env_values = true)]
    pub min_interval: Option<Duration>,

    #[command(flatten)]
    pub record: RecordArgs,

    /// After the run, write a Prometheus text file for node_exporter's textfile collector
    /// (outcome, exit code, time waited and held, start and end), atomically (temp file, then
    /// rename).
    #[arg(
        help = "write Prometheus metrics after the run",
        long_help,
        long,
        value_name = "PATH",
        env = "HEIMDALL_METRICS_FILE",
        hide_env_values = true
    )]
    pub metrics_file: Option<PathBuf>,

    /// At the end, print one line with the same facts on stderr, in FORMAT (json).
    #[arg(
        help = "one line of facts on stderr at the end",
        long_help,
        long,
        value_name = "FORMAT",
        value_enum,
        env = "HEIMDALL_REPORT",
        hide_env_values = true
    )]
    pub report: Option<ReportFormat>,

    #[command(flatten)]
    pub output: OutputArgs,

    /// The command to run while holding the lock, and its arguments.
    // No allow_hyphen_values: a word starting with `-` before the command is one of our options
    // or a usage error, never the command (`--wiat=10s` must not run a program of that name).
    // After the first word of the command, trailing_var_arg passes everything on untouched.
    #[arg(value_name = "COMMAND", required = true, num_args = 1..)]
    pub command: Vec<OsString>,

    /// Why the command starts where it does, when the words before it may have been meant
    /// otherwise (`--wait 5 min`): said if its program is not found.
    #[arg(skip)]
    pub command_note: Option<String>,
}

/// Lease mode: a row in a table instead of an advisory lock.
#[derive(Debug, Clone, Args)]
pub struct LeaseArgs {
    /// Lease mode, with the lease table TABLE (in schema public, whatever the search_path) or
    /// SCHEMA.TABLE (not pg_temp): a run holds a row there instead of an advisory lock,
    /// renewed by short autocommit statements, so it works through any pooler and many jobs
    /// share a few server connections (a run creates the table when missing, and refuses one
    /// of another shape; see heimdall lease-ddl). status and list then read the leases.
    #[arg(help = "hold a lease row in TABLE, not an advisory lock", long_help, long, value_name = "TABLE", value_parser = lease_table, env = "HEIMDALL_LEASE_TABLE", hide_env_values = true)]
    pub lease_table: Option<LeaseTable>,
}

/// The run record: a table with each lock's last run.
#[derive(Debug, Clone, Args)]
pub struct RecordArgs {
    /// Record each run of the lock (start, end, exit status, outcome, host and pid) in the run
    /// table TABLE (in schema public, whatever the search_path) or SCHEMA.TABLE (not pg_temp),
    /// for status and list; --min-interval implies it, with heimdall_runs. A run creates the
    /// table when missing, and refuses one of another shape (see heimdall run-ddl). Not with
    /// --shared or --slots.
    #[arg(help = "record each run in TABLE [heimdall_runs]", long_help, long, value_name = "TABLE", value_parser = run_table, env = "HEIMDALL_RUN_TABLE", hide_env_values = true)]
    pub run_table: Option<RunTable>,
}

/// The run table when none is given: what `--min-interval`, `status` and `list` use.
pub const DEFAULT_RUN_TABLE: &str = "heimdall_runs";

/// Reads each environment twin of `command` as libpq reads its variables: an empty one counts
/// as unset (an empty `HEIMDALL_WAIT` must not mean "wait forever"), and one that is not UTF-8
/// is refused by name, never ignored, unless the flag takes a path.
pub fn with_env_rules(command: Command) -> Result<Command, clap::Error> {
    for arg in command.get_arguments() {
        let Some(name) = arg.get_env() else { continue };
        let takes_path = arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>();
        if std::env::var_os(name).is_some_and(|v| v.to_str().is_none()) && !takes_path {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::InvalidUtf8,
                format!(
                    "the environment variable {} is not valid UTF-8; fix or unset it",
                    name.to_string_lossy()
                ),
            ));
        }
    }
    Ok(command.mut_args(|arg| {
        let empty = arg
            .get_env()
            .and_then(std::env::var_os)
            .is_some_and(|v| v.is_empty());
        if empty { arg.env(None) } else { arg }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definitions_are_consistent() {
        RunCli::command().debug_assert();
        StatusCli::command().debug_assert();
        ListCli::command().debug_assert();
        KeyCli::command().debug_assert();
        LeaseDdlCli::command().debug_assert();
        RunDdlCli::command().debug_assert();
        CompletionsCli::command().debug_assert();
        ManCli::command().debug_assert();
    }

    #[test]
    fn the_command_keeps_its_own_flags() {
        let cli = RunCli::try_parse_from([
            "heimdall",
            "--name",
            "x",
            "--namespace",
            "n",
            "echo",
            "--name",
            "-v",
        ])
        .unwrap();
        assert_eq!(cli.command, ["echo", "--name", "-v"]);
        assert_eq!(cli.output.verbose, 0);
    }

    #[test]
    fn wait_takes_an_optional_duration_only_with_equals() {
        let parse = |args: &[&str]| {
            let mut all = vec!["heimdall", "--key", "1"];
            all.extend_from_slice(args);
            RunCli::try_parse_from(all).unwrap()
        };
        let cli = parse(&["--wait", "sleep", "5"]);
        assert_eq!(cli.wait, Some(Wait::Forever));
        assert_eq!(cli.command, ["sleep", "5"]);
        let cli = parse(&["--wait=30s", "true"]);
        assert_eq!(cli.wait, Some(Wait::Up(Duration::from_secs(30))));
        assert_eq!(parse(&["true"]).wait, None);
    }
}
