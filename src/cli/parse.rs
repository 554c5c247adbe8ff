//! From `argv` to what heimdall should do: the subcommand dispatch, the `--wait DURATION`
//! spelling, help in its short (`-h`) and long (`--help`, `heimdall help`) forms, and clap's
//! errors flattened to one line with a suggestion. Prints help and usage errors itself, so
//! `main` only sees a parsed command line or an exit code.
//!
//! Not responsible for what the flags mean together (see `config`).

use std::ffi::OsString;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;
use clap::{Arg, Command, CommandFactory, FromArgMatches};

use super::help::{RUN_USAGE, print_help, short_help, sub_usage, width, with_width};
use super::{
    CompletionsCli, KeyCli, LeaseDdlCli, ListCli, ManCli, RunCli, RunDdlCli, StatusCli, Sub,
    subcommand_names, wait, with_env_rules,
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
    RunDdl(RunDdlCli),
    Completions(CompletionsCli),
    Man(ManCli),
    /// Help, the version or a usage error has been printed: exit with this code.
    Exit(u8),
}

/// Parses heimdall's own arguments (`args[0]` is the program name). A subcommand is recognised
/// only as the very first argument: anywhere else the word belongs to the wrapped command, so
/// `heimdall --name x -- status` runs a program called status.
pub fn parse(args: Vec<OsString>) -> Invocation {
    let Some(first) = args.get(1) else {
        return bare_usage();
    };
    let rest = &args[1..];
    match first.to_str() {
        Some("help") => help_subcommand(&args[2..]),
        Some(word) => match Sub::named(word) {
            Some(sub) => subcommand(sub, rest),
            // A run names its lock with options before the command, so a first word that is
            // not an option is a mistyped subcommand or a command without its lock.
            None if !word.starts_with('-') => Invocation::Exit(not_a_subcommand(word)),
            None => run(args),
        },
        None => run(args),
    }
}

/// Parses a subcommand's own arguments into its type.
fn subcommand(sub: Sub, args: &[OsString]) -> Invocation {
    let parsed = match sub {
        Sub::Status => self::sub::<StatusCli>(args).map(Invocation::Status),
        Sub::List => self::sub::<ListCli>(args).map(Invocation::List),
        Sub::Key => self::sub::<KeyCli>(args).map(Invocation::Key),
        Sub::LeaseDdl => self::sub::<LeaseDdlCli>(args).map(Invocation::LeaseDdl),
        Sub::RunDdl => self::sub::<RunDdlCli>(args).map(Invocation::RunDdl),
        Sub::Completions => self::sub::<CompletionsCli>(args).map(Invocation::Completions),
        Sub::Man => self::sub::<ManCli>(args).map(Invocation::Man),
    };
    parsed.unwrap_or_else(Invocation::Exit)
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
    match cmd.try_get_matches_from_mut(args).and_then(|mut m| {
        let queue_flag = m.value_source("queue") == Some(ValueSource::CommandLine);
        RunCli::from_arg_matches_mut(&mut m).map(|mut cli| {
            cli.lock.queue_on_command_line = queue_flag;
            cli
        })
    }) {
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

/// `heimdall` alone: the usage and one hint, as a usage error.
fn bare_usage() -> Invocation {
    eprintln!(
        "Usage: {RUN_USAGE}\n       {}\nTry 'heimdall -h' for the options, or 'heimdall --help' for all the details.",
        sub_usage()
    );
    Invocation::Exit(exit::USAGE)
}

/// `heimdall help [SUBCOMMAND]`: the long help.
fn help_subcommand(rest: &[OsString]) -> Invocation {
    let cmd = match rest.first().map(|w| w.to_string_lossy()) {
        None => RunCli::command(),
        Some(name) => match Sub::named(&name) {
            Some(sub) => sub.command(),
            None if name == "help" => return help_subcommand(&[]),
            None => {
                log::error(format!(
                    "no help for '{name}': not a subcommand{} (see heimdall --help)",
                    suggestion(&name)
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
        subcommand_names().collect::<Vec<_>>().join(", ")
    ));
    exit::USAGE
}

/// The subcommand closest to a mistyped word, if any is close enough (clap's own threshold).
fn suggestion(word: &str) -> Option<&'static str> {
    subcommand_names()
        .map(|s| (strsim::jaro(word, s), s))
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
    fn mistyped_subcommands_get_a_suggestion() {
        assert_eq!(suggestion("statsu"), Some("status"));
        assert_eq!(suggestion("lsit"), Some("list"));
        assert_eq!(suggestion("rsync"), None);
    }
}
