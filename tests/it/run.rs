//! The main job end to end: the command runs under the lock, its exit code and arguments pass
//! through untouched, a second run is refused while the first holds the lock, and the lock shows
//! in `pg_locks` under the documented keys.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use crate::support::runs::{Holder, locked, locked_std};
use crate::support::{heimdall, heimdall_std, shared, unique_name, wait_child};

const LIMIT: Duration = Duration::from_secs(30);

/// Advisory locks currently granted, as `(classid, objid, objsubid)`.
fn advisory_locks() -> Vec<(u32, u32, i16)> {
    shared()
        .client()
        .query(
            "select classid::int8, objid::int8, objsubid from pg_locks \
             where locktype = 'advisory' and granted",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0) as u32,
                r.get::<_, i64>(1) as u32,
                r.get(2),
            )
        })
        .collect()
}

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
    let listing = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
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
    let stderr = String::from_utf8_lossy(&second.get_output().stderr).into_owned();
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

/// Holds a lock on the shared cluster with the lock options `args`, and returns what
/// `pg_locks` shows while it is held.
fn locks_while_holding(args: &[&str]) -> Vec<(u32, u32, i16)> {
    let mut heimdall = heimdall_std();
    heimdall.args(["--database", &shared().url()]).args(args);
    let holder = Holder::start_with(heimdall);
    let locks = advisory_locks();
    holder.stop();
    locks
}

#[test]
fn lock_shows_in_pg_locks_under_the_siphash_keys() {
    // Published vectors: "joker" -> 614772915; the name is per test, so hash it the same way
    // the README documents it and check the namespace half against the vector.
    let name = "nightly-backup";
    let ns = unique_name("siphash-ns");
    let locks = locks_while_holding(&["--namespace", &ns, "--name", name]);
    let expected_objid = 624393788_i32 as u32;
    assert!(
        locks
            .iter()
            .any(|&(_, objid, sub)| objid == expected_objid && sub == 2),
        "no lock with objid {expected_objid} (siphash of {name:?}) in {locks:?}"
    );
}

#[test]
fn lock_shows_in_pg_locks_under_the_fnv1_keys() {
    let ns = unique_name("fnv1-ns");
    let locks = locks_while_holding(&[
        "--hash",
        "fnv1",
        "--namespace",
        &ns,
        "--name",
        "nightly-backup",
    ]);
    assert!(
        locks
            .iter()
            .any(|&(_, objid, sub)| objid == 345143511 && sub == 2),
        "no lock with objid 345143511 (fnv1 of \"nightly-backup\") in {locks:?}"
    );
}

#[test]
fn lock_shows_in_pg_locks_under_explicit_keys() {
    let a = (std::process::id() as i32) | 0x4000_0000;
    let locks = locks_while_holding(&["--key", &format!("{a},-7")]);
    assert!(
        locks.contains(&(a as u32, (-7_i32) as u32, 2)),
        "pair key missing from {locks:?}"
    );

    let big: i64 = (i64::from(std::process::id()) << 32) | 0x1234;
    let locks = locks_while_holding(&["--key", &big.to_string()]);
    assert!(
        locks.contains(&((big >> 32) as u32, big as u32, 1)),
        "bigint key missing from {locks:?}"
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
    let line = rx.recv_timeout(LIMIT);
    std::fs::write(&release, "").unwrap();
    assert_eq!(
        line.as_deref(),
        Ok("first-line\n"),
        "the line arrived while the command still ran"
    );
    assert_eq!(
        wait_child(&mut child, LIMIT).and_then(|s| s.code()),
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
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
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
    let line = String::from_utf8_lossy(&out.get_output().stdout).into_owned();
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
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
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
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.starts_with("heimdall: ") && stderr.contains("--timeout"),
        "cron must hear about a timed-out job even with -q: {stderr:?}"
    );
}
