//! Lease mode (`--lease-table`): the lock is a row with a version and an expiry on the server's
//! clock, renewed by single autocommit statements, so it works through every pooler mode and
//! many holders share a few server connections. These tests try to make two holders overlap:
//! through a transaction pool, with a holder cut off from the network, SIGKILLed, or overtaken.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{self, Job, Running, group_runs_sh, heimdall_sh, lines, process_state};
use crate::support::proxy::Proxy;
use crate::support::runs::locked;
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, TestPostgres, busy_wait, heimdall, host_name, login_role,
    process_group_alive, shared, text, unique_name,
};

/// The ttl of [`SHORT_LEASE`].
const SHORT_TTL: Duration = Duration::from_secs(4);
/// The longest a waiter sleeps between two tries of a lease: 2 s, plus 25% jitter.
const LONGEST_POLL: Duration = Duration::from_millis(2500);

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

/// The lease row of `lease/name` in `leases` on `pg`: its version and when it expires, in
/// seconds since the epoch on the server's clock (the machine's: the server is local).
fn lease_row(pg: &TestPostgres, name: &str) -> Option<(i64, f64)> {
    pg.client()
        .query_opt(
            "select version, extract(epoch from expires_at)::float8 from leases \
             where lock_name = $1",
            &[&format!("lease/{name}")],
        )
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

/// A time a command wrote with `date +%s.%N` to `file` in `dir`.
fn written_time(dir: &Path, file: &str) -> f64 {
    let path = dir.join(file);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} is not a time ({text:?}): {e}", path.display()))
}

/// B, a waiter on the shared cluster for the lease `a` holds, with `flags` and `--wait=30s`:
/// once it holds the lease, its command writes `overlaps` if any process of A's job still runs,
/// and the time it started to `b-started`.
fn waiter_behind(a: &Job, flags: &[&str]) -> Running {
    let mut waiter_flags = flags.to_vec();
    waiter_flags.push("--wait=30s");
    let check = format!(
        "if {}; then echo overlap >> overlaps; fi; date +%s.%N > b-started",
        group_runs_sh(a.pgid)
    );
    Running::spawn(heimdall_sh(
        &shared().url(),
        "lease",
        a.dir.path(),
        &a.name,
        &waiter_flags,
        &check,
    ))
}

fn epoch_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn through_a_transaction_pool_a_lease_admits_one_holder_and_then_the_next() {
    one_lease_holder_and_then_the_next("transaction");
}

/// Statement pooling cannot hold an advisory lock at all (exit 78), but a lease needs no
/// session: every statement of it is one autocommit statement.
#[test]
fn through_a_statement_pool_a_lease_admits_one_holder_and_then_the_next() {
    one_lease_holder_and_then_the_next("statement");
}

/// Through a PgBouncer in `pool_mode`: A holds a lease, B is refused while A runs, C runs after.
fn one_lease_holder_and_then_the_next(pool_mode: &str) {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, pool_mode);
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
    // Each command marks itself running until the test says go (or 5 minutes pass, so that a
    // failed test leaves nothing behind for long). One look a second: 150 of them at once.
    let script = format!(
        r#"touch running/$$; i=0; while [ ! -e "{}" ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done; rm running/$$"#,
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
    assert_eq!(
        most_running, HOLDERS,
        "not every holder ran at once within {RUN_LIMIT:?}"
    );
    assert!(
        most_backends <= 4,
        "{most_backends} server backends for a pool of 4"
    );
}

#[test]
fn a_holder_cut_off_stops_its_command_before_its_lease_expires_and_only_then_a_waiter_runs() {
    let pg = shared();
    let proxy = Proxy::start(pg.port());
    // ttl 6s, kill-after 1s: margin 1s, budget 4s, renewals every 2s.
    let flags = [
        "--lease-table",
        "leases",
        "--lease-ttl",
        "6s",
        "--kill-after",
        "1s",
    ];
    // A's job notes when the SIGTERM that stops it came, and leaves at once.
    let mut a = Job::start_on(
        &proxy.url(pg),
        "lease",
        "cut",
        &flags,
        "trap 'date +%s.%N > a-stopped; exit 143' TERM; echo $$ > pid; sleep 600 & wait",
    );
    proxy.cut();
    // From the cut on, nothing of A reaches the server: the row keeps A's version and the
    // expiry of a renewal A saw succeed, or a later one (see docs/lease.md, The safety arithmetic).
    let (version, mut expires) = lease_row(pg, &a.name).expect("A's lease row");
    // The waiter connects directly and polls.
    let mut b = waiter_behind(&a, &flags);
    let a_err = a.run.expect_exit(76, RUN_LIMIT);
    if let Some((v, e)) = lease_row(pg, &a.name)
        && v == version
    {
        expires = expires.max(e);
    }
    let b_err = b.expect_exit(0, RUN_LIMIT);
    let stopped = written_time(a.dir.path(), "a-stopped");
    let b_started = written_time(a.dir.path(), "b-started");
    eprintln!(
        "cut: A's job stopped {:.2}s before its lease expired; B ran {:.2}s after it expired",
        expires - stopped,
        b_started - expires
    );
    assert!(
        !a.path("overlaps").exists(),
        "B ran while A's job still ran: {b_err}"
    );
    assert!(
        stopped < expires,
        "A's job was stopped {:.2}s after its lease expired: {a_err}",
        stopped - expires
    );
    assert!(
        b_started > stopped,
        "B's command started before A's job was stopped: {b_err}"
    );
}

#[test]
fn a_sigkilled_holders_lease_goes_to_a_waiter_within_the_ttl() {
    let a = Job::start(
        "lease",
        "killed",
        &SHORT_LEASE,
        "echo $$ > pid; sleep 600 & wait",
    );
    a.run.signal(libc::SIGKILL);
    let killed = SystemTime::now();
    // The keeper stops the job at once; the lease frees itself by its ttl.
    assert!(
        busy_wait(REACT_LIMIT, || !process_group_alive(a.pgid)),
        "A's job outlived its SIGKILLed heimdall"
    );
    let mut b = waiter_behind(&a, &SHORT_LEASE);
    let b_err = b.expect_exit(0, RUN_LIMIT);
    assert!(
        !a.path("overlaps").exists(),
        "B ran while A's job still ran: {b_err}"
    );
    let took = written_time(a.dir.path(), "b-started") - epoch_seconds(killed);
    eprintln!("the waiter ran {took:.2}s after SIGKILL");
    // The lease expires at most a ttl after A's last renewal, which came before the kill; the
    // waiter tries again at most LONGEST_POLL later, and then needs a moment to start.
    let bound = SHORT_TTL + LONGEST_POLL + Duration::from_secs(2);
    assert!(
        took <= bound.as_secs_f64(),
        "the waiter ran {took:.2}s after SIGKILL, later than {bound:?} (ttl + poll + 2 s)"
    );
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
    let mut a = Job::start(
        "lease",
        "status",
        &lease_flags("leases", "30s"),
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done",
    );
    let name = a.name.clone();
    let holder = format!(
        "\"heimdall lease/{name} @{} pid {}\"",
        host_name(),
        a.run.pid()
    );
    let status = |extra: &[&str]| {
        let out = heimdall()
            .args(["status", "--database", &pg.url(), "--namespace", "lease"])
            .args(["--name", &name, "--lease-table", "leases"])
            .args(extra)
            .output()
            .unwrap();
        (out.status.code(), text(&out.stdout))
    };
    // Held: busy (75), naming the holding heimdall and the lease's version.
    let (code, out) = status(&[]);
    assert!(
        out.contains(&format!("lease/{name}"))
            && out.contains(&format!(": held by lease/{name} {holder} (lease version ")),
        "{out}"
    );
    assert_eq!(code, Some(75), "a held lease is busy: {out}");
    let (code, out) = status(&["--json"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, Some(75), "{out}");
    assert_eq!(json["free"], false, "{json}");
    assert_eq!(
        json["holders"][0]["holder"],
        holder.trim_matches('"'),
        "{json}"
    );
    // With two slots one is left, so a run would start (0).
    let (code, out) = status(&["--slots", "2"]);
    assert!(out.contains(": 1 of 2 slots taken"), "{out}");
    assert_eq!(code, Some(0), "a run would start: {out}");
    let list = heimdall()
        .args(["list", "--database", &pg.url(), "--lease-table", "leases"])
        .output()
        .unwrap();
    let listed = text(&list.stdout);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&format!("lease/{name} ")))
        .unwrap_or_else(|| panic!("lease/{name} is not listed:\n{listed}"));
    assert!(row.contains(holder.trim_matches('"')), "{row}");
    fs::write(a.path("go"), "").unwrap();
    a.run.expect_exit(0, RUN_LIMIT);
    // Released: free (0).
    let (code, out) = status(&[]);
    assert!(out.trim_end().ends_with(": free"), "{out}");
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn the_fencing_token_of_a_lease_is_its_version_and_rises_by_one_at_every_grant() {
    let name = unique_name("fencing");
    let mut tokens = Vec::new();
    for run in 0..3 {
        let out = locked("lease", &name)
            .args(lease_flags("leases", "30s"))
            .args(["--", "sh", "-c", "echo $HEIMDALL_FENCING_TOKEN"])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {run}: {}",
            text(&out.stderr)
        );
        let token: i64 = text(&out.stdout).trim().parse().unwrap_or_else(|e| {
            panic!(
                "run {run}: HEIMDALL_FENCING_TOKEN {:?}: {e}",
                text(&out.stdout)
            )
        });
        let (version, _) = lease_row(shared(), &name).expect("the lease row");
        assert_eq!(token, version, "run {run}: the token is the row's version");
        tokens.push(token);
    }
    assert_eq!(
        tokens,
        [1, 2, 3],
        "a new row starts at 1 and every grant adds one"
    );
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
    let mut a = Job::start("lease", "stopped", &SHORT_LEASE, "echo $$ > pid; sleep 600");
    let (dir, name, job) = (a.dir.path().to_owned(), a.name.clone(), a.pgid);
    let a = &mut a.run;
    // heimdall alone stops (kill -STOP, a debugger): no renewal, no stop from its supervisor.
    a.signal(libc::SIGSTOP);
    let mut waiter = SHORT_LEASE.to_vec();
    waiter.push("--wait=30s");
    // A zombie is no overlap: SIGKILLed, it waits for its stopped parent to reap it.
    let check = r#"s=$(cut -d' ' -f3 "/proc/$(cat pid)/stat" 2>/dev/null); if [ -n "$s" ] && [ "$s" != Z ]; then echo overlap > overlaps; fi; touch bran"#;
    let mut b = Running::spawn(heimdall_sh(
        &pg.url(),
        "lease",
        dir.as_path(),
        &name,
        &waiter,
        check,
    ));
    let b_err = b.expect_exit(0, RUN_LIMIT);
    assert!(dir.as_path().join("bran").exists(), "B never ran: {b_err}");
    assert!(
        !dir.as_path().join("overlaps").exists(),
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
