//! What the keeper reaches when heimdall is SIGKILLed (issue 22, item 3): processes that left
//! the command's process group *and* lost `HEIMDALL_PID` from their environment, because they
//! rewrote their process title over it (gunicorn, nginx-style daemons, `setproctitle`), and
//! processes that merely call themselves `heimdall-keeper`. Every job's processes inherit a
//! marking descriptor; as root (or with a delegated cgroup) the keeper also moves the job into a
//! cgroup of its own, shortly after it starts. Each case runs both ways.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::hardening::{NAMESPACE, sigkill_then_no_step_under_the_next_holder, wait_pids};
use crate::support::procs::{Running, keeper_of, process_alive, shared_sh};
use crate::support::{REACT_LIMIT, RUN_LIMIT, START_LIMIT, busy_wait, new_dir, unique_name};

/// Who runs heimdall.
#[derive(Clone, Copy, Debug, PartialEq)]
enum As {
    /// Whoever runs the tests: as root, heimdall can make a cgroup for the job.
    Tester,
    /// nobody, when the tests run as root; otherwise the tester, who is a normal user already.
    NormalUser,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `shared_sh`, run as `who`. For nobody the test's directory is opened to everyone.
fn job(who: As, dir: &Path, name: &str, script: &str) -> Command {
    let mut cmd = shared_sh(NAMESPACE, dir, name, &[], script);
    if who == As::NormalUser && is_root() {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o777)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    cmd
}

/// A `setsid` daemon that rewrites its process title over its environment, as perl's `$0`
/// does with a long title, then forks and leaves its parent to exit, as daemons do. Its pid
/// goes to `pids`.
const SELF_RENAMING_DAEMON: &str = r#"echo $$ > pid
setsid perl -e '
  $0 = "x" x 3000;
  exit 0 if fork // die "fork: $!";
  open(my $f, ">>", "pids") or die; print $f "$$\n"; close $f;
  sleep 60;
' > /dev/null 2>&1 < /dev/null &
while [ ! -s pids ]; do sleep 0.05; done
sleep 60
"#;

/// Runs `script` as `who`; once its step (the pid in `pids`) fits `premise`, SIGKILLs heimdall:
/// the step must be gone before the next run holds the lock.
fn stopped_before_the_lock_goes(who: As, prefix: &str, script: &str, premise: fn(i32) -> bool) {
    let dir = new_dir();
    let name = unique_name(prefix);
    let mut run = Running::spawn(job(who, dir.path(), &name, script));
    run.command_pid(dir.path(), START_LIMIT);
    let step = wait_pids(dir.path(), 1)[0];
    assert!(
        busy_wait(START_LIMIT, || premise(step)),
        "step {step} does not fit the test's premise"
    );
    sigkill_then_no_step_under_the_next_holder(&run, dir.path(), &name, &[step]);
}

/// The daemon no longer shows HEIMDALL_PID: only something it cannot overwrite finds it.
fn environment_rewritten(pid: i32) -> bool {
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    !environ.is_empty() && !environ.windows(13).any(|w| w == b"HEIMDALL_PID=")
}

#[test]
fn a_daemon_that_rewrote_its_environment_is_stopped_before_the_lock_goes() {
    stopped_before_the_lock_goes(
        As::Tester,
        "renamed-daemon",
        SELF_RENAMING_DAEMON,
        environment_rewritten,
    );
}

#[test]
fn a_daemon_that_rewrote_its_environment_is_stopped_before_the_lock_goes_as_a_normal_user() {
    stopped_before_the_lock_goes(
        As::NormalUser,
        "renamed-daemon",
        SELF_RENAMING_DAEMON,
        environment_rewritten,
    );
}

/// A step of the job whose name is the keeper's (`comm` is the executable's file name) and that
/// left the process group, so that only the keeper's search finds it.
const NAMED_LIKE_THE_KEEPER: &str = r#"echo $$ > pid
cp /bin/sleep ./heimdall-keeper
setsid ./heimdall-keeper 60 > /dev/null 2>&1 < /dev/null &
echo $! >> pids
sleep 60
"#;

fn named_like_the_keeper(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "heimdall-keeper")
}

#[test]
fn a_step_named_heimdall_keeper_is_killed_before_the_lock_goes() {
    stopped_before_the_lock_goes(
        As::Tester,
        "fake-keeper",
        NAMED_LIKE_THE_KEEPER,
        named_like_the_keeper,
    );
}

#[test]
fn a_step_named_heimdall_keeper_is_killed_before_the_lock_goes_as_a_normal_user() {
    stopped_before_the_lock_goes(
        As::NormalUser,
        "fake-keeper",
        NAMED_LIKE_THE_KEEPER,
        named_like_the_keeper,
    );
}

/// Whether this machine lets root create cgroups: a cgroup v2 hierarchy mounted read-write.
fn cgroup2_writable() -> bool {
    is_root()
        && fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
            info.lines().any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                line.contains(" - cgroup2 ") && fields.get(5).is_some_and(|o| o.starts_with("rw"))
            })
        })
}

/// True, with a note, where this machine does not let root create cgroups.
fn skipped_without_cgroups() -> bool {
    let skipped = !cgroup2_writable();
    if skipped {
        eprintln!("skipped: needs root and a writable cgroup v2 hierarchy");
    }
    skipped
}

/// Asserts that the job's cgroup `path` is removed within a few seconds of the run.
fn assert_removed(path: &Path) {
    assert!(
        busy_wait(START_LIMIT, || !path.exists()),
        "{} is left behind",
        path.display()
    );
}

/// The cgroup path of `pid` in the v2 hierarchy.
fn cgroup_of(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The v2 hierarchy's mount point, and this process's cgroup directory in it.
fn cgroup2_dirs() -> (PathBuf, PathBuf) {
    let mount = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .unwrap();
    let own = cgroup_of(std::process::id() as i32).unwrap();
    let own = mount.join(own.trim_start_matches('/'));
    (mount, own)
}

/// heimdall's job, run by `heimdall` (a command of `job`), ends up in `heimdall-PID` below
/// heimdall's own cgroup a moment after it starts (the keeper moves it: the spawn does not
/// wait for that), with the step it started before the move; each holds the marking
/// descriptor too; and the cgroup is gone soon after the run.
fn the_job_runs_in_a_cgroup_of_its_own(heimdall: impl FnOnce(&Path, &str, &str) -> Command) {
    let dir = new_dir();
    let name = unique_name("cgroup");
    let script =
        "echo $$ > pid; sleep 60 & echo $! >> pids; while [ ! -e go ]; do sleep 0.05; done";
    let mut run = Running::spawn(heimdall(dir.path(), &name, script));
    let leader = run.command_pid(dir.path(), START_LIMIT);
    let step = wait_pids(dir.path(), 1)[0];
    let heimdall = cgroup_of(run.pid()).expect("heimdall's cgroup");
    let expected = format!("{}/heimdall-{}", heimdall.trim_end_matches('/'), run.pid());
    let moved = busy_wait(START_LIMIT, || {
        [leader, step]
            .iter()
            .all(|&pid| cgroup_of(pid).as_ref() == Some(&expected))
    });
    assert!(
        moved,
        "the job is not in a cgroup of its own ({expected}): the command is in {:?}, its step in {:?}",
        cgroup_of(leader),
        cgroup_of(step)
    );
    for pid in [leader, step] {
        assert!(
            holds_a_pipe_at_64(pid),
            "process {pid} of the job does not hold the marking descriptor beside its cgroup"
        );
    }
    fs::write(dir.path().join("go"), "").unwrap();
    run.expect_exit(0, RUN_LIMIT);
    assert!(!process_alive(step));
    let path = cgroup2_dirs().0.join(expected.trim_start_matches('/'));
    assert_removed(&path);
}

/// Whether descriptor 64 of `pid` is a pipe (the marking descriptor: nothing else puts one
/// there in these tests).
fn holds_a_pipe_at_64(pid: i32) -> bool {
    fs::read_link(format!("/proc/{pid}/fd/64"))
        .is_ok_and(|target| target.to_string_lossy().starts_with("pipe:["))
}

#[test]
fn as_root_the_job_runs_in_a_cgroup_of_its_own_which_is_removed_after_the_run() {
    if skipped_without_cgroups() {
        return;
    }
    the_job_runs_in_a_cgroup_of_its_own(|dir, name, script| job(As::Tester, dir, name, script));
}

/// A normal user whose cgroup is delegated (what systemd's `Delegate=yes` gives: the cgroup's
/// files are the user's) gets a cgroup for the job too.
#[test]
fn a_normal_user_with_a_delegated_cgroup_gets_one_for_the_job() {
    if !cgroup2_writable() {
        eprintln!("skipped: delegating a cgroup needs root and a writable cgroup v2 hierarchy");
        return;
    }
    let delegated = Delegated::create();
    let delegated = &delegated.0;
    the_job_runs_in_a_cgroup_of_its_own(|dir, name, script| {
        let inner = job(As::NormalUser, dir, name, script);
        // Moved in as root, then nobody: as a user's systemd manager starts a delegated unit.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0/cgroup.procs" && exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@""#)
            .arg(delegated)
            .arg(inner.get_program())
            .args(inner.get_args())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in inner.get_envs() {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        cmd
    });
}

/// Commands that end before the keeper could move them (the move waits for an RCU grace period,
/// 10–15 ms) run as any other: exit 0, not a word on stderr, and no cgroup left behind.
#[test]
fn as_root_jobs_that_end_before_the_keeper_moves_them_run_quietly_and_leave_no_cgroup() {
    if skipped_without_cgroups() {
        return;
    }
    let dir = new_dir();
    let name = unique_name("cgroup-short");
    let root = cgroup2_dirs().1;
    for _ in 0..10 {
        let mut run = Running::spawn(job(As::Tester, dir.path(), &name, "exit 0"));
        let path = root.join(format!("heimdall-{}", run.pid()));
        let stderr = run.expect_exit(0, RUN_LIMIT);
        assert_eq!(stderr, "", "a short job made heimdall or its keeper speak");
        assert_removed(&path);
    }
}

/// The keeper removes the job's cgroup as it exits; a keeper killed by someone else cannot, so
/// heimdall does once the job is gone.
#[test]
fn as_root_a_killed_keeper_leaves_no_cgroup_behind() {
    if skipped_without_cgroups() {
        return;
    }
    let dir = new_dir();
    let name = unique_name("cgroup-keeper-killed");
    let script = "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done";
    let mut run = Running::spawn(job(As::Tester, dir.path(), &name, script));
    let leader = run.command_pid(dir.path(), START_LIMIT);
    let path = cgroup2_dirs().1.join(format!("heimdall-{}", run.pid()));
    let cgroup = format!(
        "/{}",
        path.strip_prefix(cgroup2_dirs().0).unwrap().display()
    );
    assert!(
        busy_wait(START_LIMIT, || cgroup_of(leader).as_ref() == Some(&cgroup)),
        "the command never joined {cgroup}"
    );
    // SAFETY: plain syscall on a process this test started (through heimdall).
    unsafe { libc::kill(keeper_of(run.pid()), libc::SIGKILL) };
    assert!(busy_wait(REACT_LIMIT, || run
        .stderr()
        .contains("keeper process")));
    fs::write(dir.path().join("go"), "").unwrap();
    run.expect_exit(0, RUN_LIMIT);
    assert_removed(&path);
}

/// A cgroup delegated to nobody, removed when dropped (a failed test leaves no cgroup behind).
struct Delegated(PathBuf);

impl Delegated {
    fn create() -> Delegated {
        let path = cgroup2_dirs()
            .1
            .join(unique_name("heimdall-test-delegated"));
        fs::create_dir(&path).unwrap();
        let delegated = Delegated(path);
        let chown = Command::new("chown")
            .args(["-R", "65534:65534"])
            .arg(&delegated.0)
            .status()
            .unwrap();
        assert!(chown.success());
        delegated
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}
