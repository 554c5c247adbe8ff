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

use crate::support::procs::{
    Job, Running, process_alive, process_state, read_pid, shared_sh, signal_group,
};
use crate::support::runs::lock_is_free;
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, START_LIMIT, busy_wait, heimdall_std, new_dir, process_group_alive,
    unique_name,
};

const NAMESPACE: &str = "heimdall-tests-signals";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------
/// Starts heimdall in a temp dir of its own, under a fresh lock name made from `prefix`, and
/// waits until the command has written its pid (`echo $$ > pid`): see [`Job`].
fn start(prefix: &str, flags: &[&str], script: &str) -> Job {
    Job::start(NAMESPACE, prefix, flags, script)
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

fn assert_lock_free(name: &str) {
    assert!(
        lock_is_free(NAMESPACE, name),
        "the lock {NAMESPACE}/{name} is still held after heimdall exited"
    );
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// The command traps `signal` (its shell name), records it and exits 3; heimdall must forward
/// the signal to the group and exit 3. (No core file: SIGQUIT's default action dumps one for
/// the group's `sleep`.)
fn forwards_and_exits_with_the_commands_status(signal: i32, name: &str) {
    let script = format!(
        "ulimit -c 0; trap 'echo got-{name} > got; exit 3' {name}; echo $$ > pid; while :; do sleep 0.1; done"
    );
    let mut job = start(&format!("forward-{name}"), &["-v"], &script);

    job.run.signal(signal);
    let stderr = job.run.expect_exit(3, RUN_LIMIT);

    assert_eq!(
        fs::read_to_string(job.path("got")).unwrap_or_default(),
        format!("got-{name}\n"),
        "the command never got SIG{name}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "forwarding SIG{name} to the command's process group {}",
            job.pgid
        )),
        "{stderr}"
    );
    assert!(
        !process_group_alive(job.pgid),
        "the command's group outlived heimdall"
    );
    assert_lock_free(&job.name);
}

/// heimdall started as a background job of a non-interactive shell is (`heimdall … &` in a
/// script, and so a CI runner's steps): with SIGINT and SIGQUIT ignored. It still forwards
/// them, and the command gets them with their default action, so its trap runs; a shell cannot
/// trap a signal ignored when it started, and the command would run on past heimdall's signal.
#[test]
fn signals_ignored_when_heimdall_started_still_reach_the_commands_trap() {
    use std::os::unix::process::CommandExt;
    for (signal, name) in [(libc::SIGINT, "INT"), (libc::SIGQUIT, "QUIT")] {
        let dir = new_dir();
        let lock = unique_name(&format!("ignored-{name}"));
        let script = format!(
            "ulimit -c 0; trap 'echo got-{name} > got; exit 3' {name}; echo $$ > pid; while :; do sleep 0.1; done"
        );
        let mut cmd = shared_sh(NAMESPACE, dir.path(), &lock, &["-v"], &script);
        // SAFETY: signal(2) is async-signal-safe; the hook runs in the forked child only.
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGQUIT, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut run = Running::spawn(cmd);
        let pgid = run.command_pid(dir.path(), START_LIMIT);
        run.signal(signal);
        let stderr = run.expect_exit(3, REACT_LIMIT);
        assert_eq!(
            fs::read_to_string(dir.path().join("got")).unwrap_or_default(),
            format!("got-{name}\n"),
            "the command's trap never ran for SIG{name}; stderr:\n{stderr}"
        );
        assert!(
            !process_group_alive(pgid),
            "the command's group outlived heimdall"
        );
        assert!(lock_is_free(NAMESPACE, &lock), "the lock is still held");
    }
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
fn sigquit_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGQUIT, "QUIT");
}

#[test]
fn sigusr1_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGUSR1, "USR1");
}

#[test]
fn sigusr2_is_forwarded_and_heimdall_exits_with_the_commands_status() {
    forwards_and_exits_with_the_commands_status(libc::SIGUSR2, "USR2");
}

/// heimdall blocks the signals it handles (its signal thread takes them with sigwaitinfo); the
/// command must start with the mask heimdall was given, neither heimdall's nor an empty one.
#[test]
fn the_command_starts_with_the_signal_mask_heimdall_inherited() {
    use std::os::unix::process::CommandExt;
    let mut cmd = heimdall_std();
    cmd.args(["--database", &crate::support::shared().url()])
        .args(["--namespace", NAMESPACE, "--name", &unique_name("mask")])
        .args(["--", "grep", "^SigBlk:", "/proc/self/status"]);
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let usr1 = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        set
    };
    // SAFETY: the hook runs between fork and exec and only calls sigprocmask, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::sigprocmask(libc::SIG_SETMASK, &usr1, std::ptr::null_mut());
            Ok(())
        });
    }
    let out = crate::support::output_of(&mut cmd);
    assert!(
        out.status.success(),
        "{}",
        crate::support::text(&out.stderr)
    );
    // SIGUSR1 (10) alone: bit 9.
    assert_eq!(
        crate::support::text(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["SigBlk:", "0000000000000200"],
        "the command's blocked signals are not the ones heimdall was started with"
    );
}

#[test]
fn command_killed_by_the_forwarded_sigterm_makes_heimdall_exit_143() {
    let mut job = start("forward-untrapped", &[], "echo $$ > pid; exec sleep 600");

    job.run.signal(libc::SIGTERM);
    job.run.expect_exit(143, REACT_LIMIT);
    assert!(
        !process_group_alive(job.pgid),
        "the command outlived heimdall"
    );
    assert_lock_free(&job.name);
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
    let mut job = start("sigkill-heimdall", &[], "echo $$ > pid; exec sleep 600");
    let (lock, pid) = (job.name.clone(), job.pgid);
    assert!(
        !lock_is_free(NAMESPACE, &lock),
        "the lock is free while the command runs"
    );

    job.run.signal(libc::SIGKILL);
    let (status, stderr) = job.run.finish(REACT_LIMIT);
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

/// A command whose leader outlives the timeout's SIGTERM until the test says `go`: it traps
/// TERM, notes it in `term` and waits; the rest of its group (two sleeps) dies of the TERM.
const LINGERS_AFTER_TERM: &str = "trap 'touch term; while [ ! -e go ]; do sleep 0.05; done; exit 143' TERM; \
     echo $$ > pid; sleep 600 & sleep 600";

/// A [`LINGERS_AFTER_TERM`] command under `--timeout` given as `timeout`: once the timeout's
/// SIGTERM has come, heimdall still holds the lock (a waiter stays queued) while the leader
/// lives; when it exits, heimdall exits 124, and the waiter runs only with the whole group gone.
/// Returns heimdall's stderr.
fn timeout_stops_the_group(timeout: &str, prefix: &str) -> String {
    let started = Instant::now();
    // --kill-after far beyond the test: a SIGKILL would mean the TERM did not do.
    let mut job = start(
        prefix,
        &["--timeout", timeout, "--kill-after", "120s"],
        LINGERS_AFTER_TERM,
    );
    let waiter = job.queue_waiter();
    let term = job.path("term");
    assert!(
        busy_wait(RUN_LIMIT, || term.exists()),
        "the command never got the timeout's SIGTERM; stderr:\n{}",
        job.run.stderr()
    );
    assert!(
        !job.run.has_exited() && !lock_is_free(NAMESPACE, &job.name),
        "heimdall let go while the command's leader still ran; stderr:\n{}",
        job.run.stderr()
    );
    fs::write(job.path("go"), "").unwrap();
    job.assert_waiter_ran_alone(waiter);
    let stderr = job.run.expect_exit(124, RUN_LIMIT);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "exited before the timeout"
    );
    assert!(
        stderr.contains("--timeout of 1s expired"),
        "stderr does not mention the timeout:\n{stderr}"
    );
    assert!(
        !process_group_alive(job.pgid),
        "processes of group {} survived the timeout",
        job.pgid
    );
    stderr
}

#[test]
fn timeout_stops_the_whole_process_group_and_exits_124() {
    let stderr = timeout_stops_the_group("1s", "timeout");
    assert!(
        !stderr.contains("SIGKILL"),
        "SIGTERM should have sufficed:\n{stderr}"
    );
}

#[test]
fn timeout_given_as_a_bare_integer_means_seconds() {
    timeout_stops_the_group("1", "timeout-bare");
}

#[test]
fn timeout_kills_a_command_that_ignores_sigterm_after_kill_after() {
    // An ignored signal stays ignored across fork and exec: both sleeps ignore TERM too, and
    // only the SIGKILL after --kill-after ends them. The waiter queues within timeout +
    // kill-after, and runs only once the whole group is gone.
    let mut job = start(
        "timeout-ignores-term",
        &["--timeout", "1s", "--kill-after", "3s"],
        "trap '' TERM; echo $$ > pid; sleep 600 & sleep 600",
    );
    let waiter = job.queue_waiter();
    job.assert_waiter_ran_alone(waiter);
    let stderr = job.run.expect_exit(124, RUN_LIMIT);
    assert!(
        stderr.contains("--timeout of 1s expired") && stderr.contains("sending SIGKILL"),
        "stderr does not mention the timeout and the SIGKILL:\n{stderr}"
    );
    assert!(
        !process_group_alive(job.pgid),
        "processes of group {} survived the timeout",
        job.pgid
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
        "sleep 600 & echo $! > bgpid",
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
    // The background sleep ignores TERM, so heimdall must wait --kill-after, then SIGKILL it;
    // the shell leaves it behind only once a waiter is queued, so the waiter sees the cleanup.
    let mut job = start(
        "leftover-ignores-term",
        &["--kill-after", "2s"],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; trap '' TERM; sleep 600 & echo $! > bgpid",
    );
    let waiter = job.queue_waiter();
    fs::write(job.path("go"), "").unwrap();
    job.assert_waiter_ran_alone(waiter);
    let stderr = job.run.expect_exit(0, RUN_LIMIT);
    let bg = read_bg_pid(job.dir.path());
    assert!(!process_alive(bg), "the leftover sleep outlived heimdall");
    assert!(!process_group_alive(job.pgid));
    assert!(stderr.contains("sending SIGKILL"), "{stderr}");
}

// ---------------------------------------------------------------------------
// Job control
// ---------------------------------------------------------------------------

#[test]
fn stopped_and_continued_command_is_waited_for_and_keeps_its_status() {
    let mut job = start(
        "stop-cont",
        &[],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; exit 7",
    );
    let (lock, pgid, run) = (job.name.clone(), job.pgid, &mut job.run);

    sigstop_group(pgid);
    fs::write(job.dir.path().join("go"), "").unwrap();
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
    let mut job = start("stopped-term", &[], "echo $$ > pid; exec sleep 600");
    let (lock, pgid) = (job.name.clone(), job.pgid);
    sigstop_group(pgid);

    job.run.signal(libc::SIGTERM);
    job.run.expect_exit(143, REACT_LIMIT);
    assert!(
        !process_group_alive(pgid),
        "the stopped command outlived heimdall"
    );
    assert_lock_free(&lock);
}
