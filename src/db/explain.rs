//! A failed connection attempt in words an operator can act on: psql's question for a server
//! that is not there (with the socket path tried, and whether anything was configured at all),
//! a server that does not speak PostgreSQL, then TLS's own reasons (`conninfo::tls::explain`)
//! and the server's. No errno numbers, no labels of the `postgres` crate's own.

use std::io::ErrorKind;

use super::describe_pg_error;
use crate::conninfo::tls;
use crate::conninfo::{ConnInfo, HostFrom};

/// Why connecting to `host` (one host of [`ConnInfo::each_host`]) failed with `e`.
pub fn connect_failure(e: &postgres::Error, host: &ConnInfo) -> String {
    if let Some(how) = not_postgres(e) {
        return format!(
            "the server at {} did not answer as PostgreSQL ({how}); is that PostgreSQL's host and port?",
            host.host_label()
        );
    }
    let name = host.hosts.first().map_or("", String::as_str);
    if let Some(why) = tls::explain(e, &host.tls, name) {
        return why;
    }
    let socket = name.starts_with('/').then(|| {
        format!(
            "{name}/.s.PGSQL.{}",
            host.ports.first().copied().unwrap_or_default()
        )
    });
    match (io_kind(e), socket) {
        (Some(ErrorKind::NotFound), Some(socket)) => format!(
            "no server socket at {socket}{}. Is the server running locally and accepting connections on that socket?",
            defaulted(host.host_from)
        ),
        (Some(ErrorKind::ConnectionRefused), Some(socket)) => format!(
            "the socket {socket} refused the connection{}. Is the server running locally and accepting connections on that socket?",
            defaulted(host.host_from)
        ),
        (Some(ErrorKind::ConnectionRefused), None) => "Connection refused. Is the server running on that host and accepting TCP/IP connections?".to_owned(),
        _ => describe_pg_error(e),
    }
}

/// What a message says of a host that was libpq's guess rather than anyone's setting.
fn defaulted(from: HostFrom) -> &'static str {
    match from {
        HostFrom::Given => "",
        HostFrom::Default => {
            " (no host was configured: the connection string and PGHOST name none, so heimdall tried libpq's default socket directory)"
        }
        HostFrom::NothingGiven => {
            " (nothing was configured: no --database, HEIMDALL_DATABASE_URL, DATABASE_URL or PG* variable, so heimdall tried libpq's default)"
        }
    }
}

/// How the peer showed it is not PostgreSQL, if it did: an answer the protocol cannot read (a
/// message cut off by the end of the stream, one of no known type), TLS agreed to and then not
/// spoken (an SSH banner's `S` reads as yes to the SSLRequest), or the connection closed before
/// any answer.
fn not_postgres(e: &postgres::Error) -> Option<&'static str> {
    let top = e.to_string();
    if top == "unexpected message from server" || top == "error parsing response from server" {
        return Some("it answered something else");
    }
    if e.is_closed() {
        return Some("it closed the connection");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io.to_string() == "bytes remaining on stream" {
                return Some("it answered something else");
            }
            if io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|tls| matches!(tls, rustls::Error::InvalidMessage(_)))
            {
                return Some("it agreed to TLS, then did not speak it");
            }
            if matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
            ) {
                return Some("it closed the connection");
            }
        }
        source = s.source();
    }
    None
}

/// The kind of the I/O error under `e`, if there is one.
fn io_kind(e: &postgres::Error) -> Option<ErrorKind> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = s.source();
    }
    None
}
