//! Lease mode (`--lease-table`): the lock is a row with a version and an expiry on the server's
//! clock, renewed by single autocommit statements, so it works through every pooler mode and
//! many holders share a few server connections. These tests try to make two holders overlap:
//! through a transaction pool, with a holder cut off from the network, SIGKILLed, or overtaken.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{self, Running, heimdall_sh, lines, process_state};
use crate::support::proxy::Proxy;
use crate::support::{TestPostgres, busy_wait, heimdall, login_role, shared, unique_name};

const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A 4 s lease with a 1 s kill-after: a margin of 1 s, a budget of 2 s, renewals every 1 s.
pub(crate) const SHORT_LEASE: [&str; 6] = [
    "--lease-table",
    "leases",
    "--lease-ttl",
    "4s",
    "--kill-after",
    "1s",
];

fn lease_flags<'a>(table: &'a str, ttl: &'a str) -> [&'a str; 4] {
    ["--lease-table", table, "--lease-ttl", ttl]
}

fn guarded(url: &str, dir: &Path, name: &str, flags: &[&str], seconds: &str) -> Running {
    procs::guarded(url, "lease", dir, name, flags, seconds)
}

#[test]
fn through_a_transaction_pool_a_lease_admits_one_holder_and_then_the_next() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let url = bouncer.url(pg.superuser());
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("pool");
    let flags = lease_flags("leases", "30s");
    let mut a = guarded(&url, dir.path(), &name, &flags, "2");
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
        "A never ran: {}",
        a.stderr()
    );
    let mut b = guarded(&url, dir.path(), &name, &flags, "0");
    let b_err = b.expect_exit(75, RUN_LIMIT);
    assert!(b_err.contains("lease"), "{b_err}");
    a.expect_exit(0, RUN_LIMIT);
    let mut c = guarded(&url, dir.path(), &name, &flags, "0");
    c.expect_exit(0, RUN_LIMIT);
    assert_eq!(lines(dir.path(), "overlaps"), 0);
    assert_eq!(lines(dir.path(), "runs"), 2, "A and C ran");
}

#[test]
fn many_holders_share_a_pool_of_four_server_connections() {
    // A fresh cluster: all 150 also race to create the missing lease table.
    const HOLDERS: usize = 150;
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start_with(&pg, "transaction", "max_client_conn = 400\n");
    let url = bouncer.url(pg.superuser());
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("running")).unwrap();
    let go = dir.path().join("go");
    // Each command marks itself running until the test says go (or 30 s pass).
    let script = format!(
        r#"touch running/$$; i=0; while [ ! -e "{}" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; rm running/$$"#,
        go.display()
    );
    let prefix = unique_name("many");
    // 150 starts on a loaded 2-core machine can take longer than the default 10 s to log in.
    let flags = [
        "--lease-table",
        "leases",
        "--lease-ttl",
        "30s",
        "--connect-timeout",
        "60s",
    ];
    let mut runs: Vec<Running> = (0..HOLDERS)
        .map(|i| {
            Running::spawn(heimdall_sh(
                &url,
                "lease",
                dir.path(),
                &format!("{prefix}-{i}"),
                &flags,
                &script,
            ))
        })
        .collect();
    let mut monitor = pg.client();
    let mut most_running = 0;
    let mut most_backends: i64 = 0;
    let deadline = Instant::now() + RUN_LIMIT;
    while Instant::now() < deadline {
        let running = fs::read_dir(dir.path().join("running")).unwrap().count();
        most_running = most_running.max(running);
        let backends: i64 = monitor
            .query_one(
                "select count(*) from pg_stat_activity where backend_type = 'client backend' \
                 and pid <> pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        most_backends = most_backends.max(backends);
        if running == HOLDERS {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(&go, "").unwrap();
    for (i, run) in runs.iter_mut().enumerate() {
        let (status, stderr) = run.finish(RUN_LIMIT);
        assert!(status.success(), "holder {i}: {status}: {stderr}");
    }
    eprintln!("{most_running} of {HOLDERS} ran at once on at most {most_backends} server backends");
    assert!(most_running >= 135, "only {most_running} ran at once");
    assert!(
        most_backends <= 4,
        "{most_backends} server backends for a pool of 4"
    );
}

#[test]
fn a_holder_cut_off_stops_its_command_before_its_lease_expires_and_only_then_a_waiter_runs() {
    let pg = shared();
    let proxy = Proxy::start(pg.port());
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("cut");
    // ttl 6s, kill-after 1s: margin 1s, budget 4s, renewals every 2s.
    let flags = [
        "--lease-table",
        "leases",
        "--lease-ttl",
        "6s",
        "--kill-after",
        "1s",
    ];
    let mut a = guarded(&proxy.url(pg), dir.path(), &name, &flags, "60");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    let cut = Instant::now();
    proxy.cut();
    // The waiter connects directly and polls; it may only run after A's command is gone.
    let mut waiter_flags = flags.to_vec();
    waiter_flags.push("--wait=30s");
    let mut b = guarded(&pg.url(), dir.path(), &name, &waiter_flags, "0");
    a.expect_exit(76, RUN_LIMIT);
    let stopped = cut.elapsed();
    b.expect_exit(0, RUN_LIMIT);
    let took_over = cut.elapsed();
    eprintln!(
        "cut: A stopped after {:.1}s, B ran after {:.1}s",
        stopped.as_secs_f64(),
        took_over.as_secs_f64()
    );
    assert_eq!(lines(dir.path(), "overlaps"), 0);
    assert_eq!(lines(dir.path(), "runs"), 2);
    // The order is the promise; the overlap check above is its proof on the job's side.
    assert!(stopped < took_over, "B ran before A was stopped");
}

#[test]
fn a_sigkilled_holders_lease_goes_to_a_waiter_within_the_ttl() {
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("killed");
    let flags = SHORT_LEASE;
    let a = guarded(&pg.url(), dir.path(), &name, &flags, "60");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    // The job is gone at once (the keeper), and the lease by the ttl.
    let mut waiter_flags = flags.to_vec();
    waiter_flags.push("--wait=30s");
    let mut b = guarded(&pg.url(), dir.path(), &name, &waiter_flags, "0");
    b.expect_exit(0, RUN_LIMIT);
    let took = killed.elapsed();
    eprintln!("the waiter ran {:.1}s after SIGKILL", took.as_secs_f64());
    assert!(took < Duration::from_secs(6), "took {took:?} (ttl 4s + 2s)");
}

#[test]
fn a_lease_taken_over_behind_the_holders_back_stops_the_job_with_76() {
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("stale");
    let flags = SHORT_LEASE;
    let mut a = guarded(&pg.url(), dir.path(), &name, &flags, "60");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    pg_take_over(&name);
    let stderr = a.expect_exit(76, RUN_LIMIT);
    assert!(stderr.contains("version"), "{stderr}");
}

#[test]
fn a_missing_lease_table_is_created_and_a_role_without_create_gets_the_ddl() {
    let pg = TestPostgres::start();
    let table = format!("fresh_{}", std::process::id());
    heimdall()
        .args([
            "--database",
            &pg.url(),
            "--namespace",
            "lease",
            "--name",
            "x",
        ])
        .args(["--lease-table", &table, "true"])
        .timeout(RUN_LIMIT)
        .assert()
        .success();
    let role = format!("nocreate_{}", std::process::id());
    pg.client()
        .batch_execute(&format!(
            "create role {role} login; revoke create on schema public from public"
        ))
        .unwrap();
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let out = heimdall()
        .args(["--database", &url, "--namespace", "lease", "--name", "x"])
        .args(["--lease-table", "other_leases", "true"])
        .timeout(RUN_LIMIT)
        .assert()
        .code(69);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("CREATE TABLE IF NOT EXISTS \"public\".\"other_leases\""),
        "{stderr}"
    );
    let ddl = heimdall()
        .args(["lease-ddl", "--lease-table", "ops.leases"])
        .output()
        .unwrap();
    assert!(ddl.status.success());
    assert!(String::from_utf8_lossy(&ddl.stdout).contains("\"ops\".\"leases\""));
}

#[test]
fn status_and_list_show_a_lease_holder() {
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("status");
    let flags = [&lease_flags("leases", "30s")[..], &["--slots", "2"]].concat();
    let mut a = guarded(&pg.url(), dir.path(), &name, &flags, "3");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    let status = heimdall()
        .args(["status", "--database", &pg.url(), "--namespace", "lease"])
        .args(["--name", &name, "--lease-table", "leases", "--slots", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("lease/{name}")), "{text}");
    assert!(text.contains(": 1 of 2 slots taken"), "{text}");
    assert_eq!(status.status.code(), Some(0), "a run would start: {text}");
    let list = heimdall()
        .args(["list", "--database", &pg.url(), "--lease-table", "leases"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains(&format!("lease/{name}")), "{text}");
    a.expect_exit(0, RUN_LIMIT);
}

#[test]
fn a_heimdall_inside_a_leased_command_reenters_its_lease() {
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("reenter");
    let inner = format!(
        "{} --database '{}' --namespace lease --name {name} --lease-table leases -- touch inner",
        env!("CARGO_BIN_EXE_heimdall"),
        pg.url()
    );
    let mut outer = Running::spawn(heimdall_sh(
        &pg.url(),
        "lease",
        dir.path(),
        &name,
        &lease_flags("leases", "30s"),
        &inner,
    ));
    let (status, stderr) = outer.finish(RUN_LIMIT);
    assert!(status.success(), "{status}: {stderr}");
    assert!(
        dir.path().join("inner").exists(),
        "the inner heimdall did not run its command under the outer lease: {stderr}"
    );
}

#[test]
fn status_of_a_lease_table_that_cannot_be_read_is_an_error_not_free() {
    let out = heimdall()
        .args([
            "status",
            "--database",
            &shared().url(),
            "--namespace",
            "lease",
        ])
        .args(["--name", "x", "--lease-table", "no_such_leases"])
        .timeout(RUN_LIMIT)
        .assert()
        .code(69);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(stderr.contains("no_such_leases"), "{stderr}");
    assert!(out.get_output().stdout.is_empty(), "no 'free' on stdout");
}

#[test]
fn a_stopped_holders_job_is_killed_by_the_keeper_before_its_lease_can_expire() {
    let pg = shared();
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("stopped");
    let mut a = Running::spawn(heimdall_sh(
        &pg.url(),
        "lease",
        dir.path(),
        &name,
        &SHORT_LEASE,
        "echo $$ > pid; sleep 60",
    ));
    let job = a.command_pid(dir.path(), RUN_LIMIT);
    // heimdall alone stops (kill -STOP, a debugger): no renewal, no stop from its supervisor.
    a.signal(libc::SIGSTOP);
    let mut waiter = SHORT_LEASE.to_vec();
    waiter.push("--wait=30s");
    // A zombie is no overlap: SIGKILLed, it waits for its stopped parent to reap it.
    let check = r#"s=$(cut -d' ' -f3 "/proc/$(cat pid)/stat" 2>/dev/null); if [ -n "$s" ] && [ "$s" != Z ]; then echo overlap > overlaps; fi; touch bran"#;
    let mut b = Running::spawn(heimdall_sh(
        &pg.url(),
        "lease",
        dir.path(),
        &name,
        &waiter,
        check,
    ));
    let b_err = b.expect_exit(0, RUN_LIMIT);
    assert!(dir.path().join("bran").exists(), "B never ran: {b_err}");
    assert!(
        !dir.path().join("overlaps").exists(),
        "B ran while A's job was alive"
    );
    assert!(
        matches!(process_state(job), None | Some('Z')),
        "A's job outlived its lease"
    );
    a.signal(libc::SIGCONT);
    a.expect_exit(76, RUN_LIMIT);
}

// ---------------------------------------------------------------------------
// A renewal's connection closed between renewals
// ---------------------------------------------------------------------------

/// A 12 s lease with a 1 s kill-after: a margin of 1.2 s, a budget of 9.8 s, renewals every 4 s,
/// each after the connection has idled 4 s. `-v`, so the reconnects show.
const IDLE_LEASE: [&str; 7] = [
    "--lease-table",
    "leases",
    "--lease-ttl",
    "12s",
    "--kill-after",
    "1s",
    "-v",
];

/// A role of its own on the shared cluster whose sessions end after `idle` without a statement;
/// it may create and use the lease tables in public.
fn idle_role(idle: &str) -> (String, String) {
    let setting = format!("idle_session_timeout = '{idle}'");
    let (role, url) = login_role(shared(), "idler", &[&setting]);
    shared()
        .client()
        .batch_execute(&format!(
            "GRANT CREATE ON SCHEMA public TO {role}; \
             GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}"
        ))
        .unwrap();
    (role, url)
}

/// Makes sure `leases` exists before a role that may not own it uses it.
fn ensure_leases_table() {
    heimdall()
        .args(["--database", &shared().url(), "--namespace", "lease"])
        .args(["--name", &unique_name("create"), "--lease-table", "leases"])
        .args(["--", "true"])
        .assert()
        .success();
}

/// A 10 s job holding a lease through `url` runs to its end and exits 0, having reconnected.
fn runs_to_its_end_reconnecting(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("idle");
    let mut a = guarded(url, dir.path(), &name, &IDLE_LEASE, "10");
    let stderr = a.expect_exit(0, RUN_LIMIT);
    assert_eq!(lines(dir.path(), "runs"), 1, "{stderr}");
    assert!(stderr.contains("reconnected"), "{stderr}");
}

#[test]
fn a_role_whose_idle_sessions_end_keeps_its_lease_to_the_end_of_the_job() {
    ensure_leases_table();
    runs_to_its_end_reconnecting(&idle_role("3s").1);
}

#[test]
fn through_a_pool_that_closes_idle_clients_a_lease_holder_runs_to_its_end() {
    let pg = shared();
    ensure_leases_table();
    let bouncer = PgBouncer::start_with(pg, "transaction", "client_idle_timeout = 2\n");
    runs_to_its_end_reconnecting(&bouncer.url(pg.superuser()));
}

/// How many sessions `role` has on the shared cluster.
fn sessions_of(role: &str) -> i64 {
    shared()
        .client()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_lease_taken_over_while_its_connection_was_closed_still_ends_76_within_the_budget() {
    ensure_leases_table();
    let (role, url) = idle_role("1s");
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("idle-taken");
    let mut a = guarded(&url, dir.path(), &name, &IDLE_LEASE, "60");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    assert!(
        busy_wait(RUN_LIMIT, || sessions_of(&role) == 0),
        "the idle session never ended"
    );
    pg_take_over(&name);
    let taken = Instant::now();
    let stderr = a.expect_exit(76, RUN_LIMIT);
    assert!(stderr.contains("took it over"), "{stderr}");
    // The next renewal finds it: within one renewal interval, well within the budget.
    assert!(
        taken.elapsed() < Duration::from_millis(9800),
        "76 only after {:?}",
        taken.elapsed()
    );
}

/// What another holder does to the row of `lease/name`: a new version.
fn pg_take_over(name: &str) {
    shared()
        .client()
        .execute(
            "update leases set version = version + 100 where lock_name = $1",
            &[&format!("lease/{name}")],
        )
        .unwrap();
}

#[test]
fn a_holder_that_cannot_reconnect_stops_its_job_before_its_lease_expires() {
    ensure_leases_table();
    let (role, url) = idle_role("1s");
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("no-reconnect");
    let mut a = guarded(&url, dir.path(), &name, &IDLE_LEASE, "60");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    // Every reconnect is refused from now on.
    shared()
        .client()
        .batch_execute(&format!("ALTER ROLE {role} NOLOGIN"))
        .unwrap();
    let refused = Instant::now();
    // The waiter (another role) polls; it may only run after A's command is gone.
    let mut waiter_flags = IDLE_LEASE.to_vec();
    waiter_flags.push("--wait=40s");
    let mut b = guarded(&shared().url(), dir.path(), &name, &waiter_flags, "0");
    let a_err = a.expect_exit(76, RUN_LIMIT);
    let stopped = refused.elapsed();
    b.expect_exit(0, RUN_LIMIT);
    assert_eq!(lines(dir.path(), "overlaps"), 0, "{a_err}");
    assert_eq!(lines(dir.path(), "runs"), 2);
    // The budget runs from the last renewal sent before the refusals: at most 4 s before.
    assert!(
        stopped < Duration::from_secs(12),
        "stopped after {stopped:?}"
    );
}
