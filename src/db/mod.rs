//! The database session ([`Session`]): connecting (`connect.rs`: bounded by the connect timeout,
//! with libpq's TLS `allow` fallback), running simple-protocol statements, and putting the
//! server's errors into words; a question on a connection of its own (`probe.rs`), cancelling a
//! statement in flight (`cancel.rs`), finding the connection's socket (`socket.rs`).
//!
//! Nothing here knows about locks: `hold` speaks its protocols through it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use postgres::Client;

pub mod cancel;
mod connect;
mod explain;
mod probe;
mod row;
pub mod socket;
pub mod sqlstate;

pub use connect::{connect, open};
pub use probe::{ProbeEnd, probe};
pub use row::Row;

use crate::conninfo::ConnInfo;
use crate::log;
use cancel::Canceller;
use sqlstate::SqlState;

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

/// Whether a job may be running under a lock this process holds: from just before the command
/// is spawned until every process of it is gone (set by the keeper's bookkeeping).
static JOB_ALIVE: AtomicBool = AtomicBool::new(false);

/// Says whether a job may be running (see [`Session`]'s `Drop`).
pub fn set_job_alive(alive: bool) {
    JOB_ALIVE.store(alive, Ordering::SeqCst);
}

/// Whether a job may be running under a lock this process holds.
pub fn job_alive() -> bool {
    JOB_ALIVE.load(Ordering::SeqCst)
}

/// The holding connection is closed only after the job is gone: whatever path drops a session
/// while a job may run (an error after the spawn, a panic), it must not end the session (the
/// client's Terminate would, whoever else holds the socket). The client is left as it is
/// instead: its socket stays open until heimdall exits, and the keeper's copy until the keeper
/// has killed the job, so the server lets go of the lock only then.
impl Drop for Session {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && job_alive()
        {
            std::mem::forget(client);
        }
    }
}

/// An open connection, with the server's last notice kept for messages: PostgreSQL announces
/// some shutdowns as a WARNING notice just before it closes the connection.
pub struct Session {
    /// `None` only once [`Session::close`] or the drop has taken it.
    client: Option<Client>,
    last_notice: Arc<Mutex<Option<String>>>,
    pub where_: String,
    /// The TCP port heimdall dialled, when there was only one to dial. A server that says it
    /// listens on another one is reached through a pooler or proxy.
    pub dialled_port: Option<u16>,
    /// The host that answered, as settings of that one host: where a [`probe`] goes.
    pub reached: ConnInfo,
    /// The connection's socket, when heimdall found it (the crate does not expose it): the
    /// watchdog watches it between heartbeats for a server that ends the session.
    pub socket: Option<RawFd>,
}

impl Session {
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

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("the client is taken only by close and drop, which consume the Session")
    }

    fn client_mut(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("the client is taken only by close and drop, which consume the Session")
    }

    /// Runs one simple-protocol message (no prepare round trip) and returns its first row, or
    /// an empty one.
    pub fn first_row(&mut self, sql: &str) -> std::result::Result<Row, postgres::Error> {
        Ok(self.rows(sql)?.into_iter().next().unwrap_or_default())
    }

    /// All rows of one simple-protocol message, of every statement in it in turn.
    pub fn rows(&mut self, sql: &str) -> std::result::Result<Vec<Row>, postgres::Error> {
        log::debug(format!("query: {sql}"));
        self.client_mut()
            .simple_query(sql)
            .map(|m| row::from_messages(&m))
    }

    /// What cancels the statement in flight from another thread (a signal during a wait):
    /// closing the socket alone would leave the backend queued for the lock.
    pub fn canceller(&self) -> Canceller {
        Canceller {
            token: self.client().cancel_token(),
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
            Some(c) if *c == SqlState::IDLE_SESSION_TIMEOUT => {
                format!("backend closed for idling ({detail})")
            }
            // A heartbeat sent after the server closed its end meets a reset: the same end.
            _ if e.is_closed() || reset_by_peer(e) => match notice {
                Some(notice) => format!("the server closed the connection ({notice})"),
                None => "the server closed the connection".to_owned(),
            },
            _ => detail,
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

/// SQL: the `timestamptz` expression `ts` as seconds since the epoch with exactly six
/// decimals (`numeric`, whose text no setting changes): `EXTRACT` returns `numeric` from
/// PostgreSQL 14 on, exact to the microsecond, with six decimals for an epoch. It is also
/// cheaper than [`epoch_micros_sql`] in a fresh backend (one function to look up, no operator
/// or cast), and the holding transaction's start is read with it in every run.
pub fn epoch_seconds_sql(ts: &str) -> String {
    format!("EXTRACT(EPOCH FROM {ts})")
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

/// The crate's Display of a server error is just "db error"; the detail is in the source. Build
/// one line with the server's message and the crate's context.
pub fn describe_pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    // The crate's label for a setting the server needs and it lacks ("invalid configuration:
    // password missing") says nothing the rest does not.
    let top = e.to_string();
    let mut parts = Vec::new();
    if top != "invalid configuration" {
        parts.push(top);
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(match s.downcast_ref::<std::io::Error>() {
            Some(io) => plain_io(io),
            None => s.to_string(),
        });
        source = s.source();
    }
    let mut text = parts.join(": ");
    if text.contains("password missing") {
        text.push_str(" (the server asks for a password: set PGPASSWORD, put it in the URL, or add a ~/.pgpass line)");
    }
    text
}

/// An I/O error as a person reads it: `Connection refused`, without `(os error 111)`.
fn plain_io(io: &std::io::Error) -> String {
    let text = io.to_string();
    match io.raw_os_error() {
        Some(n) => text.replace(&format!(" (os error {n})"), ""),
        None => text,
    }
}
