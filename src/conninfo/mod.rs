//! libpq-compatible connection settings: a `postgres://` URL or a `key=value` string, then the
//! `PG*` environment variables for whatever it leaves out, then `~/.pgpass`, then libpq's
//! defaults. The `postgres` crate reads none of the environment and knows only part of libpq's
//! syntax, so heimdall resolves everything here and hands the crate a finished `Config`.
//!
//! This module holds the resolved settings and the precedence; `syntax` parses the two
//! spellings of a connection string, `params` gives each parameter its meaning, `tls` the TLS
//! settings, `pgpass` the password file.
//! Nothing here connects. Passwords never reach an error message or a `Debug` print.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use postgres::config::{LoadBalanceHosts, SslNegotiation, TargetSessionAttrs};

mod params;
pub mod pgpass;
mod syntax;
pub mod tls;

pub use params::HostFrom;
use params::{Endpoints, Tcp, check_keys, libpq_connect_timeout, routing};
use syntax::{Params, Value, parse, without_password};
use tls::{SslMode, TlsSettings};

/// libpq's fallback when a connection string names no host: the Unix socket directory Debian's
/// libpq is built with, else the upstream default.
pub const SOCKET_DIRS: [&str; 2] = ["/var/run/postgresql", "/tmp"];
pub const DEFAULT_PORT: u16 = 5432;
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

/// Shuffles `items` (Fisher-Yates), seeded from the standard library's per-process random
/// hash keys: spreading load needs no better randomness than that.
fn shuffle<T>(items: &mut [T]) {
    use std::hash::{BuildHasher, Hasher};
    let mut state = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        | 1;
    for i in (1..items.len()).rev() {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        items.swap(i, (state % (i as u64 + 1)) as usize);
    }
}

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
pub struct ConnInfo {
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
    pub host_from: HostFrom,
}

/// What the outside world provides: environment variables and the user's identity. A trait
/// object so that unit tests can resolve settings without touching the real environment.
pub struct Environment<'a> {
    pub var: &'a dyn Fn(&str) -> Option<String>,
    /// The OS user's name, looked up only when needed.
    pub os_user: &'a dyn Fn() -> Option<String>,
    pub home: Option<PathBuf>,
}

/// A connection string, and where it was given (`--database`, `HEIMDALL_DATABASE_URL`,
/// `DATABASE_URL`), which its errors name.
#[derive(Debug, Clone, Copy)]
pub struct Given<'a> {
    pub text: &'a str,
    pub from: &'a str,
}

impl ConnInfo {
    /// Resolves `database` (URL or key=value, possibly absent) with libpq's precedence.
    pub fn resolve(database: Option<Given<'_>>, env: &Environment<'_>) -> Result<ConnInfo> {
        let mut params = match database {
            Some(given) => parse(given.text, given.from)?,
            None => Params::new(),
        };
        let database_without_password = database.map(|given| without_password(given.text, &params));
        for (key, var) in SUPPORTED {
            if let Some(var) = var
                && !params.contains_key(*key)
                && let Some(value) = (env.var)(var).filter(|v| !v.is_empty())
            {
                params.insert((*key).to_owned(), Value::env(value));
            }
        }
        let host_from = HostFrom::of(&params);
        let mut settings = Self::from_params(params, env)?;
        settings.database_without_password = database_without_password;
        settings.host_from = host_from;
        Ok(settings)
    }

    fn from_params(mut params: Params, env: &Environment<'_>) -> Result<ConnInfo> {
        check_keys(&params)?;
        // libpq treats an empty password as none, and looks in the password file.
        let password = params.remove("password").filter(|v| !v.text.is_empty());
        let mut take = |key: &str| params.remove(key).map(|v| v.text);

        let Endpoints {
            hosts,
            hostaddrs,
            ports,
        } = Endpoints::from_params(&mut take)?;
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
        let tls = tls::settings(
            ssl_mode.as_deref(),
            take("sslrootcert"),
            take("sslcert"),
            take("sslkey"),
            take("sslnegotiation").as_deref(),
            &hosts,
            env.home.as_deref(),
        )?;
        let (load_balance_hosts, target_session_attrs) = routing(&mut take)?;
        let connect_timeout = take("connect_timeout")
            .map(|t| libpq_connect_timeout(&t))
            .transpose()?;
        let tcp = Tcp::from_params(&mut take)?;
        let application_name = take("application_name");
        // fallback_application_name only matters when heimdall would not name itself, which it
        // always does; accept it so connection strings written for other tools keep working.
        let _ = take("fallback_application_name");
        let options = take("options");
        let passfile = take("passfile");

        let mut warnings = Vec::new();
        let (password, password_source) = match password {
            Some(v) => (Some(Secret(v.text)), v.source),
            None => {
                let target = pgpass::Login {
                    first_host: hosts.first().map(String::as_str),
                    first_hostaddr: hostaddrs.first().copied(),
                    port: ports[0],
                    dbname: &dbname,
                    user: &user,
                };
                let path = passfile
                    .map(PathBuf::from)
                    .or_else(|| pgpass::default_path(env.home.clone()));
                match path.map(|path| pgpass::password_for(&path, &target)) {
                    Some(Ok(found)) => found,
                    Some(Err(warning)) => {
                        warnings.push(warning);
                        (None, PasswordSource::None)
                    }
                    None => (None, PasswordSource::None),
                }
            }
        };

        Ok(ConnInfo {
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
            keepalives: tcp.keepalives,
            keepalives_idle: tcp.keepalives_idle,
            keepalives_interval: tcp.keepalives_interval,
            keepalives_count: tcp.keepalives_count,
            tcp_user_timeout: tcp.tcp_user_timeout,
            warnings,
            database_without_password: None,
            host_from: HostFrom::Given,
        })
    }

    /// The `postgres` crate's configuration. The application name and the effective connect
    /// timeout are decided by the caller.
    pub fn to_postgres(
        &self,
        application_name: &str,
        connect_timeout: Duration,
    ) -> postgres::Config {
        self.to_tokio_postgres(application_name, connect_timeout)
            .into()
    }

    /// [`ConnInfo::to_postgres`] for the async client underneath (see `db::probe`).
    pub fn to_tokio_postgres(
        &self,
        application_name: &str,
        connect_timeout: Duration,
    ) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
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
                // `allow` starts without TLS; db/connect.rs retries with it if the server insists.
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

    /// One set of settings per host, in the order to try them: as given, or shuffled with
    /// `load_balance_hosts=random`, as libpq does. heimdall tries the hosts one by one itself,
    /// so that `connect_timeout` bounds each host (the login too) and each failure can be
    /// named; each keeps `target_session_attrs`, TLS and the rest.
    pub fn each_host(&self) -> Vec<ConnInfo> {
        let count = self.hosts.len().max(self.hostaddrs.len()).max(1);
        let mut each: Vec<ConnInfo> = (0..count)
            .map(|i| {
                let mut one = self.clone();
                one.hosts = self.hosts.get(i).cloned().into_iter().collect();
                one.hostaddrs = self.hostaddrs.get(i).copied().into_iter().collect();
                one.ports = vec![*self.ports.get(i).unwrap_or(&self.ports[0])];
                one
            })
            .collect();
        if self.load_balance_hosts == LoadBalanceHosts::Random {
            shuffle(&mut each);
        }
        each
    }

    /// The first host, for messages about one of [`ConnInfo::each_host`]: `db1 port 5432`,
    /// `db1 (10.0.0.5) port 5432`, `/var/run/postgresql port 5432`.
    pub fn host_label(&self) -> String {
        let port = self.ports.first().copied().unwrap_or(DEFAULT_PORT);
        match (self.hosts.first(), self.hostaddrs.first()) {
            (Some(host), Some(addr)) => format!("{host} ({addr}) port {port}"),
            (Some(host), None) => format!("{host} port {port}"),
            (None, Some(addr)) => format!("{addr} port {port}"),
            (None, None) => format!("port {port}"),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn resolve_with(database: Option<&str>, vars: &[(&str, &str)]) -> Result<ConnInfo> {
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
        let given = database.map(|text| Given {
            text,
            from: "--database",
        });
        ConnInfo::resolve(given, &env)
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
}
