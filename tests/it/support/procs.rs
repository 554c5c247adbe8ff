//! A heimdall in the background whose command runs a shell script ([`heimdall_sh`],
//! [`Running`]), and what tests read about the processes it starts: pid files ([`read_pid`]),
//! process states ([`process_state`], [`process_alive`]) and whole process groups
//! ([`signal_group`]).
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{busy_wait, heimdall_std, proc_stat_fields, process_group_alive, shared, wait_child};

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

    /// heimdall's own pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The command's process group, once [`Running::command_pid`] has found it.
    pub fn pgid(&self) -> Option<i32> {
        self.pgid
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
    /// which is remembered for [`Running::pgid`] and for the cleanup on drop.
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
