//! The holding connection: every statement of a holder reaches the backend that holds the lock,
//! even through a proxy that routes statements one by one (pgpool-II) or a transaction pool
//! that hands a waiter's next transaction to another server connection; a session the server
//! ended is noticed at once, not at the next heartbeat; and the holding connection is closed
//! only after the job is gone, whatever the watchdog saw, so a second run never starts beside
//! a job that is still being stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, waiters};
use crate::support::pgbouncer::PgBouncer;
use crate::support::pgpool::{self, Reads};
use crate::support::procs::{self, Job, Running, heimdall_sh, lines};
use crate::support::{
    RUN_LIMIT, TestPostgres, busy_wait, process_group_alive, shared, unique_name,
};
const NAMESPACE: &str = "holding";

/// A job that ignores SIGTERM (as one inside a critical section may) and appends the time to
/// `writes` every 50 ms until it is killed: its last line is its last write.
const STUBBORN: &str =
    "echo $$ > pid; trap '' TERM; while :; do date +%s.%N >> writes; sleep 0.05; done";

/// The last time a [`STUBBORN`] job (or any job appending `date +%s.%N` lines) wrote to `file`.
fn last_write(dir: &Path, file: &str) -> f64 {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .fold(f64::MIN, f64::max)
}

/// A second host that tries the lock every 100 ms with `url` (and `flags`) until its command
/// runs, and returns when that command started (`date +%s.%N`, the same clock as
/// [`last_write`]).
fn second_host_start(url: &str, name: &str, flags: &[&str], dir: &Path, limit: Duration) -> f64 {
    let deadline = Instant::now() + limit;
    loop {
        let mut run = Running::spawn(heimdall_sh(
            url,
            NAMESPACE,
            dir,
            name,
            flags,
            "date +%s.%N > second-start",
        ));
        let (status, stderr) = run.finish(RUN_LIMIT);
        match status.code() {
            Some(0) => return last_write(dir, "second-start"),
            Some(75) => {}
            other => panic!("the second host's run ended with {other:?}: {stderr}"),
        }
        assert!(
            Instant::now() < deadline,
            "the second host never got the lock within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// A proxy that routes statements one by one: pgpool-II with load balancing
// ---------------------------------------------------------------------------

#[test]
fn a_holder_through_pgpool_load_balancing_keeps_its_lock_to_the_end() {
    // The standby takes every read pgpool balances: a heartbeat that went there would be
    // answered by another backend at the first beat.
    let cluster = pgpool::Cluster::start(Reads::Standby, "");
    let url = cluster.url(cluster.primary.superuser());
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("pgpool-hold");
    let mut a = procs::guarded(
        &url,
        NAMESPACE,
        dir.path(),
        &name,
        &["--heartbeat", "300ms"],
        "2",
    );
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
        "A never ran: {}",
        a.stderr()
    );
    // The lock is really held on the primary while A runs: a direct run is refused.
    let mut b = procs::guarded(
        &cluster.primary.url(),
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "0",
    );
    b.expect_exit(75, RUN_LIMIT);
    // And through pgpool, whose reads go to the standby: the busy message still finds the
    // holder, on the primary, and names it.
    let mut c = procs::guarded(&url, NAMESPACE, dir.path(), &name, &[], "0");
    let c_err = c.expect_exit(75, RUN_LIMIT);
    assert!(
        c_err.contains(&format!("pid {}", a.pid())),
        "the busy message does not name the holder (heimdall pid {}): {c_err}",
        a.pid()
    );
    let stderr = a.expect_exit(0, RUN_LIMIT);
    assert!(!stderr.contains("lost lock"), "{stderr}");
    assert_eq!(lines(dir.path(), "runs"), 1);
}

#[test]
fn a_heartbeat_answered_by_a_standby_stops_the_job_before_the_lock_is_let_go() {
    // Every function counts as read-only, so pgpool balances even the heartbeat to the
    // standby: heimdall cannot confirm its lock, and must stop the job while it still holds it.
    // Not on slot 0, whose heartbeat also reads `pg_locks` for a replacer (`--replace`), a
    // system catalog, which pgpool sends to the primary: slot 0 of two is taken first, directly.
    let cluster = pgpool::Cluster::start(Reads::Standby, "read_only_function_list = '.*'");
    let url = cluster.url(cluster.primary.superuser());
    let slots = ["--slots", "2"];
    let name = unique_name("pgpool-standby");
    let slot_0 = crate::support::runs::Holder::start_with({
        let mut cmd = crate::support::heimdall_std();
        cmd.args([
            "--database",
            &cluster.primary.url(),
            "--namespace",
            NAMESPACE,
        ])
        .args(["--name", &name, "--slots", "2"]);
        cmd
    });
    let mut a = Job::start_in(
        tempfile::tempdir().unwrap(),
        &url,
        NAMESPACE,
        &name,
        &["--slots", "2", "--heartbeat", "1s", "--kill-after", "2s"],
        STUBBORN,
    );
    let dir = a.dir.path();
    let second = second_host_start(&cluster.primary.url(), &a.name, &slots, dir, RUN_LIMIT);
    let stderr = a.run.expect_exit(76, RUN_LIMIT);
    let last = last_write(dir, "writes");
    assert!(
        second > last,
        "the second host's command started at {second}, before the first job's last write at {last}: {stderr}"
    );
    assert!(stderr.contains("standby"), "names the standby: {stderr}");
    drop(slot_0);
}

// ---------------------------------------------------------------------------
// --wait through a transaction pool with several server connections
// ---------------------------------------------------------------------------

/// A direct holder A, then a pooled waiter B with `b_flags`, then a direct waiter C with
/// `c_flags` once B runs: B's wait is granted on another server connection than its first
/// attempt ran on, and B must still hold (exit 0, no overlap with C).
fn pooled_waiter_keeps_its_lock(a_flags: &[&str], b_flags: &[&str], c_flags: &[&str]) {
    let pg = TestPostgres::start();
    // Several server connections, handed out in turn (server_round_robin): the waiter's queued
    // transaction lands on another one than its first attempt did.
    let bouncer = PgBouncer::start(&pg, "transaction");
    bouncer.warm(4);
    let pooled = bouncer.url(pg.superuser());
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("pooled-wait");
    let mut a = procs::guarded(&pg.url(), NAMESPACE, dir.path(), &name, a_flags, "1.5");
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
        "A never ran: {}",
        a.stderr()
    );
    let mut b_args = vec!["--wait", "--heartbeat", "300ms"];
    b_args.extend_from_slice(b_flags);
    let mut b = procs::guarded(&pooled, NAMESPACE, dir.path(), &name, &b_args, "2");
    a.expect_exit(0, RUN_LIMIT);
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 2
            || b.has_exited()),
        "B never ran: {}",
        b.stderr()
    );
    let mut c_args = vec!["--wait"];
    c_args.extend_from_slice(c_flags);
    let mut c = procs::guarded(&pg.url(), NAMESPACE, dir.path(), &name, &c_args, "0");
    let b_err = b.expect_exit(0, RUN_LIMIT);
    assert!(!b_err.contains("lost lock"), "{b_err}");
    c.expect_exit(0, RUN_LIMIT);
    assert_eq!(lines(dir.path(), "overlaps"), 0, "two holders at once");
    assert_eq!(lines(dir.path(), "runs"), 3);
}

#[test]
fn a_pooled_wait_keeps_the_lock_it_was_granted_on_another_server_connection() {
    pooled_waiter_keeps_its_lock(&[], &[], &[]);
}

#[test]
fn a_pooled_shared_wait_keeps_the_lock_it_was_granted_on_another_server_connection() {
    pooled_waiter_keeps_its_lock(&[], &["--shared"], &[]);
}

#[test]
fn a_pooled_slotted_wait_keeps_the_slot_it_was_granted_on_another_server_connection() {
    // One slot of one, so the guarded command still sees any overlap; the slot protocol (try
    // every slot, queue on one for a while, try again) is what runs.
    pooled_waiter_keeps_its_lock(&["--slots", "1"], &["--slots", "1"], &["--slots", "1"]);
}

#[test]
fn pooled_waits_for_several_slots_never_call_their_own_lock_lost() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let pooled = bouncer.url(pg.superuser());
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("pooled-slots");
    let slots = ["--slots", "3", "--wait", "--heartbeat", "300ms"];
    let mut runs: Vec<Running> = (0..6)
        .map(|_| {
            Running::spawn(heimdall_sh(
                &pooled,
                NAMESPACE,
                dir.path(),
                &name,
                &slots,
                "echo ran >> runs; sleep 1",
            ))
        })
        .collect();
    for run in &mut runs {
        let stderr = run.expect_exit(0, RUN_LIMIT);
        assert!(!stderr.contains("lost lock"), "{stderr}");
    }
    assert_eq!(lines(dir.path(), "runs"), 6);
}

// ---------------------------------------------------------------------------
// A wait cancelled by a signal
// ---------------------------------------------------------------------------

/// A heimdall on `url` waiting for `NAMESPACE/name` (`--wait`), whose command touches
/// `dir/ran`; returns once `client`'s server shows it queued.
fn queued_waiter(url: &str, dir: &Path, name: &str, client: &mut postgres::Client) -> Running {
    Running::spawn_queued(
        heimdall_sh(url, NAMESPACE, dir, name, &["--wait"], "touch ran"),
        client,
        LockId::of(NAMESPACE, name),
        1,
    )
}

/// How many backends wait in the lock queue for the lock `NAMESPACE/name`.
fn queued_for(client: &mut postgres::Client, name: &str) -> usize {
    waiters(client, LockId::of(NAMESPACE, name)).len()
}

#[test]
fn a_signalled_pooled_waiter_leaves_nothing_queued_and_the_pooler_serving() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let pooled = bouncer.url(pg.superuser());
    let mut client = pg.client();
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let name = unique_name("cancelled-wait");
        let holder = crate::support::runs::Holder::start(&pg.url(), NAMESPACE, &name);
        let mut waiter = queued_waiter(&pooled, dir.path(), &name, &mut client);
        waiter.signal(libc::SIGTERM);
        waiter.expect_exit(143, RUN_LIMIT);
        assert!(
            busy_wait(Duration::from_secs(5), || queued_for(&mut client, &name)
                == 0),
            "round {round}: the cancelled waiter's backend is still queued for the lock"
        );
        assert!(!dir.path().join("ran").exists(), "the command ran");
        holder.stop();
        // The pooler still serves: a pooled run takes the lock now that it is free.
        let mut next = Running::spawn(heimdall_sh(
            &pooled,
            NAMESPACE,
            dir.path(),
            &name,
            &[],
            "touch ran",
        ));
        next.expect_exit(0, RUN_LIMIT);
        assert!(dir.path().join("ran").exists());
    }
}

// ---------------------------------------------------------------------------
// A session the server ended, noticed at once
// ---------------------------------------------------------------------------

/// Starts a job under `url` with the default heartbeat (5 s), terminates its backend from
/// `pg`, and returns how long the job outlived the termination.
fn job_life_after_terminate(url: &str, pg: &TestPostgres) -> Duration {
    let mut job = Job::start_on(
        url,
        NAMESPACE,
        "terminated",
        &[],
        "echo $$ > pid; exec sleep 30",
    );
    let (pgid, run) = (job.pgid, &mut job.run);
    let mut client = pg.client();
    let like = format!("%{NAMESPACE}/{}%", job.name);
    let terminated = Instant::now();
    let n: i64 = client
        .query_one(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name like $1 and pid <> pg_backend_pid()) t",
            &[&like],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "one holding backend to terminate");
    assert!(
        busy_wait(RUN_LIMIT, || !process_group_alive(pgid)),
        "the job never stopped"
    );
    let life = terminated.elapsed();
    run.expect_exit(76, RUN_LIMIT);
    life
}

#[test]
fn a_terminated_backend_stops_the_job_within_a_second_at_the_default_heartbeat() {
    let life = job_life_after_terminate(&shared().url(), shared());
    assert!(
        life < Duration::from_secs(1),
        "the job ran on for {life:?} after its backend was terminated"
    );
}

#[test]
fn a_backend_terminated_behind_a_transaction_pool_stops_the_job_within_a_second() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let life = job_life_after_terminate(&bouncer.url(pg.superuser()), &pg);
    assert!(
        life < Duration::from_secs(1),
        "the job ran on for {life:?} after its backend was terminated"
    );
}

#[test]
fn a_sigkilled_waiter_leaves_the_servers_queue_within_seconds() {
    // No cancel is sent for a SIGKILLed heimdall; its backend must notice the closed socket
    // itself, or it would sit at the head of the queue until granted a lock nobody uses.
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("killed-wait");
    let holder = crate::support::runs::Holder::start(&shared().url(), NAMESPACE, &name);
    let mut client = shared().client();
    let mut waiter = queued_waiter(&shared().url(), dir.path(), &name, &mut client);
    waiter.signal(libc::SIGKILL);
    waiter.finish(RUN_LIMIT);
    assert!(
        busy_wait(Duration::from_secs(5), || queued_for(&mut client, &name)
            == 0),
        "the SIGKILLed waiter's backend is still queued for the lock"
    );
    holder.stop();
    assert!(!dir.path().join("ran").exists(), "the command ran");
}

// ---------------------------------------------------------------------------
// The promise as a matrix: every lock mode through every path
// ---------------------------------------------------------------------------

/// A job that counts how many runs of it are inside at once: each run adds a file of its own
/// first and counts after, so of runs that overlap, the last to arrive sees them all. A run
/// stopped by SIGTERM (a replacer's takeover) takes its file along.
const COUNTING: &str = r#"trap 'rm -f inside/$$; exit 143' TERM; mkdir -p inside; touch inside/$$; n=$(ls inside | wc -l); echo $n >> seen; echo ran >> runs; sleep "$0"; rm inside/$$"#;

/// The most runs a [`COUNTING`] job saw inside at once.
fn most_inside(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("seen"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

/// heimdall on `url` running a [`COUNTING`] job for `seconds`, with heartbeats every 300 ms so
/// that several go through the path while it holds.
fn counting(url: &str, dir: &Path, name: &str, flags: &[&str], seconds: &str) -> Running {
    let mut args = vec!["--heartbeat", "300ms"];
    args.extend_from_slice(flags);
    let script = COUNTING.replace("\"$0\"", seconds);
    Running::spawn(heimdall_sh(url, NAMESPACE, dir, name, &args, &script))
}

/// Every lock mode on `url`: the holders a mode allows run, the next is refused or waits, and
/// no more than the mode allows are ever inside at once.
fn every_mode_keeps_the_promise(url: &str, path: &str) {
    let table = format!("matrix_leases_{}", std::process::id());
    let modes: [(&str, Vec<&str>, usize); 7] = [
        ("plain", vec![], 1),
        ("wait", vec!["--wait"], 1),
        // The wait's place is taken in the same message as the wait: through every path too.
        ("queue", vec!["--wait", "--queue", "1"], 1),
        ("slots", vec!["--slots", "2"], 2),
        ("shared", vec!["--shared"], 2),
        ("lease", vec!["--lease-table", &table], 1),
        // The next run takes over: the holder stops (79) before it runs.
        ("replace", vec!["--replace"], 1),
    ];
    for (mode, flags, allowed) in modes {
        let dir = tempfile::tempdir().unwrap();
        let name = unique_name(&format!("matrix-{mode}"));
        let context = format!("{path}, {mode}");
        let mut holders: Vec<Running> = (0..allowed)
            .map(|_| counting(url, dir.path(), &name, &flags, "1.5"))
            .collect();
        assert!(
            busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == allowed),
            "{context}: the first {allowed} never ran: {:?}",
            holders.iter().map(Running::stderr).collect::<Vec<_>>()
        );
        // One more: exclusive in shared mode, since a shared holder lets shared runs in.
        let next_flags: Vec<&str> = if mode == "shared" {
            vec![]
        } else {
            flags.clone()
        };
        let mut next = counting(url, dir.path(), &name, &next_flags, "0.2");
        let waits = matches!(mode, "wait" | "queue" | "replace");
        let code = if waits { 0 } else { 75 };
        let next_err = next.expect_exit(code, RUN_LIMIT);
        let holder_code = if mode == "replace" { 79 } else { 0 };
        for holder in &mut holders {
            let stderr = holder.expect_exit(holder_code, RUN_LIMIT);
            assert!(!stderr.contains("lost lock"), "{context}: {stderr}");
        }
        assert!(
            most_inside(dir.path()) <= allowed,
            "{context}: {} runs inside at once, {allowed} allowed; {next_err}",
            most_inside(dir.path())
        );
        let ran = if waits { allowed + 1 } else { allowed };
        assert_eq!(lines(dir.path(), "runs"), ran, "{context}: {next_err}");
    }
}

#[test]
fn every_lock_mode_keeps_the_promise_on_a_direct_connection() {
    every_mode_keeps_the_promise(&shared().url(), "direct");
}

#[test]
fn every_lock_mode_keeps_the_promise_through_pgbouncer_session_pooling() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "session");
    every_mode_keeps_the_promise(&bouncer.url(pg.superuser()), "PgBouncer session pool");
}

#[test]
fn every_lock_mode_keeps_the_promise_through_pgbouncer_transaction_pooling() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    bouncer.warm(4);
    every_mode_keeps_the_promise(&bouncer.url(pg.superuser()), "PgBouncer transaction pool");
}

#[test]
fn every_lock_mode_keeps_the_promise_through_pgpool_load_balancing() {
    let cluster = pgpool::Cluster::start(Reads::Balanced, "");
    every_mode_keeps_the_promise(&cluster.url(cluster.primary.superuser()), "pgpool-II");
}
