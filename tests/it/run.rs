//! The main job end to end: the command runs under the lock, its exit code and arguments pass
//! through untouched, a second run is refused while the first holds the lock, and the lock shows
//! in `pg_locks` under the documented keys.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::support::locks::{LockId, holders};
use crate::support::runs::{Holder, locked, locked_std};
use crate::support::{RUN_LIMIT, heimdall, heimdall_std, shared, text, unique_name, wait_child};

#[test]
fn exits_with_the_commands_own_code() {
    let name = unique_name("codes");
    for code in [0, 1, 42] {
        locked("run", &name)
            .args(["sh", "-c", &format!("exit {code}")])
            .assert()
            .code(code);
    }
}

#[test]
fn arguments_after_the_command_are_untouched() {
    let name = unique_name("args");
    locked("run", &name)
        .args(["echo", "--name", "-v", "--", "--database"])
        .assert()
        .success()
        .stdout("--name -v -- --database\n");
    locked("run", &name)
        .args(["--", "echo", "-q"])
        .assert()
        .success()
        .stdout("-q\n");
}

#[test]
fn the_go_tools_invocation_still_works() {
    let name = unique_name("legacy");
    let out = locked("joker", &name)
        .args(["--timeout", "30", "ls", "-la", "/"])
        .assert()
        .success();
    let listing = text(&out.get_output().stdout);
    assert!(listing.contains(" bin"), "ls -la / ran: {listing}");
}

#[test]
fn second_run_is_refused_while_the_first_holds_and_runs_after() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("scenario");
    let date_ran = dir.path().join("date-ran");

    // The first run holds the lock until the test stops it.
    let first = Holder::start_with(locked_std("run", &name));

    let second = locked("run", &name)
        .args(["sh", "-c", "date > \"$1\"", "sh"])
        .arg(&date_ran)
        .assert()
        .code(75);
    let stderr = text(&second.get_output().stderr);
    assert!(stderr.starts_with("heimdall: "), "{stderr}");
    assert!(
        stderr.contains(&format!("run/{name}")),
        "names the lock: {stderr}"
    );
    assert!(stderr.contains("keys "), "names the keys: {stderr}");
    assert!(
        !date_ran.exists(),
        "the refused run must not run its command"
    );

    first.stop();

    locked("run", &name)
        .args(["sh", "-c", "date > \"$1\"", "sh"])
        .arg(&date_ran)
        .assert()
        .success();
    assert!(
        date_ran.exists(),
        "after the first run ended, the command runs"
    );
}

#[test]
fn busy_exit_code_is_configurable_and_quiet_silences_the_notice() {
    let name = unique_name("busy-code");
    let holder = Holder::start_with(locked_std("run", &name));

    locked("run", &name)
        .args(["--busy-exit-code", "0", "true"])
        .assert()
        .code(0);
    locked("run", &name)
        .env("HEIMDALL_BUSY_EXIT_CODE", "3")
        .arg("true")
        .assert()
        .code(3);
    locked("run", &name)
        .args(["-q", "true"])
        .assert()
        .code(75)
        .stderr("");

    holder.stop();
}

/// Holds a lock on the shared cluster with the lock options `args`, and asserts that
/// `pg_locks` shows it granted under exactly `expected`, and to one backend only.
fn shows_in_pg_locks_as(args: &[&str], expected: LockId) {
    let mut heimdall = heimdall_std();
    heimdall.args(["--database", &shared().url()]).args(args);
    let holder = Holder::start_with(heimdall);
    let backends = holders(&mut shared().client(), expected);
    holder.stop();
    assert_eq!(
        backends.len(),
        1,
        "{args:?}: pg_locks shows no lock granted as {expected:?}"
    );
}

// The published vectors (docs/reference.md, "Keys"): "joker" -> 614772915 as the namespace's key with
// siphash, 856429646 with fnv1; "nightly-backup" -> 624393788 as the name's with siphash,
// 345143511 with fnv1. No other test locks joker/nightly-backup.

#[test]
fn lock_shows_in_pg_locks_under_the_siphash_keys() {
    shows_in_pg_locks_as(
        &["--namespace", "joker", "--name", "nightly-backup"],
        LockId {
            classid: 614772915,
            objid: 624393788,
            objsubid: 2,
        },
    );
}

#[test]
fn lock_shows_in_pg_locks_under_the_fnv1_keys() {
    shows_in_pg_locks_as(
        &[
            "--hash",
            "fnv1",
            "--namespace",
            "joker",
            "--name",
            "nightly-backup",
        ],
        LockId {
            classid: 856429646,
            objid: 345143511,
            objsubid: 2,
        },
    );
}

#[test]
fn lock_shows_in_pg_locks_under_explicit_keys() {
    let a = (std::process::id() as i32) | 0x4000_0000;
    shows_in_pg_locks_as(
        &["--key", &format!("{a},-7")],
        LockId {
            classid: a as u32,
            objid: (-7_i32) as u32,
            objsubid: 2,
        },
    );
    let big: i64 = (i64::from(std::process::id()) << 32) | 0x1234;
    shows_in_pg_locks_as(
        &["--key", &big.to_string()],
        LockId {
            classid: (big >> 32) as u32,
            objid: big as u32,
            objsubid: 1,
        },
    );
}

#[test]
fn explicit_keys_exclude_an_application_using_the_same_keys() {
    let key = (std::process::id() as i64) << 20 | 77;
    let mut app = shared().client();
    let taken: bool = app
        .query_one("select pg_try_advisory_lock($1)", &[&key])
        .unwrap()
        .get(0);
    assert!(taken);
    heimdall()
        .args([
            "--database",
            &shared().url(),
            "--key",
            &key.to_string(),
            "true",
        ])
        .assert()
        .code(75);
    app.execute("select pg_advisory_unlock($1)", &[&key])
        .unwrap();
    heimdall()
        .args([
            "--database",
            &shared().url(),
            "--key",
            &key.to_string(),
            "true",
        ])
        .assert()
        .success();
}

#[test]
fn output_streams_before_the_command_exits() {
    let dir = tempfile::tempdir().unwrap();
    let release = dir.path().join("release");
    let name = unique_name("stream");
    let mut child = locked_std("run", &name)
        .args([
            "sh",
            "-c",
            "echo first-line; while [ ! -e \"$1\" ]; do sleep 0.05; done; echo last",
            "sh",
        ])
        .arg(&release)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on a thread so a missing line cannot hang the test past its deadline.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let _ = tx.send(line);
        // Keep reading, so the command's last echo does not die of SIGPIPE.
        std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
    });
    let line = rx.recv_timeout(RUN_LIMIT);
    std::fs::write(&release, "").unwrap();
    assert_eq!(
        line.as_deref(),
        Ok("first-line\n"),
        "the line arrived while the command still ran"
    );
    assert_eq!(
        wait_child(&mut child, RUN_LIMIT).and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn stdout_belongs_to_the_command_even_when_verbose() {
    let name = unique_name("stdout");
    let out = locked("run", &name)
        .args(["--debug", "echo", "only-this"])
        .assert()
        .success();
    assert_eq!(out.get_output().stdout, b"only-this\n");
    let stderr = text(&out.get_output().stderr);
    assert!(!stderr.is_empty(), "--debug says something");
    for line in stderr.lines() {
        assert!(line.starts_with("heimdall: "), "unprefixed line: {line}");
    }
}

#[test]
fn command_learns_its_lock_from_the_environment() {
    let name = unique_name("env");
    let out = locked("envns", &name)
        .args([
            "sh",
            "-c",
            "echo \"$HEIMDALL_NAMESPACE|$HEIMDALL_NAME|$HEIMDALL_KEY\"",
        ])
        .assert()
        .success();
    let line = text(&out.get_output().stdout);
    let parts: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(parts[0], "envns");
    assert_eq!(parts[1], name);
    let (k1, k2) = parts[2].split_once(',').expect("HEIMDALL_KEY is k1,k2");
    assert!(
        k1.parse::<i32>().is_ok() && k2.parse::<i32>().is_ok(),
        "{line}"
    );

    heimdall()
        .args(["--database", &shared().url(), "--key", "9001"])
        .env("HEIMDALL_NAME", "from-outside")
        .args(["sh", "-c", "echo \"${HEIMDALL_NAME:-unset}|$HEIMDALL_KEY\""])
        .assert()
        .success()
        .stdout("unset|9001\n");
}

#[test]
fn a_command_that_cannot_run_gets_126_or_127_and_the_lock_is_freed() {
    let name = unique_name("exec");
    let out = locked("run", &name)
        .arg("/nonexistent/definitely-not-here")
        .assert()
        .code(127);
    let stderr = text(&out.get_output().stderr);
    assert!(stderr.contains("not found"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    locked("run", &name).arg(&script).assert().code(126);
    locked("run", &name).arg(dir.path()).assert().code(126);

    // Neither failure left the lock behind.
    locked("run", &name).arg("true").assert().success();
}

#[test]
fn unicode_names_work() {
    let name = format!("{}-ночной-作業-🦀", unique_name("uni"));
    locked("名前空間", &name)
        .args(["sh", "-c", "printf '%s' \"$HEIMDALL_NAME\""])
        .assert()
        .success()
        .stdout(name.clone());
}

#[test]
fn quiet_silences_the_busy_notice_but_not_a_timeout() {
    let name = unique_name("quiet-timeout");
    let out = locked("run", &name)
        .args([
            "-q",
            "--timeout",
            "200ms",
            "--kill-after",
            "0",
            "sleep",
            "30",
        ])
        .assert()
        .code(124);
    let stderr = text(&out.get_output().stderr);
    assert!(
        stderr.starts_with("heimdall: ") && stderr.contains("--timeout"),
        "cron must hear about a timed-out job even with -q: {stderr:?}"
    );
}

/// heimdall's threads while its command runs, by name (the command reads its parent's).
fn threads_while_running(flags: &[&str]) -> Vec<String> {
    let out = locked("run", &unique_name("threads"))
        .args(flags)
        .args(["--", "sh", "-c", "cat /proc/$PPID/task/*/comm"])
        .output()
        .expect("cannot run heimdall");
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

/// The log writer thread starts with the first message: a run that says nothing (the default
/// verbosity and a clean run) does without it, and a verbose one has it.
#[test]
fn a_run_that_says_nothing_starts_no_log_thread() {
    let quiet = threads_while_running(&[]);
    assert!(quiet.iter().any(|t| t == "signals"), "threads: {quiet:?}");
    assert!(!quiet.iter().any(|t| t == "log"), "threads: {quiet:?}");
    let verbose = threads_while_running(&["-v"]);
    assert!(verbose.iter().any(|t| t == "log"), "threads: {verbose:?}");
}
