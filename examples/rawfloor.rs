//! The second floor that `make bench` compares heimdall's wrap overhead against: the least any
//! client can do to run a command under an advisory lock, written with the standard library
//! alone so that no driver's cost is in it. It speaks the wire protocol (version 3.0) itself:
//! connect over TCP or a unix socket, send the startup message, accept trust authentication,
//! send `SELECT pg_try_advisory_lock(1,2)` as one simple query, read to ReadyForQuery, run the
//! command, send Terminate, exit with the command's code. Closing the connection releases the
//! lock.
//!
//! Not a tool, and not a general client. It leaves out:
//! - every authentication method but trust (any other request is a clear error: exit 69);
//! - TLS (`sslmode` may only be `disable`, `allow` or `prefer`, and no TLS is tried), GSS;
//! - the PG* environment, `.pgpass`, service files, several hosts, connect timeouts;
//! - checking the lock's answer (as `examples/floor.rs`: run back to back, the previous run's
//!   backend may still be releasing (1,2), and the cost is the same one round trip);
//! - signals, process groups, a watchdog, an unlock: everything heimdall does beyond this is
//!   what the overhead figure measures.
//!
//! Usage: `rawfloor CONNINFO COMMAND [ARGS]...`, CONNINFO either `host=… port=… user=… dbname=…`
//! (values without quotes or spaces) or a URL `postgresql://user@host:port/dbname?host=…&port=…`,
//! the two forms the bench uses. A host that starts with `/` is a unix socket directory.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitCode};

/// Exit codes, as heimdall's: the server cannot be used (69), usage (2), no command (127).
const UNAVAILABLE: u8 = 69;

struct Conninfo {
    host: String,
    port: String,
    user: String,
    dbname: String,
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(conninfo), Some(program)) = (args.next(), args.next()) else {
        eprintln!("usage: rawfloor CONNINFO COMMAND [ARGS]...");
        return ExitCode::from(2);
    };
    let info = match parse(&conninfo) {
        Ok(info) => info,
        Err(e) => {
            eprintln!("rawfloor: bad connection string: {e}");
            return ExitCode::from(2);
        }
    };
    let result = if info.host.starts_with('/') {
        let path = format!("{}/.s.PGSQL.{}", info.host, info.port);
        UnixStream::connect(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot connect to {path}: {e}")))
            .and_then(|s| lock_and_run(s, &info, &program, args))
    } else {
        let port = info.port.parse().unwrap_or(5432);
        TcpStream::connect((info.host.as_str(), port))
            // As libpq and the postgres crate do: small messages go out at once.
            .and_then(|s| s.set_nodelay(true).map(|()| s))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot connect to {}:{port}: {e}", info.host),
                )
            })
            .and_then(|s| lock_and_run(s, &info, &program, args))
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("rawfloor: {e}");
            ExitCode::from(UNAVAILABLE)
        }
    }
}

/// Startup, the lock query, the command, Terminate. Returns the exit code to leave with: the
/// command's, 128+N for a death by signal N, 127 when it cannot be started.
fn lock_and_run<S: Read + Write>(
    stream: S,
    info: &Conninfo,
    program: &str,
    args: impl Iterator<Item = String>,
) -> io::Result<u8> {
    let mut conn = BufReader::new(stream);

    // StartupMessage: length, protocol 3.0, then name/value pairs ending in an empty name.
    let mut body = 196_608_i32.to_be_bytes().to_vec();
    for (name, value) in [("user", &info.user), ("database", &info.dbname)] {
        for s in [name, value.as_str()] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    conn.get_mut().write_all(&message(None, &body))?;
    read_to_ready(&mut conn, true)?;

    let mut query = b"SELECT pg_try_advisory_lock(1,2)".to_vec();
    query.push(0);
    conn.get_mut().write_all(&message(Some(b'Q'), &query))?;
    read_to_ready(&mut conn, false)?;

    let code = match Command::new(program).args(args).status() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => code.clamp(0, 255) as u8,
            (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
            (None, None) => 125,
        },
        Err(e) => {
            eprintln!("rawfloor: cannot run {program}: {e}");
            127
        }
    };
    // Terminate; the server then ends the session and releases the lock. A failure to send it
    // changes nothing: closing the socket on exit does the same.
    let _ = conn.get_mut().write_all(&message(Some(b'X'), &[]));
    Ok(code)
}

/// A frontend message: the type byte (none for the startup message), the length counting itself.
fn message(kind: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend(kind);
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads backend messages up to ReadyForQuery. ErrorResponse is an error; during startup, so is
/// any authentication request but AuthenticationOk. Everything else (ParameterStatus,
/// BackendKeyData, RowDescription, DataRow, CommandComplete, notices) is skipped.
fn read_to_ready(conn: &mut impl Read, startup: bool) -> io::Result<()> {
    loop {
        let mut head = [0u8; 5];
        conn.read_exact(&mut head)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let len = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_sub(4))
            .ok_or_else(|| io::Error::other(format!("bad message length {len}")))?;
        let mut body = vec![0u8; len];
        conn.read_exact(&mut body)?;
        match head[0] {
            b'Z' => return Ok(()),
            b'E' => return Err(io::Error::other(server_error(&body))),
            b'R' if startup => {
                let method = body
                    .get(..4)
                    .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if method != Some(0) {
                    return Err(io::Error::other(format!(
                        "the server asks for authentication (request {}); rawfloor speaks trust only",
                        method.unwrap_or(-1)
                    )));
                }
            }
            _ => {}
        }
    }
}

/// "SEVERITY: message (SQLSTATE code)" from an ErrorResponse's fields.
fn server_error(body: &[u8]) -> String {
    let (mut severity, mut code, mut text) = ("ERROR", "", "");
    for field in body.split(|&b| b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = std::str::from_utf8(value).unwrap_or("?");
        match kind {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => text = value,
            _ => {}
        }
    }
    format!("server: {severity}: {text} (SQLSTATE {code})")
}

/// `host=… port=… user=… dbname=…` or `postgres[ql]://user@host:port/dbname?key=value&…`.
/// Missing parts default as in libpq: the unix socket in /var/run/postgresql, port 5432, user
/// from USER, dbname = user.
fn parse(conninfo: &str) -> Result<Conninfo, String> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let rest = conninfo
        .strip_prefix("postgresql://")
        .or_else(|| conninfo.strip_prefix("postgres://"));
    if let Some(rest) = rest {
        let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, dbname) = main.split_once('/').unwrap_or((main, ""));
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (Some(user), hostport),
            None => (None, authority),
        };
        if let Some(user) = user {
            if user.contains(':') {
                return Err("a password is not supported (trust only)".into());
            }
            pairs.push(("user".into(), decode(user)?));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        };
        if !host.is_empty() {
            pairs.push(("host".into(), decode(host)?));
        }
        if let Some(port) = port.filter(|p| !p.is_empty()) {
            pairs.push(("port".into(), port.into()));
        }
        if !dbname.is_empty() {
            pairs.push(("dbname".into(), decode(dbname)?));
        }
        for param in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = param
                .split_once('=')
                .ok_or_else(|| format!("{param:?} is not key=value"))?;
            pairs.push((decode(k)?, decode(v)?));
        }
    } else {
        for word in conninfo.split_whitespace() {
            let (k, v) = word
                .split_once('=')
                .ok_or_else(|| format!("{word:?} is not key=value"))?;
            pairs.push((k.into(), v.into()));
        }
    }

    let mut info = Conninfo {
        host: "/var/run/postgresql".into(),
        port: "5432".into(),
        user: std::env::var("USER").unwrap_or_else(|_| "postgres".into()),
        dbname: String::new(),
    };
    for (k, v) in pairs {
        match k.as_str() {
            "host" => info.host = v,
            "port" => info.port = v,
            "user" => info.user = v,
            "dbname" => info.dbname = v,
            "sslmode" if matches!(v.as_str(), "disable" | "allow" | "prefer") => {}
            // The key alone: a value might be a password.
            _ => return Err(format!("{k} is not supported by this floor")),
        }
    }
    if info.port.parse::<u16>().is_err() {
        return Err(format!("port {:?} is not a number", info.port));
    }
    if info.dbname.is_empty() {
        info.dbname = info.user.clone();
    }
    Ok(info)
}

/// Percent-decoding, as URLs carry a socket directory: `%2Ftmp` is `/tmp`.
fn decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex: Vec<u8> = bytes.by_ref().take(2).collect();
            let byte = std::str::from_utf8(&hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent-escape in {s:?}"))?;
            out.push(byte);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}
