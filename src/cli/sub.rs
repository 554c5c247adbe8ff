//! The subcommands, recognised only as heimdall's very first argument ([`Sub`]), and their
//! options: `status`, `stop`, `list`, `key`, `lease-ddl`, `completions`, `man`. The options they share
//! with a run (where to connect, which lock, how much to say) are in `cli/mod.rs`.

use clap::{Command, CommandFactory, Parser};

use super::values::{exit_code, lease_table, long_duration, run_table};
use super::{ConnArgs, LeaseArgs, LockArgs, OutputArgs, RecordArgs};
use crate::domain::lease_table::{LeaseTable, RunTable};
use crate::exit;

/// The subcommands, recognised only as heimdall's very first argument. The one list: the
/// dispatch, `heimdall help NAME`, the usage line, the man page and the completions come from
/// it. `help` has no options and no type of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    Status,
    Stop,
    List,
    Key,
    LeaseDdl,
    RunDdl,
    Completions,
    Man,
}

impl Sub {
    pub const ALL: [Sub; 8] = [
        Sub::Status,
        Sub::Stop,
        Sub::List,
        Sub::Key,
        Sub::LeaseDdl,
        Sub::RunDdl,
        Sub::Completions,
        Sub::Man,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Sub::Status => "status",
            Sub::Stop => "stop",
            Sub::List => "list",
            Sub::Key => "key",
            Sub::LeaseDdl => "lease-ddl",
            Sub::RunDdl => "run-ddl",
            Sub::Completions => "completions",
            Sub::Man => "man",
        }
    }

    pub fn named(name: &str) -> Option<Sub> {
        Sub::ALL.into_iter().find(|sub| sub.name() == name)
    }

    /// Its clap definition, for its help and the documentation.
    pub fn command(self) -> Command {
        match self {
            Sub::Status => StatusCli::command(),
            Sub::Stop => StopCli::command(),
            Sub::List => ListCli::command(),
            Sub::Key => KeyCli::command(),
            Sub::LeaseDdl => LeaseDdlCli::command(),
            Sub::RunDdl => RunDdlCli::command(),
            Sub::Completions => CompletionsCli::command(),
            Sub::Man => ManCli::command(),
        }
    }
}

/// Every word taken for a subcommand as the first argument: the subcommands, then `help`.
pub fn subcommand_names() -> impl Iterator<Item = &'static str> {
    Sub::ALL.into_iter().map(Sub::name).chain(["help"])
}

/// `-q` for `status` and `list`, which report on stdout whatever the lock's state.
const QUIET_REPORT: &str = "Print no warnings; errors are still printed, and the report on stdout.";

#[derive(Debug, Parser)]
#[command(
    name = "heimdall status",
    bin_name = "heimdall status",
    version,
    about = "Tell whether a lock is free or held, and by whom; with --slots N, how many of the N are taken. Exit 0 when a run would start, the busy code when it would not.",
    after_help = format!("Exit status: 0 free (with --slots N: fewer than N taken); {} (--busy-exit-code) held; {} cannot connect or query; {} usage error.", exit::BUSY_DEFAULT, exit::UNAVAILABLE, exit::USAGE),
    mut_arg("quiet", |a| a.help(QUIET_REPORT).long_help(QUIET_REPORT)),
)]
pub struct StatusCli {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(flatten)]
    pub lock: LockArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    #[command(flatten)]
    pub record: RecordArgs,

    /// Exit code when the lock is held (with --slots, every slot) (0-255).
    #[arg(long, value_name = "N", default_value_t = exit::BUSY_DEFAULT, value_parser = exit_code, env = "HEIMDALL_BUSY_EXIT_CODE", hide_env_values = true)]
    pub busy_exit_code: u8,

    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall stop",
    bin_name = "heimdall stop",
    version,
    about = "Ask the heimdall run holding a lock to stop its command and let go (as --replace does, without running anything), and wait until it has. A lock held by a session that is not heimdall's is reported, never terminated.",
    after_help = format!("Exit status: 0 the holder stopped and let go, or nothing held the lock; {} (--busy-exit-code) still held when the wait ended, or held by a session that is not heimdall's; {} cannot connect or query; {} usage error.", exit::BUSY_DEFAULT, exit::UNAVAILABLE, exit::USAGE),
)]
pub struct StopCli {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(flatten)]
    pub lock: LockArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    /// How long to wait for the holder to let go, e.g. 2m. Default: 30s, a holder's default
    /// heartbeat (5s), heartbeat timeout (5s) and kill-after (10s), plus 10s; more for a holder
    /// with a longer --kill-after.
    /// Not read from HEIMDALL_WAIT: a fleet's wait for its runs is no bound for an operator.
    #[arg(long, value_name = "DURATION", require_equals = true, value_parser = long_duration)]
    pub wait: Option<std::time::Duration>,

    /// Exit code when the lock is still held when the wait ends (0-255).
    #[arg(long, value_name = "N", default_value_t = exit::BUSY_DEFAULT, value_parser = exit_code, env = "HEIMDALL_BUSY_EXIT_CODE", hide_env_values = true)]
    pub busy_exit_code: u8,

    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall list",
    bin_name = "heimdall list",
    version,
    about = "List every advisory lock held through heimdall on the database (recognised by the application_name heimdall sets).",
    after_help = format!("Exit status: 0 listed (also when there is none); {} cannot connect or query; {} usage error.", exit::UNAVAILABLE, exit::USAGE),
    mut_arg("quiet", |a| a.help(QUIET_REPORT).long_help(QUIET_REPORT)),
)]
pub struct ListCli {
    #[command(flatten)]
    pub conn: ConnArgs,

    #[command(flatten)]
    pub lease: LeaseArgs,

    #[command(flatten)]
    pub record: RecordArgs,

    /// Print one JSON array on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall key",
    bin_name = "heimdall key",
    version,
    about = "Print the keys a namespace and name map to, and the pg_locks query a DBA can paste. Needs no database."
)]
pub struct KeyCli {
    #[command(flatten)]
    pub lock: LockArgs,

    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall lease-ddl",
    bin_name = "heimdall lease-ddl",
    version,
    about = "Print the CREATE TABLE statement for a lease table, for a DBA to run. Needs no database."
)]
pub struct LeaseDdlCli {
    /// The table, TABLE (in schema public) or SCHEMA.TABLE.
    #[arg(long, value_name = "TABLE", value_parser = lease_table, default_value = "heimdall_leases", env = "HEIMDALL_LEASE_TABLE", hide_env_values = true)]
    pub lease_table: LeaseTable,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall run-ddl",
    bin_name = "heimdall run-ddl",
    version,
    about = "Print the CREATE TABLE statement for a run table (--run-table, --min-interval), for a DBA to run. Needs no database."
)]
pub struct RunDdlCli {
    /// The table, TABLE (in schema public) or SCHEMA.TABLE.
    #[arg(long, value_name = "TABLE", value_parser = run_table, default_value = super::DEFAULT_RUN_TABLE, env = "HEIMDALL_RUN_TABLE", hide_env_values = true)]
    pub run_table: RunTable,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall completions",
    bin_name = "heimdall completions",
    version,
    about = "Print shell completions for heimdall on stdout, e.g. heimdall completions bash > /etc/bash_completion.d/heimdall"
)]
pub struct CompletionsCli {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Parser)]
#[command(
    name = "heimdall man",
    bin_name = "heimdall man",
    version,
    about = "Print heimdall's manual page (roff) on stdout, e.g. heimdall man > heimdall.1"
)]
pub struct ManCli {}
