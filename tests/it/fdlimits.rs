//! Low file-descriptor limits (issue 22, item 13): whatever `ulimit -n` heimdall starts with, it
//! either runs the command under the lock or refuses with one clear line and a documented exit
//! code, before its `--report` line, which stays the last line on stderr. Never a panic, never
//! the command without the lock, never a keeper message after the report, which a spawn that
//! fails at exec (EMFILE then, a bad interpreter here) used to cause.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::time::Duration;

use crate::support::runs::{lock_is_free, locked_std};
use crate::support::{new_dir, unique_name, wait_child};

const NAMESPACE: &str = "heimdall-tests-fdlimits";
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// Enough for heimdall's own needs (docs/design.md, Running the command) and what the test harness
/// leaves open.
const LIMITS_UP_TO: u64 = 32;

/// heimdall with `RLIMIT_NOFILE` set to `limit` (soft and hard, as `prlimit --nofile=N`), its
/// command touching `ran`. Returns (exit code, stderr, whether the command ran).
fn run_with_nofile(limit: u64) -> (Option<i32>, String, bool) {
    let dir = new_dir();
    let name = unique_name(&format!("nofile-{limit}"));
    let mut cmd = locked_std(NAMESPACE, &name);
    cmd.current_dir(dir.path())
        .args(["--report", "json", "--", "touch", "ran"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("cannot start heimdall");
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });
    let status = wait_child(&mut child, RUN_LIMIT).expect("heimdall hung");
    let stderr = reader.join().unwrap();
    assert!(
        status.signal().is_none(),
        "nofile={limit}: heimdall died of signal {:?}; stderr:\n{stderr}",
        status.signal()
    );
    assert!(
        lock_is_free(NAMESPACE, &name),
        "nofile={limit}: the lock is held after heimdall exited"
    );
    (status.code(), stderr, dir.path().join("ran").exists())
}

#[test]
fn every_low_descriptor_limit_gives_a_run_or_one_clear_error_before_the_report() {
    let mut outcomes = Vec::new();
    let mut runs = Vec::new();
    for limit in 3..=LIMITS_UP_TO {
        let (code, stderr, ran) = run_with_nofile(limit);
        let lines: Vec<&str> = stderr.lines().collect();
        outcomes.push(format!("nofile={limit}: exit {code:?}, ran {ran}"));
        runs.push(ran);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("internal error"),
            "nofile={limit}: {stderr}"
        );
        if stderr.contains("error while loading shared libraries") {
            // Below heimdall: the dynamic loader cannot open the C library (3 descriptors are
            // stdin, stdout and stderr). The command cannot run either.
            assert!(!ran, "nofile={limit}");
            continue;
        }
        let report = lines.last().copied().unwrap_or_default();
        assert!(
            report.starts_with('{') && report.contains("\"exit_code\""),
            "nofile={limit}: the report is not the last line on stderr:\n{stderr}"
        );
        if ran {
            assert_eq!(code, Some(0), "nofile={limit}: {stderr}");
            assert_eq!(lines.len(), 1, "nofile={limit}: {stderr}");
        } else {
            assert_eq!(code, Some(125), "nofile={limit}: {stderr}");
            assert_eq!(
                lines.len(),
                2,
                "nofile={limit}: one error, then the report: {stderr}"
            );
            assert!(
                lines[0].contains("file descriptors") && lines[0].contains("ulimit -n"),
                "nofile={limit}: the error does not say what to raise: {stderr}"
            );
        }
    }
    let outcomes = outcomes.join("\n");
    eprintln!("{outcomes}");
    let first_run = runs.iter().position(|&ran| ran);
    assert!(
        first_run.is_some_and(|first| runs[first..].iter().all(|&ran| ran)),
        "heimdall must run its command from some limit up to {LIMITS_UP_TO}, at every limit \
         above that:\n{outcomes}"
    );
}

#[test]
fn a_spawn_that_fails_at_exec_ends_with_one_error_and_the_report_last() {
    let dir = new_dir();
    let script = dir.path().join("bad-interpreter");
    fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let out = locked_std(NAMESPACE, &unique_name("exec-fails"))
        .current_dir(dir.path())
        .args(["--report", "json", "--", "./bad-interpreter"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "one error, then the report:\n{stderr}");
    assert!(lines[0].contains("bad-interpreter"), "{stderr}");
    assert!(
        lines[1].starts_with('{'),
        "the report is not last:\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(127), "{stderr}");
}
