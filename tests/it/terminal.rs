//! A wait that a person watches (issue 25, section 5): with stderr a terminal, one status line
//! redrawn while `--wait` waits, erased when the wait ends, whatever ends it; with stderr a
//! pipe or a file (cron mail, CI logs), or under `-q`, nothing of it. heimdall runs under
//! `script` (util-linux), which gives it a pseudo-terminal and copies what it writes there.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::support::locks::{LockId, waiters};
use crate::support::runs::{Holder, locked_std};
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, busy_wait, run_under, shared, text, unique_name, wait_child,
};

const NAMESPACE: &str = "terminal";
/// What draws the line again (`\r`) after erasing it (ECMA-48 EL).
const ERASE: &str = "\r\x1b[K";
const FRAME: &str = "\r\x1b[Kheimdall: waiting ";

/// `cmd`, with its environment, run by `script` on a pseudo-terminal of its own: heimdall's
/// stdout and stderr are that terminal; `script` copies what reaches it to its own stdout.
fn at_a_terminal(cmd: &Command) -> Command {
    let quoted: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| format!("'{}'", word.to_str().unwrap().replace('\'', r"'\''")))
        .collect();
    let mut script = Command::new("script");
    script
        .args(["--quiet", "--return", "--flush", "--command"])
        .arg(quoted.join(" "))
        .arg("/dev/null");
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    // script's terminal has no size: heimdall falls back to $COLUMNS, wide enough for a frame.
    script.env("COLUMNS", "300");
    // What is written to script's stdin is typed at the terminal.
    script
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    script
}

/// A child whose stdout is read as it comes.
struct Watched {
    child: Child,
    seen: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Watched {
    fn spawn(mut cmd: Command) -> Watched {
        let mut child = cmd.spawn().expect("cannot run script(1) (util-linux)");
        let mut out = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let reader = std::thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Watched {
            child,
            seen,
            reader,
        }
    }

    fn seen(&self) -> String {
        text(&self.seen.lock().unwrap())
    }

    /// Waits for the child's end; its exit code and everything it wrote.
    fn finish(mut self) -> (Option<i32>, String) {
        let status = wait_child(&mut self.child, RUN_LIMIT);
        self.reader.join().unwrap();
        let seen = text(&self.seen.lock().unwrap());
        (status.and_then(|s| s.code()), seen)
    }
}

/// The frames drawn in `out`, each up to the next carriage return.
fn frames(out: &str) -> Vec<&str> {
    out.match_indices(FRAME)
        .map(|(at, _)| {
            let frame = &out[at + ERASE.len()..];
            &frame[..frame.find('\r').unwrap_or(frame.len())]
        })
        .collect()
}

/// What follows the last frame in `out`, where the line must be erased.
fn after_last_frame(out: &str) -> &str {
    let last = out
        .rfind(FRAME)
        .unwrap_or_else(|| panic!("no frame: {out:?}"));
    let after = &out[last + FRAME.len()..];
    assert!(after.contains(ERASE), "never erased: {out:?}");
    after
}

/// Holds `name`, starts `waiter` (heimdall with its options, under `script`) and waits until
/// it has drawn a frame whose wait reads `1s`: the line is redrawn as the wait goes on.
fn wait_behind_a_holder(name: &str, waiter: &mut Command) -> (Holder, Watched) {
    let holder = Holder::start_with(locked_std(NAMESPACE, name));
    let watched = Watched::spawn(at_a_terminal(waiter));
    let redrawn = busy_wait(REACT_LIMIT, || {
        frames(&watched.seen())
            .iter()
            .any(|f| f.contains("heimdall: waiting 1s "))
    });
    assert!(
        redrawn,
        "no frame after a second of waiting: {:?}",
        watched.seen()
    );
    (holder, watched)
}

#[test]
fn a_wait_at_a_terminal_shows_a_live_line_and_erases_it_when_the_lock_comes() {
    let name = unique_name("live");
    let mut waiter = locked_std(NAMESPACE, &name);
    waiter.args(["--wait=1m", "--", "echo", "the command ran"]);
    let (holder, watched) = wait_behind_a_holder(&name, &mut waiter);
    let holder_pid = holder.pid();
    holder.stop();
    let (code, out) = watched.finish();
    assert_eq!(code, Some(0), "{out:?}");

    let frames = frames(&out);
    assert!(frames.len() >= 2, "one frame a second: {out:?}");
    let first = frames[0];
    for part in [
        format!("heimdall: waiting 0s of 1m for lock {NAMESPACE}/{name}, held "),
        " by pid ".to_owned(),
        format!(" pid {holder_pid}\")"),
    ] {
        assert!(first.contains(&part), "{part:?} not in {first:?}");
    }
    assert!(
        frames.iter().any(|f| f.contains("waiting 1s of 1m ")),
        "{out:?}"
    );
    // Erased after the last frame, before the command wrote anything; never drawn again.
    let after = after_last_frame(&out);
    let erased = after
        .find(ERASE)
        .unwrap_or_else(|| panic!("never erased: {out:?}"));
    let ran = after
        .find("the command ran")
        .unwrap_or_else(|| panic!("{out:?}"));
    assert!(
        erased < ran,
        "the command wrote before the line was erased: {out:?}"
    );
    assert!(
        !after[..erased].contains('\n'),
        "one line, redrawn in place: {out:?}"
    );
}

#[test]
fn a_wait_that_runs_out_at_a_terminal_erases_the_line_before_the_busy_message() {
    let name = unique_name("runs-out");
    let mut waiter = locked_std(NAMESPACE, &name);
    waiter.args(["--wait=3s", "--", "echo", "the command ran"]);
    let (holder, watched) = wait_behind_a_holder(&name, &mut waiter);
    let (code, out) = watched.finish();
    holder.stop();
    assert_eq!(code, Some(75), "{out:?}");
    let after = after_last_frame(&out);
    let busy = after
        .find("heimdall: lock ")
        .unwrap_or_else(|| panic!("{out:?}"));
    let erased = after
        .find(ERASE)
        .unwrap_or_else(|| panic!("never erased: {out:?}"));
    assert!(erased < busy, "{out:?}");
    assert!(after[busy..].contains("after waiting"), "{out:?}");
    assert!(!out.contains("the command ran"), "{out:?}");
}

#[test]
fn a_lease_wait_at_a_terminal_shows_the_line_too() {
    let name = unique_name("lease");
    let holder = Holder::start_with({
        let mut cmd = locked_std(NAMESPACE, &name);
        cmd.args(["--lease-table", "terminal_leases"]);
        cmd
    });
    let mut waiter = locked_std(NAMESPACE, &name);
    waiter.args([
        "--lease-table",
        "terminal_leases",
        "--wait=1m",
        "--",
        "true",
    ]);
    let watched = Watched::spawn(at_a_terminal(&waiter));
    let drawn = busy_wait(REACT_LIMIT, || {
        frames(&watched.seen())
            .iter()
            .any(|f| f.contains("waiting 1s of 1m ") && f.contains(" by \"heimdall "))
    });
    holder.stop();
    let (code, out) = watched.finish();
    assert!(drawn, "{out:?}");
    assert_eq!(code, Some(0), "{out:?}");
    after_last_frame(&out);
}

/// Ctrl-C, as a person waiting would type it: the wait is cancelled, the line goes.
#[test]
fn ctrl_c_at_the_terminal_ends_the_wait_and_erases_the_line() {
    let name = unique_name("ctrl-c");
    let mut waiter = locked_std(NAMESPACE, &name);
    waiter.args(["--wait=1m", "--", "echo", "the command ran"]);
    let (holder, mut watched) = wait_behind_a_holder(&name, &mut waiter);
    let mut keyboard = watched.child.stdin.take().unwrap();
    keyboard.write_all(b"\x03").unwrap();
    let (code, out) = watched.finish();
    holder.stop();
    assert_eq!(code, Some(130), "{out:?}");
    assert!(out.contains("received SIGINT"), "{out:?}");
    assert!(!out.contains("the command ran"), "{out:?}");
    after_last_frame(&out);
}

/// Ctrl-S at the terminal stops its output: every write to it waits (a non-blocking one fails)
/// until Ctrl-Q. The wait's line must never hold up the lock or the command meanwhile.
#[test]
fn a_terminal_that_stops_reading_never_holds_up_the_command() {
    let name = unique_name("stopped");
    let marker = crate::support::runs::marker();
    let mut waiter = locked_std(NAMESPACE, &name);
    waiter.args(["--wait=1m", "--", "touch"]).arg(&marker.path);
    let (holder, mut watched) = wait_behind_a_holder(&name, &mut waiter);
    let mut keyboard = watched.child.stdin.take().unwrap();
    keyboard.write_all(b"\x13").unwrap();
    // Output stops: frames come every second, and none comes through for 2.5 s.
    let stopped_at = watched.seen().len();
    let since = std::time::Instant::now();
    assert!(busy_wait(REACT_LIMIT, || since.elapsed().as_millis() > 2500));
    assert!(
        watched.seen().len() <= stopped_at + 200,
        "{:?}",
        watched.seen()
    );
    holder.stop();
    let ran = busy_wait(REACT_LIMIT, || marker.path.exists());
    keyboard.write_all(b"\x11").unwrap();
    let (code, out) = watched.finish();
    assert!(
        ran,
        "the command did not run while the terminal was stopped: {out:?}"
    );
    assert_eq!(code, Some(0), "{out:?}");
}

/// Cron mail and CI logs: stderr is a pipe or a file; and `-q` at a terminal.
#[test]
fn without_a_terminal_or_under_quiet_nothing_of_the_line_is_written() {
    for (quiet, terminal) in [(false, false), (true, true)] {
        let name = unique_name("unseen");
        let holder = Holder::start_with(locked_std(NAMESPACE, &name));
        let mut waiter = locked_std(NAMESPACE, &name);
        if quiet {
            waiter.arg("-q");
        }
        waiter.args(["--wait=1m", "--", "echo", "the command ran"]);
        let watched = if terminal {
            Watched::spawn(at_a_terminal(&waiter))
        } else {
            // heimdall's stderr into its stdout pipe, read as it comes.
            let mut sh = run_under("sh", &["-c", "exec \"$@\" 2>&1", "sh"], &waiter);
            sh.stdin(Stdio::null()).stdout(Stdio::piped());
            Watched::spawn(sh)
        };
        // Queued in the server's lock queue: a first frame would have been drawn just before.
        let id = LockId::of(NAMESPACE, &name);
        let mut client = shared().client();
        assert!(busy_wait(REACT_LIMIT, || !waiters(&mut client, id).is_empty()));
        holder.stop();
        let (code, out) = watched.finish();
        assert_eq!(code, Some(0), "{out:?}");
        assert!(out.contains("the command ran"), "{out:?}");
        assert!(!out.contains("waiting") && !out.contains('\x1b'), "{out:?}");
    }
}
