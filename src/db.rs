//! The database session: connecting (bounded by the connect timeout, with libpq's TLS `allow`
//! fallback), running simple-protocol statements, and putting the server's errors into words.
//! Nothing here knows about locks; `lock.rs` and `lease.rs` speak their protocols through it.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use anyhow::{Context, Result};
use postgres::error::SqlState;
use postgres::{CancelToken, Client, NoTls, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::Connection;
use crate::conn::PasswordSource;
use crate::conn::tls::{self, SslMode, TlsSettings};
use crate::exit::{Classify, Failure, fail};
use crate::log;

/// A statement for a message whose commit must survive a crash (a fencing token, a lease): when
/// `synchronous_commit` is `off` (on the server, the role or the database) it is raised to
/// `local` for this transaction alone (`set_config(…, true)`, i.e. `SET LOCAL`, which holds in the
/// implicit transaction of a message of several statements too), so the commit is on disk
/// before the answer. A stronger setting (`on`, `remote_write`, `remote_apply`) stays. It answers
/// no row (`set_config` never returns NULL), so the rows of the statements around it keep their
/// places.
pub const DURABLE_COMMIT: &str = "SELECT 1 WHERE CASE \
     WHEN pg_catalog.current_setting('synchronous_commit') = 'off' \
     THEN pg_catalog.set_config('synchronous_commit', 'local', true) ELSE 'unchanged' END IS NULL";

/// An open connection, with the server's last notice kept for messages: PostgreSQL announces
/// some shutdowns as a WARNING notice just before it closes the connection.
pub struct Conn {
    client: Client,
    last_notice: Arc<Mutex<Option<String>>>,
    pub where_: String,
    /// The TCP port heimdall dialled, when there was only one to dial. A server that says it
    /// listens on another one is reached through a pooler or proxy.
    pub dialled_port: Option<u16>,
}

/// Connects, bounded by the connect timeout for every host it may try. The `postgres` crate
/// applies `connect_timeout` only to opening the socket; a server that accepts the connection
/// and then never answers would hang it forever, and heimdall runs unattended.
pub fn connect(connection: &Connection) -> Result<Conn> {
    let started = Instant::now();
    let where_ = connection.conn.describe();
    log::info(format!("connecting to {where_}"));
    log::debug(format!(
        "application_name={:?} connect_timeout={:?} password={}",
        connection.application_name,
        connection.connect_timeout,
        match &connection.conn.password_source {
            PasswordSource::None => "none".to_owned(),
            PasswordSource::ConnectionString => "from the connection string".to_owned(),
            PasswordSource::Environment => "from PGPASSWORD".to_owned(),
            PasswordSource::PassFile { path, line } =>
                format!("from {} line {line}", path.display()),
        }
    ));
    let mut config = connection
        .conn
        .to_postgres(&connection.application_name, connection.connect_timeout);
    let last_notice = Arc::new(Mutex::new(None));
    let notices = Arc::clone(&last_notice);
    config.notice_callback(move |notice| {
        if let Ok(mut slot) = notices.lock() {
            *slot = Some(format!("{}: {}", notice.severity(), notice.message()));
        }
    });

    let tls_settings = connection.conn.tls.clone();
    let connector = tls::connector(&tls_settings)
        .with_context(|| format!("cannot connect to PostgreSQL ({where_})"))
        .classify(Failure::Unavailable)?;
    let attempt = move || open(&mut config, &tls_settings, connector);

    let result = if connection.connect_timeout.is_zero() {
        attempt()
    } else {
        let hosts = connection
            .conn
            .hosts
            .len()
            .max(connection.conn.hostaddrs.len())
            .max(1) as u32;
        let limit = connection.connect_timeout * hosts;
        let (tx, rx) = mpsc::channel();
        // The thread is left behind if the server never answers; heimdall exits right after.
        std::thread::Builder::new()
            .name("connect".into())
            .spawn(move || {
                let _ = tx.send(attempt());
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
    let first_host = connection.conn.hosts.first().cloned().unwrap_or_default();
    let client = result
        .map_err(|e| {
            let why = tls::explain(&e, &connection.conn.tls, &first_host)
                .unwrap_or_else(|| describe_pg_error(&e));
            anyhow::anyhow!("{why}")
        })
        .with_context(|| format!("cannot connect to PostgreSQL ({where_})"))
        .classify(Failure::Unavailable)?;
    log::info(format!("connected in {} ms", started.elapsed().as_millis()));
    let conn = &connection.conn;
    let tcp_only = !conn
        .hosts
        .iter()
        .any(|h| h.starts_with('/') || h.starts_with('@'));
    let dialled_port = match conn.ports.as_slice() {
        [port] if tcp_only => Some(*port),
        [first, rest @ ..] if tcp_only && rest.iter().all(|p| p == first) => Some(*first),
        _ => None,
    };
    Ok(Conn {
        client,
        last_notice,
        where_,
        dialled_port,
    })
}

/// One connection attempt over the hosts, with TLS as the settings ask. `allow` (libpq: plain
/// first, TLS if the server insists) is the one mode the crate lacks: a plain attempt that the
/// server refuses is retried with TLS.
fn open(
    config: &mut postgres::Config,
    tls: &TlsSettings,
    connector: Option<MakeRustlsConnect>,
) -> std::result::Result<Client, postgres::Error> {
    match connector {
        None => config.connect(NoTls),
        Some(connector) if tls.mode == SslMode::Allow => match config.connect(NoTls) {
            Err(e) if e.as_db_error().is_some() => {
                log::debug(format!(
                    "sslmode=allow: the server refused a plain connection ({}); trying TLS",
                    describe_pg_error(&e)
                ));
                config.ssl_mode(postgres::config::SslMode::Require);
                config.connect(connector)
            }
            other => other,
        },
        Some(connector) => config.connect(connector),
    }
}

impl Conn {
    /// Closes the connection (a Terminate message); a failure only means it was gone already.
    pub fn close(self) {
        if let Err(e) = self.client.close() {
            log::debug(format!("closing the connection: {e}"));
        }
    }

    /// Runs one simple-protocol statement (no prepare round trip) and returns its first row.
    pub fn first_row(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<Option<String>>, postgres::Error> {
        log::debug(format!("query: {sql}"));
        let messages = self.client.simple_query(sql)?;
        Ok(rows(&messages).into_iter().next().unwrap_or_default())
    }

    /// All rows of one simple-protocol statement.
    pub fn rows(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<Vec<Option<String>>>, postgres::Error> {
        log::debug(format!("query: {sql}"));
        self.client.simple_query(sql).map(|m| rows(&m))
    }

    /// A token that cancels the statement in flight from another thread (a signal during a
    /// wait): closing the socket alone would leave the backend queued for the lock.
    pub fn cancel_token(&self) -> CancelToken {
        self.client.cancel_token()
    }

    /// What a failed statement means for a held lock, in words an operator can act on.
    pub fn loss_reason(&self, e: &postgres::Error) -> String {
        let detail = describe_pg_error(e);
        let notice = self.last_notice.lock().ok().and_then(|n| n.clone());
        match e.code() {
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN => {
                format!("backend terminated by the server ({detail})")
            }
            Some(c) if *c == SqlState::CRASH_SHUTDOWN => {
                format!("the server crashed or restarted ({detail})")
            }
            Some(c) if c.code() == "57P05" => format!("backend closed for idling ({detail})"),
            _ if e.is_closed() => match notice {
                Some(notice) => format!("the server closed the connection ({notice})"),
                None => "the server closed the connection".to_owned(),
            },
            _ => detail,
        }
    }
}

fn rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The connection is gone: closed, or ended with a FATAL error (PgBouncer sends one only
/// sometimes before it closes).
pub fn connection_ended(e: &postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_some_and(|db| db.severity() == "FATAL")
}

/// Field `i` of a row, `""` for NULL or a missing column.
pub fn field(row: &[Option<String>], i: usize) -> &str {
    row.get(i).and_then(|v| v.as_deref()).unwrap_or("")
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
