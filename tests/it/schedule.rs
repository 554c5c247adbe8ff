//! Once per schedule: `--min-interval` lets the command start only if no run of the lock started
//! within the interval, on the database server's clock, and the run record (`--run-table`) keeps
//! the last run of each lock for `status` and `list`. These tests fire runs the way a fleet's
//! cron does (a few hundred milliseconds apart, or at the same instant, with a host clock far
//! off) and count how often the job ran; a killed run must still count.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::pgbouncer::PgBouncer;
use crate::support::pgpool::{self, Reads};
use crate::support::procs::{self, Job, Running, heimdall_sh, lines};
use crate::support::runs::run_touching;
use crate::support::{
    RUN_LIMIT, busy_wait, heimdall, host_name, login_role, new_dir, run_under, shared, text,
    unique_name,
};

const NS: &str = "schedule";

/// A plain identifier of this test's own, for a table.
fn table_name(prefix: &str) -> String {
    unique_name(prefix).replace('-', "_")
}

/// One finished run: heimdall's pid, exit code and stderr.
struct Fired {
    pid: i32,
    code: Option<i32>,
    stderr: String,
}

/// Fires `count` runs of a 0.2 s job on `url` (the guarded job of `procs`, which records each
/// run and any overlap in `dir`), `apart` from each other, with `flags`; waits for them all.
fn fire(
    url: &str,
    dir: &Path,
    name: &str,
    flags: &[&str],
    count: usize,
    apart: Duration,
) -> Vec<Fired> {
    let mut running = Vec::new();
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(apart);
        }
        running.push(procs::guarded(url, NS, dir, name, flags, "0.2"));
    }
    running
        .iter_mut()
        .map(|run| {
            let pid = run.pid();
            let (status, stderr) = run.finish(RUN_LIMIT);
            Fired {
                pid,
                code: status.code(),
                stderr,
            }
        })
        .collect()
}

/// Five runs 0.3 s apart with `--min-interval 5s` and `flags`: exactly one runs the job; every
/// other exits 75, naming the heimdall that ran it, and at least one was skipped by the record
/// (not merely refused by a lock still held).
fn five_runs_run_once(url: &str, flags: &[&str]) {
    let dir = new_dir();
    let name = unique_name("five");
    let flags = [&["--min-interval", "5s"], flags].concat();
    let fired = fire(
        url,
        dir.path(),
        &name,
        &flags,
        5,
        Duration::from_millis(300),
    );
    let report: Vec<String> = fired
        .iter()
        .map(|f| format!("pid {} exit {:?}: {}", f.pid, f.code, f.stderr))
        .collect();
    assert_eq!(
        lines(dir.path(), "runs"),
        1,
        "the job ran {} times: {report:#?}",
        lines(dir.path(), "runs")
    );
    assert_eq!(lines(dir.path(), "overlaps"), 0, "{report:#?}");
    let ran: Vec<&Fired> = fired.iter().filter(|f| f.code == Some(0)).collect();
    assert_eq!(ran.len(), 1, "{report:#?}");
    let first = ran[0].pid;
    let mut skipped = 0;
    for f in fired.iter().filter(|f| f.pid != first) {
        assert_eq!(f.code, Some(75), "{report:#?}");
        // A run refused because the lock was busy looks for the holder a moment later; the
        // holder may have let go by then, and the message says so rather than name it.
        assert!(
            f.stderr.contains(&format!("pid {first}"))
                || f.stderr.contains("gone by the time heimdall looked"),
            "the refusal does not name the heimdall that ran (pid {first}): {report:#?}"
        );
        if f.stderr.contains("last run started") {
            assert!(f.stderr.contains("--min-interval 5s"), "{report:#?}");
            assert!(f.stderr.contains(&host_name()), "{report:#?}");
            skipped += 1;
        }
    }
    assert!(
        skipped >= 1,
        "no run was skipped for the interval: {report:#?}"
    );
}

#[test]
fn five_runs_fired_apart_within_the_interval_run_the_job_once_and_the_others_name_the_first() {
    five_runs_run_once(&shared().url(), &[]);
}

#[test]
fn five_runs_through_a_pgbouncer_transaction_pool_run_the_job_once() {
    let pg = shared();
    let bouncer = PgBouncer::start(pg, "transaction");
    five_runs_run_once(&bouncer.url(pg.superuser()), &[]);
}

#[test]
fn five_runs_through_pgpool_load_balancing_run_the_job_once() {
    // The standby takes every read pgpool balances: a statement of the record that went there
    // would not see the last start, or could not write it.
    let cluster = pgpool::Cluster::start(Reads::Standby, "");
    five_runs_run_once(&cluster.url(cluster.primary.superuser()), &[]);
}

#[test]
fn five_runs_in_lease_mode_run_the_job_once() {
    let table = table_name("leases");
    five_runs_run_once(&shared().url(), &["--lease-table", &table]);
}

#[test]
fn five_runs_in_lease_mode_through_a_pgbouncer_transaction_pool_run_the_job_once() {
    let pg = shared();
    let bouncer = PgBouncer::start(pg, "transaction");
    let table = table_name("leases");
    five_runs_run_once(&bouncer.url(pg.superuser()), &["--lease-table", &table]);
}

/// Runs `flags` on one lock until a run runs the job: the first does, the ones within the
/// interval are skipped, and the first after it runs again.
fn the_next_run_after_the_interval_runs(flags: &[&str]) {
    let dir = new_dir();
    let name = unique_name("after");
    let url = shared().url();
    let interval = Duration::from_secs(2);
    let flags = [&["--min-interval", "2s"], flags].concat();
    let started = Instant::now();
    let first = fire(&url, dir.path(), &name, &flags, 1, Duration::ZERO);
    assert_eq!(first[0].code, Some(0), "{}", first[0].stderr);
    let mut skipped = 0;
    let ran_again = loop {
        let run = fire(&url, dir.path(), &name, &flags, 1, Duration::ZERO).remove(0);
        match run.code {
            Some(0) => break started.elapsed(),
            Some(75) => {
                assert!(run.stderr.contains("last run started"), "{}", run.stderr);
                skipped += 1;
            }
            other => panic!("exit {other:?}: {}", run.stderr),
        }
        assert!(started.elapsed() < interval + RUN_LIMIT, "never ran again");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(skipped >= 1, "no run was skipped within the interval");
    assert!(
        ran_again >= interval,
        "ran again {ran_again:?} after the first started, within the {interval:?} interval"
    );
    assert_eq!(lines(dir.path(), "runs"), 2);
}

#[test]
fn after_the_interval_the_next_run_runs() {
    the_next_run_after_the_interval_runs(&[]);
}

#[test]
fn after_the_interval_the_next_run_runs_in_lease_mode() {
    let table = table_name("leases");
    the_next_run_after_the_interval_runs(&["--lease-table", &table]);
}

/// Two runs started at the same instant, the second queued behind the first (`--wait`), so it
/// gets the lock once the first has run: it must find the first's record under the lock, and
/// skip.
fn two_runs_at_once_run_the_job_once(flags: &[&str]) {
    let dir = new_dir();
    let name = unique_name("race");
    let url = shared().url();
    let flags = [&["--min-interval", "1h", "--wait=30s"], flags].concat();
    let script = r#"if mkdir inside 2>/dev/null; then echo ran >> runs; sleep 1; rmdir inside; else echo overlap >> overlaps; fi"#;
    let mut a = Running::spawn(heimdall_sh(&url, NS, dir.path(), &name, &flags, script));
    let mut b = Running::spawn(heimdall_sh(&url, NS, dir.path(), &name, &flags, script));
    let (a, b) = (a.finish(RUN_LIMIT), b.finish(RUN_LIMIT));
    let codes = [a.0.code(), b.0.code()];
    assert_eq!(lines(dir.path(), "runs"), 1, "{a:?} {b:?}");
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(75)),
        "{a:?} {b:?}"
    );
    let skipped = if codes[0] == Some(75) { &a.1 } else { &b.1 };
    assert!(skipped.contains("last run started"), "{skipped}");
}

#[test]
fn two_runs_started_at_once_against_an_interval_run_the_job_once() {
    two_runs_at_once_run_the_job_once(&[]);
}

#[test]
fn two_runs_started_at_once_against_an_interval_run_the_job_once_in_lease_mode() {
    let table = table_name("leases");
    two_runs_at_once_run_the_job_once(&["--lease-table", &table]);
}

/// `heimdall status` for `NS/name` with `flags`.
fn status(name: &str, flags: &[&str]) -> std::process::Output {
    let lock = ["--namespace", NS, "--name", name];
    heimdall()
        .args(["status", "--database", &shared().url()])
        .args(lock)
        .args(flags)
        .output()
        .unwrap()
}

/// `heimdall status --json` for `NS/name` with `flags`, parsed.
fn status_json(name: &str, flags: &[&str]) -> Value {
    let out = status(name, &[flags, &["--json"]].concat());
    let code = out.status.code();
    assert!(matches!(code, Some(0 | 75)), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

/// `heimdall status` for `NS/name` with `flags`, as text: (exit code, stdout).
fn status_text(name: &str, flags: &[&str]) -> (Option<i32>, String) {
    let out = status(name, flags);
    (out.status.code(), text(&out.stdout))
}

#[test]
fn a_run_killed_during_its_command_still_counts_and_status_shows_it_killed() {
    let mut job = Job::start(
        NS,
        "killed",
        &["--min-interval", "1h"],
        "echo $$ > pid; sleep 60",
    );
    let name = job.name.clone();
    let first = job.run.pid();
    job.run.signal(libc::SIGKILL);
    job.run.finish(RUN_LIMIT);
    // The keeper stops the job, and the lock goes with its copy of the connection.
    assert!(
        busy_wait(RUN_LIMIT, || status_text(&name, &[]).0 == Some(0)),
        "the lock was never freed"
    );
    let out = heimdall()
        .current_dir(job.dir.path())
        .args([
            "--database",
            &shared().url(),
            "--namespace",
            NS,
            "--name",
            &name,
        ])
        .args(["--min-interval", "1h", "--", "touch", "ran"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(
        !job.path("ran").exists(),
        "the next run ran within the interval"
    );
    assert!(
        stderr.contains("last run started") && stderr.contains(&format!("pid {first}")),
        "{stderr}"
    );
    assert!(stderr.contains("never ended"), "{stderr}");
    let (code, status) = status_text(&name, &[]);
    assert_eq!(code, Some(0), "{status}");
    assert!(
        status.contains("last run: started") && status.contains("killed"),
        "{status}"
    );
    let last = &status_json(&name, &[])["last_run"];
    assert_eq!(last["outcome"], "killed", "{last}");
    assert!(
        last["ended_at"].is_null() && last["exit_code"].is_null(),
        "{last}"
    );
    assert_eq!(last["holder"]["pid"], first, "{last}");
}

#[test]
fn a_run_whose_host_clock_is_two_hours_ahead_is_still_skipped() {
    // The clock really is faked: otherwise the test proves nothing.
    let faked = Command::new("faketime")
        .args(["-f", "+2h", "date", "+%s"])
        .output();
    let faked = faked.unwrap_or_else(|e| {
        panic!("cannot run faketime ({e}): apt-get install faketime (scripts/ensure-deps does)")
    });
    let ahead: i64 = text(&faked.stdout).trim().parse().expect("faketime's date");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        ahead - now > 7000,
        "faketime +2h did not move the clock: {ahead} vs {now}"
    );

    let dir = new_dir();
    let name = unique_name("skew");
    let url = shared().url();
    let flags = ["--min-interval", "1h"];
    let first = fire(&url, dir.path(), &name, &flags, 1, Duration::ZERO).remove(0);
    assert_eq!(first.code, Some(0), "{}", first.stderr);
    let cmd = heimdall_sh(&url, NS, dir.path(), &name, &flags, "echo ran >> runs");
    let mut skewed = run_under("faketime", &["-f", "+2h"], &cmd);
    skewed
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut skewed = Running::spawn(skewed);
    let stderr = skewed.expect_exit(75, RUN_LIMIT);
    assert_eq!(
        lines(dir.path(), "runs"),
        1,
        "the run with its clock ahead ran the job: {stderr}"
    );
    assert!(stderr.contains("last run started"), "{stderr}");
    // Ages are the server's: the last run started seconds ago, not two hours.
    assert!(
        stderr.contains("s ago") && !stderr.contains("2h"),
        "{stderr}"
    );
}

#[test]
fn status_json_shows_the_exit_code_of_the_last_run() {
    let dir = new_dir();
    let name = unique_name("exit3");
    let url = shared().url();
    let cmd = heimdall_sh(
        &url,
        NS,
        dir.path(),
        &name,
        &["--run-table", "heimdall_runs"],
        "sleep 0.2; exit 3",
    );
    let mut run = Running::spawn(cmd);
    let pid = run.pid();
    run.expect_exit(3, RUN_LIMIT);
    let status = status_json(&name, &[]);
    let last = &status["last_run"];
    assert_eq!(last["exit_code"], 3, "{status}");
    assert_eq!(last["outcome"], "ran", "{status}");
    assert_eq!(last["holder"]["host"], host_name(), "{status}");
    assert_eq!(last["holder"]["pid"], pid, "{status}");
    assert!(
        last["started_at"].is_string() && last["ended_at"].is_string(),
        "{status}"
    );
    assert!(
        last["duration_seconds"].as_f64().is_some_and(|d| d >= 0.2),
        "{status}"
    );
    let (code, text) = status_text(&name, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("last run: started") && text.contains("exited 3 after"),
        "{text}"
    );
}

#[test]
fn a_lock_without_a_record_shows_no_last_run() {
    let name = unique_name("norecord");
    heimdall()
        .args([
            "--database",
            &shared().url(),
            "--namespace",
            NS,
            "--name",
            &name,
            "--",
            "true",
        ])
        .assert()
        .success();
    let status = status_json(&name, &[]);
    assert!(status["last_run"].is_null(), "{status}");
    let (code, text) = status_text(&name, &["--run-table", &table_name("missing")]);
    assert_eq!(code, Some(0));
    assert!(!text.contains("last run"), "{text}");
}

#[test]
fn status_and_list_show_a_running_run_and_the_last_run_of_a_free_lock() {
    let url = shared().url();
    let table = table_name("runs");
    let done = unique_name("done");
    let flags = ["--run-table", table.as_str()];
    heimdall()
        .args(["--database", &url, "--namespace", NS, "--name", &done])
        .args(flags)
        .args(["--", "sh", "-c", "exit 4"])
        .assert()
        .code(4);
    let job = Job::start(NS, "running", &flags, "echo $$ > pid; sleep 30");
    let last = &status_json(&job.name, &flags)["last_run"];
    assert_eq!(last["outcome"], "running", "{last}");
    let out = heimdall()
        .args(["list", "--database", &url, "--json"])
        .args(flags)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let items: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let find = |name: &str| {
        items
            .iter()
            .find(|i| i["lock"] == format!("{NS}/{name}"))
            .unwrap_or_else(|| panic!("{name} not listed: {items:#?}"))
            .clone()
    };
    let running = find(&job.name);
    assert_eq!(running["held"], true, "{running}");
    assert_eq!(running["last_run"]["outcome"], "running", "{running}");
    let free = find(&done);
    assert_eq!(free["held"], false, "{free}");
    assert_eq!(free["last_run"]["exit_code"], 4, "{free}");
    let out = heimdall()
        .args(["list", "--database", &url])
        .args(flags)
        .output()
        .unwrap();
    let listed = text(&out.stdout);
    let header = listed.lines().next().unwrap_or_default();
    assert!(header.contains("LAST RUN"), "{listed}");
    let row = listed
        .lines()
        .find(|l| l.contains(&done))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains("exited 4"), "{listed}");
}

#[test]
fn a_skipped_run_is_reported_as_skipped_not_busy() {
    let dir = new_dir();
    let name = unique_name("report");
    let url = shared().url();
    let prom = dir.path().join("job.prom");
    let prom_arg = format!("--metrics-file={}", prom.display());
    let flags = [
        "--min-interval",
        "1h",
        "--report",
        "json",
        prom_arg.as_str(),
    ];
    let first = fire(&url, dir.path(), &name, &flags, 1, Duration::ZERO).remove(0);
    assert!(
        first.stderr.contains(r#""outcome":"ran""#),
        "{}",
        first.stderr
    );
    let second = fire(&url, dir.path(), &name, &flags, 1, Duration::ZERO).remove(0);
    assert_eq!(second.code, Some(75), "{}", second.stderr);
    let report = second.stderr.lines().last().unwrap_or_default();
    let report: Value =
        serde_json::from_str(report).unwrap_or_else(|e| panic!("{e}: {}", second.stderr));
    assert_eq!(report["outcome"], "skipped", "{report}");
    assert_eq!(report["exit_code"], 75, "{report}");
    let metrics = std::fs::read_to_string(&prom).unwrap();
    assert!(metrics.contains(r#"outcome="skipped"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"outcome="busy"} 0"#), "{metrics}");
}

/// Runs heimdall with `args` (a lock of its own, `touch ran` as the command) and asserts that it
/// exits `code` without running the command, with one line on stderr mentioning `said`.
fn refused(args: &[&str], code: i32, said: &str) {
    let run = run_touching(NS, |cmd| {
        cmd.args(["--database", &shared().url()]).args(args);
    });
    run.assert_refused(code).assert_stderr_contains(said);
}

#[test]
fn bad_intervals_and_combinations_are_usage_errors_before_anything_runs() {
    refused(&["--min-interval", "0"], 2, "--min-interval");
    refused(&["--min-interval", "-5s"], 2, "--min-interval");
    refused(&["--min-interval", "soon"], 2, "--min-interval");
    refused(&["--min-interval", "5s", "--shared"], 2, "--shared");
    refused(&["--min-interval", "5s", "--slots", "3"], 2, "--slots");
    refused(&["--run-table", "runs", "--slots", "2"], 2, "--slots");
    refused(&["--run-table", "a b"], 2, "--run-table");
    refused(&["--run-table", "pg_temp.runs"], 2, "temporary");
    let out = heimdall()
        .args(["--key", "1", "--", "true"])
        .env("HEIMDALL_MIN_INTERVAL", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn a_record_table_of_the_wrong_shape_is_refused_with_its_ddl() {
    let table = table_name("misfit");
    shared()
        .client()
        .batch_execute(&format!(
            "CREATE TABLE {table} (lock_key text PRIMARY KEY, lock_name text NOT NULL, runs bigint NOT NULL, \
             started_at timestamp NOT NULL, ended_at timestamptz, exit_code integer, outcome text, \
             host text NOT NULL)"
        ))
        .unwrap();
    for flags in [
        vec!["--run-table", table.as_str()],
        vec!["--min-interval", "1h", "--run-table", table.as_str()],
    ] {
        refused(&flags, 69, "CREATE TABLE");
        refused(&flags, 69, "started_at timestamp without time zone");
        refused(&flags, 69, "no column pid");
    }
    let lease = table_name("leases");
    refused(
        &[
            "--min-interval",
            "1h",
            "--run-table",
            &table,
            "--lease-table",
            &lease,
        ],
        69,
        "no column pid",
    );
}

#[test]
fn a_role_that_may_not_create_the_record_table_gets_its_ddl_and_runs_once_a_dba_has_run_it() {
    let pg = shared();
    let (role, url) = login_role(pg, "norecord", &[]);
    // A schema the role may use but not create in, whatever the server's version (PostgreSQL
    // 14 still lets everyone create in public).
    let schema = table_name("dba");
    pg.client()
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; GRANT USAGE ON SCHEMA {schema} TO {role}"
        ))
        .unwrap();
    let table = format!("{schema}.runs");
    let dir = new_dir();
    let name = unique_name("dba");
    let flags = ["--min-interval", "1h", "--run-table", &table];
    let args = |cmd: &mut assert_cmd::Command| {
        cmd.current_dir(dir.path())
            .args(["--database", &url, "--namespace", NS, "--name", &name])
            .args(flags)
            .args(["--", "touch", "ran"]);
    };
    let mut cmd = heimdall();
    args(&mut cmd);
    let out = cmd.output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("ask a DBA to run: CREATE TABLE IF NOT EXISTS"),
        "{stderr}"
    );
    assert!(!dir.path().join("ran").exists());
    let ddl = heimdall()
        .args(["run-ddl", "--run-table", &table])
        .output()
        .unwrap();
    assert!(ddl.status.success(), "{}", text(&ddl.stderr));
    let ddl = text(&ddl.stdout);
    assert!(ddl.contains(&format!("\"{schema}\".\"runs\"")), "{ddl}");
    pg.client()
        .batch_execute(&format!(
            "{ddl} GRANT SELECT, INSERT, UPDATE ON {table} TO {role};"
        ))
        .unwrap();
    let mut cmd = heimdall();
    args(&mut cmd);
    cmd.assert().success();
    assert!(dir.path().join("ran").exists());
}

#[test]
fn the_record_survives_a_killed_heimdall_in_lease_mode_too() {
    let table = table_name("leases");
    let flags = [
        "--min-interval",
        "1h",
        "--lease-table",
        table.as_str(),
        "--lease-ttl",
        "3s",
        "--kill-after",
        "0",
    ];
    let mut job = Job::start(NS, "lease-killed", &flags, "echo $$ > pid; sleep 60");
    let name = job.name.clone();
    job.run.signal(libc::SIGKILL);
    job.run.finish(RUN_LIMIT);
    let lease = ["--lease-table", table.as_str()];
    assert!(
        busy_wait(RUN_LIMIT, || status_text(&name, &lease).0 == Some(0)),
        "the lease never expired"
    );
    let mut next = Running::spawn(heimdall_sh(
        &shared().url(),
        NS,
        job.dir.path(),
        &name,
        &flags,
        "touch ran",
    ));
    let stderr = next.expect_exit(75, RUN_LIMIT);
    assert!(
        stderr.contains("last run started") && stderr.contains("never ended"),
        "{stderr}"
    );
    assert!(!job.path("ran").exists());
    let last = &status_json(&name, &lease)["last_run"];
    assert_eq!(last["outcome"], "killed", "{last}");
}

/// A run whose run table is dropped while its command runs: the end cannot be written, and
/// that must cost only the record, not the proof that the lock was held to the end.
fn a_dropped_run_table_costs_the_end_not_the_run(flags: &[&str]) {
    let table = table_name("dropped");
    let flags = [&["--run-table", table.as_str()], flags].concat();
    let mut job = Job::start(
        NS,
        "dropped",
        &flags,
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done",
    );
    shared()
        .client()
        .batch_execute(&format!("DROP TABLE {table}"))
        .unwrap();
    std::fs::write(job.path("go"), "").unwrap();
    let stderr = job.run.expect_exit(0, RUN_LIMIT);
    assert!(
        stderr.contains("cannot record the end of the run"),
        "{stderr}"
    );
}

#[test]
fn a_run_table_dropped_during_the_run_costs_the_end_not_the_run() {
    a_dropped_run_table_costs_the_end_not_the_run(&[]);
}

#[test]
fn a_run_table_dropped_during_the_run_costs_the_end_not_the_run_in_lease_mode() {
    let table = table_name("leases");
    a_dropped_run_table_costs_the_end_not_the_run(&["--lease-table", &table]);
}
