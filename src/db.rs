//! The database session: connecting (bounded by the connect timeout, with libpq's TLS `allow`
//! fallback), running simple-protocol statements, and putting the server's errors into words.
//! Nothing here knows about locks; `lock.rs` and `lease.rs` speak their protocols through it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postgres::error::SqlState;
use postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::cancel::Canceller;
use crate::config::Connection;
use crate::conn::tls::{self, SslMode, TlsSettings};
use crate::conn::{ConnSettings, PasswordSource};
use crate::exit::{Classify, Failure, fail};
use crate::{keeper, log};

/// A statement for a message whose commit must survive a crash (a fencing token, a lease): when
/// `synchronous_commit` is `off` (on the server, the role or the database) it is raised to
/// `local` for this transaction alone (`set_config(…, true)`, i.e. `SET LOCAL`, which holds in the
/// implicit transaction of a message of several statements too), so the commit is on disk
/// before the answer. A stronger setting (`on`, `remote_write`, `remote_apply`) stays. It answers
/// no row (`set_config` never returns NULL), so the rows of the statements around it keep their
/// places.
pub const DURABLE_COMMIT: &str = "SELECT 1 WHERE CASE \
     WHEN pg_catalog.current_setting('synchronous_commit') OPERATOR(pg_catalog.=) 'off' \
     THEN pg_catalog.set_config('synchronous_commit', 'local', true) ELSE 'unchanged' END IS NULL";

/// An open connection, with the server's last notice kept for messages: PostgreSQL announces
/// some shutdowns as a WARNING notice just before it closes the connection.
pub struct Conn {
    /// `None` only once [`Conn::close`] or the drop has taken it.
    client: Option<Client>,
    last_notice: Arc<Mutex<Option<String>>>,
    pub where_: String,
    /// The TCP port heimdall dialled, when there was only one to dial. A server that says it
    /// listens on another one is reached through a pooler or proxy.
    pub dialled_port: Option<u16>,
    /// The host that answered, as settings of that one host: where a [`probe`] goes.
    pub reached: ConnSettings,
    /// The connection's socket, when heimdall found it (the crate does not expose it): the
    /// watchdog watches it between heartbeats for a server that ends the session.
    pub socket: Option<RawFd>,
}

/// Connects to the first host that accepts, trying them one by one (see
/// [`ConnSettings::each_host`]), each bounded by the connect timeout. The `postgres` crate
/// applies `connect_timeout` only to opening the socket; a server that accepts the connection
/// and then never answers would hang it forever, and heimdall runs unattended. When every host
/// fails, the error names each host with its own reason.
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
    let connector = tls::connector(&connection.conn.tls)
        .with_context(|| format!("cannot connect to PostgreSQL ({where_})"))
        .classify(Failure::Unavailable)?;
    let last_notice = Arc::new(Mutex::new(None));
    let hosts = connection.conn.each_host();
    let mut failures = Vec::new();
    for host in &hosts {
        match connect_host(connection, host, connector.clone(), &last_notice) {
            Ok(client) => {
                log::info(format!(
                    "connected to {} in {} ms",
                    host.host_label(),
                    started.elapsed().as_millis()
                ));
                let socket = host
                    .hosts
                    .first()
                    .is_some_and(|h| h.starts_with('/') || h.starts_with('@'));
                return Ok(Conn {
                    client: Some(client),
                    last_notice,
                    where_,
                    dialled_port: host.ports.first().copied().filter(|_| !socket),
                    reached: host.clone(),
                    socket: None,
                });
            }
            Err(why) => {
                if hosts.len() > 1 {
                    log::info(format!("cannot connect to {}: {why}", host.host_label()));
                }
                failures.push((host.host_label(), why));
            }
        }
    }
    let why = match failures.as_slice() {
        [(_, why)] => why.clone(),
        each => each
            .iter()
            .map(|(host, why)| format!("{host}: {why}"))
            .collect::<Vec<_>>()
            .join("; "),
    };
    Err(fail(
        Failure::Unavailable,
        format!("cannot connect to PostgreSQL ({where_}): {why}"),
    ))
}

/// One host, within the connect timeout; the error in words.
fn connect_host(
    connection: &Connection,
    host: &ConnSettings,
    connector: Option<MakeRustlsConnect>,
    last_notice: &Arc<Mutex<Option<String>>>,
) -> std::result::Result<Client, String> {
    let mut config = host.to_postgres(&connection.application_name, connection.connect_timeout);
    let notices = Arc::clone(last_notice);
    config.notice_callback(move |notice| {
        if let Ok(mut slot) = notices.lock() {
            *slot = Some(format!("{}: {}", notice.severity(), notice.message()));
        }
    });
    let tls_settings = host.tls.clone();
    let attempt = move || open(&mut config, &tls_settings, connector);
    let result = if connection.connect_timeout.is_zero() {
        attempt()
    } else {
        within(connection.connect_timeout, attempt)?
    };
    result.map_err(|e| {
        let name = host.hosts.first().map_or("", String::as_str);
        tls::explain(&e, &host.tls, name).unwrap_or_else(|| describe_pg_error(&e))
    })
}

/// How long an abandoned attempt gets to end once its socket is shut down.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// Runs `attempt` on a thread of its own and gives its result if it comes within `limit`.
///
/// An attempt that does not is stuck in a read nothing bounds. Its socket (the connected one
/// opened since it began: nothing else in heimdall opens one meanwhile) is shut down, which
/// ends that read: the attempt fails and closes the socket, so no half-open session stays
/// behind, and main.rs hands the keeper only the connection that succeeded. A result that still
/// comes later is dropped with the channel, closing its connection.
fn within<T: Send + 'static>(
    limit: Duration,
    attempt: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, String> {
    let before = keeper::sockets();
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("connect".into())
        .spawn(move || {
            let _ = tx.send(attempt());
        })
        .map_err(|e| format!("cannot start the connection thread: {e}"))?;
    if let Ok(result) = rx.recv_timeout(limit) {
        return Ok(result);
    }
    for fd in keeper::sockets() {
        if !before.contains(&fd) {
            // SAFETY: shutdown takes a descriptor number and touches nothing but that socket,
            // one the attempt opened since `before`.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
    let _ = rx.recv_timeout(ABANDON_WAIT);
    Err(format!(
        "no answer within {}",
        humantime::format_duration(limit)
    ))
}

/// One connection attempt, with TLS as the settings ask. `allow` (libpq: plain
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

/// How a [`probe`] ended, when it did not run every statement.
#[derive(Debug)]
pub enum ProbeEnd {
    /// No connection: the host refused it, or did not answer within the connect timeout.
    NoConnection(String),
    /// Statement `step` (from 0) failed: the server's or pooler's own words, if it sent any,
    /// and whether the connection ended with it.
    Failed {
        step: usize,
        said: Option<String>,
        ended: bool,
    },
}

/// Opens a fresh connection to `host` and runs `statements` on it, one after the other, through
/// the async client, giving the first failure in the server's or pooler's own words.
///
/// The sync client cannot give those words when a pooler sends an ErrorResponse and closes at
/// once, as PgBouncer does for `query_wait_timeout`: while waiting for an answer it polls the
/// connection first, and the end of the connection, read in the same go as the error, wins
/// (a bare "connection closed"). The async client hands the error to the statement before its
/// connection task sees the end. No TLS `allow` fallback: a probe is an extra question, not
/// the connection that holds the lock.
pub fn probe(
    connection: &Connection,
    host: &ConnSettings,
    statements: &[&str],
) -> std::result::Result<(), ProbeEnd> {
    let no_connection = |why: String| ProbeEnd::NoConnection(why);
    let config = host.to_tokio_postgres(&connection.application_name, connection.connect_timeout);
    let connector = tls::connector(&host.tls).map_err(|e| no_connection(format!("{e:#}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| no_connection(e.to_string()))?;
    let limit = Some(connection.connect_timeout).filter(|t| !t.is_zero());
    runtime.block_on(async {
        let connecting = async {
            // The connection task runs beside the statements, on this runtime.
            match connector {
                Some(tls) => config.connect(tls).await.map(|(client, task)| {
                    tokio::spawn(task);
                    client
                }),
                None => config.connect(NoTls).await.map(|(client, task)| {
                    tokio::spawn(task);
                    client
                }),
            }
        };
        let client = match limit {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| no_connection("no answer within the connect timeout".into()))?,
            None => connecting.await,
        }
        .map_err(|e| no_connection(describe_pg_error(&e)))?;
        for (step, sql) in statements.iter().enumerate() {
            log::debug(format!("probe: {sql}"));
            if let Err(e) = client.simple_query(sql).await {
                return Err(ProbeEnd::Failed {
                    step,
                    said: e.as_db_error().map(|_| describe_pg_error(&e)),
                    ended: connection_ended(&e),
                });
            }
        }
        Ok(())
    })
}

impl Conn {
    /// Closes the connection (a Terminate message); a failure only means it was gone already.
    pub fn close(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if job_alive() {
            // See `Drop`.
            std::mem::forget(client);
            return;
        }
        if let Err(e) = client.close() {
            log::debug(format!("closing the connection: {e}"));
        }
    }

    fn client(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("the client is taken only by close and drop, which consume the Conn")
    }

    /// Runs one simple-protocol statement (no prepare round trip) and returns its first row.
    pub fn first_row(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<Option<String>>, postgres::Error> {
        log::debug(format!("query: {sql}"));
        let messages = self.client().simple_query(sql)?;
        Ok(rows(&messages).into_iter().next().unwrap_or_default())
    }

    /// All rows of one simple-protocol statement.
    pub fn rows(
        &mut self,
        sql: &str,
    ) -> std::result::Result<Vec<Vec<Option<String>>>, postgres::Error> {
        log::debug(format!("query: {sql}"));
        self.client().simple_query(sql).map(|m| rows(&m))
    }

    /// What cancels the statement in flight from another thread (a signal during a wait):
    /// closing the socket alone would leave the backend queued for the lock.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            token: self
                .client
                .as_ref()
                .expect("the client is taken only by close and drop, which consume the Conn")
                .cancel_token(),
            socket: self.socket,
        }
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
            // A heartbeat sent after the server closed its end meets a reset: the same end.
            _ if e.is_closed() || reset_by_peer(e) => match notice {
                Some(notice) => format!("the server closed the connection ({notice})"),
                None => "the server closed the connection".to_owned(),
            },
            _ => detail,
        }
    }
}

/// Whether a job may be running under a lock this process holds: from just before the command
/// is spawned until every process of it is gone (set by the keeper's bookkeeping).
static JOB_ALIVE: AtomicBool = AtomicBool::new(false);

/// Says whether a job may be running (see [`Conn`]'s `Drop`).
pub fn set_job_alive(alive: bool) {
    JOB_ALIVE.store(alive, Ordering::SeqCst);
}

fn job_alive() -> bool {
    JOB_ALIVE.load(Ordering::SeqCst)
}

/// The holding connection is closed only after the job is gone: whatever path drops a session
/// while a job may run (an error after the spawn, a panic), it must not end the session (the
/// client's Terminate would, whoever else holds the socket). The client is left as it is
/// instead: its socket stays open until heimdall exits, and the keeper's copy until the keeper
/// has killed the job, so the server lets go of the lock only then.
impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && job_alive()
        {
            std::mem::forget(client);
        }
    }
}

/// The connection failed with a reset or a broken pipe: the peer had closed it.
fn reset_by_peer(e: &postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = s.source();
    }
    false
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

/// SQL: the `timestamptz` expression `ts` as whole microseconds since the epoch (`int8`),
/// exactly. The epoch is a float, scaled to an integer before it becomes text: as text, a
/// float goes through the session's `extra_float_digits`, which may round it to 15 or fewer
/// significant digits (12 for a role with `extra_float_digits = -3`).
pub fn epoch_micros_sql(ts: &str) -> String {
    format!("(pg_catalog.date_part('epoch', {ts}) OPERATOR(pg_catalog.*) 1000000)::pg_catalog.int8")
}

/// SQL: [`epoch_micros_sql`] as seconds since the epoch with exactly six decimals (`numeric`,
/// whose text no setting changes).
pub fn epoch_seconds_sql(ts: &str) -> String {
    format!(
        "pg_catalog.round({}::pg_catalog.numeric OPERATOR(pg_catalog./) 1000000, 6)",
        epoch_micros_sql(ts)
    )
}

/// For tests: the operators and casts left in `sql` for `search_path` to resolve, once
/// `OPERATOR(pg_catalog.…)`, `::pg_catalog.…` casts and the forms that are no operators
/// (`SET column = `, `= EXCLUDED.`, `name =>`) are taken out.
#[cfg(test)]
pub fn unqualified(sql: &str) -> Vec<&'static str> {
    let mut bare = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find("OPERATOR(pg_catalog.") {
        bare.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = rest.find(')').map_or("", |end| &rest[end + 1..]);
    }
    bare.push_str(rest);
    for no_lookup in [
        "::pg_catalog.",
        " = EXCLUDED",
        "SET version = ",
        "SET expires_at = ",
        "=>",
    ] {
        bare = bare.replace(no_lookup, "");
    }
    [
        " = ", "<", ">", " + ", " - ", " / ", " * ", "::", "||", " in (", " IN (",
    ]
    .into_iter()
    .filter(|op| bare.contains(op))
    .collect()
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
