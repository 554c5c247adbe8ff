//! The advisory lock's acquisition protocol on a database session (`db`): check the server is
//! safe to lock on, take the lock at once or say who holds it, or wait in PostgreSQL's own lock
//! queue (`wait.rs`); then hand over the held [`Lock`] (`lock.rs`), which the watchdog checks
//! and `run` releases. The statements themselves are in `sql.rs`, the lock-delay in `delay.rs`,
//! the server's keepalive in `keepalive.rs`, the holders in `holders.rs`. The session is owned
//! by one place at a time and closed only after the command is gone.
//!
//! The lock is a transaction-level advisory lock held by a transaction that stays open while the
//! command runs. Every connection pooler keeps a client on one server connection while its
//! transaction is open, and every one of them ends the transaction (closing the server
//! connection, or rolling back) when the client goes, so the lock holds through a transaction
//! pooler exactly as on a direct connection, and goes with heimdall. A session-level lock would
//! not: a transaction pooler hands the server connection, lock and all, to other clients
//! (`../shared/POOLERS.md` has the survey). The holding transaction has no transaction id and,
//! in read committed, no snapshot between statements, so it holds back no VACUUM.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::config::{Dial, RecordMode};
use crate::db::cancel::Canceller;
use crate::db::{self, ProbeEnd, Row, Session, connection_ended, describe_pg_error};
use crate::domain::lock::{LockTarget, Mode, Wait};
use crate::exit::{Classify, Failure, fail};
use crate::hold::record::{self, LastRun, Said, Started};
use crate::hold::{table, waiting::WaitLine};
use crate::log;

pub mod delay;
pub mod holders;
pub mod keepalive;
mod lock;
mod once_held;
mod request_sql;
mod sql;
pub mod takeover;
mod wait;

pub use lock::Lock;

use sql::{ROLLBACK_ALL, settle_sql, take_sql};
use wait::{WaitEnd, wait_in_queue};
use {delay::ServerUp, holders::Holder};

/// The outcome of acquiring.
pub enum Acquire {
    Held(Box<Lock>),
    Busy(Busy),
    /// `--min-interval`: a run started within it (the last run, when the record has it). The
    /// lock was taken to decide, and let go; the session is closed.
    Skipped(Option<LastRun>),
    /// A signal cancelled the wait in the server's queue; the session is closed in order.
    Cancelled,
    /// Every place of the `--queue` bound (this many) was taken: this run did not wait.
    QueueFull(u16),
    /// Granted after a wait while a replacer (named) waited behind: the lock was let go at
    /// once, and the command does not run (see `takeover.rs`).
    Superseded(String),
}

/// Why the command did not run, for the message.
pub struct Busy {
    pub holders: Vec<Holder>,
    /// How long heimdall waited, when it did.
    pub waited: Option<Duration>,
    /// What ended the wait, when the server did (a role's statement_timeout, say).
    pub ended_by: Option<String>,
}

/// What heimdall asks of the server: where, which lock, how.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub dial: &'a Dial,
    pub lock: &'a LockTarget,
    pub mode: Mode,
    pub wait: Option<Wait>,
    /// `--queue N`: at most N runs wait at once (see `wait.rs`).
    pub queue: Option<u16>,
    /// What the server should use to notice a dead heimdall (see `keepalive`).
    pub keepalive: &'a [(&'static str, String)],
    /// Read when the server came up, for the lock-delay.
    pub server_up: bool,
    /// The run record, written by the statement that settles into holding the lock.
    pub record: Option<&'a RecordMode>,
    /// `--replace`: the wait asks the holder to stop (see `takeover.rs`).
    pub replace: bool,
}

/// Why the connection closed in answer to the lock statement.
enum Closed {
    /// A pooler in statement mode: it runs a lone statement, and closes a client's connection
    /// when a transaction stays open after one.
    StatementPooling(Option<String>),
    /// A fresh connection to the same place could not even run `SELECT 1`: a pooler whose pool
    /// is full (PgBouncer's `query_wait_timeout`), or one that refuses for a reason of its own.
    /// Its own words.
    Refused(String),
    /// Nothing more to learn: the server went away, say.
    Unknown,
}

/// Asks a fresh connection to the host that answered, after a connection closed in answer to
/// the lock statement: statement pooling runs `SELECT 1` and closes on `BEGIN`; a full pool
/// fails `SELECT 1` already, with its own message (the async client of [`db::probe`] sees it,
/// where the sync one only sees the connection close); a server that went away refuses the
/// connection. No pooler's wording is matched: PgBouncer's has changed between versions, and
/// other poolers close without a word.
fn statement_pooling(dial: &Dial, session: &Session) -> Closed {
    let probed = db::probe(dial, &session.reached, &["SELECT 1", "BEGIN; SELECT 1"]);
    log::debug(format!("statement-pooling probe: {probed:?}"));
    match probed {
        Err(ProbeEnd::NoConnection(why)) => {
            log::debug(format!("the probe could not connect: {why}"));
            Closed::Unknown
        }
        Err(ProbeEnd::Failed {
            step: 1,
            said,
            ended: true,
        }) => Closed::StatementPooling(said),
        Err(ProbeEnd::Failed {
            step: 0,
            said: Some(said),
            ..
        }) => Closed::Refused(said),
        _ => Closed::Unknown,
    }
}

/// Takes the lock, or says who holds it. `on_wait` receives a canceller before heimdall
/// blocks in the server's lock queue, so a signal can cancel the wait, and `None` once the wait
/// is over; then it answers whether a signal cancelled it.
pub fn acquire(
    mut session: Session,
    request: &Request,
    on_wait: impl Fn(Option<Canceller>) -> bool,
) -> Result<Acquire> {
    let Request {
        dial,
        lock,
        mode,
        wait,
        queue,
        keepalive,
        server_up,
        record,
        replace,
    } = *request;
    // With one slot the key is known before the attempt, so the settle step rides along:
    // connected to running in one round trip.
    let one_slot = lock.slots == 1;
    let mut sql = take_sql(lock, mode);
    if one_slot {
        let record = record.map(|r| (r, lock, true));
        sql = format!(
            "{sql}; {}",
            settle_sql(lock.key, mode, keepalive, server_up, record)
        );
    }
    let rows = match rows_creating(&mut session, record, &sql)? {
        Err(e) if connection_ended(&e) => match statement_pooling(dial, &session) {
            Closed::StatementPooling(said) => {
                let said = said.map_or_else(String::new, |s| format!(" (the pooler said: {s})"));
                return Err(fail(
                    Failure::UnsafeServer,
                    format!(
                        "refusing to run: the connection closed when heimdall opened a transaction ({}), as a pooler in statement mode (PgBouncer pool_mode=statement) does{said}; no lock can be held through it. Connect directly, or through transaction or session pooling",
                        session.where_
                    ),
                ));
            }
            Closed::Refused(said) => {
                return Err(fail(
                    Failure::Unavailable,
                    format!(
                        "cannot take the lock: the connection closed in answer to the lock statement ({}), and a fresh connection could not run SELECT 1 either: {said}. A pooler ends a client's wait this way when its pool stays full (PgBouncer's query_wait_timeout): every server connection is taken, by held locks among others; raise its default_pool_size, or see --lease-table",
                        session.where_
                    ),
                ));
            }
            Closed::Unknown => protocol_answer(&mut session, Err(e), "cannot take the lock")?,
        },
        other => protocol_answer(&mut session, other, "cannot take the lock")?,
    };
    let answer = rows.first().cloned().unwrap_or_default();
    if answer.is_true("standby") {
        return Err(fail(
            Failure::UnsafeServer,
            format!(
                "refusing to lock on a hot standby ({}): advisory locks on a replica are local to it and exclude nobody on the primary; point --database at the primary (or add target_session_attrs=read-write)",
                session.where_
            ),
        ));
    }
    let slot = match parse_field::<i32>(&answer, "slot", "the lock's answer")? {
        -1 => None,
        slot => Some(u16::try_from(slot).map_err(|_| protocol_error(&answer))?),
    };
    if one_slot {
        if let Some(holding) = settled(&rows[1..], keepalive, record.is_some())? {
            return held(session, request, 0, holding);
        }
    } else if let Some(slot) = slot {
        return settle(session, request, slot);
    }
    // Not held. Whatever the attempt left open goes, so that the holders below are others.
    let Some(wait) = wait else {
        // The rollback and the look-up in one message: the busy path's last round trip.
        let holders = holders::of_after(&mut session, lock, "ROLLBACK; ");
        return Ok(Acquire::Busy(Busy {
            holders,
            waited: None,
            ended_by: None,
        }));
    };

    end_transaction(&mut session);
    let started = Instant::now();
    let mut line = None;
    if log::enabled(log::Level::Verbose) || WaitLine::wanted() {
        let holders = holders::of(&mut session, lock);
        log::info(format!(
            "lock {} is busy ({}); {}{}",
            lock.describe(),
            holders::describe(&holders),
            if replace {
                "asking its holder to stop (--replace) and waiting"
            } else {
                "waiting"
            },
            match wait {
                Wait::Forever => String::new(),
                Wait::Up(d) => format!(" up to {}", humantime::format_duration(d)),
            }
        ));
        let holding = holders::holding(&holders);
        line = WaitLine::start(lock, holding, Instant::now(), wait, started);
    }
    let deadline = wait.deadline(started);
    on_wait(Some(session.canceller()));
    // The settle step rides with the wait (`wait_in_queue`), but no record's start: a signal
    // may be cancelling the wait. What it will ask once granted is asked before it waits.
    let riding = record
        .is_none()
        .then(|| settle_sql(lock.key, mode, keepalive, server_up, None));
    let result = wait_in_queue(
        &mut session,
        lock,
        mode,
        queue,
        replace,
        deadline,
        riding.as_deref(),
        Some(&once_held::warm_up_sql(lock.key, server_up)),
    );
    // Gone before anything else is said, or the command starts.
    drop(line);
    if on_wait(None) {
        // The cancel was answered (the wait returned): end the transaction and session in order,
        // so no lock queue or pooler keeps a client that vanished mid-statement (PgBouncer 1.18
        // crashed on that). A grant that beat the cancel may have settled: let go of that too.
        if let Err(e) = session.rows(ROLLBACK_ALL) {
            log::debug(format!("ROLLBACK: {}", describe_pg_error(&e)));
        }
        session.close();
        return Ok(Acquire::Cancelled);
    }
    let waited = started.elapsed();
    let ended_by = match result? {
        WaitEnd::Granted(slot, settled_rows) => {
            log::info(format!("waited {} ms for the lock", waited.as_millis()));
            // A replacer waits behind: give way, not run (a settle that rode along goes too).
            let superseded = match &settled_rows {
                Some(rows) => takeover::asked_in(&mut session, rows.first()),
                None if lock.slots == 1 => takeover::superseded(&mut session, lock.key)?,
                None => None,
            };
            if let Some(by) = superseded {
                end_transaction(&mut session);
                session.close();
                return Ok(Acquire::Superseded(by));
            }
            if replace {
                log::info(format!(
                    "took over lock {} in {} ms (--replace)",
                    lock.describe(),
                    waited.as_millis()
                ));
            }
            return match settled_rows {
                Some(rows) => settle_answer(session, request, slot, rows.get(1..).unwrap_or(&[])),
                None => settle(session, request, slot),
            };
        }
        WaitEnd::Deadline => None,
        WaitEnd::EndedBy(why) => Some(why),
        WaitEnd::Full(places) => {
            end_transaction(&mut session);
            return Ok(Acquire::QueueFull(places));
        }
    };
    end_transaction(&mut session);
    let holders = holders::of(&mut session, lock);
    let ended_by = match ended_by {
        None if replace => Some(takeover::no_answer(&holders)),
        ended_by => ended_by,
    };
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
fn run_protocol(session: &mut Session, sql: &str, what: &'static str) -> Result<Vec<Row>> {
    let answer = session.rows(sql);
    protocol_answer(session, answer, what)
}

fn protocol_answer(
    session: &mut Session,
    answer: std::result::Result<Vec<Row>, postgres::Error>,
    what: &'static str,
) -> Result<Vec<Row>> {
    match answer {
        Ok(rows) => Ok(rows),
        Err(e) => {
            if !connection_ended(&e) {
                let _ = session.rows(ROLLBACK_ALL);
            }
            Err(anyhow::anyhow!("{}", describe_pg_error(&e)))
                .context(what)
                .classify(Failure::Unavailable)
        }
    }
}

/// The answer to the first message. With a run record, a run table that is missing is
/// created and the message sent again, and one of another shape is refused with its DDL,
/// whatever of the lock the failed message took gone with its transaction. Other failures are
/// left to the caller.
fn rows_creating(
    session: &mut Session,
    record: Option<&RecordMode>,
    sql: &str,
) -> Result<std::result::Result<Vec<Row>, postgres::Error>> {
    let Some(mode) = record else {
        return Ok(session.rows(sql));
    };
    let mut created = false;
    loop {
        match session.rows(sql) {
            Err(e) if !connection_ended(&e) && e.as_db_error().is_some() => {
                let _ = session.rows(ROLLBACK_ALL);
                if table::missing(&e) && !created {
                    created = true;
                    record::table::SHAPE.ensure(session, &mode.table)?;
                    continue;
                }
                let cannot = || format!("cannot take the lock: {}", describe_pg_error(&e));
                return Err(record::table::SHAPE.misfit(session, &mode.table, cannot));
            }
            answer => return Ok(answer),
        }
    }
}

/// Step 2 for a lock held at the transaction level on `key` (after a wait, or with slots). The
/// record's table was checked by the first message.
fn settle(mut session: Session, request: &Request, slot: u16) -> Result<Acquire> {
    let key = request.lock.key.slot(slot);
    let record = request.record.map(|r| (r, request.lock, false));
    let sql = settle_sql(
        key,
        request.mode,
        request.keepalive,
        request.server_up,
        record,
    );
    let rows = run_protocol(&mut session, &sql, "cannot take the lock")?;
    settle_answer(session, request, slot, &rows)
}

/// The lock held on `slot` per the settle step's answer `rows`.
fn settle_answer(session: Session, request: &Request, slot: u16, rows: &[Row]) -> Result<Acquire> {
    match settled(rows, request.keepalive, request.record.is_some())? {
        Some(holding) => held(session, request, slot, holding),
        // This backend held the key at the transaction level; the session-level lock on it
        // cannot have been refused.
        None => Err(protocol_error(rows)),
    }
}

/// What [`settle_sql`]'s answer says of the holding transaction.
struct Holding {
    fencing_token: i64,
    backend_pid: i32,
    since: String,
    since_epoch: String,
    /// When the server came up, for the lock-delay.
    server_up: Option<ServerUp>,
    /// What the statement did with the run record, when there is one.
    said: Option<Said>,
}

/// The holding transaction, when [`settle_sql`]'s answer (`rows`: the token with when the
/// server came up and the record's columns, then the re-take with the transaction's start and
/// backend, then the keepalive answer) says the lock is held.
fn settled(
    rows: &[Row],
    keepalive: &[(&'static str, String)],
    record: bool,
) -> Result<Option<Holding>> {
    let (Some(token_row), Some(held_row)) = (rows.first(), rows.get(1)) else {
        return Err(protocol_error(rows));
    };
    if !held_row.is_true("held") || token_row.text("fencing_token").is_none() {
        return Ok(None);
    }
    let text = |row: &Row, name| row.text(name).unwrap_or_default().to_owned();
    let holding = Holding {
        fencing_token: parse_field(token_row, "fencing_token", "the fencing token")?,
        backend_pid: parse_field(held_row, "backend_pid", "the holding backend's pid")?,
        since: text(held_row, "since"),
        since_epoch: text(held_row, "since_epoch"),
        server_up: delay::parse(token_row.text("server_up").unwrap_or_default()),
        said: record.then(|| Said::of(token_row)),
    };
    let applied = rows.get(2).and_then(|r| r.text("keepalive"));
    keepalive::report(keepalive, applied.unwrap_or_default());
    Ok(Some(holding))
}

/// Ends whatever transaction the protocol left open (aborted or not). Failing here only means
/// the connection is going anyway.
fn end_transaction(session: &mut Session) {
    if let Err(e) = session.rows("ROLLBACK") {
        log::debug(format!("ROLLBACK: {}", describe_pg_error(&e)));
    }
}

/// The lock, held: the run's start is in the record, if there is one. A run that must not start
/// (`--min-interval`), or a run table of another shape, lets the lock go at once.
fn held(mut session: Session, request: &Request, slot: u16, holding: Holding) -> Result<Acquire> {
    let record = match (holding.said, request.record) {
        (Some(Said::Started(run)), Some(mode)) => Some(Started {
            table: mode.table.clone(),
            key: request.lock.key.to_string(),
            run,
        }),
        (Some(Said::Skipped(last)), _) => {
            end_transaction(&mut session);
            session.close();
            return Ok(Acquire::Skipped(last));
        }
        (Some(Said::Misfit), Some(mode)) => {
            end_transaction(&mut session);
            let error = record::table::SHAPE.misfit(&mut session, &mode.table, || {
                "the run table's columns changed while heimdall looked".to_owned()
            });
            session.close();
            return Err(error);
        }
        _ => None,
    };
    Ok(Acquire::Held(Box::new(Lock {
        session,
        slot,
        backend_pid: holding.backend_pid,
        fencing_token: holding.fencing_token,
        holding_since: holding.since,
        holding_since_epoch: holding.since_epoch,
        server_up: holding.server_up,
        record,
        heartbeat: lock::heartbeat_sql(request.lock.key, slot),
        ignored: None,
    })))
}

fn protocol_error(answer: &(impl std::fmt::Debug + ?Sized)) -> anyhow::Error {
    fail(
        Failure::Internal,
        format!("unexpected answer to the lock statement: {answer:?}"),
    )
}

/// Column `name` of `row`, parsed; an internal error naming `what` if it does not parse.
fn parse_field<T: std::str::FromStr>(row: &Row, name: &str, what: &str) -> Result<T> {
    row.get(name).ok_or_else(|| {
        fail(
            Failure::Internal,
            format!("unexpected answer to the lock statement for {what}: {row:?}"),
        )
    })
}
