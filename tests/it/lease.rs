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
use crate::support::{TestPostgres, busy_wait, heimdall, shared, unique_name};

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
    pg.client()
        .execute(
            "update leases set version = version + 100 where lock_name = $1",
            &[&format!("lease/{name}")],
        )
        .unwrap();
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
        stderr.contains("CREATE TABLE IF NOT EXISTS \"other_leases\""),
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
    let flags = lease_flags("leases", "30s");
    let mut a = guarded(&pg.url(), dir.path(), &name, &flags, "3");
    assert!(busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1));
    let status = heimdall()
        .args(["status", "--database", &pg.url(), "--namespace", "lease"])
        .args(["--name", &name, "--lease-table", "leases"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains(&format!("lease/{name}")), "{text}");
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
