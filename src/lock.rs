//! The database session that holds the lock: connect, check the server is safe to lock on, take
//! the lock (at once, or waiting in PostgreSQL's own lock queue), verify it, check it while the
//! command runs, release it. An advisory lock lives exactly as long as this session, so the
//! session is owned by one place at a time and closed only after the command is gone.

use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use postgres::error::SqlState;
use postgres::{CancelToken, Client, NoTls, SimpleQueryMessage};

use crate::cli::Wait;
use crate::config::{Connection, LockTarget, Mode};
use crate::conninfo::PasswordSource;
use crate::exit::{Classify, Failure, fail};
use crate::holders::{self, Holder};
use crate::keepalive;
use crate::key::LockKey;
use crate::log;
use crate::tls::{self, SslMode, TlsSettings};
use tokio_postgres_rustls::MakeRustlsConnect;

/// With `--slots` and `--wait`, heimdall queues on one slot for a short, jittered while, then
/// tries every slot again: PostgreSQL cannot wait for the first of several locks.
const SLOT_WAIT_MIN: Duration = Duration::from_millis(50);
const SLOT_WAIT_SPREAD_MS: u64 = 200;

/// An open connection, with the server's last notice kept for messages: PostgreSQL announces
/// some shutdowns as a WARNING notice just before it closes the connection.
pub struct Conn {
    client: Client,
    last_notice: Arc<Mutex<Option<String>>>,
    pub where_: String,
}

/// The outcome of acquiring.
pub enum Acquire {
    Held(Box<Session>),
    Busy(Busy),
}

/// Why the command did not run, for the message.
pub struct Busy {
    pub holders: Vec<Holder>,
    /// How long heimdall waited, when it did.
    pub waited: Option<Duration>,
    /// What ended the wait, when the server did (a role's statement_timeout, say).
    pub ended_by: Option<String>,
}

/// A connection that holds the lock.
pub struct Session {
    conn: Conn,
    key: LockKey,
    mode: Mode,
    pub slot: u16,
    pub backend_pid: i32,
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
    Ok(Conn {
        client,
        last_notice,
        where_,
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
    fn loss_reason(&self, e: &postgres::Error) -> String {
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

fn lock_function(mode: Mode, waiting: bool) -> &'static str {
    match (mode, waiting) {
        (Mode::Exclusive, false) => "pg_try_advisory_lock",
        (Mode::Shared, false) => "pg_try_advisory_lock_shared",
        (Mode::Exclusive, true) => "pg_advisory_lock",
        (Mode::Shared, true) => "pg_advisory_lock_shared",
    }
}

/// Takes the lock, or says who holds it. `server` ([`keepalive::server_settings`]) is set for
/// the session with the first attempt. `on_wait` receives a cancel token before heimdall
/// blocks in the server's lock queue, so a signal can cancel the wait.
pub fn acquire(
    mut conn: Conn,
    lock: &LockTarget,
    mode: Mode,
    wait: Option<Wait>,
    server: &[(&'static str, String)],
    on_wait: impl Fn(Option<CancelToken>),
) -> Result<Acquire> {
    let (backend_pid, slot) = try_once(&mut conn, lock, mode, Some(server))?;
    if let Some(slot) = slot {
        return Ok(held(conn, lock, mode, slot, backend_pid));
    }
    let Some(wait) = wait else {
        let holders = holders::of(&mut conn, lock);
        return Ok(Acquire::Busy(Busy {
            holders,
            waited: None,
            ended_by: None,
        }));
    };

    let started = Instant::now();
    if log::enabled(log::Level::Verbose) {
        let holders = holders::of(&mut conn, lock);
        log::info(format!(
            "lock {} is busy ({}); waiting{}",
            lock.describe(),
            holders::describe(&holders),
            match wait {
                Wait::Forever => String::new(),
                Wait::Up(d) => format!(" up to {}", humantime::format_duration(d)),
            }
        ));
    }
    let deadline = match wait {
        Wait::Forever => None,
        Wait::Up(d) => Some(started + d),
    };
    on_wait(Some(conn.cancel_token()));
    let result = wait_in_queue(&mut conn, lock, mode, deadline);
    on_wait(None);
    let waited = started.elapsed();
    match result? {
        Ok(slot) => {
            log::info(format!("waited {} ms for the lock", waited.as_millis()));
            Ok(held(conn, lock, mode, slot, backend_pid))
        }
        Err(ended_by) => {
            let holders = holders::of(&mut conn, lock);
            Ok(Acquire::Busy(Busy {
                holders,
                waited: Some(waited),
                ended_by,
            }))
        }
    }
}

fn held(conn: Conn, lock: &LockTarget, mode: Mode, slot: u16, backend_pid: i32) -> Acquire {
    Acquire::Held(Box::new(Session {
        conn,
        key: lock.key.slot(slot),
        mode,
        slot,
        backend_pid,
    }))
}

/// One non-blocking attempt on every slot, in order, in one statement: the standby check, the
/// backend pid and the lock share a round trip. CASE stops at the first slot it gets, and keeps
/// the volatile lock functions from running on a standby at all. The first attempt (`first`:
/// the session's server-side settings) also sets those, in the same message.
fn try_once(
    conn: &mut Conn,
    lock: &LockTarget,
    mode: Mode,
    first: Option<&[(&'static str, String)]>,
) -> Result<(i32, Option<u16>)> {
    let function = lock_function(mode, false);
    let attempts: String = lock
        .slot_keys()
        .iter()
        .enumerate()
        .map(|(i, key)| format!(" WHEN {function}({}) THEN {i}", key.sql_args()))
        .collect();
    let sql = if first.is_some() {
        format!(
            "SELECT pg_backend_pid(), pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN NULL{attempts} ELSE -1 END"
        )
    } else {
        format!("SELECT pg_backend_pid(), false, CASE{attempts} ELSE -1 END")
    };
    let settings = first.unwrap_or_default();
    let sets = keepalive::set_sql(settings);
    let row = match conn.first_row(&format!("{sets}{sql}")) {
        // A server that refuses a setting (too old to know it, say) must still work: the same
        // statement again without them. A SET fails before the lock function runs.
        Err(e) if !sets.is_empty() && e.as_db_error().is_some() => {
            log::info(format!(
                "warning: setting the server's keepalive failed ({}); taking the lock without it, so if this host is cut off the lock may stay held until the server's own keepalive gives up",
                describe_pg_error(&e)
            ));
            conn.first_row(&sql)
        }
        Ok(row) => {
            keepalive::report(conn, settings);
            Ok(row)
        }
        other => other,
    };
    let row = row
        .map_err(|e| anyhow::anyhow!("{}", describe_pg_error(&e)))
        .context("cannot take the lock")
        .classify(Failure::Unavailable)?;
    let backend_pid: i32 = field(&row, 0).parse().unwrap_or(0);
    if field(&row, 1) == "t" {
        return Err(fail(
            Failure::UnsafeServer,
            format!(
                "refusing to lock on a hot standby ({}): advisory locks on a replica are local to it and exclude nobody on the primary; point --database at the primary (or add target_session_attrs=read-write)",
                conn.where_
            ),
        ));
    }
    match field(&row, 2).parse::<i32>() {
        Ok(-1) => Ok((backend_pid, None)),
        Ok(slot) => Ok((backend_pid, Some(slot as u16))),
        Err(_) => Err(fail(
            Failure::Internal,
            format!("unexpected answer to the lock statement: {row:?}"),
        )),
    }
}

/// Waits in PostgreSQL's lock queue (first come, first served) under a session `lock_timeout`.
/// Returns the slot, or what ended the wait (`None`: our own deadline).
fn wait_in_queue(
    conn: &mut Conn,
    lock: &LockTarget,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<std::result::Result<u16, Option<String>>> {
    let function = lock_function(mode, true);
    let jitter = u64::from(std::process::id());
    let mut round: u64 = 0;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            return Ok(Err(None));
        }
        // With one slot, one blocking call does it all. With several, queue on one slot for a
        // short, jittered while, then look at every slot again.
        let (slot, limit) = if lock.slots == 1 {
            (0, remaining)
        } else {
            round += 1;
            let spread =
                (jitter.wrapping_mul(2_654_435_761).wrapping_add(round * 97)) % SLOT_WAIT_SPREAD_MS;
            let slice = SLOT_WAIT_MIN + Duration::from_millis(spread);
            let slot = ((jitter + round) % u64::from(lock.slots)) as u16;
            (slot, Some(remaining.map_or(slice, |r| r.min(slice))))
        };
        // lock_timeout 0 means no limit; a limit under 1 ms would round to 0.
        let timeout_ms = limit.map_or(0, |l| l.as_millis().max(1));
        let sql = format!(
            "SET lock_timeout = {timeout_ms}; SELECT {function}({})",
            lock.key.slot(slot).sql_args()
        );
        match conn.rows(&sql) {
            Ok(_) => return Ok(Ok(slot)),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                if lock.slots > 1 {
                    let (_, got) = try_once(conn, lock, mode, None)?;
                    if let Some(slot) = got {
                        return Ok(Ok(slot));
                    }
                    continue;
                }
                return Ok(Err(None));
            }
            // A role's statement_timeout ends the wait: that is "busy", not a failure.
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                let setting = conn
                    .first_row("SHOW statement_timeout")
                    .ok()
                    .map(|r| field(&r, 0).to_owned())
                    .unwrap_or_else(|| "?".to_owned());
                return Ok(Err(Some(format!(
                    "the server's statement_timeout ({setting}) ended the wait; raise it for this role, or use --wait=DURATION below it"
                ))));
            }
            Err(e) => {
                return Err(anyhow::anyhow!("{}", describe_pg_error(&e)))
                    .context("cannot wait for the lock")
                    .classify(Failure::Unavailable);
            }
        }
    }
}

fn field(row: &[Option<String>], i: usize) -> &str {
    row.get(i).and_then(|v| v.as_deref()).unwrap_or("")
}

impl Session {
    /// The pooler guard, in a separate statement (and so, behind a transaction pooler, possibly
    /// on another server connection): `pg_locks` must show the lock granted to the very backend
    /// this session talks to, the backend that took it. A single statement always runs on one
    /// server connection, so this cannot share the lock's round trip. The same statement takes
    /// the fencing token: a transaction id assigned after the lock was granted, so it grows
    /// across all acquisitions on the database.
    pub fn verify(&mut self) -> Result<i64> {
        let (classid, objid, objsubid) = self.key.pg_locks_ids();
        let sql = format!(
            // pg_lock_status() is what the pg_locks view reads; calling it directly spares a
            // fresh backend the view's catalog lookups (about 0.2 ms).
            "SELECT pg_backend_pid(), EXISTS (SELECT 1 FROM pg_lock_status() l \
             WHERE l.locktype = 'advisory' AND l.granted AND l.pid = pg_backend_pid() \
             AND l.classid = '{classid}'::oid AND l.objid = '{objid}'::oid \
             AND l.objsubid = {objsubid}), txid_current()"
        );
        let row = self
            .conn
            .first_row(&sql)
            .map_err(|e| anyhow::anyhow!("{}", describe_pg_error(&e)))
            .context("cannot verify the lock")
            .classify(Failure::Unavailable)?;
        let pid: i32 = field(&row, 0).parse().unwrap_or(0);
        if pid == self.backend_pid && field(&row, 1) == "t" {
            return Ok(field(&row, 2).parse().unwrap_or(0));
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
                "refusing to run: {seen} ({}). heimdall seems to be behind a transaction-pooling connection pooler (e.g. PgBouncer pool_mode=transaction), where a session lock does not stay with the session; connect directly or through session pooling. The lock may stay held on the pooler's server connection until the pooler closes it",
                self.conn.where_
            ),
        ))
    }

    /// One watchdog check: a single cheap round trip that also proves the backend is the one
    /// that took the lock. Returns why the lock must count as lost, if it must.
    pub fn check(&mut self) -> std::result::Result<(), String> {
        let row = self
            .conn
            .first_row("SELECT pg_backend_pid()")
            .map_err(|e| self.conn.loss_reason(&e))?;
        match field(&row, 0).parse::<i32>() {
            Ok(pid) if pid == self.backend_pid => Ok(()),
            Ok(pid) => Err(format!(
                "the session now talks to backend pid {pid}, not {} which holds the lock (a transaction-pooling connection pooler?)",
                self.backend_pid
            )),
            Err(_) => Err("the heartbeat got no row back".to_owned()),
        }
    }

    /// Unlocks and closes the connection. Closing alone would release the lock too; unlocking
    /// first hands it to a waiter without waiting for the backend to exit, and proves the lock
    /// was still ours when the command finished. Returns why not, if it was not.
    pub fn release(mut self) -> std::result::Result<(), String> {
        let function = match self.mode {
            Mode::Exclusive => "pg_advisory_unlock",
            Mode::Shared => "pg_advisory_unlock_shared",
        };
        let sql = format!("SELECT {function}({})", self.key.sql_args());
        let held = match self.conn.first_row(&sql) {
            Ok(row) => field(&row, 0) == "t",
            Err(e) => return Err(self.conn.loss_reason(&e)),
        };
        if let Err(e) = self.conn.client.close() {
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
