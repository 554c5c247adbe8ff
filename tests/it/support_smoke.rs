//! Proves the test support module works: clusters start, authenticate as
//! configured, replicate, and the process helpers see what they claim to see.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::support::{PG_BIN_VAR, PW_PASSWORD, PW_USER, TestPostgres, output_of, text};
use postgres::error::SqlState;

fn tcp_config(pg: &TestPostgres, user: &str) -> postgres::Config {
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(pg.port())
        .user(user)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    config
}

/// The version matrix runs the suite against the server binaries that `HEIMDALL_TEST_PG_BIN`
/// names: the clusters must be those, or a run "on PostgreSQL 14" would test 15 again.
#[test]
fn the_clusters_run_the_server_that_heimdall_test_pg_bin_names() {
    let Some(dir) = std::env::var_os(PG_BIN_VAR).filter(|d| !d.is_empty()) else {
        return; // Debian's server, found as ever: nothing to compare with.
    };
    let named =
        output_of(Command::new(std::path::Path::new(&dir).join("postgres")).arg("--version"));
    // `postgres (PostgreSQL) 18.4`, and `PostgreSQL 18.4 on x86_64-pc-linux-gnu, …` from the server.
    let named = text(&named.stdout);
    let release = named
        .split_whitespace()
        .nth(2)
        .expect("postgres --version: NAME (PostgreSQL) X.Y");
    let running: String = crate::support::shared()
        .client()
        .query_one("select pg_catalog.version()", &[])
        .unwrap()
        .get(0);
    assert!(
        running.starts_with(&format!("PostgreSQL {release} ")),
        "{PG_BIN_VAR} names PostgreSQL {release}, but the shared cluster runs {running}"
    );
}

#[test]
fn shared_cluster_accepts_connections() {
    let pg = crate::support::shared();
    let one: i32 = pg.client().query_one("select 1", &[]).unwrap().get(0);
    assert_eq!(one, 1);

    let mut tcp = pg
        .url()
        .parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    let user: String = tcp
        .query_one("select current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, pg.superuser());

    let mut kv = pg
        .conninfo()
        .parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    let port: String = kv.query_one("show port", &[]).unwrap().get(0);
    assert_eq!(port, pg.port().to_string());
}

#[test]
fn password_user_needs_its_password() {
    let pg = crate::support::shared();

    let without = tcp_config(pg, PW_USER).connect(postgres::NoTls);
    assert!(
        without.is_err(),
        "connected as {PW_USER} without a password"
    );

    let wrong = tcp_config(pg, PW_USER)
        .password("wrong")
        .connect(postgres::NoTls);
    let err = wrong
        .err()
        .expect("connected as {PW_USER} with a wrong password");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err}");

    let mut client = tcp_config(pg, PW_USER)
        .password(PW_PASSWORD)
        .connect(postgres::NoTls)
        .unwrap();
    let user: String = client
        .query_one("select current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, PW_USER);
}

#[test]
fn standby_reports_recovery() {
    let primary = TestPostgres::start();
    let standby = primary.start_standby();
    assert_ne!(standby.port(), primary.port());

    let in_recovery = |pg: &TestPostgres| -> bool {
        pg.client()
            .query_one("select pg_is_in_recovery()", &[])
            .unwrap()
            .get(0)
    };
    assert!(!in_recovery(&primary));
    assert!(in_recovery(&standby));

    let standby_dir = standby.data_dir().to_owned();
    let primary_dir = primary.data_dir().to_owned();
    drop(standby);
    drop(primary);
    assert!(
        !standby_dir.exists() && !primary_dir.exists(),
        "data dirs left behind"
    );
}

#[test]
fn stop_immediate_leaves_nothing_listening() {
    let pg = TestPostgres::start();
    pg.stop_immediate();
    let config = tcp_config(&pg, pg.superuser()).connect(postgres::NoTls);
    assert!(config.is_err(), "server still accepts connections");
}

#[test]
fn process_group_alive_follows_the_group() {
    let mut child = Command::new("sh")
        .args(["-c", "sleep 60 & sleep 60"])
        .process_group(0)
        .spawn()
        .unwrap();
    let pgid = child.id() as i32;
    assert!(crate::support::busy_wait(Duration::from_secs(5), || {
        crate::support::process_group_alive(pgid)
    }));

    // SAFETY: signals a process group we just created.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    assert!(crate::support::wait_child(&mut child, Duration::from_secs(5)).is_some());
    assert!(crate::support::busy_wait(Duration::from_secs(5), || {
        !crate::support::process_group_alive(pgid)
    }));
}

#[test]
fn wait_child_kills_a_child_that_overruns() {
    let mut child = Command::new("sleep").arg("60").spawn().unwrap();
    assert_eq!(
        crate::support::wait_child(&mut child, Duration::from_millis(100)),
        None
    );
    assert!(child.try_wait().unwrap().is_some(), "child still running");
}

#[test]
fn unique_names_differ() {
    assert_ne!(
        crate::support::unique_name("lock"),
        crate::support::unique_name("lock")
    );
}

/// Set only in the copy of this test binary that [`heimdall_command_drops_connection_env`]
/// starts, with connection variables planted in its environment.
const ENV_PROBE: &str = "SUPPORT_SMOKE_ENV_PROBE";

/// Every connection variable of this process's environment is removed from the command that
/// runs heimdall. The environment of the test process cannot be changed safely while other
/// tests run, so the test starts a copy of this binary with variables planted, running only
/// this test, which then checks its own environment.
#[test]
fn heimdall_command_drops_connection_env() {
    if std::env::var_os(ENV_PROBE).is_some() {
        let cmd = crate::support::heimdall_std();
        // The one variable set: the lock-delay is off, since every test cluster has just
        // started.
        for (key, value) in cmd.get_envs() {
            if let Some(value) = value {
                assert_eq!(
                    (
                        key.to_string_lossy().as_ref(),
                        value.to_string_lossy().as_ref()
                    ),
                    (crate::support::LOCK_DELAY_ENV, "0"),
                    "heimdall_std sets a variable of its own"
                );
            }
        }
        let removed = |key: &std::ffi::OsStr| cmd.get_envs().any(|(k, v)| k == key && v.is_none());
        let mut checked = 0;
        for (key, _) in std::env::vars_os() {
            if crate::support::is_connection_variable(&key) && key != crate::support::LOCK_DELAY_ENV
            {
                assert!(removed(&key), "{key:?} is passed to heimdall");
                checked += 1;
            }
        }
        assert!(
            !removed(std::ffi::OsStr::new(ENV_PROBE)),
            "only connection variables go"
        );
        println!("checked {checked} connection variables");
        return;
    }
    let planted = [
        ("PGHOST", "planted.invalid"),
        ("PGPASSWORD", "planted-password"),
        ("PGSSLMODE", "verify-full"),
        ("HEIMDALL_WAIT", "5s"),
        ("HEIMDALL_DATABASE_URL", "postgres://planted.invalid/x"),
        ("DATABASE_URL", "postgres://planted.invalid/y"),
    ];
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "support_smoke::heimdall_command_drops_connection_env",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .envs(planted)
        .env(ENV_PROBE, "1")
        .output()
        .unwrap();
    let stdout = crate::support::text(&out.stdout);
    assert!(
        out.status.success(),
        "the copy found a connection variable passed on:\n{stdout}{}",
        crate::support::text(&out.stderr)
    );
    let checked: usize = stdout
        .split("checked ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the copy did not run the check:\n{stdout}"));
    assert!(
        checked >= planted.len(),
        "the copy checked {checked} variables, fewer than the {} planted",
        planted.len()
    );
}
