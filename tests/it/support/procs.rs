//! A heimdall in the background whose command runs a shell script ([`heimdall_sh`],
//! [`Running`], and [`Job`]: one started in a temp dir of its own), and what tests read about the
//! processes it starts: pid files ([`read_pid`]), process states ([`process_state`],
//! [`process_alive`]) and whole process groups ([`signal_group`], [`group_runs_sh`]).
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tempfile::TempDir;

use super::locks::{LockId, waiters};
use super::{
    RUN_LIMIT, START_LIMIT, busy_wait, heimdall_std, new_dir, proc_stat_fields,
    process_group_alive, shared, unique_name, wait_child,
};

/// How long the stderr reader gets to see EOF once heimdall has exited.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// heimdall connecting with `url`, locking `namespace/name`, running `sh -c script` in `dir`.
/// `flags` go before the command. stdout is discarded; stderr is piped (see [`Running`]).
pub fn heimdall_sh(
    url: &str,
    namespace: &str,
    dir: &Path,
    name: &str,
    flags: &[&str],
    script: &str,
) -> Command {
    let mut cmd = heimdall_std();
    cmd.current_dir(dir)
        .args(["--database", url, "--namespace", namespace, "--name", name])
        .args(flags)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// [`heimdall_sh`] on the shared cluster.
pub fn shared_sh(namespace: &str, dir: &Path, name: &str, flags: &[&str], script: &str) -> Command {
    heimdall_sh(&shared().url(), namespace, dir, name, flags, script)
}

/// A heimdall in the background running a shell script in a temp dir of its own, under a lock
/// name of its own, whose command has started: the script wrote its pid (`echo $$ > pid`).
/// Fields drop in order: the run (and what is left of its process group), then the dir.
pub struct Job {
    pub run: Running,
    url: String,
    namespace: String,
    /// The command's pid, which is also its process group id: it leads its own group.
    pub pgid: i32,
    /// The lock name, from the prefix given.
    pub name: String,
    pub dir: TempDir,
}

impl Job {
    /// A job on the shared cluster: see [`Job::start_on`].
    pub fn start(namespace: &str, prefix: &str, flags: &[&str], script: &str) -> Job {
        Job::start_on(&shared().url(), namespace, prefix, flags, script)
    }

    /// heimdall on `url`, locking `namespace/` a fresh name made from `prefix`, with `flags`,
    /// running `script` in a new temp dir; returns once the script has written its pid.
    pub fn start_on(url: &str, namespace: &str, prefix: &str, flags: &[&str], script: &str) -> Job {
        Job::start_in(
            new_dir(),
            url,
            namespace,
            &unique_name(prefix),
            flags,
            script,
        )
    }

    /// [`Job::start_on`] in `dir`, prepared by the caller, locking `namespace/name`.
    pub fn start_in(
        dir: TempDir,
        url: &str,
        namespace: &str,
        name: &str,
        flags: &[&str],
        script: &str,
    ) -> Job {
        let name = name.to_owned();
        let mut run = Running::spawn(heimdall_sh(
            url,
            namespace,
            dir.path(),
            &name,
            flags,
            script,
        ));
        let pgid = run.command_pid(dir.path(), START_LIMIT);
        Job {
            run,
            url: url.to_owned(),
            namespace: namespace.to_owned(),
            pgid,
            name,
            dir,
        }
    }

    /// A second heimdall on the job's lock, queued behind it (`--wait`): once it holds the
    /// lock, its command writes `overlap` if any process of the job's group still runs, and then
    /// touches `waiter-ran`. Returns once `pg_locks` shows it queued, and fails if the job has
    /// ended by then (the test came too late to prove anything).
    ///
    /// Until [`Job::assert_waiter_ran_alone`], the job's keeper is frozen: what is checked is
    /// that heimdall itself stops the job before it lets the lock go. The keeper, which kills
    /// the job once heimdall has exited, would otherwise hide a release that came first.
    /// Check the waiter before waiting for the job's heimdall: the frozen keeper holds its
    /// stderr open.
    pub fn queue_waiter(&mut self) -> Waiter {
        self.queue_waiter_watching(&[])
    }

    /// [`Job::queue_waiter`], whose command also looks at `pids`, processes of the job outside
    /// its group (a `setsid` daemon), and writes `overlap` if any of them still runs.
    pub fn queue_waiter_watching(&mut self, pids: &[i32]) -> Waiter {
        let keeper = Frozen::freeze(keeper_of(self.run.pid()));
        let mut runs = vec![group_runs_sh(self.pgid)];
        runs.extend(pids.iter().map(|pid| {
            format!("case $(cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null) in ''|Z|X) false ;; *) true ;; esac")
        }));
        let script = format!(
            "if {}; then echo overlap >> overlap; fi; touch waiter-ran",
            runs.join(" || ")
        );
        let mut client = postgres::Client::connect(&self.url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url));
        let waiter = Running::spawn_queued(
            heimdall_sh(
                &self.url,
                &self.namespace,
                self.dir.path(),
                &self.name,
                &["--wait"],
                &script,
            ),
            &mut client,
            LockId::of(&self.namespace, &self.name),
            1,
        );
        assert!(
            !self.run.has_exited(),
            "the job had ended before its waiter queued (a machine too slow for this test); \
             its stderr:\n{}",
            self.run.stderr()
        );
        Waiter {
            run: waiter,
            _keeper: keeper,
        }
    }

    /// Waits for a waiter of [`Job::queue_waiter`] to run its command, and asserts that no
    /// process of the job's group ran by then: the lock passed only once the job was gone.
    pub fn assert_waiter_ran_alone(&self, waiter: Waiter) {
        let Waiter { mut run, _keeper } = waiter;
        let stderr = run.expect_exit(0, RUN_LIMIT);
        assert!(
            self.path("waiter-ran").exists(),
            "the waiter did not run its command: {stderr}"
        );
        assert!(
            !self.path("overlap").exists(),
            "the waiter got the lock while a process of the job (its group {} or a watched pid) still ran",
            self.pgid
        );
    }

    /// The job's keeper, frozen until the result is dropped: see [`Frozen`].
    pub fn freeze_keeper(&self) -> Frozen {
        Frozen::freeze(keeper_of(self.run.pid()))
    }

    /// Waits until heimdall has exited, with `keeper` (this job's, frozen) held back meanwhile,
    /// so that whatever of the job still runs then is what heimdall itself left behind; then
    /// lets the keeper go. Returns heimdall's status and stderr, and what was left: which of
    /// `pids` still ran, and the group id if any member of the group did.
    pub fn finish_before_keeper(
        &mut self,
        keeper: Frozen,
        pids: &[i32],
    ) -> (ExitStatus, String, Vec<i32>) {
        let exited = busy_wait(RUN_LIMIT, || self.run.has_exited());
        let mut left: Vec<i32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
        if process_group_alive(self.pgid) {
            left.push(self.pgid);
        }
        drop(keeper);
        assert!(
            exited,
            "heimdall did not exit within {RUN_LIMIT:?}; stderr:\n{}",
            self.run.stderr()
        );
        let (status, stderr) = self.run.finish(RUN_LIMIT);
        (status, stderr, left)
    }

    /// `file` in the job's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }
}

/// A heimdall queued behind a [`Job`], with the job's keeper frozen: see [`Job::queue_waiter`].
/// Dropping it kills a waiter still running, then lets the keeper go.
pub struct Waiter {
    run: Running,
    _keeper: Frozen,
}

/// A heimdall running in the background, its stderr collected as it is written. Dropping it
/// kills a heimdall that is still running and, once [`Running::command_pid`] has found it, a
/// command process group that is still alive, so a failed test leaves nothing behind.
pub struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
    /// The command's process group, once known.
    pgid: Option<i32>,
}

impl Running {
    /// Spawns `cmd`, whose stderr must be piped, and starts collecting that stderr.
    pub fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("cannot start heimdall");
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Running {
            child,
            stderr,
            reader: Some(reader),
            pgid: None,
        }
    }

    /// Spawns `cmd` with `stderr` instead of a pipe of ours: nothing is collected, so
    /// [`Running::stderr`] stays empty.
    pub fn spawn_with_stderr(mut cmd: Command, stderr: Stdio) -> Running {
        let child = cmd.stderr(stderr).spawn().expect("cannot start heimdall");
        Running {
            child,
            stderr: Arc::default(),
            reader: None,
            pgid: None,
        }
    }

    /// Spawns `cmd`, a heimdall that waits for the lock `id`, and returns once `pg_locks` (asked
    /// through `client`) shows `queued` sessions waiting for it; fails if it exits first.
    pub fn spawn_queued(
        cmd: Command,
        client: &mut postgres::Client,
        id: LockId,
        queued: usize,
    ) -> Running {
        let mut run = Running::spawn(cmd);
        let mut seen = 0;
        let ok = busy_wait(START_LIMIT, || {
            seen = waiters(client, id).len();
            seen == queued || run.has_exited()
        });
        assert!(
            ok && seen == queued && !run.has_exited(),
            "expected {queued} waiters in pg_locks, saw {seen}; the waiter exited: {}; its \
             stderr:\n{}",
            run.has_exited(),
            run.stderr()
        );
        run
    }

    /// heimdall's own pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to heimdall itself.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall; the child is not reaped until `finish`, so its pid is ours.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    /// Everything heimdall has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// True once heimdall has exited.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Waits up to `limit` until the command has written its pid to `dir/pid` (`echo $$ > pid`),
    /// and returns it. The command leads its own process group, so this is also the group id,
    /// which is remembered for the cleanup on drop.
    pub fn command_pid(&mut self, dir: &Path, limit: Duration) -> i32 {
        let path = dir.join("pid");
        let mut pid = None;
        busy_wait(limit, || {
            pid = read_pid(&path);
            pid.is_some() || self.has_exited()
        });
        let pid = pid.unwrap_or_else(|| {
            panic!(
                "the command never wrote {} (heimdall exited: {}); stderr:\n{}",
                path.display(),
                self.has_exited(),
                self.stderr()
            )
        });
        self.pgid = Some(pid);
        pid
    }

    /// Waits for heimdall to exit and returns its status and everything it wrote to stderr.
    pub fn finish(&mut self, limit: Duration) -> (ExitStatus, String) {
        let Some(status) = wait_child(&mut self.child, limit) else {
            panic!(
                "heimdall did not exit within {limit:?}; killed it; stderr:\n{}",
                self.stderr()
            );
        };
        // The last lines may still be in the pipe; EOF comes once the group is gone too.
        if let Some(reader) = self.reader.take() {
            busy_wait(DRAIN_LIMIT, || reader.is_finished());
        }
        (status, self.stderr())
    }

    /// Like [`Running::finish`], for a heimdall that must exit with `code`; returns stderr.
    pub fn expect_exit(&mut self, code: i32, limit: Duration) -> String {
        let (status, stderr) = self.finish(limit);
        assert_eq!(
            status.code(),
            Some(code),
            "heimdall ended with {status}, expected exit {code}; stderr:\n{stderr}"
        );
        stderr
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(pgid) = self.pgid.filter(|&pgid| process_group_alive(pgid)) {
            // SAFETY: plain syscall; only reached when a test failed and left the group behind.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// heimdall's keeper: its child named `heimdall-keeper`.
pub fn keeper_of(heimdall: i32) -> i32 {
    let mut keeper = None;
    busy_wait(START_LIMIT, || {
        keeper = children_of(heimdall)
            .into_iter()
            .find(|&pid| comm_of(pid) == "heimdall-keeper");
        keeper.is_some()
    });
    keeper.unwrap_or_else(|| panic!("heimdall {heimdall} has no keeper process"))
}

/// The processes whose parent is `parent`, zombies included.
pub fn children_of(parent: i32) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            proc_stat_fields(pid).and_then(|f| f.get(1).and_then(|p| p.parse::<i32>().ok()))
                == Some(parent)
        })
        .collect()
}

/// The command name of `pid` (`/proc/PID/comm`), empty once it is gone.
pub fn comm_of(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// The keeper held in a ptrace stop until dropped. (SIGSTOP would not do: when heimdall dies, the
/// keeper's process group is orphaned, and the kernel sends it SIGHUP and SIGCONT.)
pub struct Frozen(i32);

impl Frozen {
    pub fn freeze(pid: i32) -> Frozen {
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

/// The pid a command wrote to `path` with `echo $$ > FILE`, None until the whole line is there
/// (the shell creates the file before it writes it).
pub fn read_pid(path: &Path) -> Option<i32> {
    let text = fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.trim().parse().ok()
}

/// The state letter of a process (R, S, T, Z, ...), None if it is gone.
pub fn process_state(pid: i32) -> Option<char> {
    proc_stat_fields(pid)?.first()?.chars().next()
}

/// True if `pid` runs (a zombie has finished: its parent just has not reaped it yet).
pub fn process_alive(pid: i32) -> bool {
    !matches!(process_state(pid), None | Some('Z' | 'X'))
}

/// A shell condition that holds while any process of group `pgid` (a number, or a shell
/// expression such as `$prev`) runs (a zombie has finished): for a command that must find
/// another job's processes gone.
pub fn group_runs_sh(pgid: impl std::fmt::Display) -> String {
    format!(
        "ps -e -o pgid=,stat= | awk -v g=\"{pgid}\" '$1 == g && $2 !~ /^Z/ {{ found = 1 }} END {{ exit !found }}'"
    )
}

/// Sends `signal` to every process of group `pgid`, and asserts that it could.
pub fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: plain syscall. The group's leader is heimdall's unreaped child while we use it.
    let rc = unsafe { libc::kill(-pgid, signal) };
    assert_eq!(rc, 0, "kill(-{pgid}, {signal}) failed");
}

/// A command that records its runs and any overlap in its directory: `mkdir` is atomic, so a
/// second command that starts while the first is inside finds the directory and writes to
/// `overlaps`. A command stopped by SIGTERM leaves too (the trap), so that only a command still
/// running counts as inside. `$0` is how many seconds it stays.
const GUARDED: &str = r#"if mkdir inside 2>/dev/null; then trap 'rmdir inside; exit 143' TERM; echo ran >> runs; sleep "$0" & wait; rmdir inside; else echo overlap >> overlaps; fi"#;

/// heimdall on `url` holding `namespace/name` with `flags`, running the guarded command for
/// `seconds` in `dir`; count with [`lines`]`(dir, "runs")` and `(dir, "overlaps")`.
pub fn guarded(
    url: &str,
    namespace: &str,
    dir: &Path,
    name: &str,
    flags: &[&str],
    seconds: &str,
) -> Running {
    let script = GUARDED.replace("\"$0\"", seconds);
    Running::spawn(heimdall_sh(url, namespace, dir, name, flags, &script))
}

/// How many lines `dir/file` has (0 when it does not exist).
pub fn lines(dir: &Path, file: &str) -> usize {
    fs::read_to_string(dir.join(file)).map_or(0, |s| s.lines().count())
}
