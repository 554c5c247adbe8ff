//! Secrets and hostile input (issue 12): URL passwords with unencoded special characters never
//! printed in part, the metrics file never written through a planted symlink, empty `HEIMDALL_*`
//! variables meaning unset, non-UTF-8 connection variables refused by name, the client key's
//! owner checked, and what the command inherits of the connection settings.
//!
//! Every run uses a lock name of its own. Checks are on what a user would see: stdout, stderr,
//! exit codes, the files on disk and the command's environment.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::runs::{Holder, Run, finish, marker, run_touching};
use crate::support::tls::{CERT_USER, shared_tls};
use crate::support::{
    PW_PASSWORD, PW_USER, RUN_LIMIT, heimdall, heimdall_std, require_root, shared, text,
    unique_name, wait_child,
};

const NAMESPACE: &str = "secrets";

/// Passwords as generators and base64 produce them: each special character a URL parser may
/// split on, alone and together.
const SPECIAL_PASSWORDS: &[&str] = &[
    "Xy7/Qz9+Secret",
    "Ab3?SecretTail",
    "Hash#Gh5kWq",
    "Mail@Rv8pLx",
    "Kq8w/Zr4t?Lm2n#Vb6x@Pj9s",
    "Tt5%zzUu6/Ww7",
];

/// Every piece of `password` longer than 3 characters, cut at the characters a parser may
/// split on (and at any other punctuation): finding one of them in any output is a leak.
fn fragments(password: &str) -> Vec<String> {
    let mut pieces: Vec<String> = password
        .split(['/', '?', '#', '@', '%'])
        .chain(password.split(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|p| p.len() > 3)
        .map(str::to_owned)
        .collect();
    pieces.push(password.to_owned());
    pieces.sort();
    pieces.dedup();
    pieces
}

fn assert_no_fragment(run: &Run, password: &str, context: &str) {
    for piece in fragments(password) {
        assert!(
            !run.stdout.contains(&piece) && !run.stderr.contains(&piece),
            "{piece:?} of the password {password:?} was printed ({context}): {run:#?}"
        );
    }
}

/// Runs heimdall with `configure`'s options and a command that prints heimdall's variables
/// (so HEIMDALL_LOCK_DATABASE and HEIMDALL_DATABASE_URL reach stdout) and touches a marker.
fn run_printing_env(configure: impl FnOnce(&mut assert_cmd::Command)) -> Run {
    let marker = marker();
    let mut cmd = heimdall();
    configure(&mut cmd);
    cmd.args(["--namespace", NAMESPACE, "--name", &unique_name("env")])
        .args([
            "--",
            "sh",
            "-c",
            r#"env | grep '^HEIMDALL_'; touch "$1""#,
            "sh",
        ])
        .arg(&marker.path);
    finish(&mut cmd, &marker)
}

// ---------------------------------------------------------------------------
// 1. URL passwords with special characters
// ---------------------------------------------------------------------------

#[test]
fn url_passwords_with_special_characters_are_never_printed_in_part() {
    let pg = shared();
    // The superuser is trusted over TCP, so a run with a right URL gets to run its command and
    // print everything -v and -vv print; the others fail at each stage heimdall reports on.
    let hosts = [
        (
            format!("127.0.0.1:{}", pg.port()),
            "postgres?sslmode=disable",
        ),
        ("127.0.0.1:1".to_owned(), "postgres?sslmode=disable"),
        ("127.0.0.1:notaport".to_owned(), "postgres"),
        (format!("127.0.0.1:{}", pg.port()), "postgres?colour=blue"),
        (format!("127.0.0.1:{}", pg.port()), "postgres?sslmode"),
    ];
    let flag_sets: [&[&str]; 3] = [&["-v"], &["-vv"], &["--report", "json"]];
    let mut ran = 0;
    for password in SPECIAL_PASSWORDS {
        for (host, rest) in &hosts {
            let url = format!("postgres://{}:{password}@{host}/{rest}", pg.superuser());
            for (i, flags) in flag_sets.iter().enumerate() {
                // Both ways of giving the URL; only the environment's reaches the command.
                let via_env = i % 2 == 0;
                let run = run_printing_env(|cmd| {
                    if via_env {
                        cmd.env("HEIMDALL_DATABASE_URL", &url);
                    } else {
                        cmd.args(["--database", &url]);
                    }
                    cmd.args(*flags);
                });
                assert_no_fragment(&run, password, &format!("{url} {flags:?}"));
                ran += usize::from(run.ran);
            }
        }
    }
    // The right URLs must have connected, or the test proved nothing about -v and -vv.
    assert_eq!(
        ran,
        (SPECIAL_PASSWORDS.len() - 1) * flag_sets.len(),
        "every right URL runs its command (all but the one with a bad percent sign)"
    );
}

#[test]
fn an_unparsable_url_with_credentials_says_to_percent_encode_and_quotes_none_of_it() {
    let password = "Tt5%zzUu6/Ww7";
    let url = format!("postgres://someone:{password}@127.0.0.1:5432/postgres");
    let run = run_touching(NAMESPACE, |cmd| {
        cmd.args(["--database", &url, "-vv"]);
    });
    run.assert_refused(2)
        .assert_stderr_contains("percent-encode");
    assert_no_fragment(&run, password, &url);
    assert!(!run.stderr.contains("someone"), "{run:#?}");
}

// ---------------------------------------------------------------------------
// 2. The metrics file and planted symlinks
// ---------------------------------------------------------------------------

/// Starts heimdall with `--metrics-file path`, its command waiting for `dir/go`; `plant` runs
/// once heimdall's pid is known and before the command ends; returns the exit status.
fn run_with_metrics(dir: &Path, path: &Path, plant: impl FnOnce(u32)) -> Option<i32> {
    let go = dir.join("go");
    let mut child = heimdall_std()
        .args(["--database", &shared().url()])
        .args(["--namespace", NAMESPACE, "--name", &unique_name("metrics")])
        .arg("--metrics-file")
        .arg(path)
        .args([
            "--",
            "sh",
            "-c",
            r#"i=0; while [ ! -e "$1" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done"#,
            "sh",
        ])
        .arg(&go)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start heimdall");
    plant(child.id());
    fs::write(&go, "").unwrap();
    wait_child(&mut child, RUN_LIMIT).and_then(|s| s.code())
}

fn assert_is_fresh_metrics_file(path: &Path) {
    let meta = fs::symlink_metadata(path).unwrap();
    assert!(
        meta.file_type().is_file(),
        "{} is not a plain file",
        path.display()
    );
    assert_eq!(meta.mode() & 0o7777, 0o644, "metrics file mode");
    let text = fs::read_to_string(path).unwrap();
    assert!(
        text.contains("heimdall_run_outcome{") && text.contains("outcome=\"ran\"} 1"),
        "{text}"
    );
}

/// A file a planted symlink points at, outside the metrics directory, and what it holds.
struct Victim {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const PRECIOUS: &str = "precious\n";

fn victim() -> Victim {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("victim");
    fs::write(&path, PRECIOUS).unwrap();
    Victim { _dir: dir, path }
}

#[test]
fn the_metrics_file_is_never_written_through_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = victim();
    let path = dir.path().join("job.prom");
    // The old temporary name was `.job.prom.PID.tmp`: plant it for heimdall's own pid and its
    // neighbours, the moment that pid is known.
    let code = run_with_metrics(dir.path(), &path, |pid| {
        for p in pid.saturating_sub(50)..pid + 50 {
            let planted = dir.path().join(format!(".job.prom.{p}.tmp"));
            std::os::unix::fs::symlink(&victim.path, planted).unwrap();
        }
    });
    assert_eq!(code, Some(0));
    assert_eq!(fs::read_to_string(&victim.path).unwrap(), PRECIOUS);
    assert_is_fresh_metrics_file(&path);
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| !e.file_type().unwrap().is_symlink())
        .map(|e| e.file_name())
        .filter(|n| n != OsStr::new("job.prom") && n != OsStr::new("go"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn a_symlink_at_the_metrics_path_is_replaced_and_its_target_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let victim = victim();
    let path = dir.path().join("job.prom");
    std::os::unix::fs::symlink(&victim.path, &path).unwrap();
    let code = run_with_metrics(dir.path(), &path, |_| {});
    assert_eq!(code, Some(0));
    assert_eq!(fs::read_to_string(&victim.path).unwrap(), PRECIOUS);
    assert_is_fresh_metrics_file(&path);
}

/// Runs `exit 3` under the lock with `--metrics-file path`, and asserts that a node that is not
/// a regular file (nor a symlink, nor absent) is left as it was, with a warning that names it,
/// and that the exit status is the command's.
fn assert_metrics_skip(path: &Path, what: &str, still: impl Fn(&fs::Metadata) -> bool) {
    let out = heimdall()
        .args(["--database", &shared().url()])
        .args(["--namespace", NAMESPACE, "--name", &unique_name("metrics")])
        .arg("--metrics-file")
        .arg(path)
        .args(["sh", "-c", "exit 3"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the exit status stands: {stderr}"
    );
    let meta = fs::symlink_metadata(path).unwrap();
    assert!(
        still(&meta),
        "the {what} was replaced: {:?}",
        meta.file_type()
    );
    assert!(
        stderr.lines().count() == 1
            && stderr.contains(&path.display().to_string())
            && stderr.contains(what),
        "one line that names the path and what it is: {stderr}"
    );
    let dir = path.parent().unwrap();
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
}

#[test]
fn a_fifo_at_the_metrics_path_is_left_alone() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.prom");
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo has no other preconditions.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
    assert_metrics_skip(&path, "FIFO", |m| m.file_type().is_fifo());
}

#[test]
fn a_device_node_at_the_metrics_path_is_left_alone() {
    use std::os::unix::fs::FileTypeExt;
    require_root("mknod of a character device");
    // A node for the same device as /dev/null, in a temp dir: what `--metrics-file /dev/null`
    // would hit, without ever touching the system's own /dev/null, even if heimdall is broken.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("null");
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mknod has no other preconditions.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
    assert_metrics_skip(&path, "character device", |m| {
        m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3)
    });
}

// ---------------------------------------------------------------------------
// 3. Empty HEIMDALL_* variables
// ---------------------------------------------------------------------------

/// Every environment twin `heimdall --help` lists.
fn env_twins() -> Vec<String> {
    let help = heimdall().arg("--help").output().unwrap();
    let help = text(&help.stdout);
    let mut names: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split([']', '=']).next().unwrap().trim().to_owned())
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn every_empty_heimdall_variable_means_unset() {
    let twins = env_twins();
    for expected in ["HEIMDALL_DATABASE_URL", "HEIMDALL_WAIT", "HEIMDALL_REPORT"] {
        assert!(
            twins.iter().any(|t| t == expected),
            "{expected} not in {twins:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for var in &twins {
        let run = run_touching(NAMESPACE, |cmd| {
            cmd.current_dir(dir.path())
                .env("DATABASE_URL", shared().url())
                .env(var, "");
        });
        assert_eq!(run.code, Some(0), "{var}= : {run:#?}");
        assert!(run.ran, "{var}= : {run:#?}");
        assert_eq!(run.stderr, "", "{var}= must say nothing: {run:#?}");
    }
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "an empty HEIMDALL_METRICS_FILE writes no file"
    );
}

#[test]
fn an_empty_heimdall_wait_does_not_wait_for_a_busy_lock() {
    let name = unique_name("wait");
    let holder = Holder::start(&shared().url(), NAMESPACE, &name);
    let marker = marker();
    let mut child = heimdall_std()
        .args([
            "--database",
            &shared().url(),
            "--namespace",
            NAMESPACE,
            "--name",
            &name,
        ])
        .env("HEIMDALL_WAIT", "")
        .env("HEIMDALL_BUSY_EXIT_CODE", "")
        .args(["--", "touch"])
        .arg(&marker.path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(10));
    holder.stop();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(75),
        "busy at once, with the default busy code"
    );
    assert!(!marker.path.exists());
}

// ---------------------------------------------------------------------------
// 4. Variables that are not UTF-8
// ---------------------------------------------------------------------------

#[test]
fn a_connection_variable_that_is_not_utf8_is_refused_by_name() {
    let bad = OsStr::from_bytes(b"postgres://u:Zz9Leaky\xff@127.0.0.1/db");
    let vars = [
        "DATABASE_URL",
        "HEIMDALL_DATABASE_URL",
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGAPPNAME",
        "PGCONNECT_TIMEOUT",
        "PGSSLMODE",
        "PGSSLROOTCERT",
        "PGSSLCERT",
        "PGSSLKEY",
        "PGSSLNEGOTIATION",
        "PGLOADBALANCEHOSTS",
        "PGTARGETSESSIONATTRS",
        "PGOPTIONS",
        "HEIMDALL_WAIT",
        "HEIMDALL_CONNECT_TIMEOUT",
    ];
    for var in vars {
        let run = run_touching(NAMESPACE, |cmd| {
            // A good DATABASE_URL, so that ignoring the bad variable would connect and run.
            if var != "DATABASE_URL" {
                cmd.env("DATABASE_URL", shared().url());
            }
            cmd.env(var, bad);
        });
        run.assert_refused(2)
            .assert_stderr_contains(var)
            .assert_stderr_contains("UTF-8")
            .assert_never_shows("Zz9Leaky");
    }
}

// ---------------------------------------------------------------------------
// 6. The client key's owner
// ---------------------------------------------------------------------------

/// Copies the test client key to a temp dir with `mode`, owned by `uid`.
fn key_copy(uid: u32, mode: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("client.key");
    fs::copy(shared_tls().certs().client_key(), &key).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&key, Some(uid), None).unwrap();
    (dir, key)
}

fn run_with_key(key: &Path) -> Run {
    let tls = shared_tls();
    let certs = tls.certs();
    let database = tls.conninfo_as(
        CERT_USER,
        "localhost",
        &format!(
            "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
            certs.root_cert().display(),
            certs.client_cert().display(),
            key.display()
        ),
    );
    let home = tempfile::tempdir().unwrap();
    run_touching(NAMESPACE, |cmd| {
        cmd.args(["--database", &database]).env("HOME", home.path());
    })
}

#[test]
fn a_client_key_owned_by_another_user_is_refused() {
    require_root("giving the client key to another user");
    let (_dir, key) = key_copy(65534, 0o600);
    run_with_key(&key)
        .assert_refused(69)
        .assert_stderr_contains(&key.display().to_string())
        .assert_stderr_contains("owned");
}

#[test]
fn a_client_key_owned_by_root_may_be_group_readable() {
    require_root("a client key owned by root");
    let (_dir, key) = key_copy(0, 0o640);
    run_with_key(&key).assert_ran();
    let (_dir, key) = key_copy(0, 0o644);
    run_with_key(&key)
        .assert_refused(69)
        .assert_stderr_contains("group or world");
}

#[test]
fn a_client_key_that_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("client.key");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o600)).unwrap();
    run_with_key(&fifo)
        .assert_refused(69)
        .assert_stderr_contains("not a regular file");
}

// ---------------------------------------------------------------------------
// 7. What the command inherits
// ---------------------------------------------------------------------------

/// Runs heimdall with `configure`'s options around a command that writes its environment to a
/// file, then runs `nested` (a shell snippet; `$H` is heimdall's path, `$NAME` the lock name,
/// `$CODES` a file for exit codes). Returns the run, the environment and the codes.
fn run_nested(
    configure: impl FnOnce(&mut assert_cmd::Command),
    nested: &str,
) -> (Run, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    let codes = dir.path().join("codes");
    let name = unique_name("nested");
    let marker = marker();
    let mut cmd = heimdall();
    configure(&mut cmd);
    cmd.args(["--namespace", NAMESPACE, "--name", &name])
        .env("H", env!("CARGO_BIN_EXE_heimdall"))
        .env("NAME", &name)
        .env("CODES", &codes)
        .args([
            "--",
            "sh",
            "-c",
            &format!(r#"env > "$1"; {nested} touch "$2""#),
            "sh",
        ])
        .arg(&env_file)
        .arg(&marker.path);
    let run = finish(&mut cmd, &marker);
    let env = fs::read_to_string(&env_file).unwrap_or_default();
    let codes = fs::read_to_string(&codes).unwrap_or_default();
    (run, env, codes)
}

fn env_value<'a>(env: &'a str, name: &str) -> Option<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn the_command_gets_the_lock_database_without_its_password() {
    let pg = shared();
    let url = format!(
        "postgres://{PW_USER}:{PW_PASSWORD}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let job_url = "postgres://app:job-own-Secret9@db.invalid/app";
    // Inside: the same lock without a password (re-entrancy must be proved over a connection,
    // and the same database refuses the login: 69); the same lock with the password in
    // PGPASSWORD (proved, re-entrant: 0); another lock without a password (69, never another
    // database); another lock with the password in PGPASSWORD, as the README says to give it.
    let nested = r#"
        "$H" -q --namespace secrets --name "$NAME" -- true 2>/dev/null; echo "same=$?" >> "$CODES";
        PGPASSWORD="$PW" "$H" --namespace secrets --name "$NAME" -- true; echo "same-pw=$?" >> "$CODES";
        "$H" -q --namespace secrets --name "$NAME-other" -- true 2>/dev/null; echo "other=$?" >> "$CODES";
        PGPASSWORD="$PW" "$H" --namespace secrets --name "$NAME-pw" -- true; echo "pw=$?" >> "$CODES";
    "#;
    for via_env in [true, false] {
        let (run, env, codes) = run_nested(
            |cmd| {
                if via_env {
                    cmd.env("HEIMDALL_DATABASE_URL", &url);
                } else {
                    cmd.args(["--database", &url]);
                }
                cmd.env("DATABASE_URL", job_url).env("PW", PW_PASSWORD);
            },
            nested,
        );
        run.assert_ran();
        let child_url = env_value(&env, "HEIMDALL_DATABASE_URL")
            .unwrap_or_else(|| panic!("the command gets HEIMDALL_DATABASE_URL: {env}"));
        assert!(!child_url.contains(PW_PASSWORD), "{child_url}");
        assert!(
            child_url.contains(PW_USER) && child_url.contains(&pg.port().to_string()),
            "{child_url}"
        );
        assert_eq!(
            env_value(&env, "DATABASE_URL"),
            Some(job_url),
            "the job keeps its own DATABASE_URL"
        );
        let lock_db = env_value(&env, "HEIMDALL_LOCK_DATABASE").unwrap();
        assert!(!lock_db.contains(PW_PASSWORD), "{lock_db}");
        assert_eq!(
            codes, "same=69\nsame-pw=0\nother=69\npw=0\n",
            "nested runs (via_env {via_env})"
        );
    }
}

#[test]
fn the_command_keeps_database_url_and_pgpassword_when_heimdall_used_them() {
    let pg = shared();
    let url = format!(
        "postgres://{PW_USER}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    let nested = r#"
        "$H" --namespace secrets --name "$NAME" -- true; echo "same=$?" >> "$CODES";
        "$H" --namespace secrets --name "$NAME-other" -- true; echo "other=$?" >> "$CODES";
    "#;
    let (run, env, codes) = run_nested(
        |cmd| {
            cmd.env("DATABASE_URL", &url).env("PGPASSWORD", PW_PASSWORD);
        },
        nested,
    );
    run.assert_ran();
    assert_eq!(env_value(&env, "DATABASE_URL"), Some(url.as_str()));
    assert_eq!(env_value(&env, "PGPASSWORD"), Some(PW_PASSWORD));
    assert_eq!(codes, "same=0\nother=0\n");
}

// ---------------------------------------------------------------------------
// 6. Control characters in the names
// ---------------------------------------------------------------------------

/// Characters that end a line, move the cursor or start a terminal escape sequence: C0, DEL,
/// C1 (U+009B is a one-character CSI to some terminals), the Unicode line separators and a
/// bidirectional override.
const HOSTILE: &str = "\n\r\x1b[2K\x07\t\x7f\u{9b}31m\u{2028}\u{202e}";

/// No character of [`HOSTILE`] reaches stderr raw, and every line is heimdall's own.
fn assert_escaped(stderr: &str) {
    for c in HOSTILE
        .chars()
        .filter(|c| *c != '\n' && !c.is_ascii_graphic())
    {
        assert!(!stderr.contains(c), "{c:?} reached stderr raw: {stderr:?}");
    }
    assert!(
        stderr
            .lines()
            .all(|l| l.starts_with("heimdall: ") || l.starts_with('{')),
        "a line that is not heimdall's: {stderr:?}"
    );
}

#[test]
fn a_newline_in_the_names_cannot_forge_a_line() {
    let namespace = format!("ns{HOSTILE}");
    let name = format!("{}\nheimdall: lock released{HOSTILE}", unique_name("forge"));
    let holder = Holder::start(&shared().url(), &namespace, &name);
    // Busy: the one busy line, then the JSON report, nothing else.
    let busy = heimdall()
        .args(["--database", &shared().url()])
        .args(["--namespace", &namespace, "--name", &name])
        .args(["--report", "json", "true"])
        .output()
        .unwrap();
    let stderr = text(&busy.stderr);
    assert_eq!(busy.status.code(), Some(75), "{stderr}");
    assert_escaped(&stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "the busy line and the report: {stderr:?}");
    assert!(lines[0].contains("not running the command"), "{stderr:?}");
    let report: serde_json::Value =
        serde_json::from_str(lines[1]).expect("the report is still valid JSON");
    assert_eq!(
        report["name"],
        name.as_str(),
        "the JSON carries the name as it is"
    );
    assert_eq!(report["namespace"], namespace.as_str());
    // status prints the name on stdout: one line too.
    let status = heimdall()
        .args(["status", "--database", &shared().url()])
        .args(["--namespace", &namespace, "--name", &name])
        .output()
        .unwrap();
    let stdout = text(&status.stdout);
    assert_eq!(status.status.code(), Some(75), "{stdout}");
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert_escaped(&format!("heimdall: {stdout}"));
    holder.stop();

    // A verbose run that holds and releases: exactly one "lock released" line, heimdall's.
    let ran = heimdall()
        .args(["--database", &shared().url()])
        .args(["--namespace", &namespace, "--name", &name, "-v", "true"])
        .output()
        .unwrap();
    let stderr = text(&ran.stderr);
    assert_eq!(ran.status.code(), Some(0), "{stderr}");
    assert_escaped(&stderr);
    let released = stderr
        .lines()
        .filter(|l| l.starts_with("heimdall: lock released"))
        .count();
    assert_eq!(released, 1, "one real release line, none forged: {stderr}");
    assert!(
        stderr.contains(r"\nheimdall: lock released\n\r\u001b[2K"),
        "the name shows escaped: {stderr}"
    );
}
