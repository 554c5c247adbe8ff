//! The command line as a new user types it: typos are usage errors named before connecting,
//! `--wait 5s` means what `flock -w 5` users mean, a missing program is reported before any
//! wait, `-h` fits a screen, the man page renders, a warning is printed once, and output into a
//! closed pipe ends quietly.

use std::fs;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::runs::{Holder, finish, locked, locked_std, marker};
use crate::support::{heimdall, heimdall_std, render_man_page, shared, text, unique_name};

const NAMESPACE: &str = "cli";
/// Nothing listens there: a run that got as far as connecting would fail with 69, not 2.
const UNREACHABLE: &str = "postgres://nobody@127.0.0.1:1/postgres?sslmode=disable";

// ---------------------------------------------------------------------------
// Typos are usage errors, named, before connecting
// ---------------------------------------------------------------------------

#[test]
fn a_mistyped_option_before_the_command_is_a_usage_error_with_a_suggestion() {
    for (typo, suggested) in [
        ("--wiat=10s", "--wait"),
        ("--namepsace", "--namespace"),
        ("--tiemout", "--timeout"),
    ] {
        let marker = marker();
        let mut cmd = heimdall();
        cmd.args(["--database", UNREACHABLE, "--namespace", NAMESPACE])
            .args(["--name", "x", typo, "a", "--", "touch"])
            .arg(&marker.path);
        let word = typo.split('=').next().unwrap();
        finish(&mut cmd, &marker)
            .assert_refused(2)
            .assert_stderr_contains(&format!("unknown option '{word}'"))
            .assert_stderr_contains(&format!("did you mean {suggested}?"));
    }
}

#[test]
fn a_mistyped_option_is_refused_even_while_the_lock_is_busy() {
    let name = unique_name("typo-busy");
    let holder = Holder::start_with(locked_std(NAMESPACE, &name));
    let marker = marker();
    let mut cmd = locked(NAMESPACE, &name);
    cmd.args(["--wiat=10s", "--", "touch"]).arg(&marker.path);
    finish(&mut cmd, &marker)
        .assert_refused(2)
        .assert_stderr_contains("did you mean --wait?");
    holder.stop();
}

#[test]
fn words_after_the_command_or_a_double_dash_reach_the_command_untouched() {
    let name = unique_name("untouched");
    locked(NAMESPACE, &name)
        .args(["echo", "--wiat=10s", "-x", "--namepsace"])
        .assert()
        .success()
        .stdout("--wiat=10s -x --namepsace\n");
    locked(NAMESPACE, &name)
        .args(["--", "echo", "--wiat", "-h", "--help"])
        .assert()
        .success()
        .stdout("--wiat -h --help\n");
}

#[test]
fn an_option_like_program_after_a_double_dash_is_not_found_with_a_hint() {
    let out = locked(NAMESPACE, &unique_name("dash-program"))
        .args(["--", "--wiat=10s", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("command not found: --wiat=10s"), "{stderr}");
    assert!(stderr.contains("before the '--'"), "{stderr}");
}

#[test]
fn a_mistyped_subcommand_is_a_usage_error_with_a_suggestion() {
    let out = heimdall()
        .args(["statsu", "--database", UNREACHABLE, "--key", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("did you mean 'heimdall status'?"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

// ---------------------------------------------------------------------------
// --wait DURATION, and durations with fractions
// ---------------------------------------------------------------------------

#[test]
fn wait_with_a_space_gives_up_after_that_duration() {
    let name = unique_name("wait-space");
    let holder = Holder::start_with(locked_std(NAMESPACE, &name));
    let marker = marker();
    let mut cmd = locked(NAMESPACE, &name);
    cmd.args(["--wait", "1s", "touch"]).arg(&marker.path);
    let run = finish(&mut cmd, &marker);
    run.assert_refused(75)
        .assert_stderr_contains("after waiting");
    assert!(
        run.elapsed >= Duration::from_millis(900) && run.elapsed < Duration::from_secs(20),
        "gave up after {:?}",
        run.elapsed
    );
    holder.stop();
}

/// Each duration flag read with its fraction, as heimdall's own messages show it: a value read
/// as a whole number of seconds (1 or 2 for 1.5), or as milliseconds, says something else.
#[test]
fn every_duration_flag_takes_fractional_seconds() {
    // --timeout, --kill-after; and --heartbeat, --heartbeat-timeout and --kill-after together
    // in the server's keepalive bound: 1.5 + 1.5 + 0.5 + 2 s of margin = 5.5 s, rounded up to 6 s
    // (any of them read without its fraction gives 5 s).
    let out = locked(NAMESPACE, &unique_name("fractions"))
        .args(["-vv", "--timeout=1.5", "--kill-after", "0.5"])
        .args(["--heartbeat", "1.5", "--heartbeat-timeout=1.5"])
        .args(["--connect-timeout", "2.5"])
        .args(["--", "sh", "-c", "trap '' TERM; sleep 30"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    for said in [
        "connect_timeout=2.5s",
        "tcp_user_timeout=6000",
        "--timeout of 1s 500ms expired",
        "still running 500ms after SIGTERM",
    ] {
        assert!(stderr.contains(said), "{said:?} missing:\n{stderr}");
    }

    // --min-hold: the hold after a command that took well under a second is more than 0.5 s.
    let out = locked(NAMESPACE, &unique_name("fractions"))
        .args(["-v", "--min-hold", "1.5", "--", "true"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let held: u64 = stderr
        .split("holding the lock ")
        .nth(1)
        .and_then(|rest| rest.split(" ms more").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no --min-hold line:\n{stderr}"));
    assert!(
        (500..=1500).contains(&held),
        "held {held} ms more for --min-hold 1.5"
    );

    // --wait, against a held lock.
    let name = unique_name("fractions");
    let holder = Holder::start_with(locked_std(NAMESPACE, &name));
    let out = locked(NAMESPACE, &name)
        .args(["-v", "--wait=2.5", "--", "true"])
        .output()
        .unwrap();
    holder.stop();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("waiting up to 2s 500ms"), "{stderr}");

    // --lease-ttl, with --kill-after: renewals every min(ttl/3, (ttl - kill-after - 1 s)/2).
    let out = locked(NAMESPACE, &unique_name("fractions"))
        .args(["-v", "--lease-table", "leases", "--lease-ttl", "4.5"])
        .args(["--kill-after", "0.5", "--", "true"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("ttl 4s 500ms, renewed every 1s 500ms"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------
// The program is looked up before connecting
// ---------------------------------------------------------------------------

#[test]
fn a_missing_program_exits_127_at_once_while_the_lock_is_busy() {
    let name = unique_name("missing-busy");
    let holder = Holder::start_with(locked_std(NAMESPACE, &name));
    let started = Instant::now();
    let out = locked(NAMESPACE, &name)
        .args(["--wait", "--", "heimdall-no-such-program", "x"])
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("command not found: heimdall-no-such-program"),
        "{}",
        text(&out.stderr)
    );
    // The holder keeps the lock for up to 30 s; a run that waited for it would take that long.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    holder.stop();
}

#[test]
fn a_program_that_cannot_be_executed_exits_126_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable");
    fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
    let out = heimdall()
        .args(["--database", UNREACHABLE, "--key", "1", "--"])
        .arg(&script)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let out = heimdall()
        .args(["--database", UNREACHABLE, "--key", "1", "--"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let out = heimdall()
        .args(["--database", UNREACHABLE, "--key", "1", "--"])
        .arg(dir.path().join("absent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------
// Help
// ---------------------------------------------------------------------------

#[test]
fn short_help_fits_an_80_column_screen() {
    let out = heimdall().env("COLUMNS", "80").arg("-h").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(
        help.lines().count() <= 60,
        "{} lines:\n{help}",
        help.lines().count()
    );
    for line in help.lines() {
        assert!(line.len() <= 80, "{} columns: {line}", line.len());
    }
    for needle in [
        "--wait",
        "--database",
        "Exit status:",
        "75 busy",
        "127 not found",
    ] {
        assert!(help.contains(needle), "{needle} missing:\n{help}");
    }
}

#[test]
fn long_help_states_the_wait_rule_and_the_exit_table() {
    let out = heimdall()
        .env("COLUMNS", "80")
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = text(&out.stdout);
    assert!(help.contains("--wait 5s date"), "{help}");
    assert!(help.contains("HEIMDALL_WAIT"), "env twins shown: {help}");
    assert!(help.contains("Exit status:"), "{help}");
    for line in help.lines() {
        assert!(line.len() <= 80, "{} columns: {line}", line.len());
    }
    let short = heimdall().env("COLUMNS", "80").arg("-h").output().unwrap();
    assert!(help.lines().count() > text(&short.stdout).lines().count());
}

/// The `Usage:` lines of a help text: the first, and the lines indented under it.
fn usage_lines(help: &str) -> Vec<String> {
    let mut lines = help.lines().skip_while(|l| !l.starts_with("Usage: "));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no Usage: in\n{help}"));
    std::iter::once(first)
        .chain(lines.take_while(|l| l.starts_with("       heimdall")))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn long_help_shows_examples_and_the_usage_of_short_help() {
    let help = |flag| {
        let out = heimdall().env("COLUMNS", "100").arg(flag).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let (long, short) = (help("--help"), help("-h"));
    assert_eq!(usage_lines(&long), usage_lines(&short), "{long}");
    let examples: String = long
        .split("\nExamples:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Examples: block in\n{long}"))
        .split("\n\n")
        .next()
        .unwrap()
        .to_owned();
    for example in [
        "0 2 * * * heimdall -q ",
        "heimdall --wait=10m ",
        "heimdall status ",
    ] {
        assert!(
            examples.contains(example),
            "{example:?} missing:\n{examples}"
        );
    }
}

/// Trailing blanks are invisible in a terminal but not in a diff, a pager that shows them or
/// a test that compares text.
#[test]
fn help_and_the_man_page_have_no_trailing_blanks() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("heimdall.1");
    let roff = heimdall().arg("man").output().unwrap();
    fs::write(&page, &roff.stdout).unwrap();
    let mut texts = vec![("man (roff)".to_owned(), text(&roff.stdout))];
    texts.push(("man (rendered)".to_owned(), render_man_page(&page)));
    for args in [
        &["-h"][..],
        &["--help"],
        &["help", "status"],
        &["status", "--help"],
    ] {
        for columns in ["80", "100"] {
            let out = heimdall()
                .env("COLUMNS", columns)
                .args(args)
                .output()
                .unwrap();
            texts.push((format!("{args:?} at {columns}"), text(&out.stdout)));
        }
    }
    for (what, text) in texts {
        for (n, line) in text.lines().enumerate() {
            assert_eq!(line.trim_end(), line, "{what}, line {}: {line:?}", n + 1);
        }
    }
}

#[test]
fn help_subcommand_prints_the_long_help_of_heimdall_or_a_subcommand() {
    let long = heimdall().arg("--help").output().unwrap();
    let help = heimdall().arg("help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert_eq!(text(&help.stdout), text(&long.stdout));
    let status = heimdall().args(["help", "status"]).output().unwrap();
    assert_eq!(status.status.code(), Some(0));
    assert!(text(&status.stdout).contains("--busy-exit-code"));
    let unknown = heimdall().args(["help", "statsu"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("did you mean 'status'?"));
}

#[test]
fn bare_heimdall_prints_the_usage_and_one_hint() {
    let out = heimdall().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("Usage: heimdall"), "{stderr}");
    assert_eq!(stderr.matches("Try ").count(), 1, "{stderr}");
    assert!(stderr.lines().count() <= 4, "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn list_and_status_describe_quiet_without_a_busy_lock() {
    for sub in ["list", "status"] {
        let out = heimdall().args([sub, "--help"]).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{sub} --help: {}",
            text(&out.stderr)
        );
        let help = text(&out.stdout);
        // The description: the lines after `-q, --quiet` up to a blank line or the next option.
        let quiet: Vec<&str> = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("-q, --quiet"))
            .skip(1)
            .take_while(|l| !l.trim().is_empty() && !l.trim_start().starts_with('-'))
            .map(str::trim)
            .collect();
        let quiet = quiet.join(" ");
        assert!(
            quiet.contains("warnings"),
            "{sub} --help says what -q silences: {quiet:?} in\n{help}"
        );
        assert!(!quiet.contains("busy"), "{sub} --help: {quiet:?}");
    }
}

// ---------------------------------------------------------------------------
// The manual page
// ---------------------------------------------------------------------------

#[test]
fn man_page_renders_examples_exit_status_and_environment_without_missing_pages() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("heimdall.1");
    let roff = heimdall().arg("man").output().unwrap();
    assert_eq!(roff.status.code(), Some(0), "{}", text(&roff.stderr));
    fs::write(&page, &roff.stdout).unwrap();
    let man = render_man_page(&page);
    for section in [
        "SYNOPSIS",
        "EXAMPLES",
        "EXIT STATUS",
        "SEE ALSO",
        "ENVIRONMENT",
    ] {
        assert!(man.contains(section), "{section} missing:\n{man}");
    }
    for example in ["crontab", "systemd", "--wait", "--slots"] {
        assert!(man.contains(example), "no {example} example:\n{man}");
    }
    // The environment twins and libpq's variables, and the exit table's codes.
    for needle in [
        "HEIMDALL_DATABASE_URL",
        "PGHOST",
        "--heartbeat",
        "75",
        "124",
    ] {
        assert!(man.contains(needle), "{needle} missing:\n{man}");
    }
    for stray in ["heimdall-status(1)", "README.md", "[subcommands]"] {
        assert!(!man.contains(stray), "{stray} in the page:\n{man}");
    }
    // A DESCRIPTION that says what heimdall does and what it promises, not the NAME line again.
    let section = |name: &str| -> String {
        man.lines()
            .skip_while(|l| l.trim() != name)
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with(' '))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (name, description) = (section("NAME"), section("DESCRIPTION"));
    assert!(
        description.len() > 3 * name.len(),
        "NAME: {name}\nDESCRIPTION: {description}"
    );
    // In the roff, where groff has not hyphenated a word across lines yet.
    let roff = text(&roff.stdout);
    let roff = roff
        .split(".SH DESCRIPTION\n")
        .nth(1)
        .and_then(|rest| rest.split("\n.SH ").next())
        .unwrap_or_else(|| panic!("no DESCRIPTION in\n{roff}"));
    for promise in [
        "at most one machine at a time",
        "never runs without its lock",
        "exits with the command's exit code",
        "exits 75",
    ] {
        assert!(
            roff.contains(promise),
            "{promise:?} not in DESCRIPTION:\n{roff}"
        );
    }
}

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

/// The line comes from heimdall once the command runs, so it may follow the command's first
/// output: the forked child must not write anything before exec (issue 22, item 7).
#[test]
fn verbose_names_the_commands_pid() {
    let out = locked(NAMESPACE, &unique_name("pid-named"))
        .args(["-v", "--", "sh", "-c", "echo \"command: pid $$\" >&2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    let pid = stderr
        .lines()
        .find_map(|l| l.strip_prefix("command: pid "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        stderr.contains(&format!("heimdall: started the command as pid {pid}\n")),
        "{stderr}"
    );
}

#[test]
fn an_exclusive_run_inside_a_shared_one_says_its_parent_holds_the_lock() {
    let name = unique_name("nested");
    let bin = env!("CARGO_BIN_EXE_heimdall");
    let started = Instant::now();
    let out = locked(NAMESPACE, &name)
        .args(["--shared", "--", bin, "--database", &shared().url()])
        .args([
            "--namespace",
            NAMESPACE,
            "--name",
            &name,
            "--wait",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("the heimdall that started this one"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it did not wait for itself"
    );
}

#[test]
fn status_says_a_lock_is_shared_and_list_shows_the_slot() {
    let name = unique_name("shared-status");
    let mut shared_run = locked_std(NAMESPACE, &name);
    shared_run.arg("--shared");
    let holder = Holder::start_with(shared_run);
    let out = heimdall()
        .args(["status", "--database", &shared().url()])
        .args(["--namespace", NAMESPACE, "--name", &name])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert!(
        text(&out.stdout).contains("held in shared mode by"),
        "{}",
        text(&out.stdout)
    );
    holder.stop();

    let slotted = unique_name("slots");
    let mut slot_run = locked_std(NAMESPACE, &slotted);
    slot_run.args(["--slots", "3"]);
    let first = Holder::start_with(slot_run);
    let mut slot_run = locked_std(NAMESPACE, &slotted);
    slot_run.args(["--slots", "3"]);
    let second = Holder::start_with(slot_run);
    let out = heimdall()
        .args(["list", "--database", &shared().url()])
        .output()
        .unwrap();
    let list = text(&out.stdout);
    assert!(
        list.lines().next().unwrap_or_default().contains("SLOT"),
        "{list}"
    );
    let label = format!("{NAMESPACE}/{slotted}");
    let mut slots: Vec<&str> = list
        .lines()
        .filter(|l| l.starts_with(&label))
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    slots.sort_unstable();
    assert_eq!(slots, ["0", "1"], "{list}");
    first.stop();
    second.stop();
}

// ---------------------------------------------------------------------------
// A closed stdout
// ---------------------------------------------------------------------------

/// Runs heimdall with `args` and a stdout whose reader is already gone, as `| head -1` leaves
/// it once head has exited.
fn into_closed_pipe(args: &[&str]) -> Output {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are ours and used nowhere else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let mut cmd = heimdall_std();
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let status = crate::support::wait_child(&mut child, Duration::from_secs(30))
        .expect("heimdall did not finish");
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    Output {
        status,
        stdout: Vec::new(),
        stderr,
    }
}

#[test]
fn every_subcommand_stops_quietly_on_a_closed_stdout() {
    let url = shared().url();
    let name = unique_name("pipe");
    let cases: Vec<Vec<&str>> = vec![
        vec!["key", "--namespace", "a", "--name", "b", "--slots", "1000"],
        vec!["key", "--key", "1", "--json"],
        vec!["completions", "bash"],
        vec!["man"],
        vec!["list", "--database", &url],
        vec!["list", "--database", &url, "--json"],
        vec![
            "status",
            "--database",
            &url,
            "--namespace",
            NAMESPACE,
            "--name",
            &name,
        ],
        vec!["--help"],
        vec!["-h"],
        vec!["help"],
        vec!["help", "status"],
        vec!["status", "--help"],
        vec!["--version"],
    ];
    for args in cases {
        let out = into_closed_pipe(&args);
        assert!(
            matches!(out.status.code(), Some(0 | 141)),
            "{args:?}: {:?} {}",
            out.status,
            text(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn a_closed_stdout_does_not_hide_a_full_disk() {
    let full = fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap_or_else(|e| {
            panic!(
                "this test writes to /dev/full, Linux's always-full device, and cannot open it \
                 ({e}); create it with `mknod -m 666 /dev/full c 1 7`"
            )
        });
    let out = heimdall_std()
        .args(["key", "--key", "1"])
        .stdout(Stdio::from(full))
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("cannot write to stdout"),
        "{}",
        text(&out.stderr)
    );
}
