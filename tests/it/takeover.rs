//! Takeover without overlap (#28): `--replace` asks the heimdall run holding the lock to stop
//! its command, waits for the lock, then runs; `heimdall stop` asks the same without running
//! anything. The holder stops its command as on a lost lock, lets go only once the job is gone,
//! and exits 79 naming the replacer; a session that is not heimdall's is never asked nor
//! terminated; a plain waiter granted the lock while a replacer waits behind it does not run.
//!
//! Ordering is checked strictly (marker files with nanosecond timestamps, and the replacer's
//! command looking for any process of the holder's job); speed only within the shared limits.

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use crate::support::locks::{LockId, holders, waiters};
use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{Job, Running, group_runs_sh, heimdall_sh};
use crate::support::runs::run_touching;
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, START_LIMIT, busy_wait, heimdall, heimdall_std, host_name, new_dir,
    shared, text, unique_name, wait_output,
};

const NS: &str = "hm-takeover";

/// A job that ends at once on SIGTERM, writing the moment it did to `holder-ended`.
const STOPS_ON_TERM: &str =
    "trap 'date +%s%N > holder-ended; exit 0' TERM; echo $$ > pid; while :; do sleep 0.05; done";

/// A job that ignores SIGTERM (and so does every process of it): only SIGKILL ends it.
const IGNORES_TERM: &str = "trap '' TERM; echo $$ > pid; while :; do sleep 0.05; done";

/// The holder's flags: a heartbeat of 1s, so the request is seen within a second.
const HOLDER: [&str; 2] = ["--heartbeat", "1s"];

/// The replacer's command: the moment it started, in `replacer-started`, and `overlap` if any
/// process of the holder's group `pgid` still ran then.
fn replacer_script(pgid: i32) -> String {
    format!(
        "date +%s%N > replacer-started; if {}; then echo overlap > overlap; fi",
        group_runs_sh(pgid)
    )
}

/// A nanosecond timestamp a script wrote with `date +%s%N`.
fn stamp(dir: &Path, file: &str) -> u128 {
    let text = fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{file} was not written: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{file}: {text:?}"))
}

/// `--replace` on the job's lock through `url`, with `flags`, running [`replacer_script`].
fn replacer(job: &Job, url: &str, flags: &[&str]) -> Running {
    let mut args = vec!["--replace", "-v"];
    args.extend_from_slice(flags);
    Running::spawn(heimdall_sh(
        url,
        NS,
        job.dir.path(),
        &job.name,
        &args,
        &replacer_script(job.pgid),
    ))
}

/// The holder exits 79 naming the replacer, the replacer's command ran after the holder's job
/// was gone, and the replacer said how long the takeover took.
fn assert_taken_over(mut job: Job, mut replacer: Running, ended_marker: bool) {
    let holder_err = job.run.expect_exit(79, RUN_LIMIT);
    let who = format!(
        "replaced by heimdall on {} (pid {})",
        host_name(),
        replacer.pid()
    );
    assert!(
        holder_err.contains(&who),
        "names the replacer ({who}): {holder_err}"
    );
    let replacer_err = replacer.expect_exit(0, RUN_LIMIT);
    assert!(
        replacer_err.contains("took over lock") || replacer_err.contains("took over lease"),
        "-v says how long the takeover took: {replacer_err}"
    );
    let dir = job.dir.path();
    assert!(
        !dir.join("overlap").exists(),
        "the replacer's command ran while the holder's job still ran"
    );
    if ended_marker {
        assert!(
            stamp(dir, "replacer-started") >= stamp(dir, "holder-ended"),
            "the replacer's command started before the holder's job ended"
        );
    }
}

#[test]
fn a_replacer_runs_once_the_holders_job_has_stopped_and_the_holder_exits_79_naming_it() {
    let job = Job::start(NS, "tk-term", &HOLDER, STOPS_ON_TERM);
    let asked = Instant::now();
    let mut run = replacer(&job, &shared().url(), &["--wait=60s"]);
    assert!(
        busy_wait(RUN_LIMIT, || job
            .dir
            .path()
            .join("replacer-started")
            .exists()
            || run.has_exited()),
        "the replacer never ran: {}",
        run.stderr()
    );
    // One heartbeat (1s) and the job's stop: well within the shared reaction limit, far
    // from the replacer's own --wait.
    assert!(
        asked.elapsed() < REACT_LIMIT,
        "the takeover took {:?}",
        asked.elapsed()
    );
    assert_taken_over(job, run, true);
}

#[test]
fn a_replacer_waits_through_the_kill_after_of_a_job_that_ignores_sigterm() {
    let mut job = Job::start(
        NS,
        "tk-ignore",
        &["--heartbeat", "1s", "--kill-after", "2s"],
        IGNORES_TERM,
    );
    // Frozen, the keeper cannot kill the job for a heimdall that let go too early: what is
    // checked is heimdall's own order (see `Job::queue_waiter`).
    let keeper = job.freeze_keeper();
    let asked = Instant::now();
    let mut run = replacer(&job, &shared().url(), &["--wait=60s"]);
    let replacer_err = run.expect_exit(0, RUN_LIMIT);
    assert!(
        !job.dir.path().join("overlap").exists(),
        "the replacer's command ran while the holder's job still ran: {replacer_err}"
    );
    drop(keeper);
    // The job ignored SIGTERM: the lock could pass only after the holder's --kill-after.
    assert!(
        asked.elapsed().as_secs_f64() >= 2.0,
        "the replacer ran before the holder's kill-after: {replacer_err}"
    );
    let holder_err = job.run.expect_exit(79, RUN_LIMIT);
    assert!(holder_err.contains("SIGKILL"), "{holder_err}");
}

#[test]
fn heimdall_stop_stops_the_holder_and_exits_0_with_the_lock_free() {
    let mut job = Job::start(NS, "tk-stop", &HOLDER, STOPS_ON_TERM);
    let out = heimdall()
        .args(["stop", "--database", &shared().url(), "--namespace", NS])
        .args(["--name", &job.name, "--json"])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["result"], "stopped", "{json}");
    assert!(json["waited_ms"].as_u64().is_some(), "{json}");
    let holder_err = job.run.expect_exit(79, RUN_LIMIT);
    assert!(
        holder_err.contains(&format!("replaced by heimdall on {}", host_name())),
        "{holder_err}"
    );
    assert!(job.dir.path().join("holder-ended").exists());
    let mut client = shared().client();
    assert!(holders(&mut client, LockId::of(NS, &job.name)).is_empty());
    // Nothing holds it now: exit 0, saying so.
    let out = heimdall()
        .args(["stop", "--database", &shared().url(), "--namespace", NS])
        .args(["--name", &job.name])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("nothing to stop"), "{out:?}");
}

/// A plain client session holding `NS/name` as heimdall would (the two int4 keys).
fn psql_holder(name: &str) -> (postgres::Client, i32) {
    let id = LockId::of(NS, name);
    let mut client = shared().client();
    let row = client
        .query_one(
            "SELECT pg_advisory_lock($1, $2), pg_backend_pid() AS pid",
            &[&(id.classid as i32), &(id.objid as i32)],
        )
        .unwrap();
    (client, row.get("pid"))
}

#[test]
fn heimdall_stop_and_replace_report_a_session_that_is_not_heimdall_and_terminate_nothing() {
    let name = unique_name("tk-psql");
    let (_session, pid) = psql_holder(&name);
    let out = heimdall()
        .args(["stop", "--database", &shared().url(), "--namespace", NS])
        .args(["--name", &name])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("not a heimdall run"), "{stderr}");
    assert!(stderr.contains(&format!("pid {pid}")), "{stderr}");
    // A replacer asks nobody, and gives up with the busy code once its wait ends.
    let dir = new_dir();
    let mut run = Running::spawn(heimdall_sh(
        &shared().url(),
        NS,
        dir.path(),
        &name,
        &["--replace", "--wait=1s"],
        "touch ran",
    ));
    let stderr = run.expect_exit(75, RUN_LIMIT);
    assert!(stderr.contains("not a heimdall run"), "{stderr}");
    assert!(!dir.path().join("ran").exists());
    let mut client = shared().client();
    assert_eq!(
        holders(&mut client, LockId::of(NS, &name)),
        vec![pid],
        "the session still holds the lock"
    );
}

#[test]
fn a_holder_that_does_not_look_leaves_the_replacer_busy_saying_it_did_not_respond() {
    // A heartbeat of an hour stands for a heimdall older than --replace: nothing looks.
    let mut job = Job::start(NS, "tk-old", &["--heartbeat", "1h"], STOPS_ON_TERM);
    let mut run = replacer(&job, &shared().url(), &["--wait=2s"]);
    let stderr = run.expect_exit(75, RUN_LIMIT);
    assert!(
        stderr.contains("did not stop or respond in time"),
        "{stderr}"
    );
    assert!(!job.dir.path().join("replacer-started").exists());
    assert!(!job.run.has_exited(), "the holder runs on");
}

/// A plain waiter with `flags`, queued ahead of a replacer, is granted the lock when the holder
/// lets go: it must give way without running, and the replacer take over.
fn a_waiter_ahead_of_a_replacer_gives_way(prefix: &str, flags: &[&str]) {
    let job = Job::start(NS, prefix, &HOLDER, STOPS_ON_TERM);
    let url = shared().url();
    let mut client = shared().client();
    let id = LockId::of(NS, &job.name);
    let waiter_dir = new_dir();
    let cmd = heimdall_sh(&url, NS, waiter_dir.path(), &job.name, flags, "touch ran");
    let mut plain = Running::spawn_queued(cmd, &mut client, id, 1);
    let run = replacer(&job, &url, &["--wait=60s"]);
    assert!(
        busy_wait(START_LIMIT, || waiters(&mut client, id).len() == 2),
        "the replacer never queued"
    );
    let stderr = plain.expect_exit(75, RUN_LIMIT);
    let who = format!(
        "superseded by a replacer, heimdall on {} (pid {})",
        host_name(),
        run.pid()
    );
    assert!(stderr.contains(&who), "{stderr}");
    assert!(!waiter_dir.path().join("ran").exists(), "the waiter ran");
    assert_taken_over(job, run, true);
}

#[test]
fn a_waiter_granted_while_a_replacer_waits_gives_way_without_running() {
    // The settle step rides with the wait: the question comes in the same message.
    a_waiter_ahead_of_a_replacer_gives_way("tk-queue", &["--wait=60s"]);
}

#[test]
fn a_waiter_with_a_run_record_granted_while_a_replacer_waits_gives_way_too() {
    // With a run record the settle step is a message of its own, and so is the question.
    let table = unique_name("tk_runs").replace('-', "_");
    a_waiter_ahead_of_a_replacer_gives_way("tk-queue-rec", &["--wait=60s", "--run-table", &table]);
}

#[test]
fn list_shows_the_holder_but_not_a_waiters_queue_place_or_a_replacers_request() {
    // A heartbeat of an hour: the holder never answers, so the replacer stays in the queue.
    let job = Job::start(NS, "tk-list", &["--heartbeat", "1h"], STOPS_ON_TERM);
    let url = shared().url();
    let mut client = shared().client();
    let id = LockId::of(NS, &job.name);
    let waiter_dir = new_dir();
    let flags = ["--wait=60s", "--queue", "2"];
    let cmd = heimdall_sh(&url, NS, waiter_dir.path(), &job.name, &flags, "touch ran");
    let waiter = Running::spawn_queued(cmd, &mut client, id, 1);
    let run = replacer(&job, &url, &["--wait=60s"]);
    assert!(
        busy_wait(START_LIMIT, || waiters(&mut client, id).len() == 2),
        "the replacer never queued"
    );
    let out = heimdall()
        .args(["list", "--database", &url, "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = json.as_array().unwrap();
    let by = |pid: i32| -> Vec<&serde_json::Value> {
        let pid = u32::try_from(pid).unwrap();
        items.iter().filter(|e| e["heimdall_pid"] == pid).collect()
    };
    assert!(
        by(waiter.pid()).is_empty(),
        "the waiter's place is listed: {json}"
    );
    assert!(
        by(run.pid()).is_empty(),
        "the replacer's request is listed: {json}"
    );
    let holder = by(job.run.pid());
    assert_eq!(holder.len(), 1, "the holder, once: {json}");
    assert_eq!(holder[0]["name"], job.name.as_str(), "{json}");
}

#[test]
fn a_replacer_takes_over_through_a_pgbouncer_transaction_pool() {
    let pg = shared();
    let bouncer = PgBouncer::start(pg, "transaction");
    bouncer.warm(3);
    let pooled = bouncer.url(pg.superuser());
    let job = Job::start_on(&pooled, NS, "tk-pool", &HOLDER, STOPS_ON_TERM);
    let run = replacer(&job, &pooled, &["--wait=60s"]);
    assert_taken_over(job, run, true);
    // And an operator's stop, through the pool too.
    let mut job = Job::start_on(&pooled, NS, "tk-pool-stop", &HOLDER, STOPS_ON_TERM);
    let out = heimdall()
        .args(["stop", "--database", &pooled, "--namespace", NS])
        .args(["--name", &job.name])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    job.run.expect_exit(79, RUN_LIMIT);
}

#[test]
fn replace_with_shared_slots_queue_or_min_interval_is_a_usage_error() {
    for flags in [
        &["--shared"][..],
        &["--slots", "2"],
        &["--wait", "--queue", "1"],
        &["--min-interval", "1h"],
    ] {
        run_touching(NS, |cmd| {
            cmd.args(["--database", &shared().url(), "--replace"])
                .args(flags);
        })
        .assert_refused(2)
        .assert_stderr_contains("--replace");
    }
}

#[test]
fn a_holder_whose_command_ended_lets_a_waiting_replacer_in_without_its_min_hold_or_a_76() {
    // The heartbeat never comes (1h): the check that starts --min-hold is the one that sees
    // the request, after the command ended on its own.
    let flags = ["-v", "--heartbeat", "1h", "--min-hold", "1h"];
    let script = "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done";
    let mut job = Job::start(NS, "tk-late", &flags, script);
    let url = shared().url();
    let mut client = shared().client();
    let id = LockId::of(NS, &job.name);
    let mut run = replacer(&job, &url, &["--wait=60s"]);
    assert!(
        busy_wait(START_LIMIT, || waiters(&mut client, id).len() == 1),
        "the replacer never queued"
    );
    fs::write(job.dir.path().join("go"), "").unwrap();
    let holder_err = job.run.expect_exit(0, RUN_LIMIT);
    assert!(!holder_err.contains("lost lock"), "{holder_err}");
    assert!(
        holder_err.contains("not keeping the lock for --min-hold"),
        "{holder_err}"
    );
    run.expect_exit(0, RUN_LIMIT);
    assert!(job.dir.path().join("replacer-started").exists());
}

#[test]
fn a_request_from_a_role_that_could_not_terminate_the_holder_is_ignored() {
    let (_, holder_url) = shared().role_with(&[]);
    let (_, other_url) = shared().role_with(&[]);
    let (member, member_url) = shared().role_with(&[]);
    shared()
        .client()
        .batch_execute(&format!("GRANT pg_signal_backend TO {member}"))
        .unwrap();
    let mut job = Job::start_on(&holder_url, NS, "tk-role", &HOLDER, STOPS_ON_TERM);
    let mut stranger = replacer(&job, &other_url, &["--wait=3s"]);
    let stderr = stranger.expect_exit(75, RUN_LIMIT);
    assert!(
        stderr.contains("did not stop or respond in time"),
        "{stderr}"
    );
    assert!(!job.dir.path().join("replacer-started").exists());
    assert!(
        !job.run.has_exited(),
        "a role without the right stopped the holder"
    );
    // A member of pg_signal_backend may end a non-superuser's session, and so stop its run.
    let mut run = replacer(&job, &member_url, &["--wait=60s"]);
    let stderr = job.run.expect_exit(79, RUN_LIMIT);
    assert!(stderr.contains("ignoring the request of"), "{stderr}");
    run.expect_exit(0, RUN_LIMIT);
}

#[test]
fn a_fleets_heimdall_queue_is_ignored_by_a_replacer() {
    let dir = new_dir();
    let name = unique_name("tk-envq");
    let mut cmd = heimdall_sh(
        &shared().url(),
        NS,
        dir.path(),
        &name,
        &["--replace"],
        "touch ran",
    );
    cmd.env("HEIMDALL_QUEUE", "1");
    let mut run = Running::spawn(cmd);
    let stderr = run.expect_exit(0, RUN_LIMIT);
    assert!(
        dir.path().join("ran").exists(),
        "the command did not run: {stderr}"
    );
}

/// Lease mode in `table`, renewed every 2s (ttl 6s, kill-after 1s).
fn lease_flags(table: &str) -> [&str; 6] {
    [
        "--lease-table",
        table,
        "--lease-ttl",
        "6s",
        "--kill-after",
        "1s",
    ]
}

#[test]
fn a_replacer_takes_over_a_lease_adding_the_request_columns_to_an_older_table() {
    let table = format!("tk_leases_{}", std::process::id());
    let flags = lease_flags(&table);
    // The holder creates the table as every earlier version did: without the request columns.
    let job = Job::start(NS, "tk-lease", &flags, STOPS_ON_TERM);
    let mut args = flags.to_vec();
    args.push("--wait=60s");
    let run = replacer(&job, &shared().url(), &args);
    assert_taken_over(job, run, true);
    let mut client = shared().client();
    let columns: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attname IN ('replacer', 'replace_until') AND NOT attisdropped",
            &[&table],
        )
        .unwrap()
        .get(0);
    assert_eq!(columns, 2, "the replacer added the request's columns");
}

#[test]
fn heimdall_stop_stops_a_lease_holder_through_a_pgbouncer_transaction_pool() {
    let pg = shared();
    let bouncer = PgBouncer::start(pg, "transaction");
    let pooled = bouncer.url(pg.superuser());
    let table = format!("tk_pool_leases_{}", std::process::id());
    let mut job = Job::start_on(
        &pooled,
        NS,
        "tk-lease-stop",
        &lease_flags(&table),
        STOPS_ON_TERM,
    );
    let mut stop = heimdall_std();
    stop.args(["stop", "--database", &pooled, "--namespace", NS])
        .args(["--name", &job.name, "--lease-table", &table, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stop = stop.spawn().unwrap();
    let holder_err = job.run.expect_exit(79, RUN_LIMIT);
    assert!(
        holder_err.contains("replaced by heimdall on"),
        "{holder_err}"
    );
    assert!(job.dir.path().join("holder-ended").exists());
    // The lease was let go in order before the holder exited, not left to expire (6s later).
    let live: bool = shared()
        .client()
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT FROM {table} WHERE lock_name = $1 \
                 AND expires_at > clock_timestamp())"
            ),
            &[&format!("{NS}/{}", job.name)],
        )
        .unwrap()
        .get(0);
    assert!(!live, "the replaced holder left its lease to expire");
    let out = wait_output(stop);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["result"], "stopped", "{json}");
}

#[test]
fn a_lease_waiter_lets_a_replacer_go_first_and_runs_after_it() {
    let table = format!("tk_queue_leases_{}", std::process::id());
    let flags = lease_flags(&table);
    let mut job = Job::start(NS, "tk-lease-queue", &flags, STOPS_ON_TERM);
    let mut args = flags.to_vec();
    args.push("--wait=60s");
    let mut plain = Running::spawn(heimdall_sh(
        &shared().url(),
        NS,
        job.dir.path(),
        &job.name,
        &args,
        "date +%s%N > plain-started",
    ));
    let mut run = replacer(&job, &shared().url(), &args);
    job.run.expect_exit(79, RUN_LIMIT);
    run.expect_exit(0, RUN_LIMIT);
    plain.expect_exit(0, RUN_LIMIT);
    let dir = job.dir.path();
    assert!(!dir.join("overlap").exists());
    assert!(
        stamp(dir, "plain-started") > stamp(dir, "replacer-started"),
        "the plain waiter took the lease before the replacer"
    );
}
