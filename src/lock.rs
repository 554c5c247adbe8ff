//! The database session that holds the lock: connect, check the server is safe to lock on, take
//! the lock, release it. An advisory lock lives exactly as long as this session, so the session
//! is owned by one place and closed only after the command is gone.

use std::sync::mpsc;
use std::time::Instant;

use anyhow::{Context, Result};
use postgres::{Client, NoTls, SimpleQueryMessage};

use crate::config::Settings;
use crate::exit::{Classify, Failure, fail};
use crate::key::LockKey;
use crate::log;

/// The outcome of one attempt to take the lock.
pub enum Acquire {
    Held(Box<Session>),
    Busy,
}

/// A connection that holds the lock.
pub struct Session {
    client: Client,
    key: LockKey,
    pub backend_pid: i32,
}

/// Connects, bounded by the connect timeout for every host it may try. The `postgres` crate
/// applies `connect_timeout` only to opening the socket; a server that accepts the connection
/// and then never answers would hang it forever, and heimdall runs unattended.
pub fn connect(settings: &Settings) -> Result<Client> {
    let started = Instant::now();
    let where_ = settings.conn.describe();
    log::info(format!("connecting to {where_}"));
    log::debug(format!(
        "application_name={:?} connect_timeout={:?} password={}",
        settings.application_name,
        settings.connect_timeout,
        match &settings.conn.password_source {
            crate::conninfo::PasswordSource::None => "none".to_owned(),
            crate::conninfo::PasswordSource::ConnectionString =>
                "from the connection string".to_owned(),
            crate::conninfo::PasswordSource::Environment => "from PGPASSWORD".to_owned(),
            crate::conninfo::PasswordSource::PassFile { path, line } =>
                format!("from {} line {line}", path.display()),
        }
    ));
    let config = settings
        .conn
        .to_postgres(&settings.application_name, settings.connect_timeout);

    let result = if settings.connect_timeout.is_zero() {
        config.connect(NoTls)
    } else {
        let hosts = settings
            .conn
            .hosts
            .len()
            .max(settings.conn.hostaddrs.len())
            .max(1) as u32;
        let limit = settings.connect_timeout * hosts;
        let (tx, rx) = mpsc::channel();
        // The thread is left behind if the server never answers; heimdall exits right after.
        std::thread::Builder::new()
            .name("connect".into())
            .spawn(move || {
                let _ = tx.send(config.connect(NoTls));
            })
            .context("cannot start the connection thread")?;
        match rx.recv_timeout(limit) {
            Ok(result) => result,
            Err(_) => {
                return Err(fail(
                    Failure::Unavailable,
                    format!(
                        "cannot connect to PostgreSQL ({where_}): no answer within {}",
                        humantime::format_duration(limit)
                    ),
                ));
            }
        }
    };
    let client = result
        .map_err(|e| anyhow::anyhow!("{}", describe_pg_error(&e)))
        .with_context(|| format!("cannot connect to PostgreSQL ({where_})"))
        .classify(Failure::Unavailable)?;
    log::info(format!("connected in {} ms", started.elapsed().as_millis()));
    Ok(client)
}

/// Takes the lock if it is free, in one round trip: the standby check, the lock and the backend
/// pid share one simple-protocol statement (a prepared statement would cost a second round trip).
pub fn try_acquire(mut client: Client, key: LockKey, where_: &str) -> Result<Acquire> {
    // CASE keeps the volatile lock function from running on a standby at all.
    let sql = format!(
        "SELECT pg_backend_pid(), pg_is_in_recovery(), \
         CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_try_advisory_lock({}) END",
        key.sql_args()
    );
    log::debug(format!("query: {sql}"));
    let row = first_row(&mut client, &sql)
        .context("cannot take the lock")
        .classify(Failure::Unavailable)?;
    let backend_pid: i32 = row[0].as_deref().unwrap_or("0").parse().unwrap_or(0);
    if row[1].as_deref() == Some("t") {
        return Err(fail(
            Failure::UnsafeServer,
            format!(
                "refusing to lock on a hot standby ({where_}): advisory locks on a replica are local to it and exclude nobody on the primary; point --database at the primary (or add target_session_attrs=read-write)"
            ),
        ));
    }
    match row[2].as_deref() {
        Some("t") => Ok(Acquire::Held(Box::new(Session {
            client,
            key,
            backend_pid,
        }))),
        Some("f") => Ok(Acquire::Busy),
        other => Err(fail(
            Failure::Internal,
            format!("unexpected answer from pg_try_advisory_lock: {other:?}"),
        )),
    }
}

impl Session {
    /// The pooler guard: in a separate statement (and so, behind a transaction pooler, possibly
    /// on another server connection), checks that `pg_locks` shows the lock granted to the very
    /// backend this session talks to, and that it is the backend that took it. A single
    /// statement always runs on one server connection, so this cannot share the lock's round
    /// trip.
    pub fn verify(&mut self, where_: &str) -> Result<()> {
        let (classid, objid, objsubid) = self.key.pg_locks_ids();
        let sql = format!(
            "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND granted AND pid = pg_backend_pid() AND classid = '{classid}'::oid \
             AND objid = '{objid}'::oid AND objsubid = {objsubid})"
        );
        log::debug(format!("query: {sql}"));
        let row = first_row(&mut self.client, &sql)
            .context("cannot verify the lock")
            .classify(Failure::Unavailable)?;
        let pid: i32 = row[0].as_deref().unwrap_or("0").parse().unwrap_or(0);
        if pid == self.backend_pid && row[1].as_deref() == Some("t") {
            return Ok(());
        }
        let seen = if pid == self.backend_pid {
            format!("pg_locks does not show it granted to backend pid {pid}")
        } else {
            format!(
                "it was granted to backend pid {}, but the next statement ran on backend pid {pid}",
                self.backend_pid
            )
        };
        Err(fail(
            Failure::UnsafeServer,
            format!(
                "refusing to run: {seen} ({where_}). heimdall seems to be behind a transaction-pooling connection pooler (e.g. PgBouncer pool_mode=transaction), where a session lock does not stay with the session; connect directly or through session pooling. The lock may stay held on the pooler's server connection until the pooler closes it"
            ),
        ))
    }

    /// One watchdog check: a single cheap round trip that also proves the backend is the one
    /// that took the lock. Returns why the lock must count as lost, if it must.
    pub fn check(&mut self) -> std::result::Result<(), String> {
        let rows = self
            .client
            .simple_query("SELECT pg_backend_pid()")
            .map_err(|e| loss_reason(&e))?;
        let pid = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|p| p.parse::<i32>().ok()),
            _ => None,
        });
        match pid {
            Some(pid) if pid == self.backend_pid => Ok(()),
            Some(pid) => Err(format!(
                "the session now talks to backend pid {pid}, not {} which holds the lock (a transaction-pooling connection pooler?)",
                self.backend_pid
            )),
            None => Err("the heartbeat got no row back".to_owned()),
        }
    }

    /// Unlocks and closes the connection. Closing alone would release the lock too; unlocking
    /// first hands it to a waiter without waiting for the backend to exit, and proves the lock
    /// was still ours when the command finished. Returns why not, if it was not.
    pub fn release(mut self) -> std::result::Result<(), String> {
        let sql = format!("SELECT pg_advisory_unlock({})", self.key.sql_args());
        let held = match self.client.simple_query(&sql) {
            Ok(messages) => messages
                .iter()
                .any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("t"))),
            Err(e) => return Err(loss_reason(&e)),
        };
        if let Err(e) = self.client.close() {
            log::debug(format!("closing the connection: {e}"));
        }
        if held {
            log::info("lock released");
            Ok(())
        } else {
            Err("the session no longer held the lock at release".to_owned())
        }
    }
}

fn first_row(client: &mut Client, sql: &str) -> Result<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .map_err(|e| anyhow::anyhow!("{}", describe_pg_error(&e)))?;
    for message in messages {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok((0..row.len())
                .map(|i| row.get(i).map(str::to_owned))
                .collect());
        }
    }
    anyhow::bail!("the server returned no row")
}

/// What a failed heartbeat means, in words an operator can act on.
fn loss_reason(e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    let detail = describe_pg_error(e);
    match e.code() {
        Some(c) if *c == SqlState::ADMIN_SHUTDOWN => {
            format!("backend terminated by the server ({detail})")
        }
        Some(c) if *c == SqlState::CRASH_SHUTDOWN => {
            format!("the server crashed or restarted ({detail})")
        }
        Some(c) if c.code() == "57P05" => format!("backend closed for idling ({detail})"),
        _ if e.is_closed() => format!("the connection was closed ({detail})"),
        _ => detail,
    }
}

/// The crate's Display of a server error is just "db error"; the detail is in the source. Build
/// one line with the server's message and the crate's context.
pub fn describe_pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    if text.contains("password missing") {
        text.push_str(" (the server asks for a password: set PGPASSWORD, put it in the URL, or add a ~/.pgpass line)");
    }
    text
}
