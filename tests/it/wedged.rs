//! A stderr whose reader is alive but no longer reads (issue 22, item 1): a wedged logger, a
//! full journald stream, `| less` in another window. No write of heimdall's or of its keeper's
//! may hold up what protects the lock: the job is stopped within the watchdog's bound when the
//! lock is lost, and killed before the lock goes when heimdall itself dies, in advisory and in
//! lease mode. Messages are best effort and come after the action.
//!
//! Each stderr is filled before heimdall starts (see `support::wedged`).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::hardening::{
    NAMESPACE, sigkill_then_no_step_under_the_next_holder, terminate_holder, wait_pids,
};
use crate::lease::SHORT_LEASE;
use crate::support::procs::{Running, heimdall_sh, process_alive, shared_sh};
use crate::support::wedged::Wedged;
use crate::support::{RUN_LIMIT, START_LIMIT, busy_wait, new_dir, shared, unique_name};

/// The tightest watchdog: a check a second, answered within a second, SIGKILL a second after
/// SIGTERM.
const TIGHT: [&str; 4] = ["--heartbeat", "1s", "--kill-after", "1s"];
/// After the server ends the session, the job is gone within heartbeat + heartbeat-timeout +
/// kill-after (docs/failures.md, The watchdog), 3 s with [`TIGHT`]; 5 s more for a loaded machine.
const STOP_BOUND: Duration = Duration::from_secs(3 + 5);

/// The command: records the lock's key, its own pid and a background step's, then waits.
const JOB: &str = "echo $HEIMDALL_KEY > key; echo $$ > pid; sleep 60 & echo $! >> pids; wait";

/// The holder's backend is terminated while heimdall's stderr is wedged: the job must still be
/// gone within the watchdog's bound, and heimdall exit 76.
fn lost_lock_stops_the_job_despite(wedged: Wedged, dir: &Path) {
    let name = unique_name("wedged-lost");
    let cmd = shared_sh(NAMESPACE, dir, &name, &TIGHT, JOB);
    let mut run = Running::spawn_with_stderr(cmd, wedged.stdio());
    let leader = run.command_pid(dir, START_LIMIT);
    let step = wait_pids(dir, 1)[0];

    terminate_holder(dir);
    let lost = Instant::now();
    let stopped = busy_wait(STOP_BOUND, || {
        !process_alive(leader) && !process_alive(step)
    });
    let took = lost.elapsed();
    assert!(
        stopped,
        "the job still ran {took:?} after its lock was lost (bound {STOP_BOUND:?}): heimdall is \
         blocked writing to its stderr"
    );
    eprintln!("the job was gone {took:?} after the lock was lost");
    let (status, _) = run.finish(RUN_LIMIT);
    assert_eq!(status.code(), Some(76), "heimdall ended with {status}");
    drop(wedged);
}

/// What heimdall queued while nobody read comes out, whole and in order, once stderr is read
/// again.
#[test]
fn lines_queued_while_stderr_was_wedged_come_out_once_it_is_read_again() {
    let dir = new_dir();
    let name = unique_name("wedged-queue");
    let wedged = Wedged::pipe();
    let cmd = shared_sh(
        NAMESPACE,
        dir.path(),
        &name,
        &["-v"],
        "echo $$ > pid; while [ ! -e go ]; do sleep 0.05; done",
    );
    let mut run = Running::spawn_with_stderr(cmd, wedged.stdio());
    let pid = run.command_pid(dir.path(), START_LIMIT);
    let drained = wedged.unwedge();
    let started = format!("heimdall: started the command as pid {pid}\n");
    let arrived = busy_wait(START_LIMIT, || drained.text().contains(&started));
    std::fs::write(dir.path().join("go"), "").unwrap();
    run.expect_exit(0, RUN_LIMIT);
    let text = drained.text();
    assert!(arrived, "heimdall wrote: {text}");
    let connecting = text.find("heimdall: connecting to").unwrap_or(usize::MAX);
    assert!(
        connecting < text.find(&started).unwrap(),
        "out of order: {text}"
    );
    assert!(
        text.lines().all(|l| l.starts_with("heimdall: ")),
        "a line came out cut or mixed: {text}"
    );
}

#[test]
fn a_wedged_stderr_pipe_does_not_keep_the_job_running_after_the_lock_is_lost() {
    lost_lock_stops_the_job_despite(Wedged::pipe(), new_dir().path());
}

#[test]
fn a_wedged_stderr_fifo_does_not_keep_the_job_running_after_the_lock_is_lost() {
    let dir = new_dir();
    lost_lock_stops_the_job_despite(Wedged::fifo(dir.path()), dir.path());
}

#[test]
fn a_wedged_stderr_socket_does_not_keep_the_job_running_after_the_lock_is_lost() {
    lost_lock_stops_the_job_despite(Wedged::socket(), new_dir().path());
}

#[test]
fn a_wedged_stderr_terminal_does_not_keep_the_job_running_after_the_lock_is_lost() {
    lost_lock_stops_the_job_despite(Wedged::pty(), new_dir().path());
}

/// heimdall is SIGKILLed with its stderr wedged: its keeper must kill the job before the lock
/// goes, and then let it go.
fn keeper_kills_the_job_despite(wedged: Wedged) {
    let dir = new_dir();
    let name = unique_name("wedged-keeper");
    let cmd = shared_sh(NAMESPACE, dir.path(), &name, &[], JOB);
    let mut run = Running::spawn_with_stderr(cmd, wedged.stdio());
    let leader = run.command_pid(dir.path(), START_LIMIT);
    let step = wait_pids(dir.path(), 1)[0];
    sigkill_then_no_step_under_the_next_holder(&run, dir.path(), &name, &[leader, step]);
    drop(wedged);
}

#[test]
fn the_keeper_kills_the_job_and_releases_the_lock_with_a_wedged_stderr_pipe() {
    keeper_kills_the_job_despite(Wedged::pipe());
}

#[test]
fn the_keeper_kills_the_job_and_releases_the_lock_with_a_wedged_stderr_socket() {
    keeper_kills_the_job_despite(Wedged::socket());
}

/// Run B, which waits for the lease, then writes to `overlaps` if any process whose pid A's job
/// wrote (`pid`, `pids`) still runs (a zombie has finished), and touches `bran`.
fn lease_waiter(dir: &Path, name: &str) -> Running {
    let mut flags = SHORT_LEASE.to_vec();
    flags.push("--wait=30s");
    let check = r#"for p in $(cat pid pids); do s=$(cut -d' ' -f3 "/proc/$p/stat" 2>/dev/null); if [ -n "$s" ] && [ "$s" != Z ]; then echo "$p" >> overlaps; fi; done; touch bran"#;
    Running::spawn(heimdall_sh(
        &shared().url(),
        "lease",
        dir,
        name,
        &flags,
        check,
    ))
}

/// Lease mode: heimdall is stopped (`stop`: SIGKILL, or SIGSTOP, which leaves the keeper to
/// act at the lease's deadline) with its stderr wedged. The lease expires by the clock,
/// whatever the keeper does: the job must be gone before a waiter gets it.
fn lease_job_is_gone_before_the_lease_expires(stop: i32) {
    let dir = new_dir();
    let name = unique_name("wedged-lease");
    let wedged = Wedged::pipe();
    let cmd = heimdall_sh(
        &shared().url(),
        "lease",
        dir.path(),
        &name,
        &SHORT_LEASE,
        "echo $$ > pid; sleep 60 & echo $! >> pids; wait",
    );
    let mut a = Running::spawn_with_stderr(cmd, wedged.stdio());
    a.command_pid(dir.path(), START_LIMIT);
    wait_pids(dir.path(), 1);
    a.signal(stop);
    let mut b = lease_waiter(dir.path(), &name);
    let b_err = b.expect_exit(0, RUN_LIMIT);
    assert!(dir.path().join("bran").exists(), "B never ran: {b_err}");
    let overlaps = std::fs::read_to_string(dir.path().join("overlaps")).unwrap_or_default();
    assert!(
        overlaps.is_empty(),
        "B held the lease while processes {overlaps:?} of A's job ran"
    );
    if stop == libc::SIGSTOP {
        a.signal(libc::SIGCONT);
        a.expect_exit(76, RUN_LIMIT);
    }
    drop(wedged);
}

#[test]
fn a_sigkilled_lease_holders_keeper_kills_the_job_before_the_lease_expires_with_a_wedged_stderr() {
    lease_job_is_gone_before_the_lease_expires(libc::SIGKILL);
}

#[test]
fn a_stopped_lease_holders_keeper_kills_the_job_before_the_lease_expires_with_a_wedged_stderr() {
    lease_job_is_gone_before_the_lease_expires(libc::SIGSTOP);
}
