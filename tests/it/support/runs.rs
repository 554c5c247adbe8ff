//! Running heimdall in the foreground and holding a lock in the background: one run whose
//! command touches a marker file ([`Run`], [`run_touching`]), commands for a lock on the shared
//! cluster ([`locked`], [`locked_std`], [`lock_is_free`]), and a heimdall that holds a lock until told to stop
//! ([`Holder`]).
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    RUN_LIMIT, START_LIMIT, busy_wait, heimdall, heimdall_std, shared, unique_name, wait_child,
};

// ---------------------------------------------------------------------------
// One run whose command touches a marker file
// ---------------------------------------------------------------------------

/// How one heimdall run ended, and whether its command ran.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The command touched its marker file.
    pub ran: bool,
    pub elapsed: Duration,
}

impl Run {
    /// Exited 0 and the command ran.
    pub fn assert_ran(&self) -> &Self {
        assert_eq!(self.code, Some(0), "heimdall failed: {self:#?}");
        assert!(
            self.ran,
            "heimdall exited 0 but the command never ran: {self:#?}"
        );
        self
    }

    /// Exited with `code`, the command did not run, and stderr is heimdall's one line.
    pub fn assert_refused(&self, code: i32) -> &Self {
        self.assert_failed(code);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr: {self:#?}");
        self
    }

    /// Exited with `code`, the command did not run, and every stderr line is heimdall's.
    pub fn assert_failed(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "wrong exit code: {self:#?}");
        assert!(
            !self.ran,
            "the command ran although heimdall failed: {self:#?}"
        );
        assert!(
            !self.stderr.is_empty() && self.stderr.lines().all(|l| l.starts_with("heimdall: ")),
            "stderr should be heimdall's own lines: {self:#?}"
        );
        self
    }

    /// stderr contains `text`.
    pub fn assert_stderr_contains(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "stderr should mention {text:?}: {self:#?}"
        );
        self
    }

    /// stderr contains at least one of `texts`.
    pub fn assert_stderr_contains_any(&self, texts: &[&str]) -> &Self {
        assert!(
            texts.iter().any(|t| self.stderr.contains(t)),
            "stderr should mention one of {texts:?}: {self:#?}"
        );
        self
    }

    /// Neither stdout nor stderr contains `secret` (a password, key material).
    pub fn assert_never_shows(&self, secret: &str) -> &Self {
        assert!(
            !self.stderr.contains(secret) && !self.stdout.contains(secret),
            "{secret:?} was printed: {self:#?}"
        );
        self
    }
}

/// A file the command creates, in a temp dir of its own: it exists iff the command ran.
pub struct Marker {
    _dir: TempDir,
    pub path: PathBuf,
}

/// A fresh [`Marker`] that does not exist yet.
pub fn marker() -> Marker {
    let dir = tempfile::tempdir().expect("cannot create a temp dir");
    let path = dir.path().join("ran");
    Marker { _dir: dir, path }
}

/// Runs `cmd` to the end and reports it as a [`Run`], `ran` meaning that `marker` exists.
pub fn finish(cmd: &mut assert_cmd::Command, marker: &Marker) -> Run {
    let started = Instant::now();
    let output = cmd.output().expect("cannot run heimdall");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        ran: marker.path.exists(),
        elapsed: started.elapsed(),
    }
}

/// Runs heimdall with `configure`'s options (connection, environment), a lock of its own in
/// `namespace` and a command that touches a marker file.
pub fn run_touching(namespace: &str, configure: impl FnOnce(&mut assert_cmd::Command)) -> Run {
    let marker = marker();
    let mut cmd = heimdall();
    configure(&mut cmd);
    cmd.args(["--namespace", namespace, "--name", &unique_name("lock")])
        .arg("--")
        .arg("touch")
        .arg(&marker.path);
    finish(&mut cmd, &marker)
}

/// [`run_touching`] against `database`, with no other options.
pub fn run_touching_on(namespace: &str, database: &str) -> Run {
    run_touching(namespace, |cmd| {
        cmd.args(["--database", database]);
    })
}

// ---------------------------------------------------------------------------
// Commands for one lock on the shared cluster
// ---------------------------------------------------------------------------

/// `heimdall --database SHARED --namespace NAMESPACE --name NAME`, the rest for the test to add.
pub fn locked(namespace: &str, name: &str) -> assert_cmd::Command {
    let mut cmd = heimdall();
    cmd.args(lock_args(&shared().url(), namespace, name));
    cmd
}

/// Tries the lock with a probing heimdall: true if it ran its command (the lock was free),
/// false if it exited 75 (the lock is held elsewhere) without running it.
pub fn lock_is_free(namespace: &str, name: &str) -> bool {
    let output = locked(namespace, name)
        .args(["--", "echo", "ran"])
        .output()
        .expect("cannot run heimdall");
    match output.status.code() {
        Some(0) => {
            assert_eq!(String::from_utf8_lossy(&output.stdout), "ran\n");
            true
        }
        Some(75) => {
            assert!(output.stdout.is_empty(), "a refused run ran its command");
            false
        }
        _ => panic!(
            "the probing heimdall ended with {}; stderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// [`locked`] as a `std::process::Command`, for a run the test spawns.
pub fn locked_std(namespace: &str, name: &str) -> Command {
    let mut cmd = heimdall_std();
    cmd.args(lock_args(&shared().url(), namespace, name));
    cmd
}

fn lock_args<'a>(database: &'a str, namespace: &'a str, name: &'a str) -> [&'a str; 6] {
    [
        "--database",
        database,
        "--namespace",
        namespace,
        "--name",
        name,
    ]
}

// ---------------------------------------------------------------------------
// A lock held in the background
// ---------------------------------------------------------------------------

/// A heimdall started in the background whose command touches a "started" file and then waits
/// for a "stop" file (at most ~30 s, so a failed test leaves nothing running for long).
/// Dropping it lets the command finish, and kills a heimdall that does not exit.
pub struct Holder {
    child: Child,
    dir: TempDir,
}

impl Holder {
    /// Starts heimdall on `database` holding `namespace/name`; returns once its command runs.
    pub fn start(database: &str, namespace: &str, name: &str) -> Holder {
        let mut cmd = heimdall_std();
        cmd.args(lock_args(database, namespace, name));
        Holder::start_with(cmd)
    }

    /// Starts `heimdall`, a heimdall command given its connection and lock options already, with
    /// the holding command; returns once that command runs, and panics with heimdall's stderr
    /// if it never does.
    pub fn start_with(mut heimdall: Command) -> Holder {
        let dir = tempfile::tempdir().expect("cannot create a temp dir");
        let child = heimdall
            .args([
                "--",
                "sh",
                "-c",
                r#"touch "$1"; i=0; while [ ! -e "$2" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"#,
                "sh",
            ])
            .arg(dir.path().join("started"))
            .arg(dir.path().join("stop"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start heimdall");
        let mut holder = Holder { child, dir };
        let started = holder.dir.path().join("started");
        if !busy_wait(START_LIMIT, || started.exists()) {
            let status = wait_child(&mut holder.child, Duration::from_millis(100));
            let mut stderr = String::new();
            if let Some(mut pipe) = holder.child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            panic!("the command never started (heimdall: {status:?}): {stderr}");
        }
        holder
    }

    /// heimdall's own pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the command finish and asserts that heimdall then exits 0.
    pub fn stop(mut self) {
        fs::write(self.dir.path().join("stop"), "").expect("cannot write the stop file");
        let status = wait_child(&mut self.child, RUN_LIMIT);
        assert!(
            status.is_some_and(|s| s.success()),
            "heimdall did not exit 0 after its command finished: {status:?}"
        );
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.path().join("stop"), "");
        if wait_child(&mut self.child, Duration::from_secs(5)).is_none() {
            eprintln!("heimdall {} did not stop; killed it", self.child.id());
        }
    }
}
