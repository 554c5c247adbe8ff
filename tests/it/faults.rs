//! Faults while the command runs: the watchdog notices that the session holding the lock is
//! gone (backend terminated, server stopped, network cut), stops the command's whole process
//! group and exits 76; a quiet run costs one heartbeat per interval and no measurable CPU; and
//! `--heartbeat 0` really turns the watchdog off.
//!
//! Every test uses its own lock name and temp dir, where the command writes its pid
//! (`echo $$ > pid`) once it runs, so the tests poll for that instead of sleeping. Each fault
//! test prints how long heimdall took to report the lost lock (run with `--nocapture`).

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders};
use crate::support::procs::{self, Frozen, Job, Running};
use crate::support::proxy::Proxy;
use crate::support::{
    RUN_LIMIT, START_LIMIT, TestPostgres, busy_wait, new_dir, proc_stat_fields,
    process_group_alive, shared, unique_name,
};

const NAMESPACE: &str = "faults";
/// A command whose process group outlives its leader unless someone stops the whole group, and
/// that ignores SIGTERM (an ignored signal stays ignored across fork and exec), so that only
/// the SIGKILL after `--kill-after` ends it.
const GROUP_SCRIPT: &str = "trap '' TERM; echo $$ > pid; sleep 600 & sleep 600";
/// heimdall's default `--heartbeat` (and so its default `--heartbeat-timeout`).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);
/// The `--kill-after` of these runs.
const KILL_AFTER: Duration = Duration::from_secs(1);
/// Added to each bound: a loaded machine is slow to schedule heimdall and the test.
const SLACK: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Running heimdall in the background
// ---------------------------------------------------------------------------

/// A [`GROUP_SCRIPT`] job with `--heartbeat` at `interval` and [`KILL_AFTER`], and its bounds.
struct GroupRun {
    /// Held back while the test runs, so that heimdall itself must stop the job: the keeper
    /// would kill it once heimdall has exited.
    keeper: Option<Frozen>,
    job: Job,
    /// When heimdall must have reported the loss: the next heartbeat and its answer's deadline.
    reported: Duration,
    /// When the job must be gone: then SIGTERM, and SIGKILL a kill-after later.
    gone: Duration,
}

/// Starts a [`GroupRun`] on `url` under a fresh lock named from `prefix`, and waits until its
/// command has written its pid.
fn start_group(url: &str, prefix: &str, interval: Duration) -> GroupRun {
    let mut flags = vec![format!("--kill-after={}s", KILL_AFTER.as_secs())];
    if interval != DEFAULT_HEARTBEAT {
        flags.push(format!("--heartbeat={}ms", interval.as_millis()));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let job = Job::start_on(url, NAMESPACE, prefix, &flags, GROUP_SCRIPT);
    // heartbeat-timeout defaults to the interval.
    let reported = interval * 2;
    GroupRun {
        keeper: Some(job.freeze_keeper()),
        job,
        reported: reported + SLACK,
        gone: reported + KILL_AFTER + SLACK,
    }
}

/// The lost-lock path after a fault injected at `fault`: heimdall reports the loss within its
/// bound, SIGKILLs the group (which ignores SIGTERM) after `--kill-after`, has the whole group
/// gone within that bound, and exits 76. Returns the report line, and prints the timings.
fn expect_lost_lock(group: &mut GroupRun, test: &str, fault: Instant) -> String {
    let (pgid, lock) = (group.job.pgid, group.job.name.clone());
    let run = &mut group.job.run;
    let (mut reported, mut gone) = (None, None);
    busy_wait(group.gone + SLACK, || {
        if reported.is_none() && run.stderr().contains("heimdall: lost lock ") {
            reported = Some(fault.elapsed());
        }
        if gone.is_none() && !process_group_alive(pgid) {
            gone = Some(fault.elapsed());
        }
        (reported.is_some() && gone.is_some()) || run.has_exited()
    });
    let exited = busy_wait(RUN_LIMIT, || run.has_exited());
    let left = process_group_alive(pgid);
    drop(group.keeper.take());
    assert!(exited, "heimdall did not exit; stderr:\n{}", run.stderr());
    let (status, stderr) = run.finish(RUN_LIMIT);
    let exited = fault.elapsed();
    assert!(
        !left,
        "the command's process group {pgid} outlived heimdall; stderr:\n{stderr}"
    );
    let gone = gone.unwrap_or(exited);
    let reported = reported.unwrap_or_else(|| {
        panic!("heimdall never reported the lost lock ({status}); stderr:\n{stderr}")
    });
    eprintln!(
        "{test}: lost lock reported {:.2}s after the fault (bound {:.0}s), the job gone after \
         {:.2}s (bound {:.0}s), heimdall exited after {:.2}s",
        reported.as_secs_f64(),
        group.reported.as_secs_f64(),
        gone.as_secs_f64(),
        group.gone.as_secs_f64(),
        exited.as_secs_f64(),
    );
    assert_eq!(
        status.code(),
        Some(76),
        "heimdall ended with {status}, expected exit 76; stderr:\n{stderr}"
    );
    assert!(
        reported <= group.reported,
        "the lost lock was reported {reported:?} after the fault, more than {:?}; stderr:\n{stderr}",
        group.reported
    );
    assert!(
        gone <= group.gone,
        "the job ran on {gone:?} after the fault, more than {:?}; stderr:\n{stderr}",
        group.gone
    );
    assert!(
        stderr.contains("sending SIGKILL"),
        "the job ignores SIGTERM: heimdall must have sent SIGKILL after --kill-after; stderr:\n{stderr}"
    );
    let prefix = format!("heimdall: lost lock {NAMESPACE}/{lock} (keys ");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line starting {prefix:?}; stderr:\n{stderr}"
    );
    let line = lines[0];
    assert!(
        line.contains(") after the command ran ") && line.ends_with("; stopping the command"),
        "unexpected lost-lock line: {line}"
    );
    eprintln!("{test}: {line}");
    line.to_owned()
}

/// The backend heimdall's session runs on, found by the application_name heimdall sets.
fn heimdall_backend(client: &mut postgres::Client, lock: &str) -> i32 {
    let pattern = format!("heimdall {NAMESPACE}/{lock} @%");
    let mut pid = None;
    busy_wait(START_LIMIT, || {
        pid = client
            .query_opt(
                "select pid from pg_stat_activity where application_name like $1",
                &[&pattern],
            )
            .unwrap()
            .map(|row| row.get::<_, i32>(0));
        pid.is_some()
    });
    pid.unwrap_or_else(|| {
        panic!("no backend in pg_stat_activity with application_name {pattern:?}")
    })
}

fn terminate_backend(client: &mut postgres::Client, pid: i32) {
    let done: bool = client
        .query_one("select pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(done, "pg_terminate_backend({pid}) returned false");
}

// ---------------------------------------------------------------------------
// 1. The backend is terminated
// ---------------------------------------------------------------------------

fn terminated_backend_stops_the_command(test: &str, interval: Duration) {
    let mut group = start_group(&shared().url(), "term", interval);
    let mut client = shared().client();
    let backend = heimdall_backend(&mut client, &group.job.name);

    let fault = Instant::now();
    terminate_backend(&mut client, backend);
    let line = expect_lost_lock(&mut group, test, fault);
    assert!(
        line.contains(
            "backend terminated by the server (FATAL: terminating connection due to administrator command)"
        ),
        "the message does not say the backend was terminated: {line}"
    );
}

#[test]
fn terminated_backend_stops_the_command_group_and_exits_76() {
    terminated_backend_stops_the_command(
        "terminated_backend (heartbeat 1s)",
        Duration::from_secs(1),
    );
}

#[test]
fn terminated_backend_is_noticed_with_the_default_heartbeat() {
    terminated_backend_stops_the_command("terminated_backend (heartbeat 5s)", DEFAULT_HEARTBEAT);
}

// ---------------------------------------------------------------------------
// 2. The server stops abruptly
// ---------------------------------------------------------------------------

fn server_crash_stops_the_command(test: &str, interval: Duration) {
    let pg = TestPostgres::start();
    let mut group = start_group(&pg.url(), "crash", interval);

    let fault = Instant::now();
    pg.stop_immediate();
    let line = expect_lost_lock(&mut group, test, fault);
    // PostgreSQL announces an immediate shutdown to each client as a WARNING notice just
    // before it closes the connection, and heimdall quotes it when it read it. When heimdall's
    // next heartbeat meets the closed socket with a reset, the kernel drops the unread notice,
    // so only the closed connection is certain.
    assert!(
        line.contains("the server closed the connection"),
        "the message does not say the server went away: {line}"
    );
}

#[test]
fn server_stopping_abruptly_stops_the_command_group_and_exits_76() {
    server_crash_stops_the_command("server_crash (heartbeat 1s)", Duration::from_secs(1));
}

#[test]
fn server_stopping_abruptly_is_noticed_with_the_default_heartbeat() {
    server_crash_stops_the_command("server_crash (heartbeat 5s)", DEFAULT_HEARTBEAT);
}

// ---------------------------------------------------------------------------
// 3. The network is cut
// ---------------------------------------------------------------------------

fn network_cut_stops_the_command(test: &str, interval: Duration) {
    let proxy = Proxy::start(shared().port());
    let mut group = start_group(&proxy.url(shared()), "cut", interval);

    let fault = Instant::now();
    proxy.cut();
    let line = expect_lost_lock(&mut group, test, fault);
    let expected = format!("no answer to the heartbeat within {}s", interval.as_secs());
    assert!(
        line.contains(&expected),
        "the message does not say {expected:?}: {line}"
    );
    // The server never saw the cut: its backend holds the lock until the proxy closes.
    drop(proxy);
}

#[test]
fn network_cut_is_noticed_by_the_heartbeat_deadline_and_exits_76() {
    network_cut_stops_the_command("network_cut (heartbeat 1s)", Duration::from_secs(1));
}

#[test]
fn network_cut_is_noticed_with_the_default_heartbeat() {
    network_cut_stops_the_command("network_cut (heartbeat 5s)", DEFAULT_HEARTBEAT);
}

// ---------------------------------------------------------------------------
// 4. A quiet run sends one heartbeat per interval
// ---------------------------------------------------------------------------

#[test]
fn quiet_run_sends_at_most_one_heartbeat_per_interval() {
    let interval = Duration::from_millis(200);
    let proxy = Proxy::start(shared().port());
    let dir = new_dir();
    let lock = unique_name("count");
    // A generous answer deadline: this test counts heartbeats, it does not race them.
    let flags = ["--heartbeat", "200ms", "--heartbeat-timeout", "10s"];
    let mut run = Running::spawn(procs::heimdall_sh(
        &proxy.url(shared()),
        NAMESPACE,
        dir.path(),
        &lock,
        &flags,
        "sleep 2",
    ));
    let (status, stderr) = run.finish(RUN_LIMIT);
    assert!(
        status.success(),
        "heimdall ended with {status}; stderr:\n{stderr}"
    );

    let queries = proxy.queries();
    let texts: Vec<&str> = queries.iter().map(|(_, sql)| sql.as_str()).collect();
    assert!(
        queries.len() >= 2,
        "expected the lock and the release; saw {texts:#?}"
    );
    let (lock_at, lock_sql) = &queries[0];
    let (release_at, release_sql) = &queries[queries.len() - 1];
    assert!(
        lock_sql.contains("pg_try_advisory_xact_lock(") && lock_sql.contains("COMMIT AND CHAIN"),
        "first query, the lock: {lock_sql}"
    );
    assert!(
        release_sql.ends_with("; COMMIT"),
        "last query, the release: {release_sql}"
    );
    let heartbeats = queries.len() - 2;
    assert!(
        texts[1..texts.len() - 1]
            .iter()
            .all(|sql| sql.starts_with(
                "SELECT pg_catalog.pg_backend_pid(), pg_catalog.now(), pg_catalog.pg_is_in_recovery(), (SELECT r.pid FROM pg_catalog.pg_lock_status() r "
            ) && sql.ends_with(" LIMIT 1) AS replacer")),
        "between the lock and the release only heartbeats are expected: {texts:#?}"
    );
    // The command runs between the lock statement and the release, as the wire saw them.
    let elapsed = release_at.duration_since(*lock_at);
    let most = (elapsed.as_micros() / interval.as_micros()) as usize + 1;
    eprintln!(
        "quiet run: {heartbeats} heartbeats in {:.2}s at {interval:?} (at most {most} allowed)",
        elapsed.as_secs_f64()
    );
    assert!(
        heartbeats >= 1,
        "no heartbeat in {elapsed:?}; stderr:\n{stderr}"
    );
    assert!(
        heartbeats <= most,
        "{heartbeats} heartbeats in {elapsed:?} at one per {interval:?}"
    );
}

// ---------------------------------------------------------------------------
// 5. An idle heimdall uses no CPU
// ---------------------------------------------------------------------------

/// utime + stime of `pid` in clock ticks, from /proc/PID/stat (fields 14 and 15; the fields
/// after the command name, which may contain anything, start after the last ')').
fn cpu_ticks(pid: i32) -> u64 {
    let fields = proc_stat_fields(pid).expect("heimdall is gone");
    // The fields start at field 3 (state): utime is field 14, stime field 15.
    fields[14 - 3].parse::<u64>().unwrap() + fields[15 - 3].parse::<u64>().unwrap()
}

#[test]
fn idle_heimdall_uses_no_measurable_cpu() {
    // The command runs until the test says go, so the window below never holds heimdall's
    // start or its exit, however slow the machine.
    let mut job = Job::start(
        NAMESPACE,
        "idle",
        &[],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.1; done",
    );
    let window = Duration::from_millis(2500);
    let before = cpu_ticks(job.run.pid());
    // Waiting is the point here: heimdall must sit still while the command runs.
    thread::sleep(window);
    let after = cpu_ticks(job.run.pid());
    fs::write(job.path("go"), "").unwrap();
    let (status, stderr) = job.run.finish(RUN_LIMIT);
    assert!(
        status.success(),
        "heimdall ended with {status}; stderr:\n{stderr}"
    );
    eprintln!(
        "idle heimdall: {} clock ticks of CPU in {window:?}",
        after - before
    );
    assert!(
        after - before <= 2,
        "heimdall used {} clock ticks of CPU in {window:?} while its command ran",
        after - before
    );
}

// ---------------------------------------------------------------------------
// 6. --heartbeat 0
// ---------------------------------------------------------------------------

/// The documented trade-off: without the watchdog, a lost lock goes unseen while the command
/// runs, and the command runs to its end without its lock. Only the unlock at the end finds
/// out, and heimdall then exits 76 rather than pass the run off as a success.
#[test]
fn heartbeat_zero_lets_the_command_run_to_its_end_without_its_lock() {
    let script = "echo \"$HEIMDALL_KEY\" > key; echo $$ > pid; \
                  while [ ! -e go ]; do sleep 0.05; done; echo finished > done";
    let mut job = Job::start(NAMESPACE, "nowatch", &["--heartbeat", "0"], script);
    let (dir, lock, run) = (&job.dir, &job.name, &mut job.run);
    let key = fs::read_to_string(dir.path().join("key")).unwrap();
    let id = LockId::from_key(&key);
    let mut client = shared().client();
    assert_eq!(holders(&mut client, id).len(), 1);
    let backend = heimdall_backend(&mut client, lock);
    terminate_backend(&mut client, backend);
    let gone = busy_wait(START_LIMIT, || {
        client
            .query_opt("select 1 from pg_stat_activity where pid = $1", &[&backend])
            .unwrap()
            .is_none()
    });
    assert!(
        gone,
        "backend {backend} still exists after pg_terminate_backend"
    );

    // The lock is free for anyone, and heimdall lets its command run on.
    assert_eq!(
        holders(&mut client, id).len(),
        0,
        "the lock is still held after its backend was terminated"
    );
    assert!(
        !run.has_exited(),
        "heimdall exited although its watchdog is off; stderr:\n{}",
        run.stderr()
    );
    fs::write(dir.path().join("go"), "").unwrap();
    let (status, stderr) = run.finish(RUN_LIMIT);
    assert_eq!(
        fs::read_to_string(dir.path().join("done")).unwrap(),
        "finished\n",
        "the command did not run to its end; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("stopping the command"),
        "heimdall stopped the command although its watchdog is off; stderr:\n{stderr}"
    );
    assert_eq!(
        status.code(),
        Some(76),
        "heimdall ended with {status}; stderr:\n{stderr}"
    );
    let expected = format!(
        "heimdall: lost lock {NAMESPACE}/{lock} (keys {}) before the command finished (the command exited with status 0): backend terminated by the server",
        key.trim()
    );
    assert!(
        stderr.contains(&expected),
        "stderr does not say {expected:?}:\n{stderr}"
    );
}
