//! The lock through connection poolers, and against a role's settings: heimdall holds a
//! transaction-level lock in an open transaction, which every pooler keeps on one server
//! connection, so two runs never hold it at once: directly, through transaction pooling and
//! through session pooling. Statement pooling cannot hold a lock at all and is refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders};
use crate::support::pgbouncer::PgBouncer;
use crate::support::procs::{self, Running, lines};
use crate::support::runs::Holder;
use crate::support::{
    RUN_LIMIT, START_LIMIT, TestPostgres, busy_wait, heimdall, heimdall_std, text, unique_name,
};

/// heimdall on `url` running the guarded command (see [`procs::guarded`]) for `seconds`.
fn guarded(url: &str, dir: &Path, name: &str, seconds: &str) -> Running {
    procs::guarded(url, "pooler", dir, name, &[], seconds)
}

/// Starts A, waits until its command runs, then runs B on the same lock while A holds it.
fn second_run_while_first_holds(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("quiet");
    let mut a = guarded(url, dir.path(), &name, "2");
    assert!(
        busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
        "A never ran: {}",
        a.stderr()
    );
    let mut b = guarded(url, dir.path(), &name, "0");
    let b_err = b.expect_exit(75, RUN_LIMIT);
    assert!(b_err.contains("not running the command"), "{b_err}");
    a.expect_exit(0, RUN_LIMIT);
    assert_eq!(lines(dir.path(), "overlaps"), 0, "the commands overlapped");
    assert_eq!(lines(dir.path(), "runs"), 1, "only A ran");
}

#[test]
fn a_quiet_transaction_pool_refuses_the_second_run_while_the_first_holds() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    second_run_while_first_holds(&bouncer.url(pg.superuser()));
}

#[test]
fn a_session_pool_refuses_the_second_run_while_the_first_holds() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "session");
    second_run_while_first_holds(&bouncer.url(pg.superuser()));
}

/// Three clients that keep the pool's server connections changing hands.
struct Churn {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Churn {
    fn start(bouncer: &PgBouncer) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..3)
            .map(|_| {
                let mut client = bouncer.config().connect(postgres::NoTls).unwrap();
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let deadline = Instant::now() + RUN_LIMIT;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        client.batch_execute("select pg_sleep(0.03)").unwrap();
                    }
                })
            })
            .collect();
        Churn { stop, threads }
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn a_busy_transaction_pool_never_lets_two_runs_overlap() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let url = bouncer.url(pg.superuser());
    let _churn = Churn::start(&bouncer);
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let name = unique_name("busy");
        let mut a = guarded(&url, dir.path(), &name, "1.5");
        assert!(
            busy_wait(RUN_LIMIT, || lines(dir.path(), "runs") == 1),
            "round {round}: A never ran: {}",
            a.stderr()
        );
        let mut b = guarded(&url, dir.path(), &name, "0");
        b.expect_exit(75, RUN_LIMIT);
        // A's heartbeats and release run while the pool churns: it must still exit 0.
        a.expect_exit(0, RUN_LIMIT);
        assert_eq!(lines(dir.path(), "overlaps"), 0, "round {round}: overlap");
    }
}

#[test]
fn statement_pooling_is_refused_before_the_command_runs() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "statement");
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let out = heimdall()
        .args(["--database", &bouncer.url(pg.superuser())])
        .args(["--namespace", "pooler", "--name", &unique_name("stmt")])
        .args(["touch"])
        .arg(&marker)
        .timeout(RUN_LIMIT)
        .assert()
        .code(78);
    let stderr = text(&out.get_output().stderr);
    assert!(stderr.contains("statement"), "names the mode: {stderr}");
    assert!(
        stderr.contains("transaction or session pooling"),
        "names the fix: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(!marker.exists(), "the command must not run");
}

#[test]
fn a_full_transaction_pool_is_unavailable_not_statement_pooling() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start_with(
        &pg,
        "transaction",
        "default_pool_size = 1\nquery_wait_timeout = 3\n",
    );
    let url = bouncer.url(pg.superuser());
    // The pool's one server connection is pinned by a holder's open transaction.
    let holder = Holder::start(&url, "pooler", &unique_name("pinned"));
    let started = Instant::now();
    let out = on_lock(None, &url, &unique_name("queued"))
        .arg("true")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    eprintln!("a full pool answered in {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("FATAL: query_wait_timeout") && !stderr.contains("statement mode"),
        "the pooler's own message, not statement mode: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    holder.stop();
}

/// `heimdall [SUBCOMMAND] --database URL --namespace pooler --name NAME`, the rest to add.
fn on_lock(subcommand: Option<&str>, url: &str, name: &str) -> assert_cmd::Command {
    let mut cmd = heimdall();
    cmd.args(subcommand)
        .args(["--database", url, "--namespace", "pooler", "--name", name])
        .timeout(RUN_LIMIT);
    cmd
}

#[test]
fn a_holder_killed_through_the_transaction_pool_frees_the_lock() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let url = bouncer.url(pg.superuser());
    let name = unique_name("killed");
    let holder = Holder::start(&url, "pooler", &name);
    on_lock(None, &url, &name).arg("true").assert().code(75);
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(holder.pid() as i32, libc::SIGKILL) };
    let killed = Instant::now();
    let freed = busy_wait(Duration::from_secs(10), || {
        on_lock(None, &url, &name)
            .args(["-q", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert!(freed, "the lock was still held 10 s after SIGKILL");
    eprintln!("freed {} ms after SIGKILL", killed.elapsed().as_millis());
}

/// The backend that holds `pooler/name` on `pg`.
fn holding_backend(pg: &TestPostgres, name: &str) -> i32 {
    let backends = holders(&mut pg.client(), LockId::of("pooler", name));
    assert_eq!(backends.len(), 1, "one backend holds pooler/{name}");
    backends[0]
}

/// The holding backend's `backend_xid` and `backend_xmin`.
fn holder_xid_and_xmin(pg: &TestPostgres, name: &str) -> (Option<String>, Option<String>) {
    let row = pg
        .client()
        .query_one(
            "select backend_xid::text, backend_xmin::text from pg_stat_activity where pid = $1",
            &[&holding_backend(pg, name)],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn the_holding_backend_keeps_no_transaction_id_or_snapshot_so_vacuum_is_not_held_back() {
    let pg = TestPostgres::start();
    // A role that would keep a snapshot for the whole transaction, were heimdall to use its
    // default isolation.
    let (role, direct) = pg.role_with(&["default_transaction_isolation = 'serializable'"]);
    let bouncer = PgBouncer::start(&pg, "transaction");
    for url in [direct, bouncer.url(&role)] {
        let name = unique_name("xmin");
        let holder = Holder::start(&url, "pooler", &name);
        assert_eq!(
            holder_xid_and_xmin(&pg, &name),
            (None, None),
            "through {url}"
        );
        holder.stop();
    }
}

/// Role timeouts shorter than the holding session stays idle: a statement, an idle
/// transaction and an idle session may each last 1.5 s at most.
const SHORT_TIMEOUTS: [&str; 3] = [
    "idle_session_timeout = '1500ms'",
    "idle_in_transaction_session_timeout = '1500ms'",
    "statement_timeout = '1500ms'",
];

#[test]
fn a_role_with_short_idle_timeouts_cannot_end_the_holding_session() {
    let pg = TestPostgres::start();
    let (_role, url) = pg.role_with(&SHORT_TIMEOUTS);
    let name = unique_name("idle");
    let holder = Holder::start(&url, "pooler", &name);
    let backend = holding_backend(&pg, &name);
    // The holding session sits idle in its transaction between heartbeats (5 s apart by
    // default): wait until it has done so for longer than the role allows, and is still there.
    let mut client = pg.client();
    let idle_past_the_timeouts = busy_wait(START_LIMIT, || {
        client
            .query_opt(
                "select 1 from pg_stat_activity where pid = $1 \
                 and state = 'idle in transaction' and now() - state_change > interval '2 s'",
                &[&backend],
            )
            .unwrap()
            .is_some()
    });
    assert!(
        idle_past_the_timeouts,
        "the holding backend {backend} never stayed idle in its transaction past the role's \
         1.5 s timeouts; was it ended?"
    );
    // The lock is still held: a second run is refused, and the holder ends as it began.
    on_lock(None, &url, &name)
        .args(["--", "true"])
        .assert()
        .code(75);
    holder.stop();
}

#[test]
fn a_search_path_that_shadows_the_lock_functions_cannot_make_two_holders() {
    let pg = TestPostgres::start();
    let schema = format!("evil_{}", std::process::id());
    // Usable by every role: a schema the role cannot use is silently left out of its path.
    let mut sql = format!("create schema {schema}; grant usage on schema {schema} to public;");
    // Every lock function heimdall might call, shadowed by one that takes a shared lock instead.
    for kind in ["", "_xact"] {
        for (args, call) in [("a int, b int", "a, b"), ("k bigint", "k")] {
            for (prefix, ret) in [("pg_try_advisory", "boolean"), ("pg_advisory", "void")] {
                sql.push_str(&format!(
                    "create function {schema}.{prefix}{kind}_lock({args}) returns {ret} \
                     language sql as $$ select pg_catalog.{prefix}{kind}_lock_shared({call}) $$;"
                ));
            }
        }
    }
    pg.client().batch_execute(&sql).unwrap();
    let (_role, url) = pg.role_with(&[&format!("search_path = {schema}, pg_catalog, public")]);
    second_run_while_first_holds(&url);
}

/// psql holding `pg_advisory_lock(a, b)` at session level until its stdin closes.
struct PsqlHolder {
    child: std::process::Child,
}

impl PsqlHolder {
    fn start(pg: &TestPostgres, key: &str) -> PsqlHolder {
        let mut child = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
            .args([
                "-p",
                &pg.port().to_string(),
                "-U",
                pg.superuser(),
                "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("psql not found: apt-get install postgresql-client");
        use std::io::{BufRead, Write};
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "select pg_advisory_lock({key}); select 'locked';").unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        while !line.contains("locked") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "psql ended early");
        }
        // Keep stdin open (psql waits on it) by leaking it into the child handle's lifetime.
        child.stdin = Some(stdin);
        PsqlHolder { child }
    }
}

impl Drop for PsqlHolder {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        crate::support::wait_child(&mut self.child, Duration::from_secs(10));
    }
}

#[test]
fn a_session_level_lock_taken_with_psql_excludes_heimdall_and_the_reverse() {
    let pg = TestPostgres::start();
    let url = pg.url();
    let key = "7001, 7002";
    {
        let _psql = PsqlHolder::start(&pg, key);
        heimdall()
            .args(["--database", &url, "--key", "7001,7002", "true"])
            .timeout(RUN_LIMIT)
            .assert()
            .code(75);
    }
    heimdall()
        .args(["--database", &url, "--key", "7001,7002", "true"])
        .timeout(RUN_LIMIT)
        .assert()
        .success();

    let mut cmd = heimdall_std();
    cmd.args(["--database", &url, "--key", "7001,7002"]);
    let holder = Holder::start_with(cmd);
    let out = Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", pg.superuser(), "postgres", "-c"])
        .arg(format!("select pg_try_advisory_lock({key})"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "f");
    holder.stop();
}

#[test]
fn status_and_the_busy_message_work_through_a_transaction_pool() {
    let pg = TestPostgres::start();
    let bouncer = PgBouncer::start(&pg, "transaction");
    let url = bouncer.url(pg.superuser());
    let name = unique_name("status");
    let holder = Holder::start(&url, "pooler", &name);
    let out = on_lock(Some("status"), &url, &name).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("heimdall pooler/{name}")),
        "{stdout}"
    );
    let out = on_lock(None, &url, &name).arg("true").assert().code(75);
    let stderr = text(&out.get_output().stderr);
    assert!(
        stderr.contains("pooler or proxy"),
        "says the client address is the pooler's: {stderr}"
    );
    holder.stop();
}
