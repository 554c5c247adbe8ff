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

use super::help::{RUN_USAGE, print_help, run_command, short_help, sub_usage, width, with_width};
use super::{
    CompletionsCli, KeyCli, LeaseDdlCli, ListCli, ManCli, RunCli, RunDdlCli, StatusCli, StopCli,
    Sub, subcommand_names, wait, with_env_rules,
};
use crate::{exit, log};

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Run(Box<RunCli>),
    Status(StatusCli),
    Stop(StopCli),
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
        Sub::Stop => self::sub::<StopCli>(args).map(Invocation::Stop),
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
    // Undecorated: the width, the reflowed text and the usage lines of `--help` cost every run
    // some 70,000 instructions, and only `--help` shows them (see `run_command`).
    let mut cmd = match with_env_rules(RunCli::command()) {
        Ok(cmd) => cmd,
        Err(err) => return Invocation::Exit(usage_error(err, "heimdall -h", RUN_ORDER, None)),
    };
    cmd.build();
    let scanned = scan_own_options(&cmd, &mut args);
    if scanned.short_help {
        return Invocation::Exit(print_help(&short_help(&cmd, width())));
    }
    let parsed = cmd.try_get_matches_from_mut(&args).and_then(|mut m| {
        let queue_flag = m.value_source("queue") == Some(ValueSource::CommandLine);
        RunCli::from_arg_matches_mut(&mut m).map(|mut cli| {
            cli.lock.queue_on_command_line = queue_flag;
            cli
        })
    });
    match parsed {
        Ok(mut cli) => {
            cli.command_note = scanned
                .wait_before_command
                .and_then(|took| wait_note(took.as_deref(), &cli.command[0].to_string_lossy()));
            Invocation::Run(Box::new(cli))
        }
        Err(err) if err.kind() == ErrorKind::DisplayHelp => {
            Invocation::Exit(print_help(&run_command().render_long_help().to_string()))
        }
        Err(err) => {
            let taken = scanned.command_at.and_then(|at| args[at].to_str());
            match taken.and_then(Sub::named) {
                Some(sub) if err.kind() == ErrorKind::MissingRequiredArgument => {
                    Invocation::Exit(subcommand_taken_for_the_command(sub, &err))
                }
                _ => {
                    let own = &args[..scanned.command_at.unwrap_or(args.len())];
                    let var = environment_twin(&cmd, own, &err);
                    Invocation::Exit(usage_error(err, "heimdall -h", RUN_ORDER, var.as_deref()))
                }
            }
        }
    }
}

fn sub<T: CommandFactory + FromArgMatches>(args: &[OsString]) -> Result<T, u8> {
    let cmd = with_width(T::command());
    let hint = format!("{} --help", cmd.get_name());
    let mut cmd = with_env_rules(cmd).map_err(|err| usage_error(err, &hint, "", None))?;
    let parsed = cmd
        .try_get_matches_from_mut(args)
        .and_then(|mut m| T::from_arg_matches_mut(&mut m));
    parsed.map_err(|err| {
        let var = environment_twin(&cmd, args, &err);
        usage_error(err, &hint, "", var.as_deref())
    })
}

/// What [`scan_own_options`] saw of heimdall's own options.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scanned {
    /// `-h` is among them.
    short_help: bool,
    /// Where the command starts: the index of its first word, when there is one.
    command_at: Option<usize>,
    /// `--wait` comes right before the command: `Some(limit)` when it took the next word as
    /// its limit (`--wait 5 min`), `None` when it took none (`--wait 1m30`). Either may be
    /// what a program that is not found comes from.
    wait_before_command: Option<Option<String>>,
}

/// Walks heimdall's own options, up to the command (the first word that does not begin with
/// `-`, or what follows `--`), skipping option values. On the way it turns `--wait DURATION`
/// into `--wait=DURATION` when the next word reads as a duration or `forever`, as users of
/// `flock -w 5` and `timeout 5s` type it, and notices `-h`. Unknown options are left for clap,
/// which refuses them: the command's own arguments are never looked at.
fn scan_own_options(cmd: &Command, args: &mut Vec<OsString>) -> Scanned {
    let mut scanned = Scanned::default();
    // The word after a `--wait` (and its limit), and what `--wait` took.
    let mut after_wait: Option<(usize, Option<String>)> = None;
    let mut i = 1;
    while i < args.len() {
        let Some(word) = args[i].to_str().map(str::to_owned) else {
            return scanned;
        };
        if word == "--" || word == "-" || !word.starts_with('-') {
            scanned.command_at =
                Some(if word == "--" { i + 1 } else { i }).filter(|at| *at < args.len());
            scanned.wait_before_command = after_wait
                .filter(|(next, _)| *next == i && word != "--")
                .map(|(_, took)| took);
            return scanned;
        }
        if let Some(long) = word.strip_prefix("--") {
            if long == "wait" {
                let next = args.get(i + 1).and_then(|n| n.to_str()).map(str::to_owned);
                let took = next.filter(|next| wait(next).is_ok());
                if let Some(limit) = &took {
                    let joined = format!("--wait={limit}");
                    args.splice(i..i + 2, [OsString::from(joined)]);
                }
                after_wait = Some((i + 1, took));
            } else if !long.contains('=') && long_takes_value(cmd, long) {
                i += 1;
            }
        } else {
            // A cluster of short flags: `-vq`, or one taking a value, attached or next.
            for (at, c) in word.char_indices().skip(1) {
                if c == 'h' {
                    scanned.short_help = true;
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
    scanned
}

/// Why a program that is not found may be a word meant for `--wait`, given what `--wait` took
/// right before the command (see [`Scanned::wait_before_command`]). `None` when the limit
/// had a unit: then the command is surely the command.
fn wait_note(took: Option<&str>, program: &str) -> Option<String> {
    let (said, guess) = match took {
        // A bare number is seconds: the unit meant for it became the command.
        Some(limit) if limit.parse::<f64>().is_ok() => (
            format!("--wait took '{limit}' as its limit, in seconds"),
            format!("{limit}{program}"),
        ),
        Some(_) => return None,
        None => (
            format!("--wait took no limit ('{program}' is not a duration)"),
            format!("{program}s"),
        ),
    };
    let write = if wait(&guess).is_ok() {
        format!(": --wait={guess}")
    } else {
        " (30s, 5m, 1h30m)".to_owned()
    };
    Some(format!(
        "{said}, so the command starts at '{program}'; write the limit as --wait=DURATION{write}"
    ))
}

/// The one-line error for `heimdall --database X status --namespace a`: a run whose command is
/// a subcommand's name, and whose lock options went to that "command".
fn subcommand_taken_for_the_command(sub: Sub, err: &clap::Error) -> u8 {
    let name = sub.name();
    log::error(format!(
        "'{name}' was taken as the command to run ({}); subcommands come first: heimdall {name} [OPTIONS] (see heimdall help {name})",
        one_line(err).trim_end_matches('.')
    ));
    exit::USAGE
}

/// The environment variable an invalid value came from, when it came from one: the option's
/// environment twin is set and the option is not among `own`, heimdall's own words.
fn environment_twin(cmd: &Command, own: &[OsString], err: &clap::Error) -> Option<String> {
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    // `--wait[=<DURATION>]`, `--busy-exit-code <N>`.
    let shown = context(err, ContextKind::InvalidArg)?;
    let long: String = shown
        .strip_prefix("--")?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let var = cmd
        .get_arguments()
        .find(|a| a.get_long() == Some(long.as_str()))?
        .get_env()?
        .to_str()?
        .to_owned();
    let given = own.iter().filter_map(|w| w.to_str()).any(|w| {
        w.strip_prefix("--")
            .is_some_and(|w| w == long || w.starts_with(&format!("{long}=")))
    });
    (!given && std::env::var_os(&var).is_some_and(|v| !v.is_empty())).then_some(var)
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
    let mut cmd = match rest.first().map(|w| w.to_string_lossy()) {
        None => run_command(),
        Some(name) => match Sub::named(&name) {
            Some(sub) => with_width(sub.command()),
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
    Invocation::Exit(print_help(&cmd.render_long_help().to_string()))
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
/// `order` explains, for an unknown option, where the options go; `env` is the environment
/// variable an invalid value came from.
fn usage_error(err: clap::Error, hint: &str, order: &str, env: Option<&str>) -> u8 {
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
            let mut line = one_line(&err);
            if let (Some(var), Some(shown)) = (env, context(&err, ContextKind::InvalidArg)) {
                let long = shown.split(['[', ' ', '=']).next().unwrap_or(&shown);
                line = line.replace(
                    &format!("for '{shown}'"),
                    &format!("in {var} ({long}'s environment twin; fix or unset it)"),
                );
            }
            log::error(format!("{line} (see {hint})"));
            exit::USAGE
        }
    }
}

/// clap's error as one line: its first paragraph, without `error: `.
fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let text = text.strip_prefix("error: ").unwrap_or(&text);
    let first_block = text.split("\n\n").next().unwrap_or(text);
    first_block.split_whitespace().collect::<Vec<_>>().join(" ")
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

    fn scanned(words: &[&str]) -> (Scanned, Vec<OsString>) {
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
    fn the_scan_finds_where_the_command_starts_and_what_wait_took_before_it() {
        let at = |words: &[&str]| scanned(words).0.command_at;
        assert_eq!(at(&["--key", "1", "date", "-x"]), Some(3));
        assert_eq!(at(&["--key", "1", "--", "date"]), Some(4));
        assert_eq!(at(&["--name", "x", "--key"]), None);
        let took = |words: &[&str]| scanned(words).0.wait_before_command;
        assert_eq!(took(&["--wait", "5", "min"]), Some(Some("5".to_owned())));
        assert_eq!(took(&["--wait", "1m30"]), Some(None));
        assert_eq!(took(&["--wait", "5", "--key", "1", "min"]), None);
        assert_eq!(took(&["--wait", "--", "five"]), None);
        assert_eq!(took(&["--key", "1", "min"]), None);
    }

    #[test]
    fn a_wait_note_suggests_the_limit_written_whole() {
        let note = |took: Option<&str>, program| wait_note(took, program).unwrap_or_default();
        assert!(note(Some("5"), "min").ends_with("--wait=DURATION: --wait=5min"));
        assert!(note(Some("1.5"), "h").contains("--wait took '1.5' as its limit, in seconds"));
        assert!(note(None, "1m30").ends_with(": --wait=1m30s"));
        assert!(note(None, "five").ends_with("--wait=DURATION (30s, 5m, 1h30m)"));
        assert_eq!(wait_note(Some("5s"), "min"), None);
    }

    #[test]
    fn short_help_is_asked_only_before_the_command() {
        let short = |words: &[&str]| scanned(words).0.short_help;
        assert!(short(&["-h"]));
        assert!(short(&["--key", "1", "-vh"]));
        assert!(!short(&["--key", "1", "ls", "-h"]));
        assert!(!short(&["--key", "1", "--", "-h"]));
        assert!(!short(&["--key", "-h", "ls"]));
    }

    #[test]
    fn mistyped_subcommands_get_a_suggestion() {
        assert_eq!(suggestion("statsu"), Some("status"));
        assert_eq!(suggestion("lsit"), Some("list"));
        assert_eq!(suggestion("rsync"), None);
    }
}
