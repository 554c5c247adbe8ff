//! Signals and process groups: what heimdall forwards, how it reports a command's death by
//! signal, what `--timeout` does to the command's process group, that nothing of the command
//! outlives heimdall, and that the lock is held until the whole group is gone.
//!
//! Every test uses its own lock name, and every command runs in its own temp dir, where it
//! writes its pid (`echo $$ > pid`) once it runs: that file proves the lock is held and the
//! command started, so the tests poll for it instead of sleeping.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::new_dir;
use crate::support::procs::{
    Running, process_alive, process_state, read_pid, shared_sh, signal_group,
};
use crate::support::runs::lock_is_free;
use crate::support::{
    advisory_locks_granted, busy_wait, heimdall_std, process_group_alive, shared, unique_name,
};
use tempfile::TempDir;

const NAMESPACE: &str = "heimdall-tests-signals";
/// How long a command gets to start and write its pid file.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How long any heimdall run may take before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(20);
/// How long heimdall gets to react to a signal, or processes to vanish after one.
const REACT_LIMIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
/// Starts heimdall (see [`shared_sh`]) in a temp dir of its own, under a fresh lock name made
/// from `prefix`, and waits until the command has written its pid (`echo $$ > pid`). Returns
/// the dir, the lock name, the run and the command's pid, which is also its pgid: the command
/// leads its own process group.
fn start(prefix: &str, flags: &[&str], script: &str) -> (TempDir, String, Running, i32) {
    let dir = new_dir();
    let lock = unique_name(prefix);
    let mut run = Running::spawn(shared_sh(NAMESPACE, dir.path(), &lock, flags, script));
    let pgid = run.command_pid(dir.path(), START_LIMIT);
    (dir, lock, run, pgid)
}

/// Stops the whole group `pgid` with SIGSTOP and waits until its leader shows as stopped.
fn sigstop_group(pgid: i32) {
    signal_group(pgid, libc::SIGSTOP);
    assert!(
        busy_wait(REACT_LIMIT, || stopped(pgid)),
        "the command did not stop"
    );
}

/// Stopped, as far as the shell leading the group can be: `T`, or `D` when the STOP caught it
/// inside a vfork whose child the same STOP froze before its exec. The shell then waits,
/// uninterruptibly, until SIGCONT lets the child go on; either way it cannot exit meanwhile.
fn stopped(pgid: i32) -> bool {
    matches!(process_state(pgid), Some('T' | 'D'))
}

/// Reads the `HEIMDALL_KEY` the command wrote to `dir/key`.
fn read_key(dir: &Path) -> String {
    fs::read_to_string(dir.join("key"))
        .unwrap()
        .trim()
        .to_owned()
}
fn assert_lock_free(name: &str) {
    assert!(
        lock_is_free(NAMESPACE, name),
        "the lock {NAMESPACE}/{name} is still held after heimdall exited"
    );
}

/// Polls `pg_locks` until `alive` turns false, asserting that the lock under `key` is granted
/// whenever `alive` still holds after the query (so it held during the query). Returns how
/// many queries proved it.
fn assert_lock_held_while(key: &str, what: &str, mut alive: impl FnMut() -> bool) -> usize {
    let mut client = shared().client();
    let mut proofs = 0;
    let gone = busy_wait(RUN_LIMIT, || {
        let granted = advisory_locks_granted(&mut client, key);
        if !alive() {
            return true;
        }
        assert_eq!(
            granted, 1,
            "the lock {key} was not held while {what} still ran"
        );
        proofs += 1;
        false
    });
    assert!(gone, "{what} still runs after {RUN_LIMIT:?}");
    proofs
}
// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// The command traps `signal` (its shell name), records it and exits 3; heimdall must forward
/// the signal to the group and exit 3.
fn forwards_and_exits_with_the_commands_status(signal: i32, name: &str) {
    let script = format!(
        "trap 'echo got-{name} > got; exit 3' {name}; echo $$ > pid; while :; do sleep 0.1; done"
    );
    let (dir, lock, mut run, pgid) = start(&format!("forward-{name}"), &["-v"], &script);

    run.signal(signal);
    let stderr = run.expect_exit(3, RUN_LIMIT);

    assert_eq!(
        fs::read_to_string(dir.path().join("got")).unwrap(),
        format!("got-{name}\n")
    );
    assert!(
        stderr.contains(&format!(
            "forwarding SIG{name} to the command's process group {pgid}"
        )),
        "{stderr}"
    );
    assert!(
        !process_group_alive(pgid),
        "the command's group outlived heimdall"
    );
    assert_lock_free(&lock);
}

#[test]
fn sigterm_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGTERM, "TERM");
}

#[test]
fn sigint_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGINT, "INT");
}

#[test]
fn sighup_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGHUP, "HUP");
}

#[test]
fn command_killed_by_the_forwarded_sigterm_makes_heimdall_exit_143() {
    let (_dir, lock, mut run, pgid) =
        start("forward-untrapped", &[], "echo $$ > pid; exec sleep 60");

    run.signal(libc::SIGTERM);
    run.expect_exit(143, REACT_LIMIT);
    assert!(!process_group_alive(pgid), "the command outlived heimdall");
    assert_lock_free(&lock);
}

// ---------------------------------------------------------------------------
// Death by signal
// ---------------------------------------------------------------------------

fn command_dies_of_its_own_signal(script: &str, expected: i32) {
    let dir = new_dir();
    let lock = unique_name("self-signal");
    let mut run = Running::spawn(shared_sh(NAMESPACE, dir.path(), &lock, &["-v"], script));
    let stderr = run.expect_exit(expected, RUN_LIMIT);
    assert!(stderr.contains("command was killed by SIG"), "{stderr}");
    assert_lock_free(&lock);
}

#[test]
fn command_that_kills_itself_with_sigkill_makes_heimdall_exit_137() {
    command_dies_of_its_own_signal("kill -9 $$", 128 + libc::SIGKILL);
}

#[test]
fn command_that_dies_of_sigsegv_makes_heimdall_exit_139() {
    // No core file: the shell would otherwise leave one in the temp dir (or the system's handler).
    command_dies_of_its_own_signal("ulimit -c 0; kill -SEGV $$", 128 + libc::SIGSEGV);
}

// ---------------------------------------------------------------------------
// heimdall killed
// ---------------------------------------------------------------------------

#[test]
fn sigkill_of_heimdall_kills_the_command_and_frees_the_lock() {
    // exec: the sleep itself is heimdall's direct child, which PR_SET_PDEATHSIG covers.
    let (_dir, lock, mut run, pid) = start("sigkill-heimdall", &[], "echo $$ > pid; exec sleep 60");
    assert!(
        !lock_is_free(NAMESPACE, &lock),
        "the lock is free while the command runs"
    );

    run.signal(libc::SIGKILL);
    let (status, stderr) = run.finish(REACT_LIMIT);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}; {stderr}");

    assert!(
        busy_wait(REACT_LIMIT, || !process_alive(pid)),
        "the command (pid {pid}) outlived heimdall's SIGKILL"
    );
    // The server drops the lock as soon as it sees the closed connection.
    assert!(
        busy_wait(REACT_LIMIT, || lock_is_free(NAMESPACE, &lock)),
        "the lock {NAMESPACE}/{lock} was not freed after heimdall was killed"
    );
}

// ---------------------------------------------------------------------------
// --timeout
// ---------------------------------------------------------------------------

/// `sh -c 'sleep 60 & sleep 60'` under `flags`: heimdall must exit 124 with the whole group
/// gone and the lock free. Returns stderr.
fn timeout_stops_the_group(flags: &[&str], script: &str, name: &str) -> String {
    let started = Instant::now();
    let (dir, lock, mut run, pgid) = start(name, flags, script);
    assert!(process_group_alive(pgid));
    let key = read_key(dir.path());
    let proofs = assert_lock_held_while(&key, "the command's group", || process_group_alive(pgid));
    assert!(proofs > 0, "the group was gone before any check");

    let stderr = run.expect_exit(124, RUN_LIMIT);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "exited before the timeout"
    );
    assert!(
        stderr.contains("--timeout of 1s expired"),
        "stderr does not mention the timeout:\n{stderr}"
    );
    assert!(
        !process_group_alive(pgid),
        "processes of group {pgid} survived the timeout"
    );
    assert_lock_free(&lock);
    stderr
}

#[test]
fn timeout_stops_the_whole_process_group_and_exits_124() {
    let stderr = timeout_stops_the_group(
        &["--timeout", "1s"],
        "echo \"$HEIMDALL_KEY\" > key; echo $$ > pid; sleep 60 & sleep 60",
        "timeout",
    );
    assert!(
        !stderr.contains("SIGKILL"),
        "SIGTERM should have sufficed:\n{stderr}"
    );
}

#[test]
fn timeout_kills_a_command_that_ignores_sigterm_after_kill_after() {
    // An ignored signal stays ignored across fork and exec: both sleeps ignore TERM too.
    let stderr = timeout_stops_the_group(
        &["--timeout", "1s", "--kill-after", "1s"],
        "trap '' TERM; echo \"$HEIMDALL_KEY\" > key; echo $$ > pid; sleep 60 & sleep 60",
        "timeout-ignores-term",
    );
    assert!(
        stderr.contains("sending SIGKILL"),
        "stderr does not mention the SIGKILL:\n{stderr}"
    );
}

#[test]
fn timeout_given_as_a_bare_integer_means_seconds() {
    timeout_stops_the_group(
        &["--timeout", "1"],
        "echo \"$HEIMDALL_KEY\" > key; echo $$ > pid; sleep 60 & sleep 60",
        "timeout-bare",
    );
}

// ---------------------------------------------------------------------------
// Before the command started
// ---------------------------------------------------------------------------

#[test]
fn signal_before_the_command_started_exits_143_without_running_it() {
    let dir = new_dir();
    // A "server" that accepts the connection and never answers: heimdall waits in connect.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cmd = heimdall_std();
    cmd.current_dir(dir.path())
        .arg("--database")
        .arg(format!(
            "postgres://nobody@127.0.0.1:{port}/postgres?sslmode=disable"
        ))
        .args(["--connect-timeout", "30s"])
        .args([
            "--namespace",
            NAMESPACE,
            "--name",
            &unique_name("before-start"),
        ])
        .args(["--", "touch", "ran"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut run = Running::spawn(cmd);

    let mut connection = None;
    assert!(
        busy_wait(START_LIMIT, || {
            connection = listener.accept().ok();
            connection.is_some() || run.has_exited()
        }) && connection.is_some(),
        "heimdall never connected; stderr:\n{}",
        run.stderr()
    );

    let signalled = Instant::now();
    run.signal(libc::SIGTERM);
    let stderr = run.expect_exit(143, REACT_LIMIT);
    assert!(
        signalled.elapsed() < REACT_LIMIT,
        "heimdall waited for the connection instead of exiting"
    );
    assert!(
        stderr.contains("received SIGTERM before the command started"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("ran").exists(),
        "the command ran although the signal came first"
    );
    drop(connection);
}

// ---------------------------------------------------------------------------
// Leftover processes
// ---------------------------------------------------------------------------

fn read_bg_pid(dir: &Path) -> i32 {
    let path: PathBuf = dir.join("bgpid");
    read_pid(&path).unwrap_or_else(|| panic!("the command did not write {}", path.display()))
}

#[test]
fn leftover_background_processes_are_stopped_before_heimdall_exits() {
    let dir = new_dir();
    let lock = unique_name("leftover");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &lock,
        &[],
        "sleep 60 & echo $! > bgpid",
    ));
    let stderr = run.expect_exit(0, RUN_LIMIT);
    let bg = read_bg_pid(dir.path());

    assert!(
        !process_alive(bg),
        "the background sleep (pid {bg}) outlived heimdall"
    );
    assert!(
        stderr.contains("left processes in its process group"),
        "{stderr}"
    );
    assert_lock_free(&lock);
}

#[test]
fn lock_is_held_until_leftover_processes_that_ignore_sigterm_are_killed() {
    // The background sleep ignores TERM, so heimdall must wait --kill-after, then SIGKILL it.
    let (dir, lock, mut run, pgid) = start(
        "leftover-ignores-term",
        &["--kill-after", "2s"],
        "trap '' TERM; echo \"$HEIMDALL_KEY\" > key; sleep 60 & echo $! > bgpid; echo $$ > pid",
    );
    let key = read_key(dir.path());
    let bg = read_bg_pid(dir.path());
    // Once the shell has exited, heimdall is stopping the leftover group.
    assert!(
        busy_wait(REACT_LIMIT, || !process_alive(pgid)),
        "the shell did not exit"
    );
    assert!(
        !lock_is_free(NAMESPACE, &lock),
        "the lock was released during cleanup"
    );

    let proofs = assert_lock_held_while(&key, "the leftover sleep", || process_alive(bg));
    assert!(proofs > 0, "the leftover sleep was gone before any check");

    let stderr = run.expect_exit(0, RUN_LIMIT);
    assert!(!process_group_alive(pgid));
    assert!(stderr.contains("sending SIGKILL"), "{stderr}");
    let mut client = shared().client();
    assert_eq!(
        advisory_locks_granted(&mut client, &key),
        0,
        "pg_locks after heimdall exited"
    );
    assert_lock_free(&lock);
}

// ---------------------------------------------------------------------------
// Job control
// ---------------------------------------------------------------------------

#[test]
fn stopped_and_continued_command_is_waited_for_and_keeps_its_status() {
    let (dir, lock, mut run, pgid) = start(
        "stop-cont",
        &[],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; exit 7",
    );

    sigstop_group(pgid);
    fs::write(dir.path().join("go"), "").unwrap();
    // A stopped command has not ended: heimdall keeps waiting, and keeps the lock.
    assert!(
        !busy_wait(Duration::from_millis(300), || run.has_exited()),
        "heimdall exited while the command was stopped; stderr:\n{}",
        run.stderr()
    );
    assert!(stopped(pgid), "state {:?}", process_state(pgid));
    assert!(
        !lock_is_free(NAMESPACE, &lock),
        "the lock was released while stopped"
    );

    signal_group(pgid, libc::SIGCONT);
    let stderr = run.expect_exit(7, RUN_LIMIT);
    assert!(!stderr.contains("left processes"), "{stderr}");
    assert_lock_free(&lock);
}

/// coreutils `timeout` follows a forwarded TERM/INT/HUP with SIGCONT, and heimdall's own
/// `stop_group` sends SIGCONT too; a plain forward does not, and Linux keeps a stopped process
/// stopped with the TERM pending, so heimdall (and the lock) wait until someone continues it.
#[test]
fn sigterm_to_heimdall_ends_a_stopped_command() {
    let (_dir, lock, mut run, pgid) = start("stopped-term", &[], "echo $$ > pid; exec sleep 60");
    sigstop_group(pgid);

    run.signal(libc::SIGTERM);
    run.expect_exit(143, REACT_LIMIT);
    assert!(
        !process_group_alive(pgid),
        "the stopped command outlived heimdall"
    );
    assert_lock_free(&lock);
}
