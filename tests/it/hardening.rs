//! No step of the job outlives its lock (issue 11): heimdall's own death (SIGKILL, a set-user-ID
//! command that loses the parent-death signal), every catchable fatal signal, a closed or
//! broken stderr, zombies under the subreaper, leftovers outside the process group's direct
//! children, re-entrancy that must be proved, and durations too long to mean anything.
//!
//! Every test uses its own lock name and temp dir. Commands write their pids to files, and the
//! tests poll for those instead of sleeping.

use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::new_dir;
use crate::support::procs::{Running, process_alive, read_pid, shared_sh};
use crate::support::runs::{Holder, lock_is_free, locked, locked_std};
use crate::support::{busy_wait, heimdall, process_group_alive, shared, unique_name, wait_child};

pub(crate) const NAMESPACE: &str = "heimdall-tests-hardening";
/// How long a command gets to start and write its pid file.
pub(crate) const START_LIMIT: Duration = Duration::from_secs(10);
/// How long any heimdall run may take before the test gives up on it.
pub(crate) const RUN_LIMIT: Duration = Duration::from_secs(30);
/// How long heimdall gets to react to a signal, or processes to vanish after one.
pub(crate) const REACT_LIMIT: Duration = Duration::from_secs(10);
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
    let (a, b) = key.trim().split_once(',').expect("HEIMDALL_KEY is A,B");
    let (a, b): (i32, i32) = (a.parse().unwrap(), b.parse().unwrap());
    let sql = format!(
        "select bool_or(pg_terminate_backend(pid)) from pg_locks where locktype = 'advisory' \
         and granted and classid = '{}'::oid and objid = '{}'::oid and objsubid = 2",
        a as u32, b as u32
    );
    let done: Option<bool> = shared().client().query_one(&sql, &[]).unwrap().get(0);
    assert_eq!(done, Some(true), "found no backend holding {key}");
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
// ---------------------------------------------------------------------------
// heimdall's own death
// ---------------------------------------------------------------------------

/// sh → sh → sh → sleep in the foreground, and a background loop; every pid in `pids`.
const THREE_LEVELS: &str = r#"echo $$ > pid
sh -c 'echo $$ >> pids; while :; do sleep 1; done; echo bg >> log' &
sh -c 'echo $$ >> pids; sh -c "echo \$\$ >> pids; sleep 3 & echo \$! >> pids; wait; echo step >> log"; echo after >> log'
"#;

#[test]
fn sigkill_of_heimdall_stops_every_step_before_a_second_run_holds_the_lock() {
    let dir = new_dir();
    let name = unique_name("sigkill-tree");
    let mut run = Running::spawn(shared_sh(NAMESPACE, dir.path(), &name, &[], THREE_LEVELS));
    let leader = run.command_pid(dir.path(), START_LIMIT);
    let mut steps = wait_pids(dir.path(), 4);
    steps.push(leader);
    sigkill_then_no_step_under_the_next_holder(&run, dir.path(), &name, &steps);
    assert!(
        !dir.path().join("log").exists(),
        "a step of the first run wrote after it was killed"
    );
}

/// A heimdall of another lock inside the job, whose command started a `setsid` daemon: when
/// the outer heimdall is SIGKILLed, its keeper kills the inner heimdall but waits for the inner
/// keeper, which kills the daemon, before the outer lock can go.
#[test]
fn sigkill_of_heimdall_stops_a_daemon_started_under_a_nested_heimdall() {
    let dir = new_dir();
    let name = unique_name("sigkill-nested");
    let script = format!(
        "echo $$ > pid; {heimdall} --database {url} --namespace {NAMESPACE} --name {name}-inner -- \
         sh -c 'setsid sh -c \"echo \\$\\$ >> pids; sleep 3; echo daemon >> log\" > /dev/null 2>&1 & sleep 30'",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let mut run = Running::spawn(shared_sh(NAMESPACE, dir.path(), &name, &[], &script));
    run.command_pid(dir.path(), START_LIMIT);
    let daemon = wait_pids(dir.path(), 1)[0];
    sigkill_then_no_step_under_the_next_holder(&run, dir.path(), &name, &[daemon]);
}

/// heimdall's keeper: its child named `heimdall-keeper`.
pub(crate) fn keeper_of(heimdall: i32) -> i32 {
    let mut keeper = None;
    busy_wait(START_LIMIT, || {
        keeper = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&pid| {
                let parent = crate::support::proc_stat_fields(pid)
                    .and_then(|f| f.get(1).and_then(|p| p.parse::<i32>().ok()));
                parent == Some(heimdall)
                    && fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "heimdall-keeper")
            });
        keeper.is_some()
    });
    keeper.unwrap_or_else(|| panic!("heimdall {heimdall} has no keeper process"))
}

/// The keeper held in a ptrace stop until dropped. (SIGSTOP would not do: when heimdall dies, the
/// keeper's process group is orphaned, and the kernel sends it SIGHUP and SIGCONT.)
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        // SAFETY: plain ptrace requests on a process this test started; the test is its
        // ancestor, so the kernel allows it. The same thread waits and detaches.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0),
                0,
                "PTRACE_SEIZE"
            );
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0),
                0,
                "PTRACE_INTERRUPT"
            );
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
            assert!(
                libc::WIFSTOPPED(status),
                "the keeper did not stop: {status:#x}"
            );
        }
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in `freeze`.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The keeper holds a copy of the connection: while it has not finished (here: it is frozen),
/// the server cannot see the session end, so the lock stays held although heimdall is dead.
#[test]
fn the_lock_stays_held_until_the_keeper_has_stopped_the_job() {
    let dir = new_dir();
    let name = unique_name("keeper-holds");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "echo $$ > pid; sleep 30",
    ));
    run.command_pid(dir.path(), START_LIMIT);
    let frozen = Frozen::freeze(keeper_of(run.pid()));
    run.signal(libc::SIGKILL);
    // Not `finish`: the frozen keeper holds heimdall's stderr open.
    assert!(busy_wait(REACT_LIMIT, || run.has_exited()));
    let held = !lock_is_free(NAMESPACE, &name);
    drop(frozen);
    assert!(
        held,
        "the lock was free while the keeper had not yet stopped the job"
    );
    assert!(
        busy_wait(RUN_LIMIT, || lock_is_free(NAMESPACE, &name)),
        "the lock stayed held after the keeper finished"
    );
}

#[test]
fn sigkill_of_heimdall_stops_a_set_user_id_command_that_lost_the_parent_death_signal() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: making a set-user-ID program needs root");
        return;
    }
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

    let name = unique_name("sigkill-setuid");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "echo $$ > pid; exec ./sleep-as-nobody 30",
    ));
    let pid = run.command_pid(dir.path(), START_LIMIT);
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

    sigkill_then_no_step_under_the_next_holder(&run, dir.path(), &name, &[pid]);
}

/// A keeper killed by someone else is reported; the run goes on, and still stops what its
/// command leaves behind.
#[test]
fn a_killed_keeper_is_reported_and_the_run_goes_on() {
    let dir = new_dir();
    let name = unique_name("keeper-killed");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; sleep 30 & echo $! >> pids",
    ));
    run.command_pid(dir.path(), START_LIMIT);
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
// Signals heimdall did not catch
// ---------------------------------------------------------------------------

/// `signal` to heimdall stops the whole job (a background step included), releases the lock and
/// ends heimdall with 128+N.
fn fatal_signal_stops_the_job(signal: i32, prefix: &str) {
    let dir = new_dir();
    let name = unique_name(prefix);
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--kill-after", "2s"],
        "sleep 30 & echo $! >> pids; echo $$ > pid; wait",
    ));
    let pgid = run.command_pid(dir.path(), START_LIMIT);
    let background = wait_pids(dir.path(), 1)[0];

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
        lock_is_free(NAMESPACE, &name),
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
fn run_with(how: Stderr, mut cmd: Command) -> Option<i32> {
    how.apply(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let mut child = cmd.spawn().expect("cannot start heimdall");
    let status = wait_child(&mut child, RUN_LIMIT).expect("heimdall hung");
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
        "(sleep 2; echo late >> log) & echo $! >> pids; exit 0",
    );
    assert_eq!(run_with(how, cmd), Some(0));
    let background = wait_pids(dir.path(), 1)[0];
    assert!(
        !process_alive(background),
        "the background step outlived heimdall"
    );
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

#[test]
fn orphans_are_reaped_as_they_exit_while_the_command_runs() {
    let dir = new_dir();
    let name = unique_name("zombies");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "for i in $(seq 150); do (true &); done; sleep 1; echo $$ > pid; sleep 30",
    ));
    run.command_pid(dir.path(), START_LIMIT);
    let heimdall = run.pid();
    let mut left = usize::MAX;
    let reaped = busy_wait(REACT_LIMIT, || {
        left = zombies_of(heimdall);
        left == 0
    });
    assert!(
        reaped,
        "{left} zombies pile up under heimdall while the command runs"
    );
    run.signal(libc::SIGTERM);
    run.finish(RUN_LIMIT);
}

/// The leader starts M, which leaves the group, and M's child C, which rejoins it: C is in
/// the command's process group, but its parent is M, not heimdall. Both let go of stderr, so
/// that the test's reading it to its end does not wait for them.
const GROUP_MEMBER_WITH_ANOTHER_PARENT: &str = r#"echo $$ > pid
perl -e '
  open(STDERR, ">", "/dev/null");
  setpgrp(0, 0) or die "setpgrp: $!";
  my $c = fork // die "fork: $!";
  if ($c) { sleep 20; exit 0 }
  setpgrp(0, $ARGV[0]) or die "rejoin: $!";
  open(my $f, ">>", "pids") or die; print $f "$$\n"; close $f;
  sleep 3;
  open($f, ">>", "log") or die; print $f "late\n"; close $f;
' $$ &
while [ ! -s pids ]; do sleep 0.05; done
"#;

#[test]
fn a_group_member_whose_parent_is_not_heimdall_is_stopped_before_heimdall_exits() {
    let dir = new_dir();
    let name = unique_name("leftover-deep");
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--kill-after", "1s"],
        GROUP_MEMBER_WITH_ANOTHER_PARENT,
    ));
    let pgid = run.command_pid(dir.path(), START_LIMIT);
    let member = wait_pids(dir.path(), 1)[0];
    let stderr = run.expect_exit(0, RUN_LIMIT);
    assert!(
        !process_alive(member),
        "group member {member} (pgid {pgid}) outlived heimdall; stderr:\n{stderr}"
    );
    assert!(!process_group_alive(pgid));
}

#[test]
fn a_setsid_daemon_the_job_started_is_stopped_before_the_lock_is_released() {
    let dir = new_dir();
    let name = unique_name("setsid-daemon");
    let script = format!(
        "echo $$ > pid; setsid sh -c 'echo $$ >> pids; sleep 2; {heimdall} --database {url} --namespace {NAMESPACE} --name {name} -- touch daemon-ran' > /dev/null 2>&1 < /dev/null & \
         while [ ! -s pids ]; do sleep 0.05; done",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let mut run = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--kill-after", "1s"],
        &script,
    ));
    run.command_pid(dir.path(), START_LIMIT);
    let daemon = wait_pids(dir.path(), 1)[0];
    run.expect_exit(0, RUN_LIMIT);
    assert!(
        !process_alive(daemon),
        "the setsid daemon outlived heimdall, free to run its command without the lock"
    );
}

// ---------------------------------------------------------------------------
// Re-entrancy must be proved
// ---------------------------------------------------------------------------

/// The `HEIMDALL_*` variables of a holder's command, copied to a process outside its job, do
/// not make that process re-entrant: it takes the lock itself, and finds it busy.
#[test]
fn copied_environment_of_a_holder_does_not_let_an_outsider_run_beside_it() {
    let dir = new_dir();
    let name = unique_name("reentry-spoof");
    let mut holder = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &[],
        "env > env.txt; echo $$ > pid; sleep 30",
    ));
    holder.command_pid(dir.path(), START_LIMIT);
    let env = fs::read_to_string(dir.path().join("env.txt")).unwrap();
    let mut outsider = locked(NAMESPACE, &name);
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
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("outsider-ran").exists());
    holder.signal(libc::SIGTERM);
    holder.finish(RUN_LIMIT);
}

/// A heimdall inside the job, whose outer heimdall's backend has lost the lock (and another run
/// took it), must not run its command as if the lock were still held.
#[test]
fn inner_heimdall_does_not_reenter_a_lock_its_outer_backend_no_longer_holds() {
    let dir = new_dir();
    let name = unique_name("reentry-lost");
    let script = format!(
        "echo $HEIMDALL_KEY > key; echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done; \
         {heimdall} --database {url} --namespace {NAMESPACE} --name {name} -- touch inner-ran; echo $? > inner-rc; sleep 30",
        heimdall = env!("CARGO_BIN_EXE_heimdall"),
        url = shared().url(),
    );
    let mut outer = Running::spawn(shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["--heartbeat", "0"],
        &script,
    ));
    outer.command_pid(dir.path(), START_LIMIT);
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
        let stderr = String::from_utf8_lossy(&out.stderr);
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
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&run.stdout), "ran\n");
}
