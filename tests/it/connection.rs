//! Where heimdall connects and what it refuses: every connection source (URL, key=value,
//! environment, unix socket, password sources), the application_name it shows the server, bad
//! input with its documented exit code, passwords that must never be printed, and hot standbys.
//!
//! Every run uses a lock name of its own and a command that touches a marker file, so each test
//! checks that the command really ran, or really did not.

use std::net::TcpListener;
use std::time::Duration;

use crate::support::runs::{Holder, Run, finish, marker, run_touching, run_touching_on};
use crate::support::{PW_PASSWORD, PW_USER, REFUSED_PORT, TestPostgres, unique_name};

/// A password distinctive enough that finding it in any output is a leak.
const SECRET: &str = "hunter2-secret";
/// The lock namespace of every run in this file; names come from [`unique_name`].
const NAMESPACE: &str = "conn";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs heimdall with `configure`'s options, a lock of its own and a command that touches
/// a marker file.
fn run(configure: impl FnOnce(&mut assert_cmd::Command)) -> Run {
    run_touching(NAMESPACE, configure)
}

/// Runs heimdall against `database`.
fn run_on(database: &str) -> Run {
    run_touching_on(NAMESPACE, database)
}

/// A TCP URL for `user` (and `password`) on the shared cluster.
fn url_as(pg: &TestPostgres, user: &str, password: Option<&str>) -> String {
    let credentials = match password {
        Some(p) => format!("{user}:{p}"),
        None => user.to_owned(),
    };
    format!(
        "postgres://{credentials}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    )
}

/// PG* variables that reach [`PW_USER`] on the shared cluster, without a password.
fn pw_user_env(cmd: &mut assert_cmd::Command, pg: &TestPostgres) {
    cmd.env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port().to_string())
        .env("PGUSER", PW_USER)
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "disable");
}

/// Every application_name the server shows right now.
fn application_names(pg: &TestPostgres) -> Vec<String> {
    pg.client()
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE application_name <> ''",
            &[],
        )
        .expect("cannot read pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Every connection source works
// ---------------------------------------------------------------------------

#[test]
fn runs_with_a_postgres_url() {
    let pg = crate::support::shared();
    assert!(pg.url().starts_with("postgres://"));
    run_on(&pg.url()).assert_ran();
}

#[test]
fn runs_with_a_postgresql_url() {
    let pg = crate::support::shared();
    let url = pg.url().replacen("postgres://", "postgresql://", 1);
    run_on(&url).assert_ran();
}

#[test]
fn runs_with_a_key_value_conninfo() {
    let pg = crate::support::shared();
    run_on(&pg.conninfo()).assert_ran();
}

#[test]
fn runs_with_heimdall_database_url_from_the_environment() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.env("HEIMDALL_DATABASE_URL", pg.url());
    })
    .assert_ran();
}

#[test]
fn runs_with_database_url_from_the_environment() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.env("DATABASE_URL", pg.url());
    })
    .assert_ran();
}

#[test]
fn heimdall_database_url_wins_over_database_url() {
    let pg = crate::support::shared();
    let refused = format!("postgres://nobody@127.0.0.1:{REFUSED_PORT}/nothing");
    run(|cmd| {
        cmd.env("HEIMDALL_DATABASE_URL", pg.url())
            .env("DATABASE_URL", &refused);
    })
    .assert_ran();
}

#[test]
fn an_empty_heimdall_database_url_falls_back_to_database_url() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.env("HEIMDALL_DATABASE_URL", "")
            .env("DATABASE_URL", pg.url());
    })
    .assert_ran();
}

#[test]
fn runs_with_only_pg_environment_variables() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port().to_string())
            .env("PGUSER", pg.superuser())
            .env("PGDATABASE", "postgres");
    })
    .assert_ran();
}

#[test]
fn runs_through_a_unix_socket_named_in_a_url() {
    let pg = crate::support::shared();
    let url = format!(
        "postgresql:///postgres?host={}&port={}&user={}",
        pg.socket_dir().display(),
        pg.port(),
        pg.superuser()
    );
    run_on(&url).assert_ran();
}

#[test]
fn runs_through_a_unix_socket_named_in_a_conninfo() {
    let pg = crate::support::shared();
    let conninfo = format!(
        "host={} port={} user={} dbname=postgres",
        pg.socket_dir().display(),
        pg.port(),
        pg.superuser()
    );
    run_on(&conninfo).assert_ran();
}

#[test]
fn authenticates_with_pgpassword() {
    let pg = crate::support::shared();
    // Without the password the same run must fail, or the test proves nothing.
    run(|cmd| pw_user_env(cmd, pg))
        .assert_failed(69)
        .assert_stderr_contains("password");
    run(|cmd| {
        pw_user_env(cmd, pg);
        cmd.env("PGPASSWORD", PW_PASSWORD);
    })
    .assert_ran()
    .assert_never_shows(PW_PASSWORD);
}

#[test]
fn authenticates_with_a_pgpass_file_named_by_pgpassfile() {
    let pg = crate::support::shared();
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("passwords");
    pg.write_pgpass(&passfile, 0o600);
    run(|cmd| {
        cmd.args(["--database", &url_as(pg, PW_USER, None)])
            .env("PGPASSFILE", &passfile);
    })
    .assert_ran()
    .assert_never_shows(PW_PASSWORD);
}

#[test]
fn authenticates_with_the_pgpass_file_in_home() {
    let pg = crate::support::shared();
    let home = tempfile::tempdir().unwrap();
    pg.write_pgpass(&home.path().join(".pgpass"), 0o600);
    run(|cmd| {
        cmd.args(["--database", &url_as(pg, PW_USER, None)])
            .env("HOME", home.path());
    })
    .assert_ran()
    .assert_never_shows(PW_PASSWORD);
}

/// A password file others can read is ignored (as libpq does), and said so once: as the
/// reason of the failure when a password was needed, also under `-q`, or as a warning when none
/// was, which `-q` silences.
#[test]
fn ignores_a_pgpass_file_others_can_read_and_says_so_once() {
    let pg = crate::support::shared();
    let home = tempfile::tempdir().unwrap();
    pg.write_pgpass(&home.path().join(".pgpass"), 0o644);
    for quiet in [false, true] {
        let run = run(|cmd| {
            cmd.args(["--database", &url_as(pg, PW_USER, None)])
                .env("HOME", home.path());
            if quiet {
                cmd.arg("-q");
            }
        });
        run.assert_refused(69)
            .assert_stderr_contains("password missing")
            .assert_never_shows(PW_PASSWORD);
        // The error carries the warning as its reason (it would be lost under -q otherwise),
        // and the warning is not printed again on a line of its own.
        let line = run.stderr.trim_end();
        assert!(
            line.contains("cannot connect") && line.contains(".pgpass"),
            "quiet={quiet}: {run:#?}"
        );
        assert_eq!(
            line.matches("has group or world access").count(),
            1,
            "quiet={quiet}, the reason once: {run:#?}"
        );
    }
    // A connection that needs no password still warns, once, unless -q.
    for (quiet, expected) in [(false, 1), (true, 0)] {
        let run = run(|cmd| {
            cmd.args(["--database", &pg.url()]).env("HOME", home.path());
            if quiet {
                cmd.arg("-q");
            }
        });
        run.assert_ran();
        let warnings = run.stderr.matches("has group or world access").count();
        assert_eq!(warnings, expected, "quiet={quiet}: {run:#?}");
    }
}

#[test]
fn an_empty_url_password_falls_back_to_the_pgpass_file() {
    let pg = crate::support::shared();
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("passwords");
    pg.write_pgpass(&passfile, 0o600);
    run(|cmd| {
        cmd.args(["--database", &url_as(pg, PW_USER, Some(""))])
            .env("PGPASSFILE", &passfile);
    })
    .assert_ran();
}

#[test]
fn url_values_beat_pg_environment_variables() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.args(["--database", &pg.url()])
            .env("PGHOST", "nosuchhost.invalid")
            .env("PGPORT", REFUSED_PORT.to_string())
            .env("PGUSER", "nosuchuser")
            .env("PGDATABASE", "nosuchdb")
            .env("PGSSLMODE", "require");
    })
    .assert_ran();
}

// ---------------------------------------------------------------------------
// 2. application_name
// ---------------------------------------------------------------------------

#[test]
fn application_name_names_the_lock_and_heimdalls_pid() {
    let pg = crate::support::shared();
    let name = unique_name("app");
    let heimdall = Holder::start(&pg.url(), NAMESPACE, &name);
    let prefix = format!("heimdall {NAMESPACE}/{name} @");
    let ours: Vec<String> = application_names(pg)
        .into_iter()
        .filter(|a| a.starts_with(&prefix))
        .collect();
    assert_eq!(ours.len(), 1, "one session named {prefix:?}: {ours:?}");
    assert!(
        ours[0].contains(&format!("pid {}", heimdall.pid())),
        "{:?} should name heimdall's pid {}",
        ours[0],
        heimdall.pid()
    );
    heimdall.stop();
}

#[test]
fn application_name_from_the_url_is_kept_as_given() {
    let pg = crate::support::shared();
    let wanted = format!("nightly job {}", unique_name("app"));
    let url = format!(
        "{}&application_name={}",
        pg.url(),
        wanted.replace(' ', "%20")
    );
    let heimdall = Holder::start(&url, NAMESPACE, &unique_name("lock"));
    let names = application_names(pg);
    assert!(
        names.contains(&wanted),
        "{wanted:?} not in pg_stat_activity: {names:?}"
    );
    heimdall.stop();
}

// ---------------------------------------------------------------------------
// 3. Bad input
// ---------------------------------------------------------------------------

#[test]
fn malformed_urls_are_usage_errors_that_never_show_the_password() {
    for (url, says) in [
        (
            format!("postgres://u:{SECRET}@localhost:notaport/db"),
            "invalid port 'notaport'",
        ),
        (
            format!("postgres://u:{SECRET}%zz@localhost/db"),
            "percent-encoding",
        ),
        (
            format!("mysql://u:{SECRET}@localhost/db"),
            "postgres:// or postgresql://",
        ),
    ] {
        run(|cmd| {
            cmd.args(["--debug", "--database", &url]);
        })
        .assert_refused(2)
        .assert_stderr_contains(says)
        .assert_never_shows(SECRET);
    }
}

#[test]
fn an_unknown_sslmode_is_a_usage_error() {
    let pg = crate::support::shared();
    let url = pg.url().replace("sslmode=disable", "sslmode=bogus");
    run_on(&url)
        .assert_refused(2)
        .assert_stderr_contains("invalid sslmode 'bogus'");
}

#[test]
fn options_heimdall_cannot_honour_are_usage_errors() {
    // Refusing them beats connecting with less protection than the string asks for.
    let pg = crate::support::shared();
    for option in ["sslcrl=/etc/x.crl", "sslpassword=x", "gssencmode=require"] {
        run_on(&format!("{} {option}", pg.conninfo()))
            .assert_refused(2)
            .assert_stderr_contains("is not supported by heimdall");
    }
}

#[test]
fn an_unknown_connection_option_is_a_usage_error() {
    let pg = crate::support::shared();
    run_on(&format!("{} colour=blue", pg.conninfo()))
        .assert_refused(2)
        .assert_stderr_contains("unknown connection option 'colour'");
    run_on(&format!("{}&colour=blue", pg.url()))
        .assert_refused(2)
        .assert_stderr_contains("unknown connection option 'colour'");
}

#[test]
fn a_refused_port_is_unavailable_and_never_shows_the_password() {
    let url =
        format!("postgres://someone:{SECRET}@127.0.0.1:{REFUSED_PORT}/postgres?sslmode=disable");
    run(|cmd| {
        cmd.args(["--debug", "--database", &url]);
    })
    .assert_failed(69)
    .assert_stderr_contains("Connection refused")
    .assert_never_shows(SECRET);
    // Without --debug, the failure is heimdall's one line.
    run_on(&url).assert_refused(69);
}

#[test]
fn an_unknown_host_is_unavailable() {
    run_on("postgres://someone@nosuchhost.invalid/postgres?sslmode=disable")
        .assert_refused(69)
        .assert_stderr_contains("nosuchhost.invalid");
}

#[test]
fn a_wrong_password_is_unavailable_and_never_shown() {
    let pg = crate::support::shared();
    let url = url_as(pg, PW_USER, Some(SECRET));
    run_on(&url)
        .assert_refused(69)
        .assert_stderr_contains("authentication failed")
        .assert_never_shows(SECRET);
    run(|cmd| {
        cmd.args(["--debug", "--database", &url]);
    })
    .assert_failed(69)
    .assert_stderr_contains("authentication failed")
    .assert_never_shows(SECRET);
}

#[test]
fn a_missing_command_is_a_usage_error() {
    let pg = crate::support::shared();
    let marker = marker();
    let mut cmd = crate::support::heimdall();
    cmd.args(["--database", &pg.url(), "--namespace", NAMESPACE])
        .args(["--name", &unique_name("lock")]);
    finish(&mut cmd, &marker)
        .assert_refused(2)
        .assert_stderr_contains("<COMMAND>");
}

#[test]
fn a_missing_name_is_a_usage_error() {
    let pg = crate::support::shared();
    let marker = marker();
    let mut cmd = crate::support::heimdall();
    cmd.args([
        "--database",
        &pg.url(),
        "--namespace",
        NAMESPACE,
        "--",
        "touch",
    ])
    .arg(&marker.path);
    finish(&mut cmd, &marker)
        .assert_refused(2)
        .assert_stderr_contains("--name");
}

#[test]
fn a_busy_exit_code_above_255_is_a_usage_error() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.args(["--database", &pg.url(), "--busy-exit-code", "300"]);
    })
    .assert_refused(2)
    .assert_stderr_contains("300");
}

#[test]
fn a_timeout_that_is_not_a_duration_is_a_usage_error() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.args(["--database", &pg.url(), "--timeout", "soon"]);
    })
    .assert_refused(2)
    .assert_stderr_contains("soon");
}

#[test]
fn a_server_that_never_answers_is_unavailable_after_the_connect_timeout() {
    // The kernel completes the handshake from the backlog; nobody ever reads or answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("cannot bind a listener");
    let port = silent.local_addr().unwrap().port();
    let url = format!("postgres://someone@127.0.0.1:{port}/postgres?sslmode=disable");
    let run = run(|cmd| {
        cmd.args(["--connect-timeout", "1s", "--database", &url]);
    });
    run.assert_refused(69)
        .assert_stderr_contains("no answer within");
    assert!(
        run.elapsed < Duration::from_secs(10),
        "took {:?} with --connect-timeout 1s",
        run.elapsed
    );
    drop(silent);
}

// ---------------------------------------------------------------------------
// 4. Never print a password
// ---------------------------------------------------------------------------

#[test]
fn a_debug_run_never_shows_the_password() {
    let pg = crate::support::shared();
    run(|cmd| {
        cmd.args([
            "--debug",
            "--database",
            &url_as(pg, PW_USER, Some(PW_PASSWORD)),
        ]);
    })
    .assert_ran()
    .assert_stderr_contains("password=from the connection string")
    .assert_never_shows(PW_PASSWORD);
    run(|cmd| {
        pw_user_env(cmd, pg);
        cmd.env("PGPASSWORD", PW_PASSWORD).arg("--debug");
    })
    .assert_ran()
    .assert_stderr_contains("password=from PGPASSWORD")
    .assert_never_shows(PW_PASSWORD);
}

// ---------------------------------------------------------------------------
// 5. Hot standbys
// ---------------------------------------------------------------------------

#[test]
fn a_hot_standby_is_refused_and_read_write_rejects_it() {
    let primary = TestPostgres::start();
    let standby = primary.start_standby();

    // The primary itself is fine, so the refusal below is about the standby.
    run_on(&format!(
        "{}&target_session_attrs=read-write",
        primary.url()
    ))
    .assert_ran();

    run_on(&standby.url())
        .assert_refused(78)
        .assert_stderr_contains("hot standby");

    run_on(&format!(
        "{}&target_session_attrs=read-write",
        standby.url()
    ))
    .assert_refused(69)
    .assert_stderr_contains("does not allow writes");
}
