//! From `argv` to what heimdall should do: the subcommand dispatch, the `--wait DURATION`
//! spelling, help in its short (`-h`) and long (`--help`, `heimdall help`) forms, and clap's
//! errors flattened to one line with a suggestion. Prints help and usage errors itself, so
//! `main` only sees a parsed command line or an exit code.
//!
//! Not responsible for what the flags mean together (see `config.rs`).

use std::ffi::OsString;
use std::io::Write;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command, CommandFactory, FromArgMatches};

use super::{
    CompletionsCli, KeyCli, LeaseDdlCli, ListCli, ManCli, RunCli, SUBCOMMANDS, StatusCli, wait,
    with_env_rules,
};
use crate::{exit, log};

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Run(Box<RunCli>),
    Status(StatusCli),
    List(ListCli),
    Key(KeyCli),
    LeaseDdl(LeaseDdlCli),
    Completions(CompletionsCli),
    Man(ManCli),
    /// Help, the version or a usage error has been printed: exit with this code.
    Exit(u8),
}

/// The usage line of a run, as `-h` and a bare `heimdall` show it.
const RUN_USAGE: &str = "heimdall [OPTIONS] --namespace NS --name NAME [--] COMMAND [ARGS]...";
const SUB_USAGE: &str =
    "heimdall status | list | key | lease-ddl | completions | man | help [OPTIONS]";

/// Parses heimdall's own arguments (`args[0]` is the program name). A subcommand is recognised
/// only as the very first argument: anywhere else the word belongs to the wrapped command, so
/// `heimdall --name x -- status` runs a program called status.
pub fn parse(args: Vec<OsString>) -> Invocation {
    let Some(first) = args.get(1) else {
        return bare_usage();
    };
    let rest = &args[1..];
    match first.to_str() {
        Some("status") => sub::<StatusCli>(rest).map_or_else(Invocation::Exit, Invocation::Status),
        Some("list") => sub::<ListCli>(rest).map_or_else(Invocation::Exit, Invocation::List),
        Some("key") => sub::<KeyCli>(rest).map_or_else(Invocation::Exit, Invocation::Key),
        Some("lease-ddl") => {
            sub::<LeaseDdlCli>(rest).map_or_else(Invocation::Exit, Invocation::LeaseDdl)
        }
        Some("completions") => {
            sub::<CompletionsCli>(rest).map_or_else(Invocation::Exit, Invocation::Completions)
        }
        Some("man") => sub::<ManCli>(rest).map_or_else(Invocation::Exit, Invocation::Man),
        Some("help") => help_subcommand(&args[2..]),
        // A run names its lock with options before the command, so a first word that is not an
        // option is a mistyped subcommand or a command without its lock.
        Some(word) if !word.starts_with('-') => Invocation::Exit(not_a_subcommand(word)),
        _ => run(args),
    }
}

fn run(mut args: Vec<OsString>) -> Invocation {
    let mut cmd = match with_env_rules(with_width(RunCli::command())) {
        Ok(cmd) => cmd,
        Err(err) => return Invocation::Exit(usage_error(err, "heimdall -h", RUN_ORDER)),
    };
    cmd.build();
    if scan_own_options(&cmd, &mut args) == Scan::ShortHelp {
        return Invocation::Exit(print_help(&short_help(&cmd, width())));
    }
    match cmd
        .try_get_matches_from_mut(args)
        .and_then(|mut m| RunCli::from_arg_matches_mut(&mut m))
    {
        Ok(cli) => Invocation::Run(Box::new(cli)),
        Err(err) => Invocation::Exit(usage_error(err, "heimdall -h", RUN_ORDER)),
    }
}

fn sub<T: CommandFactory + FromArgMatches>(args: &[OsString]) -> Result<T, u8> {
    let cmd = with_width(T::command());
    let hint = format!("{} --help", cmd.get_name());
    let mut cmd = with_env_rules(cmd).map_err(|err| usage_error(err, &hint, ""))?;
    cmd.try_get_matches_from_mut(args)
        .and_then(|mut m| T::from_arg_matches_mut(&mut m))
        .map_err(|err| usage_error(err, &hint, ""))
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    ShortHelp,
    Parse,
}

/// Walks heimdall's own options, up to the command (the first word that does not begin with
/// `-`, or what follows `--`), skipping option values. On the way it turns `--wait DURATION`
/// into `--wait=DURATION` when the next word reads as a duration or `forever`, as users of
/// `flock -w 5` and `timeout 5s` type it, and notices `-h`. Unknown options are left for clap,
/// which refuses them: the command's own arguments are never looked at.
fn scan_own_options(cmd: &Command, args: &mut Vec<OsString>) -> Scan {
    let mut scan = Scan::Parse;
    let mut i = 1;
    while i < args.len() {
        let Some(word) = args[i].to_str().map(str::to_owned) else {
            return scan;
        };
        if word == "--" || word == "-" || !word.starts_with('-') {
            return scan;
        }
        if let Some(long) = word.strip_prefix("--") {
            if long == "wait"
                && let Some(next) = args.get(i + 1).and_then(|n| n.to_str())
                && wait(next).is_ok()
            {
                let joined = format!("--wait={next}");
                args.splice(i..i + 2, [OsString::from(joined)]);
            } else if !long.contains('=') && long_takes_value(cmd, long) {
                i += 1;
            }
        } else {
            // A cluster of short flags: `-vq`, or one taking a value, attached or next.
            for (at, c) in word.char_indices().skip(1) {
                if c == 'h' {
                    scan = Scan::ShortHelp;
                }
                if short_takes_value(cmd, c) {
                    if at + c.len_utf8() == word.len() {
                        i += 1;
                    }
                    break;
                }
            }
        }
        i += 1;
    }
    scan
}

/// Whether `--long` consumes the next word (not `--wait`, whose value needs `=`).
fn long_takes_value(cmd: &Command, long: &str) -> bool {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(long))
        .is_some_and(consumes_next_word)
}

fn short_takes_value(cmd: &Command, short: char) -> bool {
    cmd.get_arguments()
        .find(|a| a.get_short() == Some(short))
        .is_some_and(consumes_next_word)
}

fn consumes_next_word(arg: &Arg) -> bool {
    arg.get_action().takes_values()
        && !arg.is_require_equals_set()
        && arg.get_num_args().is_none_or(|n| n.min_values() > 0)
}

/// clap wraps help at the terminal's width; when there is no terminal, at 80 columns rather
/// than clap's 100, so that `COLUMNS=80` and a pager agree. The text after the options is
/// reflowed first: clap would wrap its pre-broken lines and tables one line at a time.
fn with_width(cmd: Command) -> Command {
    let width = width();
    let after = cmd.get_after_help().map(|a| reflow(&a.to_string(), width));
    let cmd = cmd.term_width(width);
    match after {
        Some(after) => cmd.after_help(after),
        None => cmd,
    }
}

/// Rewraps `text` at `width`: paragraphs of prose as paragraphs, and two-column tables (`  75
/// the lock is…`, continuation lines indented to the second column) as rows with a hanging
/// indent. Other lines (a table's heading) are kept as they are.
fn reflow(text: &str, width: usize) -> String {
    let mut blocks = Vec::new();
    for block in text.split("\n\n") {
        if !block.lines().any(|l| l.starts_with(' ')) {
            blocks.push(wrap("", block, width, 0));
            continue;
        }
        let mut out = String::new();
        let mut row: Option<(String, String)> = None;
        let flush = |row: &mut Option<(String, String)>, out: &mut String| {
            if let Some((prefix, text)) = row.take() {
                out.push_str(&wrap(&prefix, &text, width, prefix.len().min(width / 2)));
            }
        };
        for line in block.lines() {
            let indent = line.len() - line.trim_start().len();
            let column = second_column(line);
            match (&mut row, column) {
                (_, Some(column)) if indent > 0 => {
                    flush(&mut row, &mut out);
                    row = Some((line[..column].to_owned(), line[column..].to_owned()));
                }
                (Some((prefix, text)), None) if indent >= prefix.len().min(8) && indent > 0 => {
                    text.push(' ');
                    text.push_str(line.trim());
                }
                _ => {
                    flush(&mut row, &mut out);
                    out.push_str(&wrap("", line, width, indent + 2));
                }
            }
        }
        flush(&mut row, &mut out);
        blocks.push(out);
    }
    blocks
        .iter()
        .map(|b| b.trim_end())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Where the second column of an indented table row starts: after the first run of two or more
/// spaces that follows the first word.
fn second_column(line: &str) -> Option<usize> {
    let start = line.len() - line.trim_start().len();
    let gap = line[start..].find("  ")? + start;
    let column = gap + line[gap..].len() - line[gap..].trim_start().len();
    (column < line.len()).then_some(column)
}

/// The terminal's width (stdout's, then `$COLUMNS`), else 80; at most 100, beyond which prose
/// is hard to read.
pub fn width() -> usize {
    // SAFETY: winsize is plain data, and TIOCGWINSZ only writes into it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    let columns = if rc == 0 && size.ws_col > 0 {
        Some(usize::from(size.ws_col))
    } else {
        std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .filter(|c| *c > 0)
    };
    columns.unwrap_or(80).clamp(40, 100)
}

/// `heimdall` alone: the usage and one hint, as a usage error.
fn bare_usage() -> Invocation {
    eprintln!(
        "Usage: {RUN_USAGE}\n       {SUB_USAGE}\nTry 'heimdall -h' for the options, or 'heimdall --help' for all the details."
    );
    Invocation::Exit(exit::USAGE)
}

/// `heimdall help [SUBCOMMAND]`: the long help.
fn help_subcommand(rest: &[OsString]) -> Invocation {
    let cmd = match rest.first().map(|w| w.to_string_lossy()) {
        None => RunCli::command(),
        Some(name) => match name.as_ref() {
            "status" => StatusCli::command(),
            "list" => ListCli::command(),
            "key" => KeyCli::command(),
            "lease-ddl" => LeaseDdlCli::command(),
            "completions" => CompletionsCli::command(),
            "man" => ManCli::command(),
            "help" => return help_subcommand(&[]),
            other => {
                log::error(format!(
                    "no help for '{other}': not a subcommand{} (see heimdall --help)",
                    suggestion(other)
                        .map_or_else(String::new, |s| format!("; did you mean '{s}'?"))
                ));
                return Invocation::Exit(exit::USAGE);
            }
        },
    };
    Invocation::Exit(print_help(&with_width(cmd).render_long_help().to_string()))
}

/// A first word that is neither an option nor a subcommand.
fn not_a_subcommand(word: &str) -> u8 {
    let hint = match suggestion(word) {
        Some(sub) => format!("did you mean 'heimdall {sub}'? To run a program called {word}"),
        None => format!("to run {word}"),
    };
    log::error(format!(
        "'{word}' is not a heimdall subcommand ({}); {hint}, name the lock first: heimdall --namespace NS --name NAME -- {word} (see heimdall -h)",
        SUBCOMMANDS.join(", ")
    ));
    exit::USAGE
}

/// The subcommand closest to a mistyped word, if any is close enough (clap's own threshold).
fn suggestion(word: &str) -> Option<&'static str> {
    SUBCOMMANDS
        .iter()
        .map(|s| (strsim::jaro(word, s), *s))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, s)| s)
}

/// Why a run's unknown option is not taken for the command.
const RUN_ORDER: &str = "options go before the command; ";

/// Prints clap's help and version output, or its error as one line with clap's suggestion,
/// and gives the exit code (help and version are not failures). `hint` names the help to read;
/// `order` explains, for an unknown option, where the options go.
fn usage_error(err: clap::Error, hint: &str, order: &str) -> u8 {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => print_help(&err.render().to_string()),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            exit::USAGE
        }
        ErrorKind::UnknownArgument => {
            let word = context(&err, ContextKind::InvalidArg).unwrap_or_default();
            let suggested = context(&err, ContextKind::SuggestedArg)
                .map_or_else(String::new, |s| format!("; did you mean {s}?"));
            log::error(format!(
                "unknown option '{word}'{suggested} ({order}see {hint})"
            ));
            exit::USAGE
        }
        _ => {
            let text = err.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            let first_block = text.split("\n\n").next().unwrap_or(text);
            let line = first_block.split_whitespace().collect::<Vec<_>>().join(" ");
            log::error(format!("{line} (see {hint})"));
            exit::USAGE
        }
    }
}

fn context(err: &clap::Error, kind: ContextKind) -> Option<String> {
    match err.get(kind)? {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) => v.first().cloned(),
        other => Some(other.to_string()),
    }
}

/// Writes to stdout. A reader that stopped early (`| head -1`) is not an error: the output ends
/// quietly, as it does for coreutils. Other errors (a full disk) are.
pub fn print_stdout(text: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_ref()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Prints help text and gives the exit code: 0, or 125 when stdout cannot take it.
fn print_help(text: &str) -> u8 {
    match print_stdout(text) {
        Ok(()) => 0,
        Err(e) => {
            log::error(format!("cannot write to stdout: {e}"));
            exit::INTERNAL
        }
    }
}

/// One line per option, for `-h`: at 80 columns at most 60 lines, none wider. The option names
/// and values come from the clap definition; the summaries from [`SUMMARIES`].
fn short_help(cmd: &Command, width: usize) -> String {
    let rows: Vec<(String, String)> = cmd
        .get_arguments()
        .filter(|a| !a.is_positional() && !a.is_hide_set())
        .map(|a| (option_names(a), summary(a)))
        .collect();
    let column = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0) + 2;
    let mut text = String::new();
    text.push_str(&wrap(
        "",
        "heimdall: run a command while holding a PostgreSQL advisory lock, on at most one machine at a time.",
        width,
        0,
    ));
    text.push('\n');
    text.push_str(&wrap("Usage: ", RUN_USAGE, width, 11));
    for usage in [
        "heimdall --key KEY [OPTIONS] [--] COMMAND [ARGS]...",
        SUB_USAGE,
    ] {
        text.push_str(&wrap("       ", usage, width, 11));
    }
    text.push_str("\nOptions:\n");
    for (names, summary) in rows {
        let names = format!("{names:<column$}");
        text.push_str(&wrap(&names, &summary, width, column.min(width / 2)));
    }
    text.push('\n');
    for paragraph in [
        "--wait DURATION: the word after --wait is its limit when it reads as a duration or 'forever'; otherwise the command starts there and the wait has no limit.",
        "DURATION: 30s, 5m, 1h30m, 250ms, or seconds (5, 1.5). 0 means no wait, no limit.",
        &format!(
            "Exit status: the command's own; 128+N killed by signal N; {} busy; {} lock lost; {} cannot connect; {} unsafe server; {} --timeout; {} heimdall failed; {} cannot execute; {} not found; {} usage error.",
            exit::BUSY_DEFAULT,
            exit::LOCK_LOST,
            exit::UNAVAILABLE,
            exit::UNSAFE_SERVER,
            exit::TIMED_OUT,
            exit::INTERNAL,
            exit::CANNOT_EXECUTE,
            exit::NOT_FOUND,
            exit::USAGE
        ),
        "Environment twins, the subcommands and the details: heimdall --help, man heimdall.",
    ] {
        text.push_str(&wrap("", paragraph, width, 0));
    }
    text
}

/// `-v, --verbose`, `    --database URL|CONNINFO`, `    --wait[=DURATION]`.
fn option_names(arg: &Arg) -> String {
    let short = arg
        .get_short()
        .map_or_else(|| "    ".to_owned(), |s| format!("-{s}, "));
    let long = arg.get_long().map(|l| format!("--{l}")).unwrap_or_default();
    let value = if !arg.get_action().takes_values() {
        String::new()
    } else {
        let possible = possible_values(arg);
        let value = if possible.is_empty() {
            arg.get_value_names()
                .and_then(|v| v.first())
                .map_or_else(|| arg.get_id().as_str().to_uppercase(), |v| v.to_string())
        } else {
            possible.join("|")
        };
        if arg.is_require_equals_set() {
            format!("[={value}]")
        } else {
            format!(" {value}")
        }
    };
    format!("  {short}{long}{value}")
}

/// The values an enum-valued argument accepts (`siphash`, `fnv1`), for help and the man page.
pub fn possible_values(arg: &Arg) -> Vec<String> {
    arg.get_possible_values()
        .iter()
        .filter(|p| !p.is_hide_set())
        .map(|p| p.get_name().to_owned())
        .collect()
}

/// One short line per option for `-h`; `--help` has the full text. Every visible option must
/// have one (a unit test checks), so a new flag cannot be left out of `-h`.
const SUMMARIES: &[(&str, &str)] = &[
    ("database", "PostgreSQL URL or key=value (else PG*)"),
    (
        "connect_timeout",
        "most to wait to connect and log in [10s]",
    ),
    ("namespace", "the lock's namespace"),
    ("name", "the lock's name within the namespace"),
    ("key", "explicit keys instead of names"),
    ("hash", "how names become keys"),
    ("slots", "at most N copies at once (1-1000)"),
    ("wait", "wait for a busy lock; alone: no limit"),
    ("shared", "shared mode: shared holders run together"),
    ("timeout", "stop the command after this (exit 124)"),
    ("kill_after", "from SIGTERM to SIGKILL when stopping it"),
    ("heartbeat", "check the lock's session this often; 0: off"),
    ("heartbeat_timeout", "most one check may take [--heartbeat]"),
    ("busy_exit_code", "exit code when the lock is busy"),
    ("min_hold", "keep the lock at least this long"),
    (
        "lease_table",
        "hold a lease row in TABLE, not an advisory lock",
    ),
    ("lease_ttl", "a lease lives this long unrenewed [30s]"),
    ("metrics_file", "write Prometheus metrics after the run"),
    ("report", "one line of facts on stderr at the end"),
    ("verbose", "say more on stderr (-vv: more)"),
    ("quiet", "nothing when busy, no warnings"),
    ("debug", "the most output (same as -vv)"),
    ("help", "this summary (--help: everything)"),
    ("version", "print the version"),
];

fn summary(arg: &Arg) -> String {
    let id = arg.get_id().as_str();
    let text = SUMMARIES
        .iter()
        .find(|(name, _)| *name == id)
        .map_or("", |(_, text)| text);
    match arg.get_default_values() {
        [default] if arg.get_action().takes_values() && !text.contains('[') => {
            format!("{text} [{}]", default.to_string_lossy())
        }
        _ => text.to_owned(),
    }
}

/// `prefix` then the words of `text`, wrapped at `width` columns with continuation lines
/// indented by `indent`. A prefix too wide for the first word gets a line of its own.
fn wrap(prefix: &str, text: &str, width: usize, indent: usize) -> String {
    let mut out = String::new();
    let mut line = prefix.to_owned();
    let mut bare = true;
    for word in text.split_whitespace() {
        let full = if bare {
            line.len() + word.len() > width && !line.trim().is_empty()
        } else {
            line.len() + 1 + word.len() > width
        };
        if full {
            out.push_str(line.trim_end());
            out.push('\n');
            line = " ".repeat(indent);
            bare = true;
        }
        if !bare {
            line.push(' ');
        }
        line.push_str(word);
        bare = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<OsString> {
        std::iter::once("heimdall")
            .chain(words.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn scanned(words: &[&str]) -> (Scan, Vec<OsString>) {
        let mut cmd = RunCli::command();
        cmd.build();
        let mut all = args(words);
        let scan = scan_own_options(&cmd, &mut all);
        (scan, all)
    }

    #[test]
    fn wait_takes_the_next_word_only_when_it_is_a_duration() {
        assert_eq!(
            scanned(&["--key", "1", "--wait", "5s", "date"]).1,
            args(&["--key", "1", "--wait=5s", "date"])
        );
        assert_eq!(
            scanned(&["--wait", "forever", "--key", "1", "date"]).1,
            args(&["--wait=forever", "--key", "1", "date"])
        );
        assert_eq!(
            scanned(&["--wait", "1.5", "date"]).1,
            args(&["--wait=1.5", "date"])
        );
        for untouched in [
            &["--key", "1", "--wait", "date", "5s"][..],
            &["--key", "1", "--", "--wait", "5s"],
            &["--key", "1", "date", "--wait", "5s"],
            // The value of --name is not an option, even when it is "--wait".
            &["--namespace", "n", "--name", "--wait", "5s"],
        ] {
            assert_eq!(scanned(untouched).1, args(untouched), "{untouched:?}");
        }
    }

    #[test]
    fn short_help_is_asked_only_before_the_command() {
        assert_eq!(scanned(&["-h"]).0, Scan::ShortHelp);
        assert_eq!(scanned(&["--key", "1", "-vh"]).0, Scan::ShortHelp);
        assert_eq!(scanned(&["--key", "1", "ls", "-h"]).0, Scan::Parse);
        assert_eq!(scanned(&["--key", "1", "--", "-h"]).0, Scan::Parse);
        assert_eq!(scanned(&["--key", "-h", "ls"]).0, Scan::Parse);
    }

    #[test]
    fn every_option_has_a_summary_for_short_help() {
        let cmd = RunCli::command();
        for arg in cmd.get_arguments().filter(|a| !a.is_positional()) {
            let id = arg.get_id().as_str();
            assert!(
                SUMMARIES.iter().any(|(name, _)| *name == id),
                "--{id} has no -h summary in SUMMARIES"
            );
        }
    }

    #[test]
    fn short_help_fits_an_80_column_screen() {
        let mut cmd = RunCli::command();
        cmd.build();
        let text = short_help(&cmd, 80);
        assert!(text.lines().count() <= 60, "{text}");
        for line in text.lines() {
            assert!(line.len() <= 80, "{} columns: {line}", line.len());
        }
        // One line per option at 80 columns.
        assert!(text.contains("      --wait[=DURATION]"), "{text}");
        assert!(text.contains("[10s]"), "defaults shown: {text}");
        // Narrower screens wrap rather than overflow.
        for line in short_help(&cmd, 50).lines() {
            assert!(line.len() <= 50, "{} columns: {line}", line.len());
        }
    }

    #[test]
    fn long_help_tables_are_reflowed_with_a_hanging_indent() {
        let text = "Exit status:\n  75      the lock is held elsewhere; the command did not run at all\n  76      lost\n          while running\n\nSome prose that goes on\nacross lines.";
        assert_eq!(
            reflow(text, 40),
            "Exit status:\n  75      the lock is held elsewhere;\n          the command did not run at all\n  76      lost while running\n\nSome prose that goes on across lines."
        );
        let mut cmd = RunCli::command();
        cmd.build();
        let after = reflow(&cmd.get_after_help().unwrap().to_string(), 80);
        for line in after.lines() {
            assert!(line.len() <= 80, "{} columns: {line}", line.len());
        }
        assert!(
            after.contains("  127                the command was not found"),
            "{after}"
        );
    }

    #[test]
    fn mistyped_subcommands_get_a_suggestion() {
        assert_eq!(suggestion("statsu"), Some("status"));
        assert_eq!(suggestion("lsit"), Some("list"));
        assert_eq!(suggestion("rsync"), None);
    }
}
