//! libpq-compatible connection settings: a `postgres://` URL or a `key=value` string, then the
//! `PG*` environment variables for whatever it leaves out, then `~/.pgpass`, then libpq's
//! defaults. The `postgres` crate reads none of the environment and knows only part of libpq's
//! syntax, so heimdall resolves everything here and hands the crate a finished `Config`.
//!
//! Nothing here connects. Passwords never reach an error message or a `Debug` print.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use postgres::config::{LoadBalanceHosts, SslNegotiation, TargetSessionAttrs};

use crate::pgpass;
use crate::tls::{RootCert, SslMode, TlsSettings};

/// libpq's fallback when a connection string names no host: the Unix socket directory Debian's
/// libpq is built with, else the upstream default.
const SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];
const DEFAULT_PORT: u16 = 5432;
/// heimdall runs unattended: without any setting, give up on a host after this long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection parameters heimdall understands, each with its libpq environment variable.
pub const SUPPORTED: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("dbname", Some("PGDATABASE")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("application_name", Some("PGAPPNAME")),
    ("fallback_application_name", None),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslnegotiation", Some("PGSSLNEGOTIATION")),
    ("load_balance_hosts", Some("PGLOADBALANCEHOSTS")),
    ("target_session_attrs", Some("PGTARGETSESSIONATTRS")),
    ("options", Some("PGOPTIONS")),
    ("keepalives", None),
    ("keepalives_idle", None),
    ("keepalives_interval", None),
    ("keepalives_count", None),
    ("tcp_user_timeout", None),
];

/// libpq parameters that heimdall recognises but cannot honour: refusing them is safer than
/// silently connecting with weaker settings than the user asked for.
const NOT_YET: &[&str] = &[
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
    "gssencmode",
    "gsslib",
    "krbsrvname",
    "service",
    "require_auth",
    "channel_binding",
    "replication",
    "client_encoding",
];

/// A password that cannot be printed by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the password came from, for `-v`; never the password itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    None,
    ConnectionString,
    Environment,
    PassFile { path: PathBuf, line: usize },
}

/// Everything needed to connect, resolved and validated.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    pub hosts: Vec<String>,
    pub hostaddrs: Vec<std::net::IpAddr>,
    pub ports: Vec<u16>,
    pub dbname: String,
    pub user: String,
    pub password: Option<Secret>,
    pub password_source: PasswordSource,
    /// Set only when the user asked for one (URL or `PGAPPNAME`); heimdall names itself otherwise.
    pub application_name: Option<String>,
    /// From the connection string or `PGCONNECT_TIMEOUT`; `Some(ZERO)` means wait forever.
    pub connect_timeout: Option<Duration>,
    pub tls: TlsSettings,
    pub load_balance_hosts: LoadBalanceHosts,
    pub target_session_attrs: TargetSessionAttrs,
    pub options: Option<String>,
    pub keepalives: bool,
    pub keepalives_idle: Option<Duration>,
    pub keepalives_interval: Option<Duration>,
    pub keepalives_count: Option<u32>,
    pub tcp_user_timeout: Option<Duration>,
    /// Warnings to show the user (e.g. an insecure password file), collected instead of printed
    /// so that this module does no output.
    pub warnings: Vec<String>,
    /// The connection string heimdall was given, without its password: what a command started
    /// under the lock may see (see [`without_password`]). `None` when no string was given.
    pub database_without_password: Option<String>,
}

/// What the outside world provides: environment variables and the user's identity. A trait
/// object so that unit tests can resolve settings without touching the real environment.
pub struct Environment<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// The OS user's name, looked up only when needed.
    pub os_user: &'a dyn Fn() -> Option<String>,
    pub home: Option<PathBuf>,
}

impl ConnSettings {
    /// Resolves `database` (URL or key=value, possibly absent) with libpq's precedence.
    pub fn resolve(database: Option<&str>, env: &Environment<'_>) -> Result<ConnSettings> {
        let mut params = match database {
            Some(s) => parse(s)?,
            None => Params::new(),
        };
        let database_without_password = database.map(|s| without_password(s, &params));
        for (key, var) in SUPPORTED {
            if let Some(var) = var
                && !params.contains_key(*key)
                && let Some(value) = (env.var)(var).filter(|v| !v.is_empty())
            {
                params.insert((*key).to_owned(), Value::env(value));
            }
        }
        let mut settings = Self::from_params(params, env)?;
        settings.database_without_password = database_without_password;
        Ok(settings)
    }

    fn from_params(mut params: Params, env: &Environment<'_>) -> Result<ConnSettings> {
        for key in params.keys() {
            if NOT_YET.contains(&key.as_str()) {
                bail!("connection option '{key}' is not supported by heimdall; remove it");
            }
            if !SUPPORTED.iter().any(|(k, _)| k == key) {
                bail!("unknown connection option '{key}'");
            }
        }
        let mut take = |key: &str| params.remove(key).map(|v| v.text);

        let hosts = split_list(take("host").as_deref());
        let hostaddrs = split_list(take("hostaddr").as_deref())
            .iter()
            .map(|a| {
                a.parse::<std::net::IpAddr>()
                    .map_err(|_| anyhow::anyhow!("hostaddr '{a}' is not an IP address"))
            })
            .collect::<Result<Vec<_>>>()?;
        let ports = split_list(take("port").as_deref())
            .iter()
            .map(|p| parse_port(p))
            .collect::<Result<Vec<_>>>()?;

        let hosts = if hosts.is_empty() && hostaddrs.is_empty() {
            vec![default_socket_dir()]
        } else {
            hosts
        };
        let host_count = hosts.len().max(hostaddrs.len());
        if !hostaddrs.is_empty() && !hosts.is_empty() && hostaddrs.len() != hosts.len() {
            bail!(
                "{} hostaddr values given for {} hosts; give one per host",
                hostaddrs.len(),
                hosts.len()
            );
        }
        if ports.len() > 1 && ports.len() != host_count {
            bail!(
                "{} ports given for {host_count} hosts; give one port, or one per host",
                ports.len()
            );
        }
        let ports = if ports.is_empty() {
            vec![DEFAULT_PORT]
        } else {
            ports
        };

        let user = match take("user") {
            Some(u) => u,
            None => (env.os_user)().ok_or_else(|| {
                anyhow::anyhow!(
                    "no user given and the OS user name is unknown; set user= or PGUSER"
                )
            })?,
        };
        let dbname = take("dbname").unwrap_or_else(|| user.clone());

        let ssl_mode = take("sslmode");
        let tls = tls_settings(
            ssl_mode.as_deref(),
            take("sslrootcert"),
            take("sslcert"),
            take("sslkey"),
            take("sslnegotiation").as_deref(),
            &hosts,
            env.home.as_deref(),
        )?;
        let load_balance_hosts = match take("load_balance_hosts").as_deref() {
            None | Some("disable") => LoadBalanceHosts::Disable,
            Some("random") => LoadBalanceHosts::Random,
            Some(other) => {
                bail!("invalid load_balance_hosts '{other}': expected disable or random")
            }
        };
        let target_session_attrs = match take("target_session_attrs").as_deref() {
            None | Some("any") => TargetSessionAttrs::Any,
            Some("read-write") => TargetSessionAttrs::ReadWrite,
            Some("read-only") => TargetSessionAttrs::ReadOnly,
            Some(other @ ("primary" | "standby" | "prefer-standby")) => {
                bail!("target_session_attrs={other} is not supported; use read-write (or any)")
            }
            Some(other) => bail!(
                "invalid target_session_attrs '{other}': expected any, read-write or read-only"
            ),
        };
        let connect_timeout = take("connect_timeout")
            .map(|t| libpq_connect_timeout(&t))
            .transpose()?;
        let keepalives = match take("keepalives").as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => bail!("invalid keepalives '{other}': expected 0 or 1"),
        };
        let seconds = |key: &str, v: Option<String>| -> Result<Option<Duration>> {
            v.map(|v| {
                v.trim()
                    .parse()
                    .map(Duration::from_secs)
                    .map_err(|_| anyhow::anyhow!("invalid {key} '{v}': expected whole seconds"))
            })
            .transpose()
        };
        let keepalives_idle = seconds("keepalives_idle", take("keepalives_idle"))?;
        let keepalives_interval = seconds("keepalives_interval", take("keepalives_interval"))?;
        let keepalives_count = take("keepalives_count")
            .map(|v| {
                v.trim().parse().map_err(|_| {
                    anyhow::anyhow!("invalid keepalives_count '{v}': expected a whole number")
                })
            })
            .transpose()?;
        let tcp_user_timeout = take("tcp_user_timeout")
            .map(|v| {
                v.trim().parse().map(Duration::from_millis).map_err(|_| {
                    anyhow::anyhow!("invalid tcp_user_timeout '{v}': expected milliseconds")
                })
            })
            .transpose()?;
        let application_name = take("application_name");
        // fallback_application_name only matters when heimdall would not name itself, which it
        // always does; accept it so connection strings written for other tools keep working.
        let _ = take("fallback_application_name");
        let options = take("options");
        let passfile = take("passfile");

        let mut warnings = Vec::new();
        // libpq treats an empty password as none, and looks in the password file.
        let (password, password_source) = match params
            .remove("password")
            .filter(|v| !v.text.is_empty())
        {
            Some(v) => (Some(Secret(v.text)), v.source),
            None => {
                let path = passfile
                    .map(PathBuf::from)
                    .or_else(|| pgpass::default_path(env.home.clone()));
                let first_host = hosts.first().map(String::as_str);
                let port = ports[0].to_string();
                let mut candidates = match (first_host, hostaddrs.first()) {
                    (Some(h), _) => vec![h.to_owned()],
                    (None, Some(a)) => vec![a.to_string()],
                    (None, None) => vec!["localhost".to_owned()],
                };
                if first_host.is_some_and(|h| SOCKET_DIRS.contains(&h)) {
                    candidates.push("localhost".to_owned());
                }
                let target = pgpass::Target {
                    hosts: candidates.iter().map(String::as_str).collect(),
                    port: &port,
                    dbname: &dbname,
                    user: &user,
                };
                match path.as_deref().map(|p| (p, pgpass::lookup(p, &target))) {
                    Some((path, pgpass::Lookup::Found { password, line })) => (
                        Some(Secret(password)),
                        PasswordSource::PassFile {
                            path: path.to_owned(),
                            line,
                        },
                    ),
                    Some((path, pgpass::Lookup::Insecure)) => {
                        warnings.push(format!(
                            "password file {} has group or world access and is ignored; permissions should be u=rw (0600) or less",
                            path.display()
                        ));
                        (None, PasswordSource::None)
                    }
                    _ => (None, PasswordSource::None),
                }
            }
        };

        Ok(ConnSettings {
            hosts,
            hostaddrs,
            ports,
            dbname,
            user,
            password,
            password_source,
            application_name,
            connect_timeout,
            tls,
            load_balance_hosts,
            target_session_attrs,
            options,
            keepalives,
            keepalives_idle,
            keepalives_interval,
            keepalives_count,
            tcp_user_timeout,
            warnings,
            database_without_password: None,
        })
    }

    /// The `postgres` crate's configuration. The application name and the effective connect
    /// timeout are decided by the caller.
    pub fn to_postgres(
        &self,
        application_name: &str,
        connect_timeout: Duration,
    ) -> postgres::Config {
        let mut config = postgres::Config::new();
        for host in &self.hosts {
            config.host(host);
        }
        for addr in &self.hostaddrs {
            config.hostaddr(*addr);
        }
        for port in &self.ports {
            config.port(*port);
        }
        config
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(application_name)
            .ssl_mode(match self.tls.mode {
                // `allow` starts without TLS; lock.rs retries with it if the server insists.
                SslMode::Disable | SslMode::Allow => postgres::config::SslMode::Disable,
                SslMode::Prefer => postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    postgres::config::SslMode::Require
                }
            })
            .ssl_negotiation(if self.tls.direct {
                SslNegotiation::Direct
            } else {
                SslNegotiation::Postgres
            })
            .load_balance_hosts(self.load_balance_hosts)
            .target_session_attrs(self.target_session_attrs)
            .keepalives(self.keepalives);
        if let Some(password) = &self.password {
            config.password(password.expose());
        }
        if !connect_timeout.is_zero() {
            config.connect_timeout(connect_timeout);
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        if let Some(d) = self.keepalives_idle {
            config.keepalives_idle(d);
        }
        if let Some(d) = self.keepalives_interval {
            config.keepalives_interval(d);
        }
        if let Some(n) = self.keepalives_count {
            config.keepalives_retries(n);
        }
        if let Some(d) = self.tcp_user_timeout {
            config.tcp_user_timeout(d);
        }
        config
    }

    /// Where heimdall connects, for messages: `host=… port=… dbname=… user=…`. No password.
    pub fn describe(&self) -> String {
        let hosts = if self.hosts.is_empty() {
            self.hostaddrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            self.hosts.join(",")
        };
        let ports = self
            .ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "host={hosts} port={ports} dbname={} user={}",
            self.dbname, self.user
        )
    }
}

/// libpq's TLS settings and defaults. `~/.postgresql/root.crt` is used when it exists (and then
/// verified against in every mode, as libpq does); `~/.postgresql/postgresql.crt` and `.key` are
/// the default client certificate. TLS is never used over Unix sockets, as in libpq.
fn tls_settings(
    mode: Option<&str>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    negotiation: Option<&str>,
    hosts: &[String],
    home: Option<&Path>,
) -> Result<TlsSettings> {
    let dot_postgresql = home.map(|h| h.join(".postgresql"));
    let root_cert = match root_cert.as_deref() {
        Some("system") => Some(RootCert::System),
        Some(path) => Some(RootCert::File(PathBuf::from(path))),
        None => dot_postgresql
            .as_ref()
            .map(|d| d.join("root.crt"))
            .filter(|p| p.exists())
            .map(RootCert::File),
    };
    let mode = match mode {
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(m) => SslMode::parse(m).ok_or_else(|| {
            anyhow::anyhow!(
                "invalid sslmode '{m}': expected disable, allow, prefer, require, verify-ca or verify-full"
            )
        })?,
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        bail!(
            "sslrootcert=system needs sslmode=verify-full (weak sslmode={} may not be used with the system trust store, as in libpq)",
            mode.name()
        );
    }
    let cert = cert
        .map(PathBuf::from)
        .or_else(|| dot_postgresql.as_ref().map(|d| d.join("postgresql.crt")));
    let key = key
        .map(PathBuf::from)
        .or_else(|| dot_postgresql.as_ref().map(|d| d.join("postgresql.key")));
    // libpq goes on without a client certificate when the file is not there.
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) if cert.exists() => Some((cert, key)),
        (Some(cert), None) if cert.exists() => {
            bail!("sslcert {} is given but no sslkey", cert.display())
        }
        _ => None,
    };
    let direct = match negotiation {
        None | Some("postgres") => false,
        Some("direct") if mode >= SslMode::Require => true,
        Some("direct") => bail!("sslnegotiation=direct needs sslmode=require or stronger"),
        Some(other) => bail!("invalid sslnegotiation '{other}': expected postgres or direct"),
    };
    let all_sockets = !hosts.is_empty() && hosts.iter().all(|h| h.starts_with('/'));
    Ok(TlsSettings {
        mode: if all_sockets { SslMode::Disable } else { mode },
        root_cert,
        client_cert,
        direct,
    })
}

fn default_socket_dir() -> String {
    SOCKET_DIRS
        .iter()
        .find(|d| Path::new(d).is_dir())
        .unwrap_or(&SOCKET_DIRS[1])
        .to_string()
}

fn split_list(value: Option<&str>) -> Vec<String> {
    match value {
        None => Vec::new(),
        Some("") => Vec::new(),
        Some(v) => v.split(',').map(|s| s.trim().to_owned()).collect(),
    }
}

fn parse_port(p: &str) -> Result<u16> {
    match p.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => bail!("invalid port '{p}': expected a number from 1 to 65535"),
    }
}

/// libpq's `connect_timeout`: whole seconds, 0 (or negative) means wait forever, and anything
/// from 1 is raised to 2 because libpq considers one second too short to be meaningful.
fn libpq_connect_timeout(value: &str) -> Result<Duration> {
    let secs: i64 = value.trim().parse().map_err(|_| {
        anyhow::anyhow!("invalid connect_timeout '{value}': expected whole seconds")
    })?;
    Ok(match secs {
        ..=0 => Duration::ZERO,
        1 => Duration::from_secs(2),
        n => Duration::from_secs(n as u64),
    })
}

/// `original` with the same settings and no password. A string without a password is kept as
/// it was written; otherwise every parameter but the password is written back as
/// `key='value'`, which [`parse_keyword_value`] reads back to the same values. Both describe
/// the same server, database and user, so a heimdall started under the lock finds the same
/// database (and recognises a lock it already holds), while the password stays with heimdall.
fn without_password(original: &str, params: &Params) -> String {
    if !params.contains_key("password") {
        return original.trim().to_owned();
    }
    params
        .iter()
        .filter(|(key, _)| *key != "password")
        .map(|(key, value)| {
            let quoted = value.text.replace('\\', "\\\\").replace('\'', "\\'");
            format!("{key}='{quoted}'")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A parameter value and where it came from.
#[derive(Debug, Clone)]
struct Value {
    text: String,
    source: PasswordSource,
}

impl Value {
    fn given(text: String) -> Value {
        Value {
            text,
            source: PasswordSource::ConnectionString,
        }
    }
    fn env(text: String) -> Value {
        Value {
            text,
            source: PasswordSource::Environment,
        }
    }
}

type Params = BTreeMap<String, Value>;

/// What to do about a URL that cannot be parsed and may hold a password: heimdall cannot know
/// where the password ends, so it quotes nothing and says how to write it.
const PERCENT_ENCODE_HINT: &str = "if the password contains special characters (/ ? # @ : % & or spaces), percent-encode them (e.g. / as %2F, @ as %40)";

/// Parses a URL or a key=value string into raw parameters. Errors never quote a password.
fn parse(s: &str) -> Result<Params> {
    let trimmed = s.trim();
    let params = if let Some(rest) = trimmed
        .strip_prefix("postgresql://")
        .or_else(|| trimmed.strip_prefix("postgres://"))
    {
        parse_url(rest).map_err(|e| {
            if rest.contains('@') {
                anyhow::anyhow!("{e:#}; {PERCENT_ENCODE_HINT}")
            } else {
                e
            }
        })?
    } else if trimmed.contains("://") {
        bail!("invalid --database URL: the scheme must be postgres:// or postgresql://")
    } else {
        parse_keyword_value(trimmed)?
    };
    Ok(params
        .into_iter()
        .map(|(k, v)| (k, Value::given(v)))
        .collect())
}

/// A parameter name heimdall knows, supported or not. Used to tell a key from a piece of a
/// password that an unquoted space or `&` cut off, which must not be quoted back.
fn known_key(key: &str) -> bool {
    SUPPORTED.iter().any(|(k, _)| *k == key) || NOT_YET.contains(&key)
}

/// Splits `user[:password]@` off the rest of a URL (after the scheme). Generated passwords hold
/// unencoded `/`, `?`, `#` and `@`, which a strict parser (and libpq) would take for the end of
/// the host part and print back as a port or a database name. So the userinfo ends at the *last*
/// `@` whose user name (the text before the first `:`) holds no `/`, `?` or `#`: a user name
/// never does, while the password may hold anything. The price: in a URL that has a password,
/// an `@` in the database name or a query value must be written `%40`.
fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    for (at, _) in rest.rmatch_indices('@') {
        let userinfo = &rest[..at];
        let user = userinfo.split(':').next().unwrap_or_default();
        if !user.contains(['/', '?', '#']) {
            return (Some(userinfo), &rest[at + 1..]);
        }
    }
    (None, rest)
}

fn parse_url(rest: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let (userinfo, after) = split_userinfo(rest);
    if let Some(userinfo) = userinfo {
        let (user, password) = match userinfo.split_once(':') {
            Some((u, p)) => (u, Some(p)),
            None => (userinfo, None),
        };
        if !user.is_empty() {
            out.insert("user".into(), percent_decode(user, "user name")?);
        }
        if let Some(p) = password {
            out.insert("password".into(), percent_decode(p, "password")?);
        }
    }
    let (before_query, query) = match after.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (after, None),
    };
    let (hostspec, path) = match before_query.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (before_query, None),
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hostspec.split(',') {
            let (host, port) = split_host_port(spec)?;
            hosts.push(percent_decode(host, "host")?);
            ports.push(port.unwrap_or_default().to_owned());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            out.insert("host".into(), hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            let ports: Vec<String> = ports
                .into_iter()
                .map(|p| {
                    if p.is_empty() {
                        DEFAULT_PORT.to_string()
                    } else {
                        p
                    }
                })
                .collect();
            out.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), percent_decode(db, "database name")?);
    }
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        // Once a password was given, a malformed or unknown pair may be the rest of a password
        // that held an '&': say what is wrong without quoting it.
        let after_password = out.contains_key("password");
        let Some((k, v)) = pair.split_once('=') else {
            if after_password {
                bail!("invalid --database URL: a query parameter has no '=value'");
            }
            bail!("invalid --database URL: query parameter '{pair}' has no '=value'");
        };
        let key = percent_decode(k, "query parameter")?;
        if after_password && !known_key(&key) {
            bail!(
                "invalid --database URL: an unknown query parameter follows the password; percent-encode an '&' in a password as %26"
            );
        }
        let what = if key == "password" {
            "password"
        } else {
            "query parameter"
        };
        out.insert(key, percent_decode(v, what)?);
    }
    Ok(out)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(spec: &str) -> Result<(&str, Option<&str>)> {
    if let Some(rest) = spec.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            bail!("invalid --database URL: unterminated '[' in an IPv6 host");
        };
        let host = &rest[..end];
        return match &rest[end + 1..] {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => bail!("invalid --database URL: unexpected text after ']'"),
            },
        };
    }
    Ok(match spec.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (spec, None),
    })
}

fn percent_decode(s: &str, what: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let Some(b) = hex else {
                bail!("invalid --database URL: bad percent-encoding in the {what}");
            };
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| anyhow::anyhow!("invalid --database URL: the {what} is not UTF-8"))
}

/// libpq's `key = value` syntax: values may be single-quoted, and `\` escapes the next character.
fn parse_keyword_value(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        // After a password, a stray word may be the rest of a password with a space in it.
        let after_password = out.contains_key("password");
        if after_password && !known_key(&key) {
            bail!(
                "invalid connection string: an unknown word follows the password; write a password with spaces in single quotes: password='...'"
            );
        }
        if chars.next() != Some('=') {
            bail!(
                "invalid connection string: expected '=' after '{key}' (write key=value pairs, or a postgres:// URL)"
            );
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => {
                        bail!("invalid connection string: unterminated quoted value for '{key}'")
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_with(database: Option<&str>, vars: &[(&str, &str)]) -> Result<ConnSettings> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let env = Environment {
            var: &lookup,
            os_user: &|| Some("osuser".into()),
            home: Some(PathBuf::from("/nonexistent-home")),
        };
        ConnSettings::resolve(database, &env)
    }

    #[test]
    fn url_gives_every_part() {
        let s = resolve_with(
            Some("postgres://al%40ice:p%3Aw@db.example:6543/app%2Fdb?sslmode=disable&application_name=x"),
            &[],
        )
        .unwrap();
        assert_eq!(s.hosts, ["db.example"]);
        assert_eq!(s.ports, [6543]);
        assert_eq!(s.user, "al@ice");
        assert_eq!(s.password.as_ref().unwrap().expose(), "p:w");
        assert_eq!(s.dbname, "app/db");
        assert_eq!(s.tls.mode, SslMode::Disable);
        assert_eq!(s.application_name.as_deref(), Some("x"));
    }

    #[test]
    fn url_takes_multiple_hosts_ipv6_and_socket_paths() {
        let s = resolve_with(Some("postgresql://a:1,[::1]:2,b/db"), &[]).unwrap();
        assert_eq!(s.hosts, ["a", "::1", "b"]);
        assert_eq!(s.ports, [1, 2, 5432]);
        let s = resolve_with(Some("postgresql://%2Ftmp%2Fsock:7/db"), &[]).unwrap();
        assert_eq!(s.hosts, ["/tmp/sock"]);
        let s = resolve_with(Some("postgresql:///db?host=/run/pg"), &[]).unwrap();
        assert_eq!(s.hosts, ["/run/pg"]);
    }

    #[test]
    fn unencoded_at_in_password_still_parses() {
        let s = resolve_with(Some("postgres://u:p@ss@h/db"), &[]).unwrap();
        assert_eq!(s.password.unwrap().expose(), "p@ss");
        assert_eq!(s.hosts, ["h"]);
    }

    #[test]
    fn keyword_value_strings_parse_with_quotes_and_escapes() {
        let s = resolve_with(
            Some(r"host=h  port = 5433 user='o\'brien' password='a b\\c' dbname=d"),
            &[],
        )
        .unwrap();
        assert_eq!(s.hosts, ["h"]);
        assert_eq!(s.ports, [5433]);
        assert_eq!(s.user, "o'brien");
        assert_eq!(s.password.unwrap().expose(), r"a b\c");
        assert_eq!(s.dbname, "d");
    }

    #[test]
    fn environment_fills_what_the_string_leaves_out() {
        let s = resolve_with(
            Some("postgres://h/db"),
            &[
                ("PGHOST", "other"),
                ("PGUSER", "envuser"),
                ("PGPORT", "7777"),
                ("PGPASSWORD", "pw"),
            ],
        )
        .unwrap();
        assert_eq!(s.hosts, ["h"], "the URL wins over PGHOST");
        assert_eq!(s.user, "envuser");
        assert_eq!(s.ports, [7777]);
        assert_eq!(s.password_source, PasswordSource::Environment);
    }

    #[test]
    fn defaults_follow_libpq() {
        let s = resolve_with(None, &[]).unwrap();
        assert!(
            s.hosts[0].starts_with('/'),
            "a socket directory: {:?}",
            s.hosts
        );
        assert_eq!(s.ports, [5432]);
        assert_eq!(s.user, "osuser");
        assert_eq!(s.dbname, "osuser");
        assert_eq!(s.tls.mode, SslMode::Disable, "no TLS over a Unix socket");
        assert_eq!(s.connect_timeout, None);
    }

    #[test]
    fn connect_timeout_follows_libpq_rounding() {
        let t = |v: &str| {
            resolve_with(Some(&format!("connect_timeout={v}")), &[])
                .unwrap()
                .connect_timeout
        };
        assert_eq!(t("0"), Some(Duration::ZERO));
        assert_eq!(t("1"), Some(Duration::from_secs(2)));
        assert_eq!(t("30"), Some(Duration::from_secs(30)));
        let s = resolve_with(None, &[("PGCONNECT_TIMEOUT", "5")]).unwrap();
        assert_eq!(s.connect_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn unsupported_and_unknown_options_are_refused_clearly() {
        let err = |s: &str| format!("{:#}", resolve_with(Some(s), &[]).unwrap_err());
        assert!(err("sslmode=bogus").contains("invalid sslmode 'bogus'"));
        assert!(err("sslcrl=/x").contains("not supported"));
        assert!(err("host=h sslrootcert=system sslmode=require").contains("verify-full"));
        assert!(err("colour=blue").contains("unknown connection option 'colour'"));
        assert!(err("port=99999").contains("invalid port"));
        assert!(err("mysql://h/db").contains("scheme"));
        assert!(err("host").contains("expected '='"));
        let env = resolve_with(Some("host=h"), &[("PGSSLMODE", "verify-ca")]).unwrap();
        assert_eq!(env.tls.mode, SslMode::VerifyCa);
    }

    #[test]
    fn errors_never_quote_the_password() {
        for s in [
            "postgres://u:hunter2%zz@h/db",
            "postgres://u:hunter2@h:notaport/db",
            "password=hunter2 colour=blue",
            "password='hunter2",
        ] {
            let err = format!("{:#}", resolve_with(Some(s), &[]).unwrap_err());
            assert!(!err.contains("hunter2"), "{err}");
        }
        let s = resolve_with(Some("password=hunter2"), &[]).unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!s.describe().contains("hunter2"));
    }

    #[test]
    fn url_passwords_may_hold_unencoded_special_characters() {
        for password in [
            "Xy7/Qz9+Secret",
            "Ab3?SecretTail",
            "Hash#Gh5kWq",
            "Mail@Rv8pLx",
            "Kq8w/Zr4t?Lm2n#Vb6x@Pj9s",
            "a:b/c",
            "/?#@",
        ] {
            let url = format!("postgres://app:{password}@127.0.0.1:5432/postgres?sslmode=disable");
            let s = resolve_with(Some(&url), &[]).unwrap();
            assert_eq!(s.password.as_ref().unwrap().expose(), password, "{url}");
            assert_eq!(s.user, "app");
            assert_eq!(s.hosts, ["127.0.0.1"]);
            assert_eq!(s.ports, [5432]);
            assert_eq!(s.dbname, "postgres");
            assert_eq!(s.tls.mode, SslMode::Disable);
            assert!(!s.describe().contains(password));
        }
    }

    #[test]
    fn an_at_sign_after_the_host_stays_there_when_the_url_has_no_password() {
        let s = resolve_with(Some("postgres://h/db@x"), &[]).unwrap();
        assert_eq!((s.hosts[0].as_str(), s.dbname.as_str()), ("h", "db@x"));
        let s = resolve_with(Some("postgres://u@h/db?application_name=job@web1"), &[]).unwrap();
        assert_eq!(s.user, "u");
        assert_eq!(s.hosts, ["h"]);
        assert_eq!(s.application_name.as_deref(), Some("job@web1"));
        // With a password, the last '@' ends it: the documented price of unencoded passwords.
        let s = resolve_with(Some("postgres://u:p@h/db%40x"), &[]).unwrap();
        assert_eq!(s.dbname, "db@x");
        let s = resolve_with(Some("postgres://u:p@h/db@x"), &[]).unwrap();
        assert_eq!(s.hosts, ["x"]);
    }

    #[test]
    fn an_unparsable_url_with_credentials_quotes_nothing_and_says_to_percent_encode() {
        for url in [
            "postgres://someone:Tt5%zzUu6/Ww7@h/db",
            "postgres://someone:Ww7Zz9@[::1/db",
            "postgres://someone:Tt5Uu6@h/db?Ww7Zz9",
        ] {
            let err = format!("{:#}", resolve_with(Some(url), &[]).unwrap_err());
            assert!(err.contains("percent-encode"), "{url}: {err}");
            for piece in ["someone", "Tt5", "Uu6", "Ww7", "Zz9"] {
                assert!(!err.contains(piece), "{url}: {err}");
            }
        }
    }

    #[test]
    fn words_cut_off_a_password_by_a_space_or_ampersand_are_never_quoted() {
        for s in [
            "postgres://h/db?password=ab&Cdef9",
            "postgres://h/db?password=ab&Cdef9=x",
            "password=ab Cdef9 host=h",
            "password=ab Cdef9=x",
        ] {
            let err = format!("{:#}", resolve_with(Some(s), &[]).unwrap_err());
            assert!(!err.contains("Cdef9"), "{s}: {err}");
        }
    }

    #[test]
    fn the_string_for_the_command_has_the_same_settings_and_no_password() {
        let url =
            r"postgres://al%27ice:Xy7/Qz9@h1:5433,h2/d%5Cb?sslmode=require&application_name=o'k";
        let outer = resolve_with(Some(url), &[]).unwrap();
        let for_child = outer.database_without_password.clone().unwrap();
        assert!(
            !for_child.contains("Xy7") && !for_child.contains("Qz9"),
            "{for_child}"
        );
        let inner = resolve_with(Some(&for_child), &[]).unwrap();
        assert_eq!(inner.describe(), outer.describe());
        assert_eq!(inner.user, "al'ice");
        assert_eq!(inner.dbname, r"d\b");
        assert_eq!(inner.tls.mode, SslMode::Require);
        assert_eq!(inner.application_name.as_deref(), Some("o'k"));
        assert_eq!(inner.password, None);
        // Without a password the string is passed on as written.
        let plain = resolve_with(Some("postgres://u@h/db"), &[]).unwrap();
        assert_eq!(
            plain.database_without_password.as_deref(),
            Some("postgres://u@h/db")
        );
        assert_eq!(
            resolve_with(None, &[]).unwrap().database_without_password,
            None
        );
    }

    #[test]
    fn port_count_must_fit_host_count() {
        assert!(resolve_with(Some("host=a,b,c port=1,2"), &[]).is_err());
        let s = resolve_with(Some("host=a,b port=1"), &[]).unwrap();
        assert_eq!(s.ports, [1]);
    }
}
