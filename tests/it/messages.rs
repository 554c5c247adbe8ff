//! Messages that name the fix (issue 25, section 2): what a new user types wrong, and the one
//! line heimdall answers with, which must say what happened and what to write instead, with
//! the documented exit code, the command never run, and no password, no "(os error N)" and no
//! "invalid configuration:" on the way.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use crate::support::runs::{Run, finish, marker, run_touching};
use crate::support::{REFUSED_PORT, heimdall, shared, text};

const NAMESPACE: &str = "messages";
/// Nothing listens there: a run that got as far as connecting would fail with 69, not 2.
const UNREACHABLE: &str = "postgres://nobody@127.0.0.1:1/postgres?sslmode=disable";
/// A password distinctive enough that finding it in any output is a leak.
const SECRET: &str = "Qv7-secret-Zt9";

/// What no message of heimdall's may carry: an errno number, or the `postgres` crate's label
/// for its own errors.
fn assert_no_noise(run: &Run) {
    for noise in ["(os error", "invalid configuration:"] {
        assert!(!run.stderr.contains(noise), "{noise:?} in: {run:#?}");
    }
}

/// heimdall with `args`, a command that touches a marker, and `env`; as a [`Run`].
fn run_with(args: &[&str], env: &[(&str, &str)]) -> Run {
    let marker = marker();
    let mut cmd = heimdall();
    cmd.args(args)
        .envs(env.iter().copied())
        .arg("touch")
        .arg(&marker.path);
    let run = finish(&mut cmd, &marker);
    assert_no_noise(&run);
    run
}

// ---------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------

#[test]
fn a_subcommand_after_options_is_said_to_have_been_taken_for_the_command() {
    let marker = marker();
    let mut cmd = heimdall();
    cmd.args([
        "--database",
        UNREACHABLE,
        "status",
        "--namespace",
        "a",
        "--name",
        "b",
    ]);
    let run = finish(&mut cmd, &marker);
    run.assert_refused(2)
        .assert_stderr_contains("'status' was taken as the command to run")
        .assert_stderr_contains("subcommands come first: heimdall status");
    assert_no_noise(&run);
}

#[test]
fn a_wait_limit_split_by_a_space_names_what_wait_took_and_the_form_to_write() {
    for (words, took, suggested) in [
        (&["5", "min"][..], "--wait took '5'", "--wait=5min"),
        (&["1m30"], "--wait took no limit", "--wait=1m30s"),
        (&["five"], "--wait took no limit", "--wait=DURATION"),
    ] {
        let mut args = vec!["--database", UNREACHABLE, "--key", "1", "--wait"];
        args.extend_from_slice(words);
        let marker = marker();
        let mut cmd = heimdall();
        cmd.args(&args).arg(&marker.path);
        let run = finish(&mut cmd, &marker);
        let program = words.last().unwrap();
        run.assert_refused(127)
            .assert_stderr_contains(&format!("command not found: {program}"))
            .assert_stderr_contains(took)
            .assert_stderr_contains(suggested);
        assert_no_noise(&run);
    }
    // A missing program that --wait had nothing to do with gets no such note.
    let run = run_with(
        &[
            "--database",
            UNREACHABLE,
            "--key",
            "1",
            "--wait=5s",
            "--",
            "heimdall-no-such",
        ],
        &[],
    );
    run.assert_refused(127);
    assert!(!run.stderr.contains("--wait"), "{run:#?}");
}

/// Every environment twin that `--help` shows, set to a value it cannot take, is named in the
/// message (the flag alone would send a reader to a command line that does not have it).
#[test]
fn a_bad_value_in_any_environment_twin_names_the_variable() {
    let help = heimdall().arg("--help").output().unwrap();
    let help = text(&help.stdout);
    let twins: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(']').next())
        .collect();
    assert!(twins.contains(&"HEIMDALL_WAIT"), "{help}");
    let mut checked = 0;
    for twin in twins {
        // Any path is a valid --metrics-file.
        if twin == "HEIMDALL_METRICS_FILE" {
            continue;
        }
        let database: &[&str] = if twin == "HEIMDALL_DATABASE_URL" {
            &[]
        } else {
            &["--database", UNREACHABLE]
        };
        let mut args = database.to_vec();
        args.extend(["--key", "1", "--"]);
        let run = run_with(&args, &[(twin, "5x")]);
        run.assert_refused(2).assert_stderr_contains(twin);
        checked += 1;
    }
    assert!(checked >= 12, "only {checked} environment twins checked");
    // DATABASE_URL, read when there is no --database, is named too.
    run_with(&["--key", "1", "--"], &[("DATABASE_URL", "5x")])
        .assert_refused(2)
        .assert_stderr_contains("DATABASE_URL");
    // The flag given on the command line is named as the flag.
    let run = run_with(
        &["--database", UNREACHABLE, "--key", "1", "--wait=5x", "--"],
        &[],
    );
    run.assert_refused(2).assert_stderr_contains("--wait");
    assert!(!run.stderr.contains("HEIMDALL_WAIT"), "{run:#?}");
}

#[test]
fn a_busy_exit_code_out_of_range_says_the_range() {
    for (sub, command) in [(None, Some("true")), (Some("status"), None)] {
        let out = heimdall()
            .args(sub)
            .args(["--database", UNREACHABLE, "--key", "1"])
            .args(["--busy-exit-code", "300"])
            .args(command)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub:?}: {stderr}");
        assert!(stderr.contains("must be 0–255"), "{sub:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// Connection strings
// ---------------------------------------------------------------------------

#[test]
fn an_unknown_query_parameter_after_a_password_is_named_with_the_closest_one() {
    let url = format!(
        "postgres://someone:{SECRET}@127.0.0.1:1/postgres?sslmode=disable&applicaton_name=job"
    );
    run_with(&["--debug", "--database", &url, "--key", "1", "--"], &[])
        .assert_refused(2)
        .assert_stderr_contains("'applicaton_name'")
        .assert_stderr_contains("did you mean application_name?")
        .assert_never_shows(SECRET);
}

#[test]
fn a_mistyped_connection_option_gets_the_closest_one() {
    for database in [
        "host=127.0.0.1 port=1 sslmdoe=require",
        "postgres://nobody@127.0.0.1:1/postgres?sslmdoe=require",
    ] {
        run_with(&["--database", database, "--key", "1", "--"], &[])
            .assert_refused(2)
            .assert_stderr_contains("unknown connection option 'sslmdoe'; did you mean sslmode?");
    }
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

/// libpq's default socket in the default directory, as heimdall picks it.
fn default_socket() -> String {
    let dir = ["/var/run/postgresql", "/tmp"]
        .into_iter()
        .find(|d| Path::new(d).is_dir())
        .unwrap_or("/tmp");
    format!("{dir}/.s.PGSQL.5432")
}

#[test]
fn with_no_server_configured_the_message_names_the_socket_and_asks_whether_the_server_runs() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path().to_str().unwrap();
    // A port nothing listens on, through the default socket directory: no host configured.
    let port = free_port().to_string();
    let dir = Path::new(&default_socket()).parent().unwrap().to_owned();
    let socket = format!("{}/.s.PGSQL.{port}", dir.display());
    run_with(&["--key", "1", "--"], &[("HOME", home), ("PGPORT", &port)])
        .assert_refused(69)
        .assert_stderr_contains(&format!("no server socket at {socket}"))
        .assert_stderr_contains("no host was configured")
        .assert_stderr_contains("Is the server running locally");
    // Nothing at all configured: only where no server listens on the default socket.
    if Path::new(&default_socket()).exists() {
        eprintln!(
            "a server listens on {}: nothing-configured case skipped",
            default_socket()
        );
        return;
    }
    run_with(&["--key", "1", "--"], &[("HOME", home)])
        .assert_refused(69)
        .assert_stderr_contains(&format!("no server socket at {}", default_socket()))
        .assert_stderr_contains("nothing was configured")
        .assert_stderr_contains("Is the server running locally");
}

#[test]
fn a_refused_connection_asks_whether_the_server_runs_as_psql_does() {
    let url =
        format!("postgres://someone:{SECRET}@127.0.0.1:{REFUSED_PORT}/postgres?sslmode=disable");
    run_with(&["--database", &url, "--key", "1", "--"], &[])
        .assert_refused(69)
        .assert_stderr_contains(
            "Is the server running on that host and accepting TCP/IP connections?",
        )
        .assert_never_shows(SECRET);
}

/// A TCP port that nothing listens on once this returns.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server on a port of its own that answers every connection with `reply` (after reading
/// what the client sent first, if `read_first`), then closes it.
fn impostor(reply: &'static [u8], read_first: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            if read_first {
                let _ = conn.read(&mut [0; 512]);
            }
            let _ = conn.write_all(reply);
            let _ = conn.shutdown(std::net::Shutdown::Write);
            // Read what else comes, so that closing sends no reset.
            let _ = conn.read_to_end(&mut Vec::new());
        }
    });
    port
}

#[test]
fn a_port_that_is_not_postgresql_is_said_not_to_answer_as_postgresql() {
    let ssh = impostor(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", false);
    let redis = impostor(b"-ERR unknown command\r\n", true);
    let http = impostor(
        b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n",
        true,
    );
    for port in [ssh, redis, http] {
        for sslmode in ["disable", "prefer"] {
            let url = format!("postgres://someone@127.0.0.1:{port}/postgres?sslmode={sslmode}");
            run_with(
                &[
                    "--connect-timeout",
                    "10s",
                    "--database",
                    &url,
                    "--key",
                    "1",
                    "--",
                ],
                &[],
            )
            .assert_refused(69)
            .assert_stderr_contains(&format!(
                "the server at 127.0.0.1 port {port} did not answer as PostgreSQL"
            ));
        }
    }
}

// ---------------------------------------------------------------------------
// Monitoring
// ---------------------------------------------------------------------------

#[test]
fn a_metrics_file_in_a_missing_directory_names_the_directory_once_under_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("textfile");
    let path = missing.join("job.prom");
    let run = run_touching(NAMESPACE, |cmd| {
        cmd.args(["-q", "--database", &shared().url(), "--metrics-file"])
            .arg(&path);
    });
    assert_no_noise(&run);
    assert_eq!(run.code, Some(0), "{run:#?}");
    assert!(run.ran, "{run:#?}");
    let said = format!("the directory {} does not exist", missing.display());
    assert_eq!(run.stderr.matches(&said).count(), 1, "{run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:#?}");
    // The temporary file is `.job.prom.XXXXXX.tmp`.
    assert!(
        !run.stderr.contains(".job.prom."),
        "the temporary file named: {run:#?}"
    );
}
