//! Several hosts in one connection string, as libpq tries them: in order (or shuffled with
//! `load_balance_hosts=random`) until one accepts, skipping a read-only one under
//! `target_session_attrs=read-write`. The point of it all: the lock is taken on the primary, and
//! a hot standby reached by accident is refused (78), never used.
//!
//! Hosts that refuse use a port nobody listens on; standby cases use one primary + hot standby
//! pair owned by this file ([`with_pair`]). Every run touches a marker file, so each test checks
//! that the command really ran, or really did not.

use std::net::TcpListener;
use std::sync::Mutex;
use std::time::Duration;

use crate::support::locks::{LockId, holders};
use crate::support::runs::{Holder, Run, run_touching, run_touching_on};
use crate::support::{REFUSED_PORT, TestPostgres, unique_name};

/// The lock namespace of every run in this file; names come from [`unique_name`].
const NAMESPACE: &str = "mh";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs heimdall against `database` with a lock of its own and a command that touches a
/// marker file.
fn run_on(database: &str) -> Run {
    run_touching_on(NAMESPACE, database)
}
/// `postgresql://SUPERUSER@127.0.0.1:P1,127.0.0.1:P2,…/postgres?sslmode=disable&QUERY`
fn url_for_ports(ports: &[u16], query: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let superuser = crate::support::shared().superuser().to_owned();
    let url = format!(
        "postgresql://{superuser}@{}/postgres?sslmode=disable",
        hosts.join(",")
    );
    if query.is_empty() {
        url
    } else {
        format!("{url}&{query}")
    }
}

/// One primary and its hot standby for the whole file, started on first use and stopped at
/// exit. Tests that use them run one at a time (they hold the lock for their whole run), so
/// no test sees another's sessions.
struct Pair {
    primary: TestPostgres,
    standby: TestPostgres,
}

static PAIR: Mutex<Option<Pair>> = Mutex::new(None);

fn with_pair<R>(test: impl FnOnce(&Pair) -> R) -> R {
    extern "C" fn stop_pair_at_exit() {
        let pair = PAIR.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(Pair { primary, standby }) = pair {
            drop(standby);
            drop(primary);
        }
    }
    // A test that panicked while holding the lock leaves a pair that is still fine to use.
    let mut guard = PAIR.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let primary = TestPostgres::start();
        let standby = primary.start_standby();
        *guard = Some(Pair { primary, standby });
        // SAFETY: registers a plain function with no captured state; atexit has no other
        // preconditions. Reached once: the pair is never taken out before exit.
        if unsafe { libc::atexit(stop_pair_at_exit) } != 0 {
            eprintln!("multihost: atexit failed; the pair stops on exit by PDEATHSIG only");
        }
    }
    test(guard.as_ref().expect("the pair was just started"))
}

/// How many backends of `pg` hold the lock `NAMESPACE/name`.
fn advisory_locks_named(pg: &TestPostgres, name: &str) -> usize {
    holders(&mut pg.client(), LockId::of(NAMESPACE, name)).len()
}

// ---------------------------------------------------------------------------
// 1. Hosts that refuse connections are skipped
// ---------------------------------------------------------------------------

#[test]
fn a_refused_first_host_falls_through_to_the_second_in_a_url() {
    let pg = crate::support::shared();
    run_on(&url_for_ports(&[REFUSED_PORT, pg.port()], "")).assert_ran();
}

#[test]
fn a_refused_first_host_falls_through_to_the_second_in_key_value_form() {
    let pg = crate::support::shared();
    run_on(&format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname=postgres sslmode=disable",
        REFUSED_PORT,
        pg.port(),
        pg.superuser()
    ))
    .assert_ran();
}

#[test]
fn every_host_refusing_is_unavailable() {
    run_on(&url_for_ports(&[REFUSED_PORT, REFUSED_PORT], "")).assert_refused(69);
}

#[test]
fn a_silent_first_host_costs_one_connect_timeout_then_the_next_host_is_tried() {
    let pg = crate::support::shared();
    // The kernel completes the handshake from the backlog; nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("cannot bind a listener");
    let url = url_for_ports(&[silent.local_addr().unwrap().port(), pg.port()], "");
    let run = run_touching(NAMESPACE, |cmd| {
        cmd.args(["--connect-timeout", "3s", "--database", &url, "--debug"]);
    });
    eprintln!(
        "a silent first host, --connect-timeout 3s: ran after {:?}",
        run.elapsed
    );
    run.assert_ran();
    assert!(
        run.elapsed < Duration::from_secs(3 + 5),
        "--connect-timeout bounds each host: {:?}",
        run.elapsed
    );
    // The abandoned attempt's socket is closed: the keeper gets the one connection that holds.
    let handed = run
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("heimdall: keeper: handing over sockets "))
        .unwrap_or_else(|| panic!("no hand-over: {run:#?}"));
    assert_eq!(handed.split(',').count(), 1, "{handed}");
    drop(silent);
}

#[test]
fn when_every_host_fails_each_one_is_named_with_its_own_error() {
    let pg = crate::support::shared();
    let silent = TcpListener::bind("127.0.0.1:0").expect("cannot bind a listener");
    let silent_port = silent.local_addr().unwrap().port();
    let url = format!(
        "postgresql://{}@127.0.0.1:{},127.0.0.1:{silent_port},127.0.0.1:{REFUSED_PORT}/no_such_db?sslmode=disable",
        pg.superuser(),
        pg.port()
    );
    let run = run_touching(NAMESPACE, |cmd| {
        cmd.args(["--connect-timeout", "2s", "--database", &url]);
    });
    run.assert_refused(69);
    eprintln!("every host failed: {}", run.stderr.trim_end());
    for (port, error) in [
        (pg.port(), "\"no_such_db\" does not exist"),
        (silent_port, "no answer within 2s"),
        (REFUSED_PORT, "refused"),
    ] {
        let host = format!("127.0.0.1 port {port}: ");
        let at = run
            .stderr
            .find(&host)
            .unwrap_or_else(|| panic!("{host:?} is not named: {run:#?}"));
        assert!(
            run.stderr[at..].split("; ").next().unwrap().contains(error),
            "{host:?} with its own error {error:?}: {run:#?}"
        );
    }
    drop(silent);
}

#[test]
fn load_balance_hosts_random_still_reaches_the_one_live_host() {
    let pg = crate::support::shared();
    // Over 8 runs a shuffle puts the refused host first about half the time.
    for _ in 0..8 {
        run_on(&url_for_ports(
            &[REFUSED_PORT, pg.port()],
            "load_balance_hosts=random",
        ))
        .assert_ran();
    }
}

#[test]
fn an_invalid_load_balance_hosts_is_a_usage_error() {
    let pg = crate::support::shared();
    run_on(&url_for_ports(&[pg.port()], "load_balance_hosts=sometimes"))
        .assert_refused(2)
        .assert_stderr_contains("load_balance_hosts");
}

// ---------------------------------------------------------------------------
// 2. A hot standby listed first
// ---------------------------------------------------------------------------

#[test]
fn read_write_skips_a_hot_standby_listed_first_and_locks_on_the_primary() {
    with_pair(|pair| {
        let name = unique_name("rw");
        let url = url_for_ports(
            &[pair.standby.port(), pair.primary.port()],
            "target_session_attrs=read-write",
        );
        let bg = Holder::start(&url, NAMESPACE, &name);
        assert_eq!(
            advisory_locks_named(&pair.primary, &name),
            1,
            "the lock should be held on the primary while the command runs"
        );
        assert_eq!(
            advisory_locks_named(&pair.standby, &name),
            0,
            "nothing should be locked on the standby"
        );
        bg.stop();
    });
}

#[test]
fn without_target_session_attrs_a_hot_standby_listed_first_is_refused() {
    with_pair(|pair| {
        run_on(&url_for_ports(
            &[pair.standby.port(), pair.primary.port()],
            "",
        ))
        .assert_refused(78)
        .assert_stderr_contains("hot standby");
    });
}

#[test]
fn load_balance_hosts_disable_tries_the_hosts_in_the_order_given() {
    with_pair(|pair| {
        let query = "load_balance_hosts=disable";
        run_on(&url_for_ports(
            &[pair.standby.port(), pair.primary.port()],
            query,
        ))
        .assert_refused(78);
        run_on(&url_for_ports(
            &[pair.primary.port(), pair.standby.port()],
            query,
        ))
        .assert_ran();
    });
}

#[test]
fn load_balance_hosts_random_with_read_write_always_locks_on_the_primary() {
    with_pair(|pair| {
        for _ in 0..8 {
            run_on(&url_for_ports(
                &[pair.standby.port(), pair.primary.port()],
                "target_session_attrs=read-write&load_balance_hosts=random",
            ))
            .assert_ran();
        }
    });
}
