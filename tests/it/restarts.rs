//! Server restarts, crashes and failovers. Each ends every session, so every advisory lock is
//! free at once, while the job of the run that held it runs on until its heimdall notices the
//! lost session and stops it. A run that takes the lock on a server that came up less than the
//! lock-delay ago must hold it and start its command only once that job is surely gone.
//!
//! Each event test has a holder whose job ignores SIGTERM (as a job inside a critical section
//! may) and appends the time to a file while it runs, and a second host that tries the lock
//! every 100 ms. The second host's command must start after the first job's last write, and
//! within the lock-delay (plus slack) after the server is back. Each prints its figures (run
//! with `--nocapture`). Every run here uses short watchdog timing, so the delay is 5 s.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tempfile::TempDir;

use crate::support::events::Shutdown;
use crate::support::procs::{Running, heimdall_sh};
use crate::support::runs::lock_is_free;
use crate::support::{LOCK_DELAY_ENV, TestPostgres, busy_wait, heimdall_std, unique_name};

const NAMESPACE: &str = "restarts";
/// The watchdog timing of every run here: heartbeat + heartbeat-timeout + kill-after + 2 s
/// makes a lock-delay of [`LOCK_DELAY`].
const TIMING: [&str; 3] = [
    "--heartbeat=1s",
    "--heartbeat-timeout=1s",
    "--kill-after=1s",
];
const LOCK_DELAY: Duration = Duration::from_secs(5);
/// What the test adds to the delay on a loaded machine: the retry interval, connecting,
/// starting the command.
const SLACK: Duration = Duration::from_secs(5);
const RETRY_EVERY: Duration = Duration::from_millis(100);
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// A role with no privileges beyond PUBLIC's.
const NOPRIV: &str = "heimdall_nopriv";

/// A job that ignores SIGTERM and appends the time to `first` every 20 ms while it runs.
const STUBBORN_JOB: &str =
    "trap '' TERM; echo $$ > pid; while :; do date +%s.%N >> first; sleep 0.02; done";
/// The second host's command: records when it started.
const RECORD_START: &str = "date +%s.%N > second";

/// Seconds since the epoch, as `date +%s.%N` writes them on this machine.
fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// The last time a command wrote to `dir/file`.
fn last_time(dir: &Path, file: &str) -> f64 {
    let text = fs::read_to_string(dir.join(file)).unwrap_or_default();
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    last.and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no time in {}: {text:?}", dir.join(file).display()))
}

/// How a second host's command came to run.
struct SecondRun {
    /// When its command started.
    started: f64,
    /// The stderr of the run that ran it.
    stderr: String,
    attempts: usize,
}

/// A second host: tries the lock on `url` with `flags` every 100 ms without waiting, as a cron
/// job on another machine would (only more often), until its command runs. With the
/// lock-delay at its default unless `flags` say otherwise.
fn second_host(url: &str, dir: &Path, lock: &str, flags: &[&str]) -> JoinHandle<SecondRun> {
    let (url, dir, lock) = (url.to_owned(), dir.to_owned(), lock.to_owned());
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    thread::spawn(move || {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let deadline = Instant::now() + RUN_LIMIT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut cmd = heimdall_sh(&url, NAMESPACE, &dir, &lock, &flags, RECORD_START);
            cmd.env_remove(LOCK_DELAY_ENV);
            let (status, stderr) = Running::spawn(cmd).finish(RUN_LIMIT);
            match status.code() {
                Some(0) => {
                    return SecondRun {
                        started: last_time(&dir, "second"),
                        stderr,
                        attempts,
                    };
                }
                // Busy, or the server is not back yet.
                Some(75 | 69) if Instant::now() < deadline => thread::sleep(RETRY_EVERY),
                _ => panic!("the second host's heimdall ended with {status}: {stderr}"),
            }
        }
    })
}

/// One of the events, on a server (and, for a failover, its standby) of the test's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Restart(Shutdown),
    /// One unrelated backend is SIGKILLed: the server reinitialises without a restart.
    Crash,
    /// The primary is stopped and its streaming standby promoted.
    Failover,
}

/// The servers an event happens to.
struct Servers {
    primary: TestPostgres,
    standby: Option<TestPostgres>,
    role: String,
}

impl Servers {
    fn start(event: Event, role: Option<&str>) -> Servers {
        let primary = TestPostgres::start();
        if let Some(role) = role {
            primary.create_role(role);
        }
        // The standby is a copy of the primary taken after the role was created.
        let standby = (event == Event::Failover).then(|| primary.start_standby());
        let role = role.unwrap_or(primary.superuser()).to_owned();
        Servers {
            primary,
            standby,
            role,
        }
    }

    /// Where both hosts lock: the primary, or with a standby both, read-write only.
    fn url(&self) -> String {
        match &self.standby {
            None => self.primary.url_as(&self.role),
            Some(standby) => format!(
                "postgres://{}@127.0.0.1:{},127.0.0.1:{}/postgres?sslmode=disable&target_session_attrs=read-write",
                self.role,
                self.primary.port(),
                standby.port()
            ),
        }
    }

    /// Waits until every server has been up longer than the lock-delay: a fresh server's own
    /// start (or a fresh standby's statistics) must not be what holds the next run back.
    fn age(&self) {
        for pg in std::iter::once(&self.primary).chain(&self.standby) {
            let mut client = pg.client();
            let sql = format!(
                "SELECT now() - pg_postmaster_start_time() > interval '{} s'",
                LOCK_DELAY.as_secs() + 1
            );
            let old = busy_wait(RUN_LIMIT, || {
                client
                    .query_one(&sql, &[])
                    .is_ok_and(|row| row.get::<_, bool>(0))
            });
            assert!(old, "the server never got older than the lock-delay");
        }
    }

    /// Makes the event happen; returns when the server was back, as [`now`] reads it.
    fn undergo(&self, event: Event) -> f64 {
        match event {
            Event::Restart(how) => self.primary.restart(how),
            Event::Crash => self.primary.crash_one_backend(),
            Event::Failover => {
                self.primary.stop(Shutdown::Fast);
                self.standby.as_ref().expect("a standby").promote();
            }
        }
        now()
    }
}

/// The figures of one event, printed by [`event_test`] and compared by the tests.
struct Figures {
    /// The second host's command started this long after the server was back.
    after_back: f64,
    /// ... and this long after the first job's last write; below zero, the two overlapped.
    after_last_write: f64,
    second: SecondRun,
}

/// A holder with a stubborn job and the watchdog timing `holder`, a second host retrying with
/// [`TIMING`] and `second_flags`, then `event`. The holder runs with the delay off (its server
/// has just started); the second host at its default unless `second_flags` say otherwise.
fn event_test(event: Event, role: Option<&str>, holder: &[&str], second_flags: &[&str]) -> Figures {
    let servers = Servers::start(event, role);
    let url = servers.url();
    let dir = TempDir::new().expect("cannot create a temp dir");
    let lock = unique_name("event");
    let mut first = Running::spawn(heimdall_sh(
        &url,
        NAMESPACE,
        dir.path(),
        &lock,
        holder,
        STUBBORN_JOB,
    ));
    first.command_pid(dir.path(), RUN_LIMIT);
    let flags: Vec<&str> = TIMING.iter().chain(second_flags).copied().collect();
    let second = second_host(&url, dir.path(), &lock, &flags);
    servers.age();
    let back = servers.undergo(event);
    first.expect_exit(76, RUN_LIMIT);
    let second = second.join().expect("the second host panicked");
    let figures = Figures {
        after_back: second.started - back,
        after_last_write: second.started - last_time(dir.path(), "first"),
        second,
    };
    let signal = figures
        .second
        .stderr
        .lines()
        .find(|l| l.contains("came up"));
    eprintln!(
        "{event:?} as {}: the second run started {:.2}s after the server was back, {:.2}s after the first job's last write ({} attempts); {}",
        servers.role,
        figures.after_back,
        figures.after_last_write,
        figures.second.attempts,
        signal.unwrap_or("no lock-delay")
    );
    figures
}

/// The promise: the second host's command starts after the first job's last write, within
/// the delay and the slack after the server is back, and says why it waited in one line.
fn assert_held_off(figures: &Figures) {
    let stderr = &figures.second.stderr;
    assert!(
        figures.after_last_write > 0.0,
        "the second run started {:.2}s before the first job's last write: they overlapped; stderr:\n{stderr}",
        -figures.after_last_write
    );
    assert!(
        figures.after_back <= (LOCK_DELAY + SLACK).as_secs_f64(),
        "the second run started {:.2}s after the server was back, later than {LOCK_DELAY:?} + {SLACK:?}; stderr:\n{stderr}",
        figures.after_back
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].contains("came up") && lines[0].contains("holding lock"),
        "at the default level, the wait is one line: {stderr}"
    );
}

#[test]
fn after_an_immediate_restart_the_next_run_waits_until_the_old_job_is_gone() {
    assert_held_off(&event_test(
        Event::Restart(Shutdown::Immediate),
        None,
        &TIMING,
        &[],
    ));
}

#[test]
fn after_a_fast_restart_the_next_run_waits_until_the_old_job_is_gone() {
    assert_held_off(&event_test(
        Event::Restart(Shutdown::Fast),
        None,
        &TIMING,
        &[],
    ));
}

#[test]
fn after_a_crash_reinitialisation_the_next_run_waits_until_the_old_job_is_gone() {
    assert_held_off(&event_test(Event::Crash, None, &TIMING, &[]));
}

#[test]
fn after_a_crash_reinitialisation_a_role_without_privileges_waits_too() {
    assert_held_off(&event_test(Event::Crash, Some(NOPRIV), &TIMING, &[]));
}

#[test]
fn after_a_failover_the_next_run_waits_until_the_old_job_is_gone() {
    assert_held_off(&event_test(Event::Failover, None, &TIMING, &[]));
}

#[test]
fn after_a_failover_a_role_without_privileges_waits_too() {
    assert_held_off(&event_test(Event::Failover, Some(NOPRIV), &TIMING, &[]));
}

#[test]
fn without_a_lock_delay_the_next_run_starts_beside_the_old_job() {
    // What --lock-delay 0 gives up, as before there was a delay: the second host runs as soon
    // as the server is back, while the old job runs on for its heartbeat and kill-after (5 s,
    // so that the overlap shows however long the restart takes).
    let figures = event_test(
        Event::Restart(Shutdown::Immediate),
        None,
        &[
            "--heartbeat=1s",
            "--heartbeat-timeout=1s",
            "--kill-after=5s",
        ],
        &["--lock-delay=0"],
    );
    assert!(
        figures.after_last_write < 0.0,
        "with --lock-delay 0 the second run should start while the old job still runs; it started {:.2}s after its last write",
        figures.after_last_write
    );
}

#[test]
fn the_fencing_token_rises_across_three_crashes_with_asynchronous_commit() {
    // The fixture's servers run with synchronous_commit = off; the walwriter, which would
    // flush an asynchronous commit within a fraction of a second, is slowed down, so that a
    // commit not made durable is lost in the crash right after the run.
    let pg = TestPostgres::start_with(crate::support::ClusterConfig {
        conf: vec![
            "synchronous_commit = off".to_owned(),
            "wal_writer_delay = 10s".to_owned(),
        ],
        ..Default::default()
    });
    let lock = unique_name("token");
    let token = || {
        let out = locked_on(&pg.url(), &lock)
            .args(["--", "sh", "-c", "echo $HEIMDALL_FENCING_TOKEN"])
            .output()
            .expect("cannot run heimdall");
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse::<i64>()
            .unwrap_or_else(|_| panic!("no token: {out:?}"))
    };
    let mut tokens = vec![token()];
    for _ in 0..3 {
        pg.crash_one_backend();
        tokens.push(token());
    }
    eprintln!("fencing tokens across three crashes: {tokens:?}");
    assert!(
        tokens.windows(2).all(|pair| pair[0] < pair[1]),
        "the fencing token must rise across every crash: {tokens:?}"
    );
}

/// heimdall with a lock of its own on `url`, the delay at its default (the environment's 0
/// removed) and the test's watchdog timing.
fn locked_on(url: &str, name: &str) -> Command {
    let mut cmd = heimdall_std();
    cmd.env_remove(LOCK_DELAY_ENV)
        .args(["--database", url, "--namespace", NAMESPACE, "--name", name])
        .args(TIMING);
    cmd
}

/// `cmd`, whose command records when it started in `dir/file`, run to its end: when that was.
fn started_at(mut cmd: Command, dir: &Path, file: &str) -> (f64, String) {
    let out = cmd
        .args(["--", "sh", "-c", &format!("date +%s.%N > {file}")])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run heimdall");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{file}: {out:?}");
    (last_time(dir, file), stderr)
}

#[test]
fn the_lock_delay_holds_waiting_slotted_and_shared_runs_too() {
    let pg = TestPostgres::start();
    let dir = TempDir::new().expect("cannot create a temp dir");
    let queued = unique_name("wait");
    let before = now();
    pg.restart(Shutdown::Immediate);
    // A run that holds the lock for a second with the delay off, so that the waiting run below
    // gets the lock from PostgreSQL's queue, not at its first attempt.
    let mut holder = heimdall_std();
    holder
        .args([
            "--database",
            &pg.url(),
            "--namespace",
            NAMESPACE,
            "--name",
            &queued,
        ])
        .args(["--", "sh", "-c", "touch held; sleep 1"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut holder = holder.spawn().expect("cannot start the holder");
    assert!(busy_wait(RUN_LIMIT, || dir.path().join("held").exists()));
    let runs = [
        ("wait", locked_on(&pg.url(), &queued), "--wait"),
        (
            "slots",
            locked_on(&pg.url(), &unique_name("slots")),
            "--slots=2",
        ),
        (
            "shared",
            locked_on(&pg.url(), &unique_name("shared")),
            "--shared",
        ),
    ];
    let started: Vec<_> = runs
        .into_iter()
        .map(|(file, mut cmd, flag)| {
            cmd.args(["-v", flag]);
            let dir = dir.path().to_owned();
            thread::spawn(move || (file, started_at(cmd, &dir, file)))
        })
        .collect();
    for run in started {
        let (file, (at, stderr)) = run.join().expect("a run panicked");
        // The server came up after `before`: a run may start its command only L after that.
        assert!(
            at >= before + LOCK_DELAY.as_secs_f64(),
            "the {file} run started its command {:.2}s after the restart began, before the lock-delay: {stderr}",
            at - before
        );
        assert!(stderr.contains("holding lock"), "{file}: {stderr}");
    }
    assert!(crate::support::wait_child(&mut holder, RUN_LIMIT).is_some_and(|s| s.success()));
}

/// A heimdall on `url` whose command would touch `dir/ran`, once it holds the lock in its
/// lock-delay (its `flags` must make it wait).
fn in_lock_delay(url: &str, dir: &Path, name: &str, flags: &[&str]) -> Running {
    let mut cmd = heimdall_sh(url, NAMESPACE, dir, name, flags, "touch ran");
    cmd.env_remove(LOCK_DELAY_ENV);
    let mut run = Running::spawn(cmd);
    let waiting = busy_wait(RUN_LIMIT, || {
        run.stderr().contains("holding lock") || run.has_exited()
    });
    assert!(
        waiting && !run.has_exited(),
        "no lock-delay: {}",
        run.stderr()
    );
    run
}

#[test]
fn a_signal_during_the_lock_delay_ends_heimdall_without_running_the_command() {
    // The shared cluster came up less than an hour ago.
    let dir = TempDir::new().expect("cannot create a temp dir");
    let name = unique_name("signal");
    let mut run = in_lock_delay(
        &crate::support::shared().url(),
        dir.path(),
        &name,
        &["--lock-delay=1h"],
    );
    run.signal(libc::SIGTERM);
    let stderr = run.expect_exit(128 + libc::SIGTERM, RUN_LIMIT);
    assert!(
        stderr.contains("received SIGTERM before the command started"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("ran").exists(),
        "the command ran: {stderr}"
    );
    assert!(lock_is_free(NAMESPACE, &name), "the lock outlived heimdall");
}

#[test]
fn a_lock_lost_during_the_lock_delay_never_starts_the_command() {
    // A fresh server: a run takes the lock well within the delay after its start.
    let pg = TestPostgres::start();
    let dir = TempDir::new().expect("cannot create a temp dir");
    let name = unique_name("lost");
    let mut run = in_lock_delay(&pg.url(), dir.path(), &name, &["-v", "--lock-delay=4s"]);
    let stderr = run.stderr();
    let backend: i32 = stderr
        .split("on backend pid ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no backend pid in: {stderr}"));
    let terminated: bool = pg
        .client()
        .query_one("SELECT pg_terminate_backend($1)", &[&backend])
        .expect("cannot terminate the backend")
        .get(0);
    assert!(terminated);
    let stderr = run.expect_exit(69, RUN_LIMIT);
    assert!(stderr.contains("during the lock-delay"), "{stderr}");
    assert!(
        !dir.path().join("ran").exists(),
        "the command ran: {stderr}"
    );
}

/// heimdall works out when the server came up from the raw values the server reads (see
/// `delay.rs`): timestamps as `query_to_xml` writes them, in the session's time zone. A role in
/// a zone far from UTC, with a `DateStyle` no parser of plain text timestamps expects, must
/// get the same delay; and every signal it may read must be found in the answer.
#[test]
fn the_lock_delay_is_read_right_in_any_time_zone_and_date_style() {
    let pg = TestPostgres::start();
    pg.create_role(NOPRIV);
    pg.client()
        .batch_execute(&format!(
            "ALTER ROLE ALL SET DateStyle = 'SQL, DMY'; ALTER ROLE ALL SET IntervalStyle = 'sql_standard'; \
             ALTER ROLE ALL SET TimeZone = 'Asia/Kathmandu'; \
             ALTER ROLE {NOPRIV} SET TimeZone = 'America/St_Johns'"
        ))
        .expect("cannot set the roles' time zones");
    let dir = TempDir::new().expect("cannot create a temp dir");
    let before = now();
    // Every signal moves at an immediate restart (docs/failures.md).
    pg.restart(Shutdown::Immediate);
    let runs = [
        (
            "superuser",
            pg.url(),
            &["checkpoint=", "postmaster=", "stats=", "walwriter="][..],
        ),
        (
            "nopriv",
            pg.url_as(NOPRIV),
            &["checkpoint=", "postmaster=", "stats="][..],
        ),
    ];
    let runs: Vec<_> = runs
        .into_iter()
        .map(|(file, url, signals)| {
            let script = format!("date +%s.%N > {file}");
            let flags: Vec<&str> = TIMING.iter().copied().chain(["-vv"]).collect();
            let mut cmd = heimdall_sh(
                &url,
                NAMESPACE,
                dir.path(),
                &unique_name(file),
                &flags,
                &script,
            );
            cmd.env_remove(LOCK_DELAY_ENV);
            (file, signals, Running::spawn(cmd))
        })
        .collect();
    for (file, signals, mut run) in runs {
        let stderr = run.expect_exit(0, RUN_LIMIT);
        let at = last_time(dir.path(), file);
        let by_its_clock = stderr
            .lines()
            .find(|line| line.contains("when the server came up, by its clock"))
            .unwrap_or_else(|| panic!("{file}: no reading in: {stderr}"));
        for signal in signals {
            assert!(
                by_its_clock.contains(signal),
                "{file}: no {signal} in: {by_its_clock}"
            );
        }
        if file == "nopriv" {
            assert!(!by_its_clock.contains("walwriter="), "{by_its_clock}");
        }
        assert!(
            at >= before + LOCK_DELAY.as_secs_f64(),
            "the {file} run started its command {:.2}s after the restart began, before the lock-delay: {stderr}",
            at - before
        );
        // A reading off by the zone's offset would wait hours, or not at all.
        assert!(
            at - before <= (LOCK_DELAY + SLACK + SLACK).as_secs_f64(),
            "the {file} run started its command {:.2}s after the restart began: {stderr}",
            at - before
        );
        assert!(stderr.contains("holding lock"), "{file}: {stderr}");
    }
}

#[test]
fn a_role_denied_every_signal_still_takes_the_lock_and_runs() {
    let pg = TestPostgres::start();
    pg.create_role(NOPRIV);
    pg.client()
        .batch_execute(
            "REVOKE EXECUTE ON FUNCTION pg_postmaster_start_time(), \
             pg_stat_get_bgwriter_stat_reset_time(), pg_stat_get_activity(integer), \
             pg_control_checkpoint(), pg_last_wal_replay_lsn(), pg_walfile_name(pg_lsn), \
             pg_current_wal_lsn() FROM PUBLIC",
        )
        .expect("cannot revoke");
    let dir = TempDir::new().expect("cannot create a temp dir");
    let mut cmd = locked_on(&pg.url_as(NOPRIV), &unique_name("denied"));
    cmd.arg("-v");
    let (_, stderr) = started_at(cmd, dir.path(), "ran");
    assert!(
        stderr.contains("cannot tell when the server came up"),
        "{stderr}"
    );
}

#[test]
fn a_lease_excludes_the_next_run_across_a_restart() {
    // Lease mode needs no lock-delay: the lease row survives the restart (its grant and renewals
    // commit durably), the holder's renewals reconnect and find the row still theirs, so the
    // job runs on under its lease, and nobody else gets in until it has ended.
    let pg = TestPostgres::start();
    let dir = TempDir::new().expect("cannot create a temp dir");
    let lock = unique_name("lease");
    let lease = [
        "--lease-table",
        "leases",
        "--lease-ttl",
        "6s",
        "--kill-after",
        "1s",
    ];
    // Like STUBBORN_JOB, but it ends by itself after about 8 s.
    let job = "trap '' TERM; echo $$ > pid; i=0; while [ $i -lt 400 ]; do \
               date +%s.%N >> first; sleep 0.02; i=$((i+1)); done";
    let mut first = Running::spawn(heimdall_sh(
        &pg.url(),
        NAMESPACE,
        dir.path(),
        &lock,
        &lease,
        job,
    ));
    first.command_pid(dir.path(), RUN_LIMIT);
    let second = second_host(&pg.url(), dir.path(), &lock, &lease);
    let back = {
        pg.restart(Shutdown::Immediate);
        now()
    };
    let first_err = first.expect_exit(0, RUN_LIMIT);
    let second = second.join().expect("the second host panicked").started;
    let last = last_time(dir.path(), "first");
    eprintln!(
        "lease, immediate restart: the second run started {:.2}s after the server was back, {:.2}s after the first job's last write",
        second - back,
        second - last
    );
    assert!(
        second > last,
        "the lease holders overlapped by {:.2}s; the first said: {first_err}",
        last - second
    );
}
