//! The pooler guard: a session advisory lock is only safe when the session stays on one server
//! connection. Behind a transaction-pooling PgBouncer it does not, and heimdall must refuse
//! before the command starts; session pooling works.

use std::time::Duration;

use crate::support::pgbouncer::PgBouncer;
use crate::support::{TestPostgres, heimdall, unique_name};

/// Makes the pooler open two server connections, by holding two transactions at once, so that
/// round-robin hands consecutive transactions of one client to different server connections.
fn warm_two_server_connections(bouncer: &PgBouncer) {
    let mut a = bouncer.config().connect(postgres::NoTls).unwrap();
    let mut b = bouncer.config().connect(postgres::NoTls).unwrap();
    a.batch_execute("BEGIN; SELECT 1").unwrap();
    b.batch_execute("BEGIN; SELECT 1").unwrap();
    a.batch_execute("COMMIT").unwrap();
    b.batch_execute("COMMIT").unwrap();
}

#[test]
fn transaction_pooling_is_refused_before_the_command_starts_and_session_pooling_works() {
    // One owned cluster for both pool modes: locks leaked on a transaction pooler's server
    // connection must not disturb other tests.
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");

    let transaction = PgBouncer::start(&pg, "transaction");
    warm_two_server_connections(&transaction);
    let out = heimdall()
        .args(["--database", &transaction.url(pg.superuser())])
        .args(["--namespace", "pooler", "--name", &unique_name("tx")])
        .args(["sh", "-c", "touch \"$1\"", "sh"])
        .arg(&marker)
        .timeout(Duration::from_secs(30))
        .assert()
        .code(78);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    assert!(
        stderr.contains("transaction-pooling"),
        "names the cause: {stderr}"
    );
    assert!(
        stderr.contains("session pooling"),
        "names the fix: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        !marker.exists(),
        "the command must not run behind a transaction pooler"
    );

    let session = PgBouncer::start(&pg, "session");
    warm_two_server_connections(&session);
    heimdall()
        .args(["--database", &session.url(pg.superuser())])
        .args(["--namespace", "pooler", "--name", &unique_name("session")])
        .args([
            "--heartbeat",
            "100ms",
            "sh",
            "-c",
            "sleep 0.5; touch \"$1\"",
            "sh",
        ])
        .arg(&marker)
        .timeout(Duration::from_secs(30))
        .assert()
        .success();
    assert!(
        marker.exists(),
        "session pooling keeps the session: the command runs"
    );
}
