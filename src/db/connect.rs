//! Connecting: to the first host that accepts, each bounded by the connect timeout (the login
//! too), with libpq's TLS `allow` fallback, and the failures named host by host.

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Session, describe_pg_error, explain, socket};
use crate::config::Dial;
use crate::conninfo::tls::{self, SslMode, TlsSettings};
use crate::conninfo::{ConnInfo, PasswordSource};
use crate::exit::{Classify, Failure, fail};
use crate::log;

/// Connects, as [`connect`] does, and says what resolving the settings warned about (a password
/// file ignored for its permissions): once connected; when the connection fails, the warnings
/// lead its error instead, so that a failure carries its reason even under -q, and no warning is
/// said twice. The first connection of a run or a subcommand; a reconnect uses [`connect`].
pub fn open(dial: &Dial) -> Result<Session> {
    match connect(dial) {
        Ok(session) => {
            for warning in &dial.info.warnings {
                log::warn(warning);
            }
            Ok(session)
        }
        Err(err) if dial.info.warnings.is_empty() => Err(err),
        Err(err) => Err(err.context(dial.info.warnings.join("; "))),
    }
}

/// Connects to the first host that accepts, trying them one by one (see
/// [`ConnInfo::each_host`]), each bounded by the connect timeout. The `postgres` crate
/// applies `connect_timeout` only to opening the socket; a server that accepts the connection
/// and then never answers would hang it forever, and heimdall runs unattended. When every host
/// fails, the error names each host with its own reason.
pub fn connect(dial: &Dial) -> Result<Session> {
    let started = Instant::now();
    let where_ = dial.info.describe();
    log::info(format!("connecting to {where_}"));
    log::debug(format!(
        "application_name={:?} connect_timeout={:?} password={}",
        dial.application_name,
        dial.connect_timeout,
        match &dial.info.password_source {
            PasswordSource::None => "none".to_owned(),
            PasswordSource::ConnectionString => "from the connection string".to_owned(),
            PasswordSource::Environment => "from PGPASSWORD".to_owned(),
            PasswordSource::PassFile { path, line } =>
                format!("from {} line {line}", path.display()),
        }
    ));
    let connector = tls::connector(&dial.info.tls)
        .with_context(|| format!("cannot connect to PostgreSQL ({where_})"))
        .classify(Failure::Unavailable)?;
    let last_notice = Arc::new(Mutex::new(None));
    let hosts = dial.info.each_host();
    let mut failures = Vec::new();
    for host in &hosts {
        match connect_host(dial, host, connector.clone(), &last_notice) {
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
                return Ok(Session {
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
    dial: &Dial,
    host: &ConnInfo,
    connector: Option<MakeRustlsConnect>,
    last_notice: &Arc<Mutex<Option<String>>>,
) -> std::result::Result<Client, String> {
    let mut config = host.to_postgres(&dial.application_name, dial.connect_timeout);
    let notices = Arc::clone(last_notice);
    config.notice_callback(move |notice| {
        if let Ok(mut slot) = notices.lock() {
            *slot = Some(format!("{}: {}", notice.severity(), notice.message()));
        }
    });
    let tls_settings = host.tls.clone();
    let attempt = move || attempt(&mut config, &tls_settings, connector);
    let result = if dial.connect_timeout.is_zero() {
        attempt()
    } else {
        within(dial.connect_timeout, attempt)?
    };
    result.map_err(|e| explain::connect_failure(&e, host))
}

/// How long an abandoned attempt gets to end once its socket is shut down.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// Runs `attempt` on a thread of its own and gives its result if it comes within `limit`.
///
/// An attempt that does not is stuck in a read nothing bounds. Its socket (the connected one
/// opened since it began: nothing else in heimdall opens one meanwhile) is shut down, which
/// ends that read: the attempt fails and closes the socket, so no half-open session stays
/// behind, and `run` hands the keeper only the connection that succeeded. A result that still
/// comes later is dropped with the channel, closing its connection.
fn within<T: Send + 'static>(
    limit: Duration,
    attempt: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, String> {
    let before = socket::connected();
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
    for fd in socket::connected() {
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
fn attempt(
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
