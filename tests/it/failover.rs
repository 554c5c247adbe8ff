//! Takeover after the holder's host is cut off or loses power: nothing sends the server a FIN
//! or a RST, so only TCP keepalive and `tcp_user_timeout`, which heimdall sets for the holding
//! session from its heartbeat, make the server drop the dead holder's lock. Another host must
//! get the lock within the documented bound, and only once the cut-off job is stopped.
//!
//! The holder runs inside a network namespace of the test's own ([`Netns`]), against a server
//! on this machine that listens on the namespace link too; the test cuts the link. Each test
//! prints how long the lock stayed held after the cut (run with `--nocapture`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::support::netns::Netns;
use crate::support::procs::{self, Running, process_alive};
use crate::support::{ClusterConfig, PG_HBA, RUN_LIMIT, START_LIMIT, TestPostgres, unique_name};

const NAMESPACE: &str = "failover";
/// The holder's watchdog: a check every second, each answered within a second (the default
/// timeout is the interval), and the job killed 1 s after SIGTERM.
const HEARTBEAT: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
const KILL_AFTER: Duration = Duration::from_secs(1);
/// The bound (docs/failures.md, The watchdog) on how long the server keeps a cut-off holder's lock:
/// heartbeat + heartbeat-timeout + kill-after + 2 s, counted from the last packet the server got.
const RELEASE_BOUND: Duration = Duration::from_secs(1 + 1 + 1 + 2);
/// Added to the bound for what the test itself adds: the waiting heimdall must be granted the
/// lock, run its command and exit, on a loaded machine. Without the keepalive settings the
/// server keeps the lock for more than two hours, far beyond this.
const SLACK: Duration = Duration::from_secs(4);

/// A holder inside its own namespace, and a server on this machine it reaches over the link.
/// Fields drop in order: the holder, the server, then the namespace and its links.
struct CutOffHost {
    holder: Running,
    /// The holder's command; it leads its own process group.
    job_pid: i32,
    lock: String,
    dir: TempDir,
    pg: TestPostgres,
    ns: Netns,
}

/// Builds the namespace, starts a server listening on the link too, and a heimdall inside the
/// namespace holding a fresh lock and running `sleep` until told otherwise.
fn hold_from_namespace() -> CutOffHost {
    let ns = Netns::create();
    let pg = TestPostgres::start_with(ClusterConfig {
        listen_addresses: vec![ns.host_addr().to_string()],
        hba: Some(format!(
            "{PG_HBA}host all all {}/32 trust\n",
            ns.inner_addr()
        )),
        ..ClusterConfig::default()
    });
    let url = format!(
        "postgres://{}@{}:{}/postgres?sslmode=disable",
        pg.superuser(),
        ns.host_addr(),
        pg.port()
    );
    let dir = TempDir::new().expect("cannot create a temp dir");
    let lock = unique_name("cut-off");
    let flags = [
        "-v".to_owned(),
        format!("--heartbeat={}s", HEARTBEAT.as_secs()),
        format!("--heartbeat-timeout={}s", HEARTBEAT_TIMEOUT.as_secs()),
        format!("--kill-after={}s", KILL_AFTER.as_secs()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let local = procs::heimdall_sh(
        &url,
        NAMESPACE,
        dir.path(),
        &lock,
        &flags,
        "echo $$ > pid; exec sleep 600",
    );
    let mut inside = ns.wrap(&local);
    inside
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut holder = Running::spawn(inside);
    let job_pid = holder.command_pid(dir.path(), START_LIMIT);
    CutOffHost {
        holder,
        job_pid,
        lock,
        dir,
        pg,
        ns,
    }
}

impl CutOffHost {
    /// A heimdall on this machine queued for the same lock over 127.0.0.1, whose command fails
    /// with 9 if the cut-off job still runs (a zombie has finished): the two must never overlap.
    fn queue_on_this_host(&self) -> Running {
        let wait = format!("--wait={}s", (RELEASE_BOUND + SLACK).as_secs());
        let script = format!(
            "case $(cut -d' ' -f3 /proc/{}/stat 2>/dev/null) in ''|Z|X) ;; *) exit 9 ;; esac",
            self.job_pid
        );
        Running::spawn(procs::heimdall_sh(
            &self.pg.url(),
            NAMESPACE,
            self.dir.path(),
            &self.lock,
            &["-v", &wait],
            &script,
        ))
    }

    /// Waits until `taker` has taken the lock and run its command; returns how long after `cut`.
    fn taken_over(&self, taker: &mut Running, cut: Instant) -> Duration {
        let stderr = taker.expect_exit(0, RELEASE_BOUND + SLACK + RUN_LIMIT);
        let after = cut.elapsed();
        eprintln!(
            "the lock was taken over {:.1}s after the cut (bound {}s + slack {}s)",
            after.as_secs_f64(),
            RELEASE_BOUND.as_secs(),
            SLACK.as_secs()
        );
        assert!(
            after <= RELEASE_BOUND + SLACK,
            "the server kept the cut-off holder's lock for {after:?} after the cut, longer than \
             {RELEASE_BOUND:?} + {SLACK:?}; taker's stderr:\n{stderr}\nserver log: {}",
            self.pg.log_path().display()
        );
        after
    }
}

#[test]
fn a_cut_off_holder_exits_76_and_this_host_takes_over_within_the_bound() {
    let mut host = hold_from_namespace();
    let mut taker = host.queue_on_this_host();
    let cut = Instant::now();
    host.ns.cut();

    let stderr = host.holder.expect_exit(76, RUN_LIMIT);
    assert!(
        !process_alive(host.job_pid),
        "the cut-off job still runs after heimdall exited 76; stderr:\n{stderr}"
    );
    host.taken_over(&mut taker, cut);
}

#[test]
fn the_lock_of_a_holder_that_lost_power_is_released_within_the_bound() {
    let mut host = hold_from_namespace();
    let mut taker = host.queue_on_this_host();
    let cut = Instant::now();
    host.ns.cut();
    // Power loss: the link is gone first, then the process; its FIN never arrives.
    host.holder.signal(libc::SIGKILL);
    let _ = host.holder.finish(RUN_LIMIT);

    host.taken_over(&mut taker, cut);
}
