//! TLS as libpq does it: every `sslmode`, root certificates given, found in `~/.postgresql` or
//! taken from the system, client certificates, host-name checks, and the errors a user sees
//! when any of it is wrong.
//!
//! Most tests run against one shared [`TlsPostgres`] whose `pg_hba.conf` lets TCP logins in only
//! over TLS, so a run that succeeds there was encrypted. The rest run against the plain shared
//! cluster, which has no TLS at all. Every run gets a HOME of its own (empty unless the test
//! fills it), so the developer's `~/.postgresql` never decides a result, and a command that
//! touches a marker file, so each test checks that the command really ran, or really did not.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::support::runs::{Run, run_touching};
use crate::support::tls::{CERT_USER, TlsPostgres, shared_tls};
use tempfile::TempDir;

/// The lock namespace of every run in this file; names come from `unique_name`.
const NAMESPACE: &str = "tls";
/// A password distinctive enough that finding it in any output is a leak. The TLS cluster
/// trusts the superuser, so giving it changes nothing but what could be printed.
const SECRET: &str = "tls-hunter2-secret";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A HOME for one run: empty, or holding `~/.postgresql` files copied from the certs dir.
struct Home {
    dir: TempDir,
}

impl Home {
    fn empty() -> Home {
        Home {
            dir: tempfile::tempdir().expect("cannot create a temp HOME"),
        }
    }

    /// A HOME whose `~/.postgresql/NAME` is a copy of `source`, for each `(NAME, source)`;
    /// key files keep mode 0600.
    fn with(files: &[(&str, &Path)]) -> Home {
        let home = Home::empty();
        let dot = home.dir.path().join(".postgresql");
        fs::create_dir(&dot).expect("cannot create ~/.postgresql");
        for (name, source) in files {
            let target = dot.join(name);
            fs::copy(source, &target).expect("cannot copy into ~/.postgresql");
            fs::set_permissions(&target, fs::Permissions::from_mode(0o600))
                .expect("cannot chmod a file in ~/.postgresql");
        }
        home
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs heimdall with an empty HOME (which `configure` may replace), `configure`'s options,
/// a lock of its own and a command that touches a marker file.
fn run(configure: impl FnOnce(&mut assert_cmd::Command)) -> Run {
    let home = Home::empty();
    run_touching(NAMESPACE, |cmd| {
        cmd.env("HOME", home.path());
        configure(cmd);
    })
}

/// Runs heimdall against `database` with an empty HOME.
fn run_on(database: &str) -> Run {
    run(|cmd| {
        cmd.args(["--database", database]);
    })
}

/// Runs heimdall against `database` with `home` as HOME.
fn run_with_home(database: &str, home: &Home) -> Run {
    run(|cmd| {
        cmd.args(["--database", database]).env("HOME", home.path());
    })
}

/// `sslrootcert=` naming the shared cluster's CA.
fn right_root(tls: &TlsPostgres) -> String {
    format!("sslrootcert={}", tls.certs().root_cert().display())
}

/// `sslrootcert=` naming a CA that signed nothing the server uses.
fn wrong_root(tls: &TlsPostgres) -> String {
    format!("sslrootcert={}", tls.certs().other_root_cert().display())
}

/// `sslcert=… sslkey=…` naming the given certificate and key files.
fn client_files(cert: &Path, key: &Path) -> String {
    format!("sslcert={} sslkey={}", cert.display(), key.display())
}

/// A conninfo for [`CERT_USER`] on `localhost` with `sslmode=verify-full`, the right root
/// certificate and the `extra` settings (e.g. [`client_files`]; may be empty).
fn cert_user_verify_full(tls: &TlsPostgres, extra: &str) -> String {
    let settings = format!("sslmode=verify-full {} {extra}", right_root(tls));
    tls.conninfo_as(CERT_USER, "localhost", settings.trim_end())
}

/// A file in a temp dir of its own, holding `contents` with mode 0600.
struct TempFile {
    _dir: TempDir,
    path: PathBuf,
}

fn temp_file(name: &str, contents: &str) -> TempFile {
    let dir = tempfile::tempdir().expect("cannot create a temp dir");
    let path = dir.path().join(name);
    fs::write(&path, contents).expect("cannot write a temp file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("cannot chmod");
    TempFile { _dir: dir, path }
}

/// A TCP URL for the plain shared cluster (no TLS at all) with `query`.
fn plain_url(query: &str) -> String {
    let pg = crate::support::shared();
    format!(
        "postgresql://{}@127.0.0.1:{}/postgres?{query}",
        pg.superuser(),
        pg.port()
    )
}

// ---------------------------------------------------------------------------
// 1. Encryption without and with verification
// ---------------------------------------------------------------------------

#[test]
fn require_connects_over_tls() {
    let tls = shared_tls();
    run_on(&tls.conninfo("127.0.0.1", "sslmode=require")).assert_ran();
}

#[test]
fn the_default_sslmode_uses_tls_where_the_server_requires_it() {
    let tls = shared_tls();
    run_on(&tls.conninfo("127.0.0.1", "")).assert_ran();
    run_on(&tls.conninfo("127.0.0.1", "sslmode=prefer")).assert_ran();
}

#[test]
fn allow_retries_with_tls_when_the_server_refuses_plain_text() {
    let tls = shared_tls();
    run_on(&tls.conninfo("127.0.0.1", "sslmode=allow")).assert_ran();
}

#[test]
fn verify_ca_works_with_the_right_root_certificate() {
    let tls = shared_tls();
    run_on(&tls.conninfo(
        "127.0.0.1",
        &format!("sslmode=verify-ca {}", right_root(tls)),
    ))
    .assert_ran();
}

#[test]
fn verify_full_works_with_the_right_root_for_localhost_and_127_0_0_1() {
    let tls = shared_tls();
    for host in ["localhost", "127.0.0.1"] {
        run_on(&tls.conninfo(host, &format!("sslmode=verify-full {}", right_root(tls))))
            .assert_ran();
    }
}

#[test]
fn verify_full_works_with_tls_settings_in_a_url() {
    let tls = shared_tls();
    let url = tls.url(
        "localhost",
        &format!(
            "sslmode=verify-full&sslrootcert={}",
            tls.certs().root_cert().display()
        ),
    );
    run_on(&url).assert_ran();
}

#[test]
fn sslnegotiation_postgres_is_the_classic_handshake() {
    let tls = shared_tls();
    run_on(&tls.conninfo(
        "localhost",
        &format!(
            "sslmode=verify-full sslnegotiation=postgres {}",
            right_root(tls)
        ),
    ))
    .assert_ran();
}

// ---------------------------------------------------------------------------
// 2. Verification failures
// ---------------------------------------------------------------------------

#[test]
fn verify_full_refuses_a_certificate_for_another_host_name() {
    let tls = shared_tls();
    // hostaddr makes heimdall connect to 127.0.0.1 but check the certificate against host.
    run_on(&tls.conninfo(
        "wrong.example",
        &format!("hostaddr=127.0.0.1 sslmode=verify-full {}", right_root(tls)),
    ))
    .assert_refused(69)
    .assert_stderr_contains("not valid for host");
}

#[test]
fn verify_ca_does_not_check_the_host_name() {
    let tls = shared_tls();
    run_on(&tls.conninfo(
        "wrong.example",
        &format!("hostaddr=127.0.0.1 sslmode=verify-ca {}", right_root(tls)),
    ))
    .assert_ran();
}

#[test]
fn a_wrong_root_certificate_is_not_trusted_and_the_password_is_never_shown() {
    let tls = shared_tls();
    for mode in ["verify-ca", "verify-full"] {
        let url = format!(
            "postgresql://{}:{SECRET}@localhost:{}/postgres?sslmode={mode}&sslrootcert={}",
            tls.superuser(),
            tls.port(),
            tls.certs().other_root_cert().display()
        );
        run_on(&url)
            .assert_refused(69)
            .assert_stderr_contains("not trusted")
            .assert_never_shows(SECRET);
    }
}

#[test]
fn require_with_a_root_certificate_verifies_the_chain() {
    let tls = shared_tls();
    run_on(&tls.conninfo("127.0.0.1", &format!("sslmode=require {}", wrong_root(tls))))
        .assert_refused(69)
        .assert_stderr_contains("not trusted");
    // The right root passes, and require still does not check the host name.
    run_on(&tls.conninfo(
        "wrong.example",
        &format!("hostaddr=127.0.0.1 sslmode=require {}", right_root(tls)),
    ))
    .assert_ran();
}

#[test]
fn verify_full_without_any_root_certificate_never_connects() {
    let tls = shared_tls();
    // No sslrootcert and an empty HOME: nothing to verify against. libpq fails here rather
    // than connecting unverified; heimdall may call it a usage error or unavailable.
    let run = run_on(&tls.conninfo("localhost", "sslmode=verify-full"));
    assert!(
        matches!(run.code, Some(2 | 69)) && !run.ran,
        "verify-full without a root certificate must fail before the command: {run:#?}"
    );
    run.assert_stderr_contains("root");
}

// ---------------------------------------------------------------------------
// 3. Root certificates from HOME and from the system
// ---------------------------------------------------------------------------

#[test]
fn verify_full_uses_the_root_certificate_in_home() {
    let tls = shared_tls();
    let home = Home::with(&[("root.crt", &tls.certs().root_cert())]);
    run_with_home(&tls.conninfo("localhost", "sslmode=verify-full"), &home).assert_ran();
}

#[test]
fn require_verifies_the_chain_when_home_has_a_root_certificate() {
    let tls = shared_tls();
    let wrong = Home::with(&[("root.crt", &tls.certs().other_root_cert())]);
    run_with_home(&tls.conninfo("127.0.0.1", "sslmode=require"), &wrong)
        .assert_refused(69)
        .assert_stderr_contains("not trusted");
    let right = Home::with(&[("root.crt", &tls.certs().root_cert())]);
    run_with_home(&tls.conninfo("127.0.0.1", "sslmode=require"), &right).assert_ran();
}

#[test]
fn sslrootcert_system_with_a_mode_weaker_than_verify_full_is_a_usage_error() {
    let tls = shared_tls();
    for mode in ["require", "verify-ca"] {
        run_on(&tls.conninfo("localhost", &format!("sslmode={mode} sslrootcert=system")))
            .assert_refused(2)
            .assert_stderr_contains("system");
    }
}

#[test]
fn sslrootcert_system_does_not_trust_the_test_authority() {
    let tls = shared_tls();
    run_on(&tls.conninfo("localhost", "sslmode=verify-full sslrootcert=system"))
        .assert_refused(69)
        .assert_stderr_contains("not trusted");
}

// ---------------------------------------------------------------------------
// 4. Client certificates
// ---------------------------------------------------------------------------

#[test]
fn a_client_certificate_authenticates_its_role() {
    let tls = shared_tls();
    let certs = tls.certs();
    run_on(&cert_user_verify_full(
        tls,
        &client_files(&certs.client_cert(), &certs.client_key()),
    ))
    .assert_ran();
}

#[test]
fn a_role_that_needs_a_client_certificate_is_refused_without_one() {
    let tls = shared_tls();
    run_on(&cert_user_verify_full(tls, ""))
        .assert_refused(69)
        .assert_stderr_contains("certificate");
}

#[test]
fn a_client_certificate_for_another_role_is_refused() {
    let tls = shared_tls();
    let certs = tls.certs();
    run_on(&cert_user_verify_full(
        tls,
        &client_files(&certs.other_client_cert(), &certs.other_client_key()),
    ))
    .assert_refused(69)
    .assert_stderr_contains("certificate authentication failed");
}

#[test]
fn the_client_certificate_in_home_is_used_by_default() {
    let tls = shared_tls();
    let certs = tls.certs();
    let home = Home::with(&[
        ("root.crt", &certs.root_cert()),
        ("postgresql.crt", &certs.client_cert()),
        ("postgresql.key", &certs.client_key()),
    ]);
    run_with_home(
        &tls.conninfo_as(CERT_USER, "localhost", "sslmode=verify-full"),
        &home,
    )
    .assert_ran();
}

#[test]
fn a_missing_key_file_is_unavailable_and_named() {
    let tls = shared_tls();
    let dir = tempfile::tempdir().expect("cannot create a temp dir");
    let missing = dir.path().join("no-such.key");
    run_on(&cert_user_verify_full(
        tls,
        &client_files(&tls.certs().client_cert(), &missing),
    ))
    .assert_refused(69)
    .assert_stderr_contains(&missing.display().to_string());
}

#[test]
fn a_damaged_key_file_is_named_and_its_contents_never_shown() {
    let tls = shared_tls();
    let certs = tls.certs();
    // Real key material, cut in half so it no longer parses.
    let lines = certs.client_key_lines();
    let damaged = temp_file(
        "damaged.key",
        &format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines[..lines.len().div_ceil(2)].join("\n")
        ),
    );
    let run = run_on(&cert_user_verify_full(
        tls,
        &client_files(&certs.client_cert(), &damaged.path),
    ));
    run.assert_refused(69)
        .assert_stderr_contains(&damaged.path.display().to_string());
    for line in lines {
        run.assert_never_shows(line);
    }
}

#[test]
fn a_damaged_certificate_file_is_named() {
    let tls = shared_tls();
    let damaged = temp_file(
        "damaged.crt",
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    run_on(&cert_user_verify_full(
        tls,
        &client_files(&damaged.path, &tls.certs().client_key()),
    ))
    .assert_refused(69)
    .assert_stderr_contains(&damaged.path.display().to_string())
    .assert_never_shows(tls.certs().client_key_lines()[0]);
}

// ---------------------------------------------------------------------------
// 5. The same through PG* environment variables
// ---------------------------------------------------------------------------

/// PG* variables that reach the TLS cluster on `localhost` as [`CERT_USER`] with
/// `PGSSLMODE=verify-full`, `root` as the root certificate, the right client certificate and
/// `key` as its key.
fn cert_user_env_verify_full(
    cmd: &mut assert_cmd::Command,
    tls: &TlsPostgres,
    root: &Path,
    key: &Path,
) {
    cmd.env("PGHOST", "localhost")
        .env("PGPORT", tls.port().to_string())
        .env("PGUSER", CERT_USER)
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", root)
        .env("PGSSLCERT", tls.certs().client_cert())
        .env("PGSSLKEY", key);
}

#[test]
fn pg_environment_variables_configure_tls_and_the_client_certificate() {
    let tls = shared_tls();
    let certs = tls.certs();
    run(|cmd| {
        cert_user_env_verify_full(cmd, tls, &certs.root_cert(), &certs.client_key());
        cmd.env("PGSSLNEGOTIATION", "postgres");
    })
    .assert_ran();
}

#[test]
fn pgsslrootcert_naming_a_wrong_root_is_not_trusted() {
    let tls = shared_tls();
    let certs = tls.certs();
    run(|cmd| {
        cert_user_env_verify_full(cmd, tls, &certs.other_root_cert(), &certs.client_key());
    })
    .assert_refused(69)
    .assert_stderr_contains("not trusted");
}

#[test]
fn pgsslkey_naming_a_missing_file_is_named_in_the_error() {
    let tls = shared_tls();
    let certs = tls.certs();
    let dir = tempfile::tempdir().expect("cannot create a temp dir");
    let missing = dir.path().join("gone.key");
    run(|cmd| {
        cert_user_env_verify_full(cmd, tls, &certs.root_cert(), &missing);
    })
    .assert_refused(69)
    .assert_stderr_contains(&missing.display().to_string());
}

#[test]
fn pgsslmode_require_without_a_client_certificate_reaches_trusted_roles() {
    let tls = shared_tls();
    run(|cmd| {
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", tls.port().to_string())
            .env("PGUSER", tls.superuser())
            .env("PGDATABASE", "postgres")
            .env("PGSSLMODE", "require");
    })
    .assert_ran();
}

// ---------------------------------------------------------------------------
// 6. Plain text: refused where TLS is required, used where TLS is optional
// ---------------------------------------------------------------------------

#[test]
fn disable_is_refused_by_a_server_that_requires_tls() {
    let tls = shared_tls();
    run_on(&tls.conninfo("127.0.0.1", "sslmode=disable"))
        .assert_refused(69)
        .assert_stderr_contains_any(&["no encryption", "pg_hba.conf"]);
}

#[test]
fn modes_that_require_tls_refuse_a_server_without_it() {
    let tls = shared_tls();
    for query in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca&{}", right_root(tls)),
        format!("sslmode=verify-full&{}", right_root(tls)),
    ] {
        run_on(&plain_url(&query))
            .assert_refused(69)
            .assert_stderr_contains("does not support TLS");
    }
}

#[test]
fn prefer_and_allow_fall_back_to_plain_text_on_a_server_without_tls() {
    let pg = crate::support::shared();
    let url = format!(
        "postgresql://{}@127.0.0.1:{}/postgres",
        pg.superuser(),
        pg.port()
    );
    run_on(&url).assert_ran();
    run_on(&plain_url("sslmode=prefer")).assert_ran();
    run_on(&plain_url("sslmode=allow")).assert_ran();
}

/// Sanity check of the fixture itself, independent of heimdall: the TLS cluster refuses a
/// plain-text login for anyone but the plain-text role, so the tests above that succeed on it
/// really used TLS.
#[test]
fn the_tls_cluster_refuses_plain_text_logins() {
    let tls = shared_tls();
    let plain = |user: &str| {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(tls.port())
            .user(user)
            .dbname("postgres")
            .ssl_mode(postgres::config::SslMode::Disable)
            .connect(postgres::NoTls)
    };
    let err = plain(tls.superuser())
        .err()
        .expect("a plain-text login as the superuser must be refused");
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("no encryption")),
        "unexpected refusal: {err:?}"
    );
    plain(crate::support::tls::PLAIN_USER).expect("the plain-text role must get in");
}
