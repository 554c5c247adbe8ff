//! Help text: clap's long help rewrapped to the terminal (tables with a hanging indent), the
//! one-line-per-option `-h`, and printing it to stdout. What the options are is `cli/mod.rs`;
//! when help is asked for is `parse.rs`.

use std::io::Write;

use clap::{Arg, ArgAction, Command, CommandFactory};

use super::RunCli;
use crate::{exit, log};

/// The usage line of a run, as `-h` and a bare `heimdall` show it.
pub const RUN_USAGE: &str = "heimdall [OPTIONS] --namespace NS --name NAME [--] COMMAND [ARGS]...";

/// The usage line of a run on explicit keys.
const KEY_USAGE: &str = "heimdall --key KEY [OPTIONS] [--] COMMAND [ARGS]...";

/// The usage line of the subcommands.
pub fn sub_usage() -> String {
    let names: Vec<&str> = super::subcommand_names().collect();
    format!("heimdall {} [OPTIONS]", names.join(" | "))
}

/// The usage lines of `-h` and `--help` alike, wrapped at `width`: a run by names, a run by
/// keys, the subcommands.
fn usage(width: usize) -> String {
    let mut text = wrap("Usage: ", RUN_USAGE, width, 11);
    for usage in [KEY_USAGE, &sub_usage()] {
        text.push_str(&wrap("       ", usage, width, 11));
    }
    text
}

/// The run's command as `--help` and `heimdall help` show it: at the terminal's width, with the
/// usage lines of `-h` (clap's own would be `heimdall [OPTIONS] <COMMAND>...`).
pub fn run_command() -> Command {
    let width = width();
    let usage = usage(width);
    let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).trim_end();
    with_width(RunCli::command()).override_usage(usage.to_owned())
}

/// clap wraps help at the terminal's width; when there is no terminal, at 80 columns rather
/// than clap's 100, so that `COLUMNS=80` and a pager agree. The text after the options is
/// reflowed first: clap would wrap its pre-broken lines and tables one line at a time.
pub fn with_width(cmd: Command) -> Command {
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
pub fn reflow(text: &str, width: usize) -> String {
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
                    out.push_str(&wrap(&line[..indent], line.trim_start(), width, indent + 2));
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
    let terminal = terminal_size::terminal_size_of(std::io::stdout())
        .map(|(terminal_size::Width(columns), _)| usize::from(columns))
        .filter(|c| *c > 0);
    let columns = terminal.or_else(|| {
        std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .filter(|c| *c > 0)
    });
    columns.unwrap_or(80).clamp(40, 100)
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
/// Prints help text and gives the exit code: 0, or 125 when stdout cannot take it. clap
/// leaves blanks at the end of the empty line inside an option's long help; they go.
pub fn print_help(text: &str) -> u8 {
    match print_stdout(without_trailing_blanks(text)) {
        Ok(()) => 0,
        Err(e) => {
            log::error(format!("cannot write to stdout: {e}"));
            exit::INTERNAL
        }
    }
}
/// `text` with no blank at the end of any line.
pub fn without_trailing_blanks(text: &str) -> String {
    let mut out: String = text
        .lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out
}
/// One line per option, for `-h`: at 80 columns at most 60 lines, none wider. The option names,
/// values and summaries come from the clap definition (each flag's `help`, beside it in
/// `cli/mod.rs`; its doc comment is the long help).
pub fn short_help(cmd: &Command, width: usize) -> String {
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
    text.push_str(&usage(width));
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
/// An option's line in `-h`: its `help`, and its default when it has one and the text does not
/// say it already. clap's own `--help` and `--version` get words of `-h`'s own.
fn summary(arg: &Arg) -> String {
    let text = match arg.get_action() {
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong => {
            "this summary (--help: everything)".to_owned()
        }
        ArgAction::Version => "print the version".to_owned(),
        _ => arg.get_help().map(ToString::to_string).unwrap_or_default(),
    };
    match arg.get_default_values() {
        [default] if arg.get_action().takes_values() && !text.contains('[') => {
            format!("{text} [{}]", default.to_string_lossy())
        }
        _ => text,
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

    #[test]
    fn every_option_has_a_one_line_summary_beside_its_long_help() {
        let cmd = RunCli::command();
        for arg in cmd.get_arguments().filter(|a| !a.is_positional()) {
            let id = arg.get_id().as_str();
            let (Some(short), Some(long)) = (arg.get_help(), arg.get_long_help()) else {
                panic!("--{id} needs help = \"…\" for -h, and its doc comment as long_help");
            };
            let short = short.to_string();
            assert!(short.len() <= 48, "--{id}: -h summary too long: {short}");
            assert_ne!(short, long.to_string(), "--{id}");
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
}
