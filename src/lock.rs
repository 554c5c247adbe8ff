//! The database session that holds the lock: connect, check the server is safe to lock on, take
//! the lock (at once, or waiting in PostgreSQL's own lock queue), check it while the command
//! runs, release it. The session is owned by one place at a time and closed only after the
//! command is gone.
//!
//! The lock is a transaction-level advisory lock held by a transaction that stays open while the
//! command runs. Every connection pooler keeps a client on one server connection while its
//! transaction is open, and every one of them ends the transaction (closing the server
//! connection, or rolling back) when the client goes, so the lock holds through a transaction
//! pooler exactly as on a direct connection, and goes with heimdall. A session-level lock would
//! not: a transaction pooler hands the server connection, lock and all, to other clients
//! (`../shared/POOLERS.md` has the survey). The holding transaction has no transaction id and,
//! in read committed, no snapshot between statements, so it holds back no VACUUM.

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
    /// The TCP port heimdall dialled, when there was only one to dial. A server that says it
    /// listens on another one is reached through a pooler or proxy.
    pub dialled_port: Option<u16>,
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
    pub slot: u16,
    pub backend_pid: i32,
    /// A transaction id assigned while this session held the lock: larger than any token an
    /// earlier holder of the lock got.
    pub fencing_token: i64,
    /// `now()` in the holding transaction, its start: the heartbeat's proof that the
    /// transaction holding the lock is still the one it talks to.
    holding_since: String,
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

/// The lock functions of one mode, schema-qualified: a role's `search_path` must not be able to
/// put functions of its own with the same names in front of PostgreSQL's.
struct Functions {
    try_xact: &'static str,
    wait_xact: &'static str,
    try_session: &'static str,
    unlock_session: &'static str,
}

fn functions(mode: Mode) -> Functions {
    match mode {
        Mode::Exclusive => Functions {
            try_xact: "pg_catalog.pg_try_advisory_xact_lock",
            wait_xact: "pg_catalog.pg_advisory_xact_lock",
            try_session: "pg_catalog.pg_try_advisory_lock",
            unlock_session: "pg_catalog.pg_advisory_unlock",
        },
        Mode::Shared => Functions {
            try_xact: "pg_catalog.pg_try_advisory_xact_lock_shared",
            wait_xact: "pg_catalog.pg_advisory_xact_lock_shared",
            try_session: "pg_catalog.pg_try_advisory_lock_shared",
            unlock_session: "pg_catalog.pg_advisory_unlock_shared",
        },
    }
}

/// Read committed, whatever the role's default: a repeatable-read or serializable transaction
/// keeps its snapshot, and with it `backend_xmin`, for the whole run, which holds back VACUUM.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// Settings that would end the holding transaction, or its heartbeats, are switched off for it
/// alone (`SET LOCAL`: a pooler may hand the server connection to another client afterwards).
/// `idle_session_timeout` needs nothing: it never applies inside a transaction.
const HOLDING_SETTINGS: &str = "SET LOCAL idle_in_transaction_session_timeout = 0; \
     SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0";

/// The first attempt: open the transaction and try every slot, in order, in one statement,
/// together with the backend pid and the standby check. CASE stops at the first slot it gets,
/// and keeps the volatile lock functions from running on a standby at all.
fn take_sql(lock: &LockTarget, mode: Mode) -> String {
    let f = functions(mode);
    let attempts: String = lock
        .slot_keys()
        .iter()
        .enumerate()
        .map(|(i, key)| format!(" WHEN {}({}) THEN {i}", f.try_xact, key.sql_args()))
        .collect();
    format!(
        "{BEGIN}; SELECT pg_catalog.pg_backend_pid(), pg_catalog.pg_is_in_recovery(), \
         CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL{attempts} ELSE -1 END"
    )
}

/// Turns a transaction that holds the lock on `key` into the holding transaction, without a
/// moment in which the lock is free and without a transaction id kept for the run:
/// 1. the session-level lock on the same key (granted at once: this backend holds it already),
///    so that the lock survives the commit that follows;
/// 2. the fencing token, a transaction id assigned while the lock is held, so tokens rise
///    strictly from one holder to the next;
/// 3. COMMIT AND CHAIN: the id is gone, and a pooler sees the connection still in a transaction;
/// 4. the settings for the holding transaction;
/// 5. the transaction-level lock again (at once, through the session lock), then the session
///    lock dropped, so nothing of the lock can outlive the transaction or the connection.
///
/// On a standby every step is skipped, so the caller can refuse it by name. When this backend
/// did not hold the lock at 1, nothing is held at the end unless the lock came free meanwhile,
/// and then it is held properly: step 5's answer alone says whether the lock is held.
fn settle_sql(key: LockKey, mode: Mode, keepalive: &[(&'static str, String)]) -> String {
    let f = functions(mode);
    let args = key.sql_args();
    format!(
        "SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
         WHEN {try_session}({args}) THEN pg_catalog.txid_current() END; \
         COMMIT AND CHAIN; {HOLDING_SETTINGS}; \
         SELECT CASE WHEN pg_catalog.pg_is_in_recovery() THEN NULL \
         WHEN {try_xact}({args}) THEN {unlock}({args}) END, pg_catalog.now(){keepalive}",
        keepalive = keepalive::set_sql(keepalive),
        try_session = f.try_session,
        try_xact = f.try_xact,
        unlock = f.unlock_session,
    )
}

/// What heimdall asks of the server: where, which lock, how.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub connection: &'a Connection,
    pub lock: &'a LockTarget,
    pub mode: Mode,
    pub wait: Option<Wait>,
    /// What the server should use to notice a dead heimdall (see `keepalive`).
    pub keepalive: &'a [(&'static str, String)],
}

/// A pooler in statement mode closes a client's connection when a transaction stays open after
/// a statement, without a word on the wire. Asked only after a connection closed in answer to
/// the lock statement: a fresh connection that closes on `BEGIN` as well is that pooler; a
/// server that went away refuses the connection instead.
fn statement_pooling(connection: &Connection) -> bool {
    let Ok(mut probe) = connect(connection) else {
        return false;
    };
    let closed = probe
        .rows("BEGIN; SELECT 1")
        .is_err_and(|e| connection_ended(&e));
    log::debug(format!(
        "statement-pooling probe: the connection closed on BEGIN: {closed}"
    ));
    closed
}

/// The connection is gone: closed, or ended with a FATAL error (PgBouncer sends one only
/// sometimes before it closes).
fn connection_ended(e: &postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_some_and(|db| db.severity() == "FATAL")
}

/// What one message of the acquisition protocol answered, row by row.
type Rows = Vec<Vec<Option<String>>>;

/// Takes the lock, or says who holds it. `on_wait` receives a cancel token before heimdall
/// blocks in the server's lock queue, so a signal can cancel the wait.
pub fn acquire(
    mut conn: Conn,
    request: &Request,
    on_wait: impl Fn(Option<CancelToken>),
) -> Result<Acquire> {
    let Request {
        connection,
        lock,
        mode,
        wait,
        keepalive,
    } = *request;
    // With one slot the key is known before the attempt, so the settle step rides along:
    // connected to running in one round trip.
    let one_slot = lock.slots == 1;
    let mut sql = take_sql(lock, mode);
    if one_slot {
        sql = format!("{sql}; {}", settle_sql(lock.key, mode, keepalive));
    }
    let rows = match conn.rows(&sql) {
        Err(e) if connection_ended(&e) && statement_pooling(connection) => {
            return Err(fail(
                Failure::UnsafeServer,
                format!(
                    "refusing to run: the connection closed when heimdall opened a transaction ({}), as a pooler in statement mode (PgBouncer pool_mode=statement) does; no lock can be held through it. Connect directly, or through transaction or session pooling",
                    conn.where_
                ),
            ));
        }
        other => protocol_answer(&mut conn, other, "cannot take the lock")?,
    };
    let first = rows.first().map(Vec::as_slice).unwrap_or_default();
    let backend_pid = parse_field::<i32>(first, 0, "the backend pid")?;
    if field(first, 1) == "t" {
        return Err(fail(
            Failure::UnsafeServer,
            format!(
                "refusing to lock on a hot standby ({}): advisory locks on a replica are local to it and exclude nobody on the primary; point --database at the primary (or add target_session_attrs=read-write)",
                conn.where_
            ),
        ));
    }
    let slot = match parse_field::<i32>(first, 2, "the lock's answer")? {
        -1 => None,
        slot => Some(u16::try_from(slot).map_err(|_| protocol_error(first))?),
    };
    if one_slot {
        if let Some(session) = settled(&rows[1..], keepalive)? {
            return Ok(held(conn, 0, backend_pid, session));
        }
    } else if let Some(slot) = slot {
        return settle(conn, request, slot, backend_pid);
    }
    // Not held. Whatever the attempt left open goes, so that the holders below are others.
    end_transaction(&mut conn);
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
        Wait::Up(d) => started.checked_add(d),
    };
    on_wait(Some(conn.cancel_token()));
    let result = wait_in_queue(&mut conn, lock, mode, deadline);
    on_wait(None);
    let waited = started.elapsed();
    let ended_by = match result? {
        WaitEnd::Granted(slot) => {
            log::info(format!("waited {} ms for the lock", waited.as_millis()));
            return settle(conn, request, slot, backend_pid);
        }
        WaitEnd::Deadline => None,
        WaitEnd::EndedBy(why) => Some(why),
    };
    end_transaction(&mut conn);
    let holders = holders::of(&mut conn, lock);
    Ok(Acquire::Busy(Busy {
        holders,
        waited: Some(waited),
        ended_by,
    }))
}

/// Runs one message of the acquisition protocol. A failure leaves the connection to be closed;
/// before that, a session-level lock that the message may have left is dropped, since a pooler
/// that rolls back and reuses server connections (pgcat, Odyssey) would keep it for the next
/// client.
fn run_protocol(conn: &mut Conn, sql: &str, what: &'static str) -> Result<Rows> {
    let answer = conn.rows(sql);
    protocol_answer(conn, answer, what)
}

fn protocol_answer(
    conn: &mut Conn,
    answer: std::result::Result<Rows, postgres::Error>,
    what: &'static str,
) -> Result<Rows> {
    match answer {
        Ok(rows) => Ok(rows),
        Err(e) => {
            if !connection_ended(&e) {
                let _ = conn.rows("ROLLBACK; SELECT pg_catalog.pg_advisory_unlock_all()");
            }
            Err(anyhow::anyhow!("{}", describe_pg_error(&e)))
                .context(what)
                .classify(Failure::Unavailable)
        }
    }
}

/// Step 2 for a lock held at the transaction level on `key` (after a wait, or with slots).
fn settle(mut conn: Conn, request: &Request, slot: u16, backend_pid: i32) -> Result<Acquire> {
    let key = request.lock.key.slot(slot);
    let sql = settle_sql(key, request.mode, request.keepalive);
    let rows = run_protocol(&mut conn, &sql, "cannot take the lock")?;
    match settled(&rows, request.keepalive)? {
        Some(session) => Ok(held(conn, slot, backend_pid, session)),
        // This backend held the key at the transaction level; the session-level lock on it
        // cannot have been refused.
        None => Err(protocol_error(&rows.concat())),
    }
}

/// The holding transaction, when [`settle_sql`]'s answer (`rows`: the token, then the re-take,
/// then the keepalive answer) says the lock is held.
fn settled(
    rows: &[Vec<Option<String>>],
    keepalive: &[(&'static str, String)],
) -> Result<Option<(i64, String)>> {
    let (Some(token_row), Some(held_row)) = (rows.first(), rows.get(1)) else {
        return Err(protocol_error(&rows.concat()));
    };
    if field(held_row, 0) != "t" || field(token_row, 0).is_empty() {
        return Ok(None);
    }
    let token = parse_field::<i64>(token_row, 0, "the fencing token")?;
    let since = field(held_row, 1).to_owned();
    keepalive::report(keepalive, rows.get(2).map(|r| field(r, 0)).unwrap_or(""));
    Ok(Some((token, since)))
}

/// Ends whatever transaction the protocol left open (aborted or not). Failing here only means
/// the connection is going anyway.
fn end_transaction(conn: &mut Conn) {
    if let Err(e) = conn.rows("ROLLBACK") {
        log::debug(format!("ROLLBACK: {}", describe_pg_error(&e)));
    }
}

fn held(
    conn: Conn,
    slot: u16,
    backend_pid: i32,
    (fencing_token, holding_since): (i64, String),
) -> Acquire {
    Acquire::Held(Box::new(Session {
        conn,
        slot,
        backend_pid,
        fencing_token,
        holding_since,
    }))
}

fn protocol_error(row: &[Option<String>]) -> anyhow::Error {
    fail(
        Failure::Internal,
        format!("unexpected answer to the lock statement: {row:?}"),
    )
}

fn parse_field<T: std::str::FromStr>(row: &[Option<String>], i: usize, what: &str) -> Result<T> {
    field(row, i).parse().map_err(|_| {
        fail(
            Failure::Internal,
            format!("unexpected answer to the lock statement for {what}: {row:?}"),
        )
    })
}

/// How a wait in the server's queue ended.
enum WaitEnd {
    Granted(u16),
    /// heimdall's own `--wait` deadline.
    Deadline,
    /// The server ended it (a role's statement_timeout), and why.
    EndedBy(String),
}

/// Waits in PostgreSQL's lock queue (first come, first served) under `lock_timeout`, inside a
/// transaction of its own each round: an aborted wait aborts the transaction, and the next round
/// rolls it back first.
fn wait_in_queue(
    conn: &mut Conn,
    lock: &LockTarget,
    mode: Mode,
    deadline: Option<Instant>,
) -> Result<WaitEnd> {
    let function = functions(mode).wait_xact;
    let jitter = u64::from(std::process::id());
    let mut round: u64 = 0;
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if remaining == Some(Duration::ZERO) {
            return Ok(WaitEnd::Deadline);
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
            "{BEGIN}; SET LOCAL lock_timeout = {timeout_ms}; SELECT {function}({})",
            lock.key.slot(slot).sql_args()
        );
        match conn.rows(&sql) {
            Ok(_) => return Ok(WaitEnd::Granted(slot)),
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                end_transaction(conn);
                if lock.slots > 1 {
                    let rows = run_protocol(conn, &take_sql(lock, mode), "cannot take the lock")?;
                    let row = rows.first().map(Vec::as_slice).unwrap_or_default();
                    match parse_field::<i32>(row, 2, "the lock's answer")? {
                        -1 => end_transaction(conn),
                        slot => {
                            return Ok(WaitEnd::Granted(
                                u16::try_from(slot).map_err(|_| protocol_error(row))?,
                            ));
                        }
                    }
                    continue;
                }
                return Ok(WaitEnd::Deadline);
            }
            // A role's statement_timeout ends the wait: that is "busy", not a failure.
            Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
                end_transaction(conn);
                let setting = conn
                    .first_row("SHOW statement_timeout")
                    .ok()
                    .map(|r| field(&r, 0).to_owned())
                    .unwrap_or_else(|| "?".to_owned());
                return Ok(WaitEnd::EndedBy(format!(
                    "the server's statement_timeout ({setting}) ended the wait; raise it for this role, or use --wait=DURATION below it"
                )));
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

/// The heartbeat and the release both ask this: the backend and the transaction that took the
/// lock must still be the ones answering. A pooler that moved the client to another server
/// connection changes the pid; one that ended the transaction changes `now()`, the
/// transaction's start.
const STILL_HOLDING: &str = "SELECT pg_catalog.pg_backend_pid(), pg_catalog.now()";

impl crate::watchdog::Guard for Session {
    /// One watchdog check: a single cheap round trip. Returns why the lock must count as lost,
    /// if it must.
    fn check(&mut self) -> std::result::Result<(), String> {
        let row = self
            .conn
            .first_row(STILL_HOLDING)
            .map_err(|e| self.conn.loss_reason(&e))?;
        self.still_holding(&row)
    }

    /// Commits the holding transaction, which releases the lock, and closes the connection.
    /// Closing alone would release it too; committing first hands it to a waiter without
    /// waiting for the backend to exit. The same message proves the lock was still held when
    /// the command finished. Returns why not, if it was not.
    fn release(mut self: Box<Self>) -> std::result::Result<(), String> {
        let rows = self
            .conn
            .rows(&format!("{STILL_HOLDING}; COMMIT"))
            .map_err(|e| self.conn.loss_reason(&e))?;
        let held = self.still_holding(rows.first().map(Vec::as_slice).unwrap_or_default());
        self.conn.close();
        held?;
        log::info("lock released");
        Ok(())
    }
}

impl Session {
    fn still_holding(&self, row: &[Option<String>]) -> std::result::Result<(), String> {
        match field(row, 0).parse::<i32>() {
            Ok(pid) if pid != self.backend_pid => Err(format!(
                "the session now talks to backend pid {pid}, not {} which holds the lock (a connection pooler that does not keep a transaction on one server connection?)",
                self.backend_pid
            )),
            Ok(_) if field(row, 1) != self.holding_since => Err(
                "the transaction that held the lock has ended (a connection pooler that ended it?)"
                    .to_owned(),
            ),
            Ok(_) => Ok(()),
            Err(_) => Err("the heartbeat got no row back".to_owned()),
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
