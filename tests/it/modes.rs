//! Waiting, shared locks, slots, and knowing who holds the lock: `--wait` (the handoff, first
//! come first served, a bounded wait, a signal during the wait, a role's own timeouts),
//! `--shared`, `--slots`, the holder named in the busy message, the `status`, `list` and `key`
//! subcommands, the fencing token, and a heimdall started inside the command it holds a lock for.
//!
//! Every test uses its own lock names and its own temp dir. Commands prove they ran by writing
//! files; the tests poll for those files and for `pg_locks` rows (a queued waiter is an
//! ungranted row) instead of sleeping.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders, waiters};
use crate::support::procs::{self, Running, shared_sh};
use crate::support::runs;
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, START_LIMIT, busy_wait, heimdall, host_name, new_dir, shared, text,
    unique_name,
};
use serde_json::Value;

/// Short, so that `heimdall NS/NAME @HOST pid PID` fits PostgreSQL's 63-byte application_name.
const NS: &str = "hm-modes";
/// `heimdall --database URL --namespace NS --name name`, as an assert_cmd command run in `dir`.
fn locked(dir: &Path, name: &str) -> assert_cmd::Command {
    let mut cmd = runs::locked(NS, name);
    cmd.current_dir(dir);
    cmd
}

/// A holder's script: marks `TAG.started`, waits for `TAG.release`, and writes the time in ns
/// to `TAG.end` as its very last action.
fn hold_script(tag: &str) -> String {
    format!(
        "touch {tag}.started; while [ ! -e {tag}.release ]; do sleep 0.02; done; date +%s%N > {tag}.end"
    )
}

/// Starts a heimdall holding `NS/name` (with `flags`) until `dir/TAG.release` appears, and
/// returns once its command runs.
fn hold(dir: &Path, name: &str, flags: &[&str], tag: &str) -> Running {
    let mut run = Running::spawn(shared_sh(NS, dir, name, flags, &hold_script(tag)));
    let started = dir.join(format!("{tag}.started"));
    assert!(
        busy_wait(START_LIMIT, || started.exists() || run.has_exited()) && started.exists(),
        "the holder {tag} of {name} never started its command; stderr:\n{}",
        run.stderr()
    );
    run
}

/// Runs heimdall on `NS/name` in `dir` with `flags` and a command that touches `dir/marker`;
/// asserts that it is refused as busy (75) without running the command, and returns stderr.
fn expect_busy(dir: &Path, name: &str, flags: &[&str], marker: &str) -> String {
    let out = locked(dir, name)
        .args(flags)
        .args(["--", "touch", marker])
        .output()
        .unwrap();
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(75), "stderr:\n{stderr}");
    assert!(
        !dir.join(marker).exists(),
        "the command ran without the lock"
    );
    stderr
}

fn release(dir: &Path, tag: &str) {
    fs::write(dir.join(format!("{tag}.release")), "").unwrap();
}

/// The ids of each slot of `NS/name` in `pg_locks`.
fn lock_ids(name: &str, slots: u16) -> Vec<LockId> {
    LockId::slots(NS, name, slots)
}

fn read_ns(path: &Path) -> i128 {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{} is not a time in ns ({text:?}): {e}", path.display()))
}

fn stdout_of(out: &std::process::Output) -> String {
    text(&out.stdout)
}

fn stderr_of(out: &std::process::Output) -> String {
    text(&out.stderr)
}

// ---------------------------------------------------------------------------
// --wait
// ---------------------------------------------------------------------------

#[test]
fn a_waiter_runs_as_soon_as_the_holder_releases() {
    let dir = new_dir();
    let name = unique_name("handoff");
    let ids = lock_ids(&name, 1)[0];
    let mut client = shared().client();
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let mut waiter = Running::spawn_queued(
        shared_sh(
            NS,
            dir.path(),
            &name,
            &["-v", "--wait"],
            "date +%s%N > waiter.start",
        ),
        &mut client,
        ids,
        1,
    );
    assert!(!dir.path().join("waiter.start").exists());

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
    let stderr = waiter.expect_exit(0, RUN_LIMIT);
    assert!(
        stderr.contains("waited ") && stderr.contains(" ms for the lock"),
        "-v did not report the wait:\n{stderr}"
    );

    let ended = read_ns(&dir.path().join("holder.end"));
    let started = read_ns(&dir.path().join("waiter.start"));
    let latency = Duration::from_nanos(u64::try_from(started - ended).unwrap_or_else(|_| {
        panic!("the waiter's command started before the holder's ended ({started} < {ended})")
    }));
    eprintln!("handoff latency (holder's command end -> waiter's command start): {latency:?}");
    assert!(latency < Duration::from_secs(5), "handoff took {latency:?}");
}

#[test]
fn waiters_run_in_the_order_they_arrived() {
    let dir = new_dir();
    let name = unique_name("fifo");
    let ids = lock_ids(&name, 1)[0];
    let mut client = shared().client();
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let mut waiters = Vec::new();
    for i in 0..5 {
        // The next one starts only once this one is visibly queued.
        waiters.push(Running::spawn_queued(
            shared_sh(
                NS,
                dir.path(),
                &name,
                &["--wait"],
                &format!("echo {i} >> order"),
            ),
            &mut client,
            ids,
            i + 1,
        ));
    }
    assert!(!dir.path().join("order").exists());

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
    for waiter in &mut waiters {
        waiter.expect_exit(0, RUN_LIMIT);
    }
    let order = fs::read_to_string(dir.path().join("order")).unwrap();
    assert_eq!(order, "0\n1\n2\n3\n4\n", "waiters ran out of arrival order");
}

#[test]
fn a_bounded_wait_gives_up_with_the_busy_code_and_names_the_holder() {
    let dir = new_dir();
    let name = unique_name("bounded");
    let ids = lock_ids(&name, 1)[0];
    let mut holder = hold(dir.path(), &name, &[], "holder");
    let backend = holders(&mut shared().client(), ids);
    assert_eq!(backend.len(), 1, "the holder's lock is not in pg_locks");

    let started = Instant::now();
    let stderr = expect_busy(dir.path(), &name, &["--wait=1s"], "ran");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1),
        "gave up after {elapsed:?}"
    );
    assert!(stderr.contains("after waiting"), "{stderr}");
    assert!(
        stderr.contains(&format!("held by pid {}", backend[0])),
        "the message does not name the holder's backend {}:\n{stderr}",
        backend[0]
    );
    assert!(
        stderr.contains(&format!("pid {}\"", holder.pid())),
        "the message does not name the holding heimdall {}:\n{stderr}",
        holder.pid()
    );

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
}

/// A waiter queued behind a holder gets `signal` (shell name `name`): heimdall exits 128+N at
/// once, cancels its queued statement so that no backend stays in the queue, and never runs
/// the command; the holder keeps its lock.
fn a_signal_during_the_wait_cancels_it(signal: i32, name: &str) {
    let dir = new_dir();
    let lock = unique_name(&format!("sig{name}-wait"));
    let ids = lock_ids(&lock, 1)[0];
    let mut client = shared().client();
    let mut holder = hold(dir.path(), &lock, &[], "holder");

    let mut waiter = Running::spawn_queued(
        shared_sh(NS, dir.path(), &lock, &["--wait"], "touch ran"),
        &mut client,
        ids,
        1,
    );

    let signalled = Instant::now();
    waiter.signal(signal);
    let stderr = waiter.expect_exit(128 + signal, REACT_LIMIT);
    let reacted = signalled.elapsed();
    assert!(reacted < REACT_LIMIT, "heimdall took {reacted:?} to exit");
    assert!(
        stderr.contains(&format!("received SIG{name} before the command started")),
        "{stderr}"
    );
    assert!(
        busy_wait(REACT_LIMIT, || waiters(&mut client, ids).is_empty()),
        "the cancelled waiter is still queued in pg_locks"
    );
    assert_eq!(
        holders(&mut client, ids).len(),
        1,
        "the holder lost its lock"
    );

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
    assert!(
        !dir.path().join("ran").exists(),
        "the signalled waiter ran its command"
    );
}

#[test]
fn sigterm_during_the_wait_exits_143_and_leaves_no_waiter_behind() {
    a_signal_during_the_wait_cancels_it(libc::SIGTERM, "TERM");
}

#[test]
fn sigint_during_the_wait_exits_130_and_leaves_no_waiter_behind() {
    a_signal_during_the_wait_cancels_it(libc::SIGINT, "INT");
}

#[test]
fn a_roles_statement_timeout_ends_the_wait_as_busy() {
    let dir = new_dir();
    let name = unique_name("role-st");
    let (_role, url) = shared().role_with(&["statement_timeout = '500ms'"]);
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let mut waiter = Running::spawn(procs::heimdall_sh(
        &url,
        NS,
        dir.path(),
        &name,
        &["--wait"],
        "touch ran",
    ));
    let stderr = waiter.expect_exit(75, RUN_LIMIT);
    assert!(stderr.contains("statement_timeout"), "{stderr}");
    assert!(stderr.contains("after waiting"), "{stderr}");
    assert!(!dir.path().join("ran").exists(), "the command ran");

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
}

#[test]
fn an_explicit_wait_overrides_a_roles_lock_timeout() {
    let dir = new_dir();
    let name = unique_name("role-lt");
    let (role, url) = shared().role_with(&["lock_timeout = '300ms'"]);
    let mut client = shared().client();
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let mut waiter = Running::spawn(procs::heimdall_sh(
        &url,
        NS,
        dir.path(),
        &name,
        // A limit the test never reaches: the role's 300ms is what must not end the wait.
        &["--wait=60s"],
        "touch ran",
    ));
    // Queued for well over the role's 300ms: its lock_timeout did not apply.
    let sql = format!(
        "select count(*) from pg_stat_activity where usename = '{role}' \
         and wait_event_type = 'Lock' and now() - query_start > interval '500ms'"
    );
    let long_queued = busy_wait(START_LIMIT, || {
        client.query_one(&sql, &[]).unwrap().get::<_, i64>(0) == 1 || waiter.has_exited()
    });
    assert!(
        long_queued && !waiter.has_exited(),
        "the waiter did not stay queued past the role's lock_timeout; stderr:\n{}",
        waiter.stderr()
    );

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
    waiter.expect_exit(0, RUN_LIMIT);
    assert!(
        dir.path().join("ran").exists(),
        "the waiter's command did not run"
    );
}

// ---------------------------------------------------------------------------
// --shared
// ---------------------------------------------------------------------------

#[test]
fn shared_holders_run_together_and_exclude_an_exclusive_run_and_vice_versa() {
    let dir = new_dir();
    let name = unique_name("shared");
    let inside = |tag: &str| {
        format!(
            "touch in-{tag}; while [ ! -e release ]; do sleep 0.02; done; rm in-{tag}; touch done-{tag}"
        )
    };
    let mut a = Running::spawn(shared_sh(
        NS,
        dir.path(),
        &name,
        &["--shared"],
        &inside("a"),
    ));
    let mut b = Running::spawn(shared_sh(
        NS,
        dir.path(),
        &name,
        &["--shared"],
        &inside("b"),
    ));
    // Each marker stays until the release: both present at once means both ran at once.
    let (in_a, in_b) = (dir.path().join("in-a"), dir.path().join("in-b"));
    assert!(
        busy_wait(START_LIMIT, || (in_a.exists() && in_b.exists())
            || a.has_exited()
            || b.has_exited())
            && in_a.exists()
            && in_b.exists(),
        "the two shared holders were not inside together; stderr a:\n{}\nstderr b:\n{}",
        a.stderr(),
        b.stderr()
    );

    expect_busy(dir.path(), &name, &[], "exclusive-ran");

    fs::write(dir.path().join("release"), "").unwrap();
    a.expect_exit(0, RUN_LIMIT);
    b.expect_exit(0, RUN_LIMIT);
    assert!(dir.path().join("done-a").exists() && dir.path().join("done-b").exists());

    let mut exclusive = hold(dir.path(), &name, &[], "exclusive");
    expect_busy(dir.path(), &name, &["--shared"], "shared-ran");
    release(dir.path(), "exclusive");
    exclusive.expect_exit(0, RUN_LIMIT);
}

// ---------------------------------------------------------------------------
// --slots
// ---------------------------------------------------------------------------

#[test]
fn slots_let_at_most_n_runs_inside_at_once() {
    let dir = new_dir();
    let name = unique_name("slots");
    // mkdir fails if the slot is already taken; `inside` records how many were in at entry.
    let script = "mkdir slot-$HEIMDALL_SLOT || { echo $HEIMDALL_SLOT >> doubled; exit 9; }; \
                  ls -d slot-* | wc -l >> inside; echo $HEIMDALL_SLOT >> slots; \
                  sleep 0.5; rmdir slot-$HEIMDALL_SLOT";
    let mut runs: Vec<Running> = (0..4)
        .map(|_| {
            Running::spawn(shared_sh(
                NS,
                dir.path(),
                &name,
                &["--slots", "2", "--wait"],
                script,
            ))
        })
        .collect();
    for run in &mut runs {
        run.expect_exit(0, RUN_LIMIT);
    }
    assert!(
        !dir.path().join("doubled").exists(),
        "two runs held the same slot at once"
    );
    let read = |file: &str| -> Vec<u32> {
        fs::read_to_string(dir.path().join(file))
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    let inside = read("inside");
    let mut slots = read("slots");
    eprintln!("runs inside at each entry: {inside:?}; slots taken: {slots:?}");
    assert_eq!(slots.len(), 4, "not every run ran");
    assert!(
        inside.iter().all(|&n| n <= 2),
        "more than 2 inside: {inside:?}"
    );
    slots.sort();
    slots.dedup();
    assert_eq!(
        slots,
        [0, 1],
        "HEIMDALL_SLOT outside 0..2, or a slot unused"
    );
}

// ---------------------------------------------------------------------------
// Who holds the lock
// ---------------------------------------------------------------------------

#[test]
fn the_busy_message_names_the_holders_host_and_heimdall_pid() {
    let dir = new_dir();
    let name = unique_name("who");
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let stderr = expect_busy(dir.path(), &name, &[], "ran");
    let expected = format!(
        "(\"heimdall {NS}/{name} @{} pid {}\", from 127.0.0.1, holding for ",
        host_name(),
        holder.pid()
    );
    assert!(
        stderr.contains("held by pid ") && stderr.contains(&expected),
        "expected {expected:?} in:\n{stderr}"
    );

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
}

#[test]
fn the_busy_message_names_the_right_heimdall_pid_even_for_a_long_lock_name() {
    let dir = new_dir();
    let name = unique_name(&format!("long-{}", "x".repeat(40)));
    let mut holder = hold(dir.path(), &name, &[], "holder");

    let stderr = expect_busy(dir.path(), &name, &[], "ran");
    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
    let expected = format!(" @{} pid {}\"", host_name(), holder.pid());
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} (the holder's host and pid) in:\n{stderr}"
    );
}

/// Takes the session-level advisory lock on each of `ids` from `client`, in one statement.
fn take_slots(client: &mut postgres::Client, ids: &[LockId]) {
    let calls: Vec<String> = ids
        .iter()
        .map(|id| {
            format!(
                "pg_advisory_lock({}, {})",
                id.classid as i32, id.objid as i32
            )
        })
        .collect();
    client
        .batch_execute(&format!("select {}", calls.join(", ")))
        .unwrap();
}

fn backend_pid(client: &mut postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .unwrap()
        .get(0)
}

#[test]
fn the_busy_message_names_each_holder_once_with_the_slots_it_holds() {
    let dir = new_dir();
    let name = unique_name("many");
    let ids = lock_ids(&name, 1000);
    // One session holds every slot but 7, another holds slot 7.
    let (mut a, mut b) = (shared().client(), shared().client());
    let mut most = ids.clone();
    let seventh = most.remove(7);
    take_slots(&mut a, &most);
    take_slots(&mut b, &[seventh]);
    let (pid_a, pid_b) = (backend_pid(&mut a), backend_pid(&mut b));

    let stderr = expect_busy(dir.path(), &name, &["--slots", "1000"], "ran");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for pid in [pid_a, pid_b] {
        assert_eq!(
            stderr.matches(&format!("pid {pid} ")).count(),
            1,
            "pid {pid} is named once: {stderr}"
        );
    }
    assert!(
        stderr.contains(&format!("pid {pid_a} (slots 0-6, 8-999, "))
            && stderr.contains(&format!("pid {pid_b} (slot 7, ")),
        "each holder with its slots: {stderr}"
    );
    eprintln!(
        "busy message, 1000 slots held by two sessions: {} bytes",
        stderr.len()
    );
    assert!(stderr.len() < 1000, "{} bytes: {stderr}", stderr.len());

    // Twelve sessions on twelve slots: ten are named, the rest counted.
    let name = unique_name("crowd");
    let clients: Vec<postgres::Client> = lock_ids(&name, 12)
        .into_iter()
        .map(|id| {
            let mut client = shared().client();
            take_slots(&mut client, &[id]);
            client
        })
        .collect();
    let stderr = expect_busy(dir.path(), &name, &["--slots", "12"], "ran");
    assert_eq!(stderr.matches(" (slot ").count(), 10, "{stderr}");
    assert!(stderr.contains("; and 2 more sessions"), "{stderr}");
    drop(clients);
}

#[test]
fn status_with_slots_counts_the_taken_ones_and_is_free_while_one_is_left() {
    let name = unique_name("status-slots");
    let ids = lock_ids(&name, 3);
    let status = |json: bool| {
        let mut cmd = heimdall();
        cmd.args(["status", "--database", &shared().url()]).args([
            "--namespace",
            NS,
            "--name",
            &name,
            "--slots",
            "3",
        ]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        (out.status.code(), stdout_of(&out))
    };
    // The text and the JSON agree on how many are taken, and the exit status follows.
    let expect = |taken: usize, code: i32| {
        let (got, text) = status(false);
        assert!(
            text.contains(&format!(": {taken} of 3 slots taken")),
            "{text}"
        );
        assert_eq!(got, Some(code), "{text}");
        let (got, text) = status(true);
        assert_eq!(got, Some(code), "{text}");
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["taken"], taken, "{json}");
        assert_eq!(json["slots"], 3, "{json}");
        assert_eq!(json["free"], taken < 3, "{json}");
    };
    let (mut a, mut b) = (shared().client(), shared().client());
    take_slots(&mut a, &ids[0..1]);
    take_slots(&mut b, &ids[2..3]);
    expect(2, 0);
    take_slots(&mut a, &ids[1..2]);
    expect(3, 75);
}

#[test]
fn status_says_free_or_held_and_list_shows_the_running_lock() {
    let dir = new_dir();
    let name = unique_name("status");
    let ids = lock_ids(&name, 1)[0];
    let url = shared().url();
    let status = |json: bool| {
        let mut cmd = heimdall();
        cmd.args([
            "status",
            "--database",
            &url,
            "--namespace",
            NS,
            "--name",
            &name,
        ]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };

    let out = status(false);
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.starts_with(&format!("lock {NS}/{name} (keys "))
            && text.trim_end().ends_with(": free"),
        "{text}"
    );
    let out = status(true);
    assert_eq!(out.status.code(), Some(0));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["free"], true, "{json}");

    let mut holder = hold(dir.path(), &name, &[], "holder");
    let backend = holders(&mut shared().client(), ids)[0];

    let out = status(false);
    assert_eq!(out.status.code(), Some(75), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(
        text.contains(&format!(": held by pid {backend} "))
            && text.contains(&format!("pid {}\"", holder.pid())),
        "{text}"
    );
    let out = status(true);
    assert_eq!(out.status.code(), Some(75));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["free"], false, "{json}");
    assert_eq!(json["holders"][0]["pid"], backend, "{json}");

    let (entry, line) = listed(backend);
    assert!(line.starts_with(&format!("{NS}/{name} ")), "{line}");
    assert!(
        line.contains(&format!("pid {} (backend {backend})", holder.pid()))
            && line.contains("exclusive"),
        "{line}"
    );
    assert_eq!(entry["lock"], format!("{NS}/{name}").as_str(), "{entry}");
    assert_eq!(entry["heimdall_pid"], holder.pid(), "{entry}");
    assert_eq!(entry["pid"], backend, "{entry}");
    assert_eq!(entry["namespace"], NS, "{entry}");
    assert_eq!(entry["name"], name.as_str(), "{entry}");
    assert_eq!(entry["mode"], "exclusive", "{entry}");
    assert_eq!(entry["host"], host_name().as_str(), "{entry}");

    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
}

/// `heimdall list --json` on the shared cluster: the entry whose backend is `pid`.
fn listed(pid: i32) -> (Value, String) {
    let url = shared().url();
    let out = heimdall()
        .args(["list", "--database", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let text = stdout_of(&out);
    assert!(text.starts_with("LOCK"), "no header:\n{text}");
    let row = text
        .lines()
        .find(|l| l.contains(&format!("(backend {pid})")))
        .unwrap_or_else(|| panic!("backend {pid} is not listed:\n{text}"))
        .to_owned();
    let out = heimdall()
        .args(["list", "--database", &url, "--json"])
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = json
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pid"] == pid)
        .unwrap_or_else(|| panic!("backend {pid} is not in {json}"))
        .clone();
    (entry, row)
}

#[test]
fn list_names_locks_faithfully_or_says_it_cannot() {
    let dir = new_dir();
    // A namespace with a '/' of its own, and a name PostgreSQL would turn into '?'s.
    for (namespace, name) in [
        (format!("{NS}/x"), unique_name("sl")),
        (NS.to_owned(), unique_name("é")),
    ] {
        let mut holder = Running::spawn(shared_sh(
            &namespace,
            dir.path(),
            &name,
            &["--slots", "3"],
            &hold_script("h"),
        ));
        assert!(
            busy_wait(START_LIMIT, || dir.path().join("h.started").exists()),
            "{}",
            holder.stderr()
        );
        let pid = holders(&mut shared().client(), LockId::of(&namespace, &name))[0];
        let (entry, row) = listed(pid);
        assert_eq!(entry["namespace"], namespace.as_str(), "{entry}");
        assert_eq!(entry["name"], name.as_str(), "{entry}");
        assert_eq!(
            entry["lock"],
            format!("{namespace}/{name}").as_str(),
            "{entry}"
        );
        assert_eq!(entry["slot"], 0, "{entry}");
        assert!(
            row.starts_with(&format!("{namespace}/{name} ")),
            "the row names the lock: {row}"
        );
        release(dir.path(), "h");
        holder.expect_exit(0, RUN_LIMIT);
        fs::remove_file(dir.path().join("h.started")).unwrap();
        fs::remove_file(dir.path().join("h.release")).unwrap();
    }

    // An application_name in heimdall's format that does not match the key it holds: the name
    // is not printed as if it were the lock's.
    let mut client = shared().client();
    client
        .batch_execute(&format!(
            "set application_name = 'heimdall {NS}/forged @h pid 1'; select pg_advisory_lock(7, 7)"
        ))
        .unwrap();
    let (entry, row) = listed(backend_pid(&mut client));
    assert_eq!(entry["lock"], Value::Null, "{entry}");
    assert_eq!(entry["name"], Value::Null, "{entry}");
    assert_eq!(entry["slot"], Value::Null, "{entry}");
    assert!(
        row.starts_with("unknown name") && !row.contains("forged "),
        "{row}"
    );
}

#[test]
fn the_key_subcommand_prints_the_documented_keys() {
    let key = |extra: &[&str]| {
        let out = heimdall()
            .args(["key", "--namespace", "joker", "--name", "test"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        stdout_of(&out)
    };
    let text = key(&[]);
    assert!(text.contains("keys:     614772915,-849833650 "), "{text}");
    assert!(
        text.contains("classid=614772915 objid=3445133646 objsubid=2"),
        "{text}"
    );
    assert!(
        text.contains("SELECT ") && text.contains("pg_locks"),
        "{text}"
    );
    let text = key(&["--hash", "fnv1"]);
    assert!(text.contains("keys:     856429646,-1137964055 "), "{text}");
    let text = key(&["--slots", "2"]);
    assert!(text.contains("614772915,-849833649 (slot 1)"), "{text}");

    let json: Value = serde_json::from_str(&key(&["--slots", "2", "--json"])).unwrap();
    assert_eq!(json["keys"], "614772915,-849833650", "{json}");
    assert_eq!(json["hash"], "siphash", "{json}");
    assert_eq!(json["slots"][1]["keys"], "614772915,-849833649", "{json}");
    assert!(
        json["query"].as_str().unwrap().contains("pg_locks"),
        "{json}"
    );
    let json: Value = serde_json::from_str(&key(&["--hash", "fnv1", "--json"])).unwrap();
    assert_eq!(json["keys"], "856429646,-1137964055", "{json}");
}

// ---------------------------------------------------------------------------
// What the command learns
// ---------------------------------------------------------------------------

#[test]
fn fencing_tokens_strictly_increase_across_runs() {
    let dir = new_dir();
    let name = unique_name("fencing");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let out = locked(dir.path(), &name)
            .args([
                "--",
                "sh",
                "-c",
                "echo \"$HEIMDALL_FENCING_TOKEN $HEIMDALL_LOCK_HELD $HEIMDALL_NAMESPACE $HEIMDALL_NAME\"",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        let text = stdout_of(&out);
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(fields[1..], ["1", NS, name.as_str()], "{text}");
        tokens.push(fields[0].parse::<i64>().unwrap());
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens do not increase: {tokens:?}"
    );
}

// ---------------------------------------------------------------------------
// heimdall inside heimdall
// ---------------------------------------------------------------------------

/// An outer heimdall on `NS/outer` with `flags`, running `script`, with `$HB` (the binary),
/// `$URL`, `$NS` and `$INNER` (the inner lock name) in the script's environment.
fn nested(
    dir: &Path,
    outer: &str,
    inner: &str,
    flags: &[&str],
    script: &str,
) -> std::process::Output {
    locked(dir, outer)
        .env("HB", env!("CARGO_BIN_EXE_heimdall"))
        .env("URL", shared().url())
        .env("NS", NS)
        .env("INNER", inner)
        .args(flags)
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap()
}

#[test]
fn a_heimdall_inside_the_command_runs_directly_under_the_same_lock() {
    let dir = new_dir();
    let name = unique_name("reentrant");
    let out = nested(
        dir.path(),
        &name,
        &name,
        &[],
        "\"$HB\" --database \"$URL\" --namespace \"$NS\" --name \"$INNER\" -v -- \
         sh -c 'echo inner; exit 7'; echo \"inner-exit=$?\"",
    );
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout_of(&out), "inner\ninner-exit=7\n", "{stderr}");
    assert!(stderr.contains("already held"), "{stderr}");
}

#[test]
fn a_heimdall_inside_the_command_takes_a_different_lock_itself() {
    let dir = new_dir();
    let (outer, inner) = (unique_name("outer"), unique_name("inner"));
    // The inner command asks `status` about the inner lock: held (75) while it runs.
    let out = nested(
        dir.path(),
        &outer,
        &inner,
        &[],
        "\"$HB\" --database \"$URL\" --namespace \"$NS\" --name \"$INNER\" -v -- \
         sh -c 'echo \"name=$HEIMDALL_NAME\"; \
                \"$HB\" status --database \"$URL\" --namespace \"$NS\" --name \"$INNER\" >/dev/null; \
                echo \"status=$?\"'",
    );
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stdout_of(&out),
        format!("name={inner}\nstatus=75\n"),
        "{stderr}"
    );
    assert!(!stderr.contains("already held"), "{stderr}");
    assert!(
        stderr.contains(&format!("acquired lock {NS}/{inner} ")),
        "{stderr}"
    );
}

/// While another heimdall holds `NS/name` with `holder_flags`, an outer heimdall on the same
/// lock with `outer_flags` runs `before` (shell) and then a plain inner heimdall on the same
/// lock, which must exit 75 without running its command (`why` says why it must not). Asserts
/// the outer run exits 0 with `expected` on stdout, ending in the inner's `inner-exit=75`.
fn inner_run_beside_a_holder_is_busy(
    name: &str,
    holder_flags: &[&str],
    outer_flags: &[&str],
    before: &str,
    expected: &str,
    why: &str,
) {
    let dir = new_dir();
    let mut holder = hold(dir.path(), name, holder_flags, "holder");
    let out = nested(
        dir.path(),
        name,
        name,
        outer_flags,
        &format!(
            "{before}\"$HB\" --database \"$URL\" --namespace \"$NS\" --name \"$INNER\" -- \
             touch inner-ran; echo \"inner-exit=$?\""
        ),
    );
    let stderr = stderr_of(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout_of(&out), expected, "{stderr}");
    assert!(!dir.path().join("inner-ran").exists(), "{why}");
    release(dir.path(), "holder");
    holder.expect_exit(0, RUN_LIMIT);
}

#[test]
fn a_plain_run_inside_a_slotted_run_is_not_taken_for_already_held() {
    // Someone else holds the plain lock, which is slot 0.
    inner_run_beside_a_holder_is_busy(
        &unique_name("reentrant-slot"),
        &[],
        &["--slots", "2"],
        "echo \"slot=$HEIMDALL_SLOT\"; ",
        "slot=1\ninner-exit=75\n",
        "the inner run ran while another heimdall held the plain lock",
    );
}

#[test]
fn an_exclusive_run_inside_a_shared_run_is_not_taken_for_already_held() {
    // Another shared holder runs: an exclusive run must not.
    inner_run_beside_a_holder_is_busy(
        &unique_name("reentrant-shared"),
        &["--shared"],
        &["--shared"],
        "",
        "inner-exit=75\n",
        "the exclusive inner run ran beside another shared holder",
    );
}

#[test]
fn a_subcommand_name_after_the_options_is_a_command_and_gets_a_hint() {
    let dir = new_dir();
    let name = unique_name("not-a-subcommand");
    for args in [&["--", "status"][..], &["status"]] {
        let out = locked(dir.path(), &name).args(args).output().unwrap();
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(127), "{args:?}: {stderr}");
        assert!(stderr.contains("must be the first argument"), "{stderr}");
        assert!(stdout_of(&out).is_empty(), "{args:?} printed a status");
    }
}
