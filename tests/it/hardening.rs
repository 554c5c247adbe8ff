//! No step of the job outlives its lock (issue 11): heimdall's own death (SIGKILL, a set-user-ID
//! command that loses the parent-death signal), every catchable fatal signal, a closed or
//! broken stderr, zombies under the subreaper, leftovers outside the process group's direct
//! children, re-entrancy that must be proved, and durations too long to mean anything.
//!
//! Every test uses its own lock name and temp dir. Commands write their pids to files, and the
//! tests poll for those instead of sleeping.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::locks::{LockId, holders};
use crate::support::new_dir;
use crate::support::procs::{
    Frozen, Job, Running, children_of, comm_of, keeper_of, process_alive, process_state, read_pid,
    shared_sh,
};
use crate::support::runs::{Holder, lock_is_free, locked, locked_std};
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, START_LIMIT, busy_wait, heimdall, process_group_alive, require_root,
    shared, text, unique_name, wait_child,
};

pub(crate) const NAMESPACE: &str = "heimdall-tests-hardening";

/// Starts heimdall in a temp dir of its own, under a fresh lock name made from `prefix`, and
/// waits until the command has written its pid (`echo $$ > pid`): see [`Job`].
fn start(prefix: &str, flags: &[&str], script: &str) -> Job {
    Job::start(NAMESPACE, prefix, flags, script)
}
/// The pids a command appended to `dir/pids`, one per line, once there are `count` of them.
pub(crate) fn wait_pids(dir: &Path, count: usize) -> Vec<i32> {
    let path = dir.join("pids");
    let mut pids = Vec::new();
    let complete = busy_wait(START_LIMIT, || {
        pids = fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        pids.len() >= count
    });
    assert!(
        complete,
        "the command wrote only {pids:?} to {}",
        path.display()
    );
    pids
}

/// A second heimdall on the same lock that waits for it, then touches `dir/second-holds` and
/// keeps the lock until dropped (at most ~30 s).
pub(crate) fn second_run(dir: &Path, name: &str) -> Running {
    Running::spawn(shared_sh(
        NAMESPACE,
        dir,
        name,
        &["--wait=30s"],
        "touch second-holds; sleep 30",
    ))
}

/// Terminates the backend that holds the lock whose `HEIMDALL_KEY` the command wrote to
/// `dir/key`.
pub(crate) fn terminate_holder(dir: &Path) {
    let path = dir.join("key");
    assert!(busy_wait(START_LIMIT, || fs::read_to_string(&path)
        .is_ok_and(|k| k.ends_with('\n'))));
    let key = fs::read_to_string(&path).unwrap();
    let mut client = shared().client();
    let backends = holders(&mut client, LockId::from_key(&key));
    assert_eq!(backends.len(), 1, "one backend holds {key}");
    let done: bool = client
        .query_one("select pg_terminate_backend($1)", &[&backends[0]])
        .unwrap()
        .get(0);
    assert!(done, "pg_terminate_backend({}) returned false", backends[0]);
}

/// SIGKILLs heimdall, lets a second run take the lock (see [`second_run`]), and asserts that
/// none of `steps` of the first run is alive while the second one holds it.
pub(crate) fn sigkill_then_no_step_under_the_next_holder(
    run: &Running,
    dir: &Path,
    name: &str,
    steps: &[i32],
) {
    run.signal(libc::SIGKILL);
    let mut second = second_run(dir, name);
    let holds = dir.join("second-holds");
    assert!(
        busy_wait(RUN_LIMIT, || holds.exists()),
        "the second run never got the lock: {}",
        second.stderr()
    );
    let alive: Vec<i32> = steps
        .iter()
        .copied()
        .filter(|&p| process_alive(p))
        .collect();
    assert!(
        alive.is_empty(),
        "steps {alive:?} of the first run still ran while the second run held the lock"
    );
    second.signal(libc::SIGTERM);
    second.finish(RUN_LIMIT);
}

/// Lets every step that waits for `dir/go` go on, and asserts that none of them writes to
/// `dir/log`: the steps in `pids` must all be gone, so nothing may come. A step that survived
/// writes at once, and the test waits for that.
fn assert_no_late_write(dir: &Path, pids: &[i32]) {
    fs::write(dir.join("go"), "").unwrap();
    let log = dir.join("log");
    busy_wait(REACT_LIMIT, || {
        log.exists() || pids.iter().all(|&p| !process_alive(p))
    });
    assert!(
        !log.exists(),
        "a step of the job wrote after heimdall had stopped it: {:?}",
        fs::read_to_string(&log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------
// heimdall's own death
// ---------------------------------------------------------------------------

/// sh → sh → sh → sleep in the foreground, and a background loop; every pid in `pids`. Each
/// step writes to `log` once it is let go (`go`), which a step that outlived heimdall would.
const THREE_LEVELS: &str = r#"echo $$ > pid
sh -c 'echo $$ >> pids; while [ ! -e go ]; do sleep 0.05; done; echo bg >> log' &
sh -c 'echo $$ >> pids; sh -c "echo \$\$ >> pids; sleep 600 & echo \$! >> pids; while [ ! -e go ]; do sleep 0.05; done; echo step >> log"; echo after >> log'
"#;

#[test]
fn sigkill_of_heimdall_stops_every_step_before_a_second_run_holds_the_lock() {
    let job = start("sigkill-tree", &[], THREE_LEVELS);
    let mut steps = wait_pids(job.dir.path(), 4);
    steps.push(job.pgid);
    sigkill_then_no_step_under_the_next_holder(&job.run, job.dir.path(), &job.name, &steps);
    assert_no_late_write(job.dir.path(), &steps);
}

/// A heimdall of another lock inside the job, whose command started a `setsid` daemon: when
/// the outer heimdall is SIGKILLed, its keeper kills the inner heimdall but waits for the inner
/// keeper, which kills the daemon, before the outer lock can go.
#[test]
fn sigkill_of_heimdall_stops_a_daemon_started_under_a_nested_heimdall() {
    let name = unique_name("sigkill-nested");
    let script = format!(
        "echo $$ > pid; {heimdall} --database {url} --namespace {NAMESPACE} --name {name}-inner -- \
         sh -c 'setsid sh -c \"echo \\$\\$ >> pids; while [ ! -e go ]; do sleep 0.05; done; echo daemon >> log\" > /dev/null 2>&1 & sleep 30'",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let job = Job::start_in(new_dir(), &shared().url(), NAMESPACE, &name, &[], &script);
    let daemon = wait_pids(job.dir.path(), 1)[0];
    sigkill_then_no_step_under_the_next_holder(&job.run, job.dir.path(), &job.name, &[daemon]);
    assert_no_late_write(job.dir.path(), &[daemon]);
}

/// Freezes `heimdall`'s keeper, runs `end_heimdall` (after which heimdall is gone), and returns
/// whether the job's process `pid` still ran and the lock `id` was still held then, before the
/// keeper is let go.
fn with_the_keeper_frozen(
    heimdall: i32,
    pid: i32,
    id: LockId,
    end_heimdall: impl FnOnce(),
) -> (bool, bool) {
    let frozen = Frozen::freeze(keeper_of(heimdall));
    end_heimdall();
    let runs = process_alive(pid);
    let held = holders(&mut shared().client(), id).len() == 1;
    drop(frozen);
    (runs, held)
}

/// Polls until `id` is free, asserting at each look that found it free that nothing of group
/// `pgid` runs: a process alive after a look found the lock free was alive at that look.
fn assert_group_gone_when_the_lock_is(id: LockId, pgid: i32, what: &str) {
    let mut client = shared().client();
    let freed = busy_wait(RUN_LIMIT, || {
        if holders(&mut client, id).is_empty() {
            assert!(
                !process_group_alive(pgid),
                "the lock was free while {what} (group {pgid}) still ran"
            );
            return true;
        }
        false
    });
    assert!(freed, "the lock stayed held after {what} was gone");
}

/// The keeper holds a copy of the connection: while it has not finished (here: it is frozen),
/// the server cannot see the session end, so the lock stays held although heimdall is dead, and
/// the job it has not yet stopped still runs.
#[test]
fn the_lock_stays_held_until_the_keeper_has_stopped_the_job() {
    // The shell dies with heimdall (its parent-death signal); the sleep is the keeper's to stop.
    let mut job = start(
        "keeper-holds",
        &[],
        "sleep 600 & echo $! > bgpid; echo \"$HEIMDALL_KEY\" > key; echo $$ > pid; wait",
    );
    let bg = read_pid(&job.path("bgpid")).expect("the command wrote its sleep's pid");
    let id = LockId::from_key(&fs::read_to_string(job.path("key")).unwrap());
    let (job_runs, held) = with_the_keeper_frozen(job.run.pid(), bg, id, || {
        job.run.signal(libc::SIGKILL);
        // Not `finish`: the frozen keeper holds heimdall's stderr open.
        assert!(busy_wait(REACT_LIMIT, || job.run.has_exited()));
    });
    assert!(
        job_runs,
        "the job's sleep {bg} was gone although the keeper, which alone stops it, was frozen"
    );
    assert!(
        held,
        "the lock was free while the keeper had not yet stopped the job"
    );
    assert_group_gone_when_the_lock_is(id, job.pgid, "the job");
    assert!(
        !process_alive(bg),
        "the keeper did not stop the job's sleep"
    );
}

#[test]
fn sigkill_of_heimdall_stops_a_set_user_id_command_that_lost_the_parent_death_signal() {
    require_root("making a set-user-ID program owned by another user");
    let dir = new_dir();
    let sleeper = dir.path().join("sleep-as-nobody");
    fs::copy("/bin/sleep", &sleeper).unwrap();
    let chown = Command::new("chown")
        .arg("nobody")
        .arg(&sleeper)
        .status()
        .unwrap();
    assert!(chown.success());
    let chmod = Command::new("chmod")
        .arg("4755")
        .arg(&sleeper)
        .status()
        .unwrap();
    assert!(chmod.success());
    // The temp dir must be traversable by nobody's credentials for exec to proceed.
    let chmod_dir = Command::new("chmod")
        .arg("755")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(chmod_dir.success());

    let job = Job::start_in(
        dir,
        &shared().url(),
        NAMESPACE,
        &unique_name("sigkill-setuid"),
        &[],
        "echo $$ > pid; exec ./sleep-as-nobody 30",
    );
    let pid = job.pgid;
    // Only a set-user-ID exec loses PR_SET_PDEATHSIG: make sure it was one.
    let switched = busy_wait(START_LIMIT, || {
        fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.contains("65534"))
        })
    });
    assert!(
        switched,
        "the command never ran as nobody (a nosuid mount?)"
    );
    sigkill_then_no_step_under_the_next_holder(&job.run, job.dir.path(), &job.name, &[pid]);
}

/// A keeper killed by someone else is reported; the run goes on, and still stops what its
/// command leaves behind.
#[test]
fn a_killed_keeper_is_reported_and_the_run_goes_on() {
    let mut job = start(
        "keeper-killed",
        &[],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; sleep 30 & echo $! >> pids",
    );
    let (dir, run) = (&job.dir, &mut job.run);
    let keeper = keeper_of(run.pid());
    // SAFETY: plain syscall on a process this test started (through heimdall).
    unsafe { libc::kill(keeper, libc::SIGKILL) };
    assert!(busy_wait(REACT_LIMIT, || run
        .stderr()
        .contains("keeper process")));
    fs::write(dir.path().join("go"), "").unwrap();
    let stderr = run.expect_exit(0, RUN_LIMIT);
    let background = wait_pids(dir.path(), 1)[0];
    assert!(!process_alive(background), "{stderr}");
}

// ---------------------------------------------------------------------------
// heimdall's own failure (exit 125)
// ---------------------------------------------------------------------------

/// A heimdall that fails inside once its command runs, when the test says so. Nothing outside
/// heimdall can make it fail there on its own, so a fault is injected: heimdall runs under
/// strace, whose second `pipe2` in heimdall's main thread (the first is the job's marking
/// descriptor, made just before the spawn; the second the watchdog's, just after the command
/// started) stops heimdall with SIGSTOP and then fails with EMFILE (too many open files) once
/// heimdall is continued ([`FailingHeimdall::fail_now`]). Should the order of those calls
/// change, the command never starts before the stop, and the test says so.
struct FailingHeimdall {
    /// strace, whose exit status is heimdall's.
    run: Running,
    /// heimdall itself, strace's child.
    heimdall: i32,
    pgid: i32,
    name: String,
    dir: tempfile::TempDir,
}

impl FailingHeimdall {
    /// Starts the job (`script` must `echo $$ > pid`) and returns once heimdall is stopped at
    /// the injected fault, its command running.
    fn start(prefix: &str, script: &str) -> FailingHeimdall {
        assert!(
            Command::new("strace").arg("-V").output().is_ok(),
            "the exit-125 tests inject a fault with strace: `apt-get install strace` \
             (scripts/ensure-deps does it)"
        );
        let dir = new_dir();
        let name = unique_name(prefix);
        let cmd = shared_sh(NAMESPACE, dir.path(), &name, &[], script);
        let mut under = crate::support::run_under(
            "strace",
            &[
                "-o",
                "/dev/null",
                "-e",
                "trace=pipe2",
                "-e",
                "inject=pipe2:error=EMFILE:signal=SIGSTOP:when=2",
                "--",
            ],
            &cmd,
        );
        under
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut run = Running::spawn(under);
        let pgid = run.command_pid(dir.path(), START_LIMIT);
        let mut heimdall = None;
        busy_wait(START_LIMIT, || {
            heimdall = children_of(run.pid())
                .into_iter()
                .find(|&pid| matches!(process_state(pid), Some('t' | 'T')));
            heimdall.is_some()
        });
        let heimdall = heimdall.unwrap_or_else(|| {
            panic!(
                "heimdall never stopped at the injected fault; stderr:\n{}",
                run.stderr()
            )
        });
        FailingHeimdall {
            run,
            heimdall,
            pgid,
            name,
            dir,
        }
    }

    /// Lets heimdall go on into its failure, and waits until it has exited.
    fn fail_now(&mut self) {
        // SAFETY: plain syscall; heimdall is strace's unreaped child, stopped.
        assert_eq!(unsafe { libc::kill(self.heimdall, libc::SIGCONT) }, 0);
        // Not `finish`: a frozen keeper holds heimdall's stderr open.
        assert!(
            busy_wait(RUN_LIMIT, || self.run.has_exited()),
            "heimdall did not exit after its fault; stderr:\n{}",
            self.run.stderr()
        );
    }

    /// heimdall's exit: 125 and one line naming what failed.
    fn assert_failed_inside(&mut self) {
        let stderr = self.run.expect_exit(125, RUN_LIMIT);
        assert!(
            stderr.contains("heimdall: cannot start the watchdog: ")
                && stderr.contains("Too many open files"),
            "{stderr}"
        );
    }
}

#[test]
fn an_internal_error_after_the_command_started_exits_125_and_sigkills_the_job_group() {
    let mut failing = FailingHeimdall::start(
        "internal-error",
        "sleep 600 & echo $! > bgpid; echo $$ > pid; wait",
    );
    let bg = read_pid(&failing.dir.path().join("bgpid")).expect("the job wrote its sleep's pid");
    // Frozen, the keeper cannot stop the job: only heimdall's own SIGKILL to the group can.
    let frozen = Frozen::freeze(keeper_of(failing.heimdall));
    failing.fail_now();
    let stopped = busy_wait(REACT_LIMIT, || !process_group_alive(failing.pgid));
    let left = (process_alive(failing.pgid), process_alive(bg));
    drop(frozen);
    assert!(
        stopped,
        "heimdall exited on an internal error and left its job running (leader, sleep alive: {left:?})"
    );
    failing.assert_failed_inside();
    assert!(lock_is_free(NAMESPACE, &failing.name));
}

/// After an internal error heimdall is gone, but a step of its job that left the process group
/// (a `setsid` daemon) still runs until the keeper stops it: the lock must stay held until then.
/// Here the keeper is frozen, so the daemon runs on, and the lock must stay held.
#[test]
fn an_internal_error_keeps_the_lock_held_until_the_keeper_has_stopped_the_job() {
    let mut failing = FailingHeimdall::start(
        "internal-error-daemon",
        "setsid sh -c 'echo $$ > daemon; exec sleep 600' > /dev/null 2>&1 < /dev/null & \
         echo $$ > pid; while [ ! -s daemon ]; do sleep 0.05; done; wait",
    );
    let daemon_file = failing.dir.path().join("daemon");
    assert!(busy_wait(START_LIMIT, || read_pid(&daemon_file).is_some()));
    let daemon = read_pid(&daemon_file).unwrap();
    let id = LockId::of(NAMESPACE, &failing.name);
    let (daemon_runs, held) =
        with_the_keeper_frozen(failing.heimdall, daemon, id, || failing.fail_now());
    assert!(
        daemon_runs,
        "the daemon {daemon} died although the keeper was frozen"
    );
    assert!(
        held,
        "the lock was free after heimdall's internal error while its job's daemon {daemon} still ran"
    );
    failing.assert_failed_inside();
    assert!(
        busy_wait(RUN_LIMIT, || !process_alive(daemon)),
        "the keeper did not stop the daemon"
    );
}

// ---------------------------------------------------------------------------
// Signals heimdall did not catch
// ---------------------------------------------------------------------------

/// `signal` to heimdall stops the whole job (a background step included), releases the lock and
/// ends heimdall with 128+N.
fn fatal_signal_stops_the_job(signal: i32, prefix: &str) {
    let mut job = start(
        prefix,
        &["--kill-after", "2s"],
        "sleep 30 & echo $! >> pids; echo $$ > pid; wait",
    );
    let (name, pgid, run) = (&job.name, job.pgid, &mut job.run);
    let background = wait_pids(job.dir.path(), 1)[0];

    run.signal(signal);
    let (status, stderr) = run.finish(RUN_LIMIT);
    assert_eq!(
        status.code(),
        Some(128 + signal),
        "heimdall ended with {status} (signal {:?}); stderr:\n{stderr}",
        status.signal()
    );
    assert!(!process_group_alive(pgid), "the command outlived heimdall");
    assert!(
        !process_alive(background),
        "a background step outlived heimdall"
    );
    assert!(
        lock_is_free(NAMESPACE, name),
        "the lock is still held after heimdall exited"
    );
}

#[test]
fn sigalrm_stops_the_job_releases_the_lock_and_exits_142() {
    fatal_signal_stops_the_job(libc::SIGALRM, "sigalrm");
}

#[test]
fn sigxcpu_stops_the_job_releases_the_lock_and_exits_152() {
    fatal_signal_stops_the_job(libc::SIGXCPU, "sigxcpu");
}

#[test]
fn sigxfsz_stops_the_job_releases_the_lock_and_exits_153() {
    fatal_signal_stops_the_job(libc::SIGXFSZ, "sigxfsz");
}

#[test]
fn sigvtalrm_stops_the_job_releases_the_lock_and_exits_154() {
    fatal_signal_stops_the_job(libc::SIGVTALRM, "sigvtalrm");
}

#[test]
fn sigprof_stops_the_job_releases_the_lock_and_exits_155() {
    fatal_signal_stops_the_job(libc::SIGPROF, "sigprof");
}

#[test]
fn sigpwr_stops_the_job_releases_the_lock_and_exits_158() {
    fatal_signal_stops_the_job(libc::SIGPWR, "sigpwr");
}

#[test]
fn sigsys_stops_the_job_releases_the_lock_and_exits_159() {
    fatal_signal_stops_the_job(libc::SIGSYS, "sigsys");
}

#[test]
fn sigtrap_stops_the_job_releases_the_lock_and_exits_133() {
    fatal_signal_stops_the_job(libc::SIGTRAP, "sigtrap");
}

#[test]
fn a_real_time_signal_stops_the_job_releases_the_lock_and_exits_128_plus_n() {
    fatal_signal_stops_the_job(libc::SIGRTMIN() + 3, "sigrt");
}

// ---------------------------------------------------------------------------
// A broken stderr
// ---------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Stderr {
    /// `2>&-`
    Closed,
    /// A pipe whose reader has gone away.
    BrokenPipe,
}

impl Stderr {
    fn apply(self, cmd: &mut Command) {
        match self {
            Stderr::Closed => {
                cmd.stderr(Stdio::inherit());
                // SAFETY: close is async-signal-safe; the closure allocates nothing.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::close(2);
                        Ok(())
                    });
                }
            }
            Stderr::BrokenPipe => {
                let (reader, writer) = std::io::pipe().expect("cannot make a pipe");
                drop(reader);
                cmd.stderr(writer);
            }
        }
    }
}

/// Runs `cmd` with stderr broken as `how`, and returns its exit code.
fn run_with(how: Stderr, cmd: Command) -> Option<i32> {
    exit_code(wait_child(&mut spawn_with(how, cmd), RUN_LIMIT))
}

/// Starts `cmd` with stderr broken as `how`.
fn spawn_with(how: Stderr, mut cmd: Command) -> std::process::Child {
    how.apply(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    cmd.spawn().expect("cannot start heimdall")
}

/// heimdall's exit code; it must have exited, and not died of a signal.
fn exit_code(status: Option<std::process::ExitStatus>) -> Option<i32> {
    let status = status.expect("heimdall hung");
    assert!(
        status.signal().is_none(),
        "heimdall died of signal {:?} (a panic on the broken stderr?)",
        status.signal()
    );
    status.code()
}

fn busy_with(how: Stderr) {
    let name = unique_name("stderr-busy");
    let holder = Holder::start(&shared().url(), NAMESPACE, &name);
    let dir = new_dir();
    let mut cmd = locked_std(NAMESPACE, &name);
    cmd.current_dir(dir.path()).args(["--", "touch", "ran"]);
    assert_eq!(run_with(how, cmd), Some(75));
    assert!(
        !dir.path().join("ran").exists(),
        "the command ran beside the holder"
    );
    holder.stop();
}

/// The command leaves a background step behind, which heimdall reports on stderr as it stops
/// it: the step must be gone when heimdall exits, whatever became of the message.
fn ran_with(how: Stderr) {
    let dir = new_dir();
    let name = unique_name("stderr-ran");
    let cmd = shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "(while [ ! -e go ]; do sleep 0.05; done; echo late >> log) & echo $! >> pids; \
         while [ ! -e leave ]; do sleep 0.05; done; exit 0",
    );
    let mut child = spawn_with(how, cmd);
    let background = wait_pids(dir.path(), 1)[0];
    // heimdall itself must stop the step before it exits: its keeper, which would stop it once
    // heimdall has exited, is held back until then.
    let frozen = Frozen::freeze(keeper_of(child.id() as i32));
    fs::write(dir.path().join("leave"), "").unwrap();
    let status = wait_child(&mut child, RUN_LIMIT);
    let left = process_alive(background);
    drop(frozen);
    assert_eq!(exit_code(status), Some(0));
    assert!(!left, "the background step outlived heimdall");
    assert_no_late_write(dir.path(), &[background]);
    assert!(lock_is_free(NAMESPACE, &name));
}

fn timed_out_with(how: Stderr) {
    let dir = new_dir();
    let name = unique_name("stderr-timeout");
    let cmd = shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--timeout", "1s"],
        "sleep 30 & echo $! >> pids; wait",
    );
    assert_eq!(run_with(how, cmd), Some(124));
    let background = wait_pids(dir.path(), 1)[0];
    assert!(
        !process_alive(background),
        "the background step outlived heimdall"
    );
    assert!(lock_is_free(NAMESPACE, &name));
}

fn lost_with(how: Stderr) {
    let dir = new_dir();
    let name = unique_name("stderr-lost");
    let mut cmd = shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--heartbeat", "1s"],
        "echo $HEIMDALL_KEY > key; sleep 30 & echo $! >> pids; wait",
    );
    how.apply(&mut cmd);
    let mut child = cmd.spawn().expect("cannot start heimdall");
    let background = wait_pids(dir.path(), 1)[0];
    terminate_holder(dir.path());
    let status = wait_child(&mut child, RUN_LIMIT).expect("heimdall hung");
    assert_eq!(status.code(), Some(76), "heimdall ended with {status}");
    assert!(
        !process_alive(background),
        "the background step outlived heimdall"
    );
}

#[test]
fn busy_run_with_a_closed_stderr_exits_75() {
    busy_with(Stderr::Closed);
}

#[test]
fn busy_run_with_a_broken_stderr_pipe_exits_75() {
    busy_with(Stderr::BrokenPipe);
}

#[test]
fn run_with_a_closed_stderr_stops_leftovers_and_exits_0() {
    ran_with(Stderr::Closed);
}

#[test]
fn run_with_a_broken_stderr_pipe_stops_leftovers_and_exits_0() {
    ran_with(Stderr::BrokenPipe);
}

#[test]
fn timed_out_run_with_a_closed_stderr_stops_the_job_and_exits_124() {
    timed_out_with(Stderr::Closed);
}

#[test]
fn timed_out_run_with_a_broken_stderr_pipe_stops_the_job_and_exits_124() {
    timed_out_with(Stderr::BrokenPipe);
}

#[test]
fn lost_lock_with_a_closed_stderr_stops_the_job_and_exits_76() {
    lost_with(Stderr::Closed);
}

#[test]
fn lost_lock_with_a_broken_stderr_pipe_stops_the_job_and_exits_76() {
    lost_with(Stderr::BrokenPipe);
}

/// `-v` says "started the command as pid N"; with the reader of stderr gone, that line must not
/// cost the command its run (issue 22, item 7: the forked child wrote it before exec, and died
/// of SIGPIPE).
#[test]
fn verbose_run_with_a_broken_stderr_pipe_runs_the_command_and_returns_its_code() {
    let dir = new_dir();
    let mut cmd = locked_std(NAMESPACE, &unique_name("stderr-verbose"));
    cmd.current_dir(dir.path())
        .args(["-v", "--", "sh", "-c", "touch ran; exit 3"]);
    assert_eq!(run_with(Stderr::BrokenPipe, cmd), Some(3));
    assert!(dir.path().join("ran").exists(), "the command never ran");
}

// ---------------------------------------------------------------------------
// Zombies and leftovers
// ---------------------------------------------------------------------------

/// How many zombies `parent` has not reaped.
fn zombies_of(parent: i32) -> usize {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(crate::support::proc_stat_fields)
        .filter(|f| f[0] == "Z" && f[1] == parent.to_string())
        .count()
}

/// How many orphans the job left: `flock` processes that heimdall, as the subreaper, adopted.
const ORPHANS: usize = 50;

#[test]
fn orphans_are_reaped_as_they_exit_while_the_command_runs() {
    // Each orphan waits on a file lock the test holds, so the test sees them adopted by
    // heimdall (no subreaper: init would adopt them) before it lets them exit all at once.
    let dir = new_dir();
    let gate = fs::File::create(dir.path().join("gate")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(gate.as_raw_fd(), libc::LOCK_EX) }, 0);
    let job = Job::start_in(
        dir,
        &shared().url(),
        NAMESPACE,
        &unique_name("zombies"),
        &[],
        &format!(
            "for i in $(seq {ORPHANS}); do (flock gate true &); done; echo $$ > pid; sleep 30"
        ),
    );
    let heimdall = job.run.pid();
    let orphans = || {
        children_of(heimdall)
            .into_iter()
            .filter(|&pid| comm_of(pid) == "flock")
            .count()
    };
    let mut adopted = 0;
    busy_wait(START_LIMIT, || {
        adopted = orphans();
        adopted == ORPHANS
    });
    assert_eq!(
        adopted, ORPHANS,
        "heimdall adopted {adopted} of the {ORPHANS} orphans (is it a subreaper?)"
    );
    drop(gate);
    let (mut left, mut zombies) = (usize::MAX, usize::MAX);
    let reaped = busy_wait(REACT_LIMIT, || {
        (left, zombies) = (orphans(), zombies_of(heimdall));
        left == 0 && zombies == 0
    });
    assert!(
        reaped,
        "{left} orphans left under heimdall, {zombies} of them zombies, while the command runs"
    );
}

/// The leader starts M, which leaves the group, and M's child C, which rejoins it: C is in
/// the command's process group, but its parent is M, not heimdall. Both let go of stderr, so
/// that the test's reading it to its end does not wait for them. C writes to `log` once let go.
const GROUP_MEMBER_WITH_ANOTHER_PARENT: &str = r#"echo $$ > pid
perl -e '
  open(STDERR, ">", "/dev/null");
  setpgrp(0, 0) or die "setpgrp: $!";
  my $c = fork // die "fork: $!";
  if ($c) { sleep 20; exit 0 }
  setpgrp(0, $ARGV[0]) or die "rejoin: $!";
  open(my $f, ">>", "pids") or die; print $f "$$\n"; close $f;
  select(undef, undef, undef, 0.05) until -e "go";
  open($f, ">>", "log") or die; print $f "late\n"; close $f;
' $$ &
while [ ! -s pids ] || [ ! -e leave ]; do sleep 0.05; done
"#;

#[test]
fn a_group_member_whose_parent_is_not_heimdall_is_stopped_before_heimdall_exits() {
    let mut job = start(
        "leftover-deep",
        &["--kill-after", "1s"],
        GROUP_MEMBER_WITH_ANOTHER_PARENT,
    );
    let member = wait_pids(job.dir.path(), 1)[0];
    // heimdall itself must stop the member before it exits: its keeper is held back until then.
    let keeper = job.freeze_keeper();
    fs::write(job.path("leave"), "").unwrap();
    let (status, stderr, left) = job.finish_before_keeper(keeper, &[member]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        left.is_empty(),
        "{left:?} of the job (group member {member}, pgid {}) outlived heimdall; stderr:\n{stderr}",
        job.pgid
    );
    assert_no_late_write(job.dir.path(), &[member]);
}

#[test]
fn a_setsid_daemon_the_job_started_is_stopped_before_the_lock_is_released() {
    // Once let go, the daemon takes the same lock itself and runs a command. The job leaves it
    // behind only once a waiter is queued, which must find the daemon gone when it gets the lock.
    let name = unique_name("setsid-daemon");
    let script = format!(
        "echo $$ > pid; setsid sh -c 'echo $$ >> pids; while [ ! -e go ]; do sleep 0.05; done; \
         {heimdall} --database {url} --namespace {NAMESPACE} --name {name} -- touch daemon-ran' > /dev/null 2>&1 < /dev/null & \
         while [ ! -s pids ] || [ ! -e leave ]; do sleep 0.05; done",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let mut job = Job::start_in(
        new_dir(),
        &shared().url(),
        NAMESPACE,
        &name,
        &["--kill-after", "1s"],
        &script,
    );
    let daemon = wait_pids(job.dir.path(), 1)[0];
    // heimdall itself must stop the daemon before it lets go of the lock (the waiter holds the
    // keeper back meanwhile).
    let waiter = job.queue_waiter_watching(&[daemon]);
    fs::write(job.path("leave"), "").unwrap();
    job.assert_waiter_ran_alone(waiter);
    job.run.expect_exit(0, RUN_LIMIT);
    assert!(
        !process_alive(daemon),
        "the setsid daemon outlived heimdall, free to run its command without the lock"
    );
    fs::write(job.path("go"), "").unwrap();
    let ran = job.path("daemon-ran");
    busy_wait(RUN_LIMIT, || ran.exists() || !process_alive(daemon));
    assert!(
        !ran.exists(),
        "the setsid daemon ran its command after heimdall exited"
    );
}

// ---------------------------------------------------------------------------
// Re-entrancy must be proved
// ---------------------------------------------------------------------------

/// The `HEIMDALL_*` variables of a holder's command, copied to a process outside its job, do
/// not make that process re-entrant: it takes the lock itself, and finds it busy.
#[test]
fn copied_environment_of_a_holder_does_not_let_an_outsider_run_beside_it() {
    let mut job = start(
        "reentry-spoof",
        &[],
        "env > env.txt; echo $$ > pid; sleep 30",
    );
    let (dir, name, holder) = (&job.dir, &job.name, &mut job.run);
    let env = fs::read_to_string(dir.path().join("env.txt")).unwrap();
    let mut outsider = locked(NAMESPACE, name);
    for line in env.lines() {
        if let Some((k, v)) = line.split_once('=')
            && k.starts_with("HEIMDALL_")
        {
            outsider.env(k, v);
        }
    }
    let out = outsider
        .current_dir(dir.path())
        .args(["--", "touch", "outsider-ran"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "the outsider was not refused: {}",
        text(&out.stderr)
    );
    assert!(!dir.path().join("outsider-ran").exists());
    holder.signal(libc::SIGTERM);
    holder.finish(RUN_LIMIT);
}

/// A heimdall inside the job, whose outer heimdall's backend has lost the lock (and another run
/// took it), must not run its command as if the lock were still held.
#[test]
fn inner_heimdall_does_not_reenter_a_lock_its_outer_backend_no_longer_holds() {
    let name = unique_name("reentry-lost");
    let script = format!(
        "echo $HEIMDALL_KEY > key; echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; \
         {heimdall} --database {url} --namespace {NAMESPACE} --name {name} -- touch inner-ran; echo $? > inner-rc; sleep 30",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let mut job = Job::start_in(
        new_dir(),
        &shared().url(),
        NAMESPACE,
        &name,
        &["--heartbeat", "0"],
        &script,
    );
    let (dir, outer) = (&job.dir, &mut job.run);
    terminate_holder(dir.path());
    let mut other = locked_std(NAMESPACE, &name);
    other.arg("--wait=10s");
    let other = Holder::start_with(other);
    fs::write(dir.path().join("go"), "").unwrap();
    let rc_path = dir.path().join("inner-rc");
    assert!(busy_wait(RUN_LIMIT, || read_pid(&rc_path).is_some()));
    assert!(
        !dir.path().join("inner-ran").exists(),
        "the inner heimdall ran its command while another run held the lock"
    );
    assert_eq!(read_pid(&rc_path), Some(75));
    other.stop();
    outer.signal(libc::SIGTERM);
    outer.finish(RUN_LIMIT);
}

// ---------------------------------------------------------------------------
// Durations
// ---------------------------------------------------------------------------

#[test]
fn absurd_durations_exit_2_before_connecting_or_running() {
    let dir = new_dir();
    for flags in [
        &["--timeout", "18446744073709551615"][..],
        &["--timeout", "2y"],
        &["--kill-after", "584542046090y"],
        &["--min-hold", "584542046090y"],
        &["--wait=584542046090y"],
        &["--heartbeat", "584542046090y"],
        &["--heartbeat", "2h"],
        &["--heartbeat-timeout", "2h"],
        &["--connect-timeout", "2y"],
    ] {
        // Nothing listens on port 1: a run that got as far as connecting would exit 69.
        let out = heimdall()
            .current_dir(dir.path())
            .args(["--database", "postgres://127.0.0.1:1/none"])
            .args(["--namespace", NAMESPACE, "--name", "absurd"])
            .args(flags)
            .args(["--", "touch", "ran"])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains("maximum"), "{flags:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{flags:?}: {stderr}");
        assert!(
            !dir.path().join("ran").exists(),
            "{flags:?} ran the command"
        );
    }
    let out = heimdall()
        .env("HEIMDALL_WAIT", "584542046090y")
        .args(["--database", "postgres://127.0.0.1:1/none"])
        .args(["--namespace", NAMESPACE, "--name", "absurd", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_longest_durations_allowed_still_run_the_command() {
    let run = locked(NAMESPACE, &unique_name("longest"))
        .args(["--timeout", "1y", "--kill-after", "1y", "--wait=1y"])
        .args(["--heartbeat", "1h", "--heartbeat-timeout", "1h"])
        .args(["--", "echo", "ran"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "ran\n");
}
