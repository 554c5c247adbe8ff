//! `--queue N`: at most N runs wait for a lock, fleet-wide (`--queue 1` is Temporal's
//! BufferOne). A run that finds every place taken exits at once with the busy code and one line;
//! a place goes with the wait that holds it, whether the wait is granted, cancelled or killed,
//! directly and through a PgBouncer transaction pool; `status` shows the waiters and the bound.
//!
//! Every test uses its own lock names. The places are read in `pg_locks` under the keys
//! `heimdall key --queue N` documents; queued runs are ungranted rows on the lock itself.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders, waiters};
use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{Running, heimdall_sh, lines};
use crate::support::runs::{Holder, run_touching};
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, START_LIMIT, TestPostgres, busy_wait, heimdall, new_dir, shared, text,
    unique_name,
};
use serde_json::Value;

const NS: &str = "hm-queue";

/// `--database URL --namespace NS --name NAME`.
fn on_lock<'a>(url: &'a str, name: &'a str) -> [&'a str; 6] {
    ["--database", url, "--namespace", NS, "--name", name]
}

/// A temp dir and a lock name of its own (from `prefix`), the lock held on `url` by a
/// background heimdall until the test stops it.
fn held(url: &str, prefix: &str) -> (tempfile::TempDir, String, Holder) {
    let name = unique_name(prefix);
    let holder = Holder::start(url, NS, &name);
    (new_dir(), name, holder)
}

/// heimdall on `url` waiting for `NS/name` with `--queue places` (and `flags`), whose command
/// appends `tag` to `dir/ran`.
fn queued(url: &str, dir: &Path, name: &str, places: u16, flags: &[&str], tag: &str) -> Running {
    let places = places.to_string();
    let mut args = vec!["--wait", "--queue", &places];
    args.extend_from_slice(flags);
    Running::spawn(heimdall_sh(
        url,
        NS,
        dir,
        name,
        &args,
        &format!("echo {tag} >> ran"),
    ))
}

/// [`queued`], returning once `pg_locks` shows `expected` runs queued for the lock.
fn queued_and_seen(
    url: &str,
    client: &mut postgres::Client,
    dir: &Path,
    name: &str,
    places: u16,
    tag: &str,
    expected: usize,
) -> Running {
    let script = format!("echo {tag} >> ran");
    queued_running_and_seen(url, client, dir, name, places, &script, expected)
}

/// [`queued_and_seen`] with a command of its own, `sh -c script`.
fn queued_running_and_seen(
    url: &str,
    client: &mut postgres::Client,
    dir: &Path,
    name: &str,
    places: u16,
    script: &str,
    expected: usize,
) -> Running {
    let places = places.to_string();
    Running::spawn_queued(
        heimdall_sh(url, NS, dir, name, &["--wait", "--queue", &places], script),
        client,
        LockId::of(NS, name),
        expected,
    )
}

/// How many of the `places` places of `NS/name` some backend holds.
fn places_taken(client: &mut postgres::Client, name: &str, places: u16) -> usize {
    LockId::places(NS, name, places)
        .into_iter()
        .map(|id| holders(client, id).len())
        .sum()
}

/// The one line a refused run prints.
fn full_line(name: &str, places: u16) -> String {
    let runs = if places == 1 {
        "1 run already waits".to_owned()
    } else {
        format!("{places} runs already wait")
    };
    format!("heimdall: {runs} for lock {NS}/{name}; not queueing (--queue {places})")
}

/// Runs heimdall on `url` with `--wait --queue places` and `flags` to the end; asserts that it
/// was refused at once (the busy code, the command not run) and returns its stderr.
fn expect_refused(url: &str, dir: &Path, name: &str, places: u16, flags: &[&str]) -> String {
    let started = Instant::now();
    let out = heimdall()
        .current_dir(dir)
        .args(on_lock(url, name))
        .args(["--wait", "--queue", &places.to_string()])
        .args(flags)
        .args(["--", "sh", "-c", "echo refused >> ran"])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "stderr:\n{stderr}");
    assert!(
        !fs::read_to_string(dir.join("ran"))
            .unwrap_or_default()
            .contains("refused"),
        "a refused run ran its command"
    );
    eprintln!("refused with a full queue in {took:?}");
    assert!(took < REACT_LIMIT, "refusing took {took:?}: it waited");
    stderr
}

#[test]
fn with_queue_one_the_first_run_waits_and_the_next_two_are_refused_at_once() {
    let url = shared().url();
    let mut client = shared().client();
    let (dir, name, holder) = held(&url, "one");

    // The first waiter, once it runs, stays until the test lets it go.
    let script = "echo first >> ran; while [ ! -e go ]; do sleep 0.02; done";
    let mut first = queued_running_and_seen(&url, &mut client, dir.path(), &name, 1, script, 1);
    let second = expect_refused(&url, dir.path(), &name, 1, &[]);
    assert_eq!(
        second.trim_end(),
        full_line(&name, 1),
        "one line, and only it"
    );
    // 0.3 s later, a third, which reports its refusal as its own outcome.
    std::thread::sleep(Duration::from_millis(300));
    let metrics = dir.path().join("third.prom");
    let metrics_arg = metrics.to_str().unwrap();
    let third = expect_refused(
        &url,
        dir.path(),
        &name,
        1,
        &["--report", "json", "--metrics-file", metrics_arg],
    );
    let lines: Vec<&str> = third.lines().collect();
    assert_eq!(lines.len(), 2, "the refusal and the report: {third}");
    assert_eq!(lines[0], full_line(&name, 1));
    let report: Value = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(report["outcome"], "queue-full", "{third}");
    assert_eq!(report["exit_code"], 75, "{third}");
    let prom = fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.lines()
            .any(|l| l.contains("outcome=\"queue-full\"") && l.ends_with(" 1")),
        "{prom}"
    );
    assert!(
        prom.lines()
            .any(|l| l.contains("outcome=\"busy\"") && l.ends_with(" 0")),
        "{prom}"
    );

    assert!(
        !first.has_exited(),
        "the waiter gave up: {}",
        first.stderr()
    );
    assert_eq!(places_taken(&mut client, &name, 1), 1);
    holder.stop();
    let ran = dir.path().join("ran");
    assert!(
        busy_wait(RUN_LIMIT, || ran.exists() || first.has_exited()) && ran.exists(),
        "the waiter never ran: {}",
        first.stderr()
    );
    // Granted, it holds the lock and no place: the next start may be buffered behind it.
    assert_eq!(
        places_taken(&mut client, &name, 1),
        0,
        "a place outlived its wait"
    );
    let mut next = queued_and_seen(&url, &mut client, dir.path(), &name, 1, "next", 1);
    fs::write(dir.path().join("go"), "").unwrap();
    first.expect_exit(0, RUN_LIMIT);
    next.expect_exit(0, RUN_LIMIT);
    assert_eq!(fs::read_to_string(&ran).unwrap(), "first\nnext\n");
    assert_eq!(
        places_taken(&mut client, &name, 1),
        0,
        "a place outlived its wait"
    );
}

#[test]
fn twenty_runs_with_queue_two_against_a_holder_let_exactly_two_wait_and_run() {
    let url = shared().url();
    let mut client = shared().client();
    let (dir, name, holder) = held(&url, "twenty");

    let mut runs: Vec<Running> = (0..20)
        .map(|i| queued(&url, dir.path(), &name, 2, &[], &i.to_string()))
        .collect();
    let exited = |runs: &mut Vec<Running>| {
        runs.iter_mut()
            .map(Running::has_exited)
            .filter(|e| *e)
            .count()
    };
    let settled = busy_wait(RUN_LIMIT, || {
        exited(&mut runs) == 18 && waiters(&mut client, LockId::of(NS, &name)).len() == 2
    });
    let waiting = waiters(&mut client, LockId::of(NS, &name)).len();
    assert!(
        settled,
        "{} of 20 exited and {waiting} wait; expected 18 and 2",
        exited(&mut runs)
    );
    assert_eq!(places_taken(&mut client, &name, 2), 2);
    let mut still: Vec<Running> = Vec::new();
    for mut run in runs {
        if run.has_exited() {
            let stderr = run.expect_exit(75, RUN_LIMIT);
            assert_eq!(stderr.trim_end(), full_line(&name, 2));
        } else {
            still.push(run);
        }
    }
    assert_eq!(still.len(), 2);
    assert!(
        !dir.path().join("ran").exists(),
        "a run ran while the holder held"
    );

    holder.stop();
    for run in &mut still {
        run.expect_exit(0, RUN_LIMIT);
    }
    assert_eq!(lines(dir.path(), "ran"), 2, "exactly the two waiters ran");
    assert_eq!(
        places_taken(&mut client, &name, 2),
        0,
        "a place outlived its wait"
    );
}

/// A holder on `url`; a waiter with `--queue 1` (the place taken: a second run is refused);
/// then the waiter gets `signal`; its place must be free within seconds, so that the next run
/// queues; that one runs after the holder. `client` reads `pg_locks` on the server itself.
fn a_waiter_ending_frees_its_place(url: &str, client: &mut postgres::Client, signal: i32) {
    let (dir, name, holder) = held(url, &format!("freed{signal}"));
    let mut waiter = queued_and_seen(url, client, dir.path(), &name, 1, "first", 1);
    assert_eq!(places_taken(client, &name, 1), 1);
    expect_refused(url, dir.path(), &name, 1, &[]);

    let signalled = Instant::now();
    waiter.signal(signal);
    let (status, stderr) = waiter.finish(REACT_LIMIT);
    assert!(
        !status.success(),
        "the signalled waiter succeeded: {stderr}"
    );
    let freed = busy_wait(REACT_LIMIT, || {
        places_taken(client, &name, 1) == 0 && waiters(client, LockId::of(NS, &name)).is_empty()
    });
    let took = signalled.elapsed();
    assert!(
        freed,
        "the place was still taken {took:?} after signal {signal}"
    );
    eprintln!("signal {signal}: place free {took:?} after the signal");

    let mut next = queued_and_seen(url, client, dir.path(), &name, 1, "next", 1);
    holder.stop();
    next.expect_exit(0, RUN_LIMIT);
    assert_eq!(
        fs::read_to_string(dir.path().join("ran")).unwrap(),
        "next\n"
    );
}

#[test]
fn a_sigkilled_waiter_frees_its_place_so_the_next_run_may_queue() {
    a_waiter_ending_frees_its_place(&shared().url(), &mut shared().client(), libc::SIGKILL);
}

#[test]
fn a_cancelled_waiter_frees_its_place_so_the_next_run_may_queue() {
    a_waiter_ending_frees_its_place(&shared().url(), &mut shared().client(), libc::SIGTERM);
}

#[test]
fn through_a_transaction_pool_a_killed_or_cancelled_waiter_frees_its_place() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    bouncer.warm(4);
    let url = bouncer.url(pg.superuser());
    let mut client = pg.client();
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        a_waiter_ending_frees_its_place(&url, &mut client, signal);
    }
}

#[test]
fn with_slots_the_queue_bounds_the_waiters_too() {
    let dir = new_dir();
    let name = unique_name("slots");
    let url = shared().url();
    let mut client = shared().client();
    let slots = |extra: &[&str]| {
        let mut cmd = crate::support::heimdall_std();
        cmd.args(on_lock(&url, &name))
            .args(["--slots", "2"])
            .args(extra);
        cmd
    };
    let a = Holder::start_with(slots(&[]));
    let b = Holder::start_with(slots(&[]));
    let mut waiter = queued(&url, dir.path(), &name, 1, &["--slots", "2"], "waiter");
    assert!(
        busy_wait(START_LIMIT, || places_taken(&mut client, &name, 1) == 1
            || waiter.has_exited()),
        "the waiter never took its place: {}",
        waiter.stderr()
    );
    let stderr = expect_refused(&url, dir.path(), &name, 1, &["--slots", "2"]);
    assert_eq!(stderr.trim_end(), full_line(&name, 1));
    // The waiter queues on one slot 50-250 ms at a time; its place stays through the slices.
    let let_go = busy_wait(Duration::from_secs(1), || {
        places_taken(&mut client, &name, 1) != 1
    });
    assert!(!let_go, "the waiter let its place go between slices");
    expect_refused(&url, dir.path(), &name, 1, &["--slots", "2"]);
    assert!(
        !waiter.has_exited(),
        "the waiter gave up: {}",
        waiter.stderr()
    );

    a.stop();
    waiter.expect_exit(0, RUN_LIMIT);
    assert_eq!(
        fs::read_to_string(dir.path().join("ran")).unwrap(),
        "waiter\n"
    );
    assert_eq!(
        places_taken(&mut client, &name, 1),
        0,
        "a place outlived its wait"
    );
    b.stop();
}

#[test]
fn status_shows_the_waiters_and_the_bound() {
    let url = shared().url();
    let mut client = shared().client();
    let (dir, name, holder) = held(&url, "status");
    let status = |json: bool| {
        let mut cmd = heimdall();
        cmd.arg("status")
            .args(on_lock(&url, &name))
            .args(["--queue", "2"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.timeout(RUN_LIMIT).output().unwrap();
        assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
        text(&out.stdout)
    };

    let mut first = queued_and_seen(&url, &mut client, dir.path(), &name, 2, "1", 1);
    let one = status(false);
    assert!(
        one.contains("; 1 waiting (--queue 2: 1 of 2 places taken)"),
        "{one}"
    );
    let mut second = queued_and_seen(&url, &mut client, dir.path(), &name, 2, "2", 2);
    let two = status(false);
    assert!(
        two.contains("; 2 waiting (--queue 2: full, a run would not queue)"),
        "{two}"
    );
    let json: Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(json["waiting"], 2, "{json}");
    assert_eq!(json["queue"], 2, "{json}");
    assert_eq!(json["queue_full"], true, "{json}");

    holder.stop();
    first.expect_exit(0, RUN_LIMIT);
    second.expect_exit(0, RUN_LIMIT);
}

#[test]
fn queue_without_wait_or_with_a_lease_table_is_a_usage_error() {
    for (flags, says) in [
        (vec!["--queue", "1"], "--wait"),
        (
            vec!["--wait", "--queue", "1", "--lease-table", "q_leases"],
            "--lease-table",
        ),
        (vec!["--wait", "--queue", "0"], "--queue"),
    ] {
        run_touching(NS, |cmd| {
            cmd.args(["--database", &shared().url()]).args(&flags);
        })
        .assert_refused(2)
        .assert_stderr_contains(says);
    }
}

#[test]
fn a_fleet_wide_heimdall_queue_leaves_a_run_that_does_not_wait_alone() {
    let dir = new_dir();
    let out = heimdall()
        .current_dir(dir.path())
        .env("HEIMDALL_QUEUE", "1")
        .args(on_lock(&shared().url(), &unique_name("env")))
        .args(["--", "touch", "ran"])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(dir.path().join("ran").exists());
}
