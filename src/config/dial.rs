//! Where and how to connect: the libpq settings (`conninfo`) with heimdall's own decisions on
//! top: the connect timeout that wins, heimdall's `application_name`, and the client side of the
//! TCP keepalive that matches the heartbeat. Resolving reads the environment and, when libpq's
//! defaults need them, the password file; it never connects (`db` does).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::System;
use crate::cli::ConnArgs;
use crate::conninfo::{self, ConnInfo, Environment, Given};
use crate::domain::appname;
use crate::domain::timing::Heartbeat;
use crate::exit::{Classify, Failure};

/// What `db` needs to connect: the libpq settings, and heimdall's decisions on top of them.
#[derive(Debug, Clone)]
pub struct Dial {
    pub info: ConnInfo,
    /// The effective per-host limit: `--connect-timeout`, else the connection string's or
    /// `PGCONNECT_TIMEOUT`, else 10s. Zero means wait forever.
    pub connect_timeout: Duration,
    pub application_name: String,
}

impl Dial {
    /// Resolves the connection. `label` goes into heimdall's own application_name.
    pub fn from_args(
        args: &ConnArgs,
        label: &str,
        heartbeat: Option<Heartbeat>,
        system: &System<'_>,
    ) -> Result<Dial> {
        let database = match given(args) {
            Some(database) => Some((database.to_owned(), given_as(database))),
            None => utf8_var("DATABASE_URL")?
                .filter(|v| !v.is_empty())
                .map(|v| (v, "DATABASE_URL")),
        };
        // Refused rather than skipped: libpq's defaults may name another database.
        for name in conninfo::SUPPORTED.iter().filter_map(|(_, var)| *var) {
            utf8_var(name)?;
        }
        let var = |name: &str| std::env::var(name).ok();
        // The password database is read only when the user name or HOME is not given: a
        // lookup can mean NSS, LDAP or a network round trip before every job.
        // Looked up at most once, when first needed.
        let passwd = std::cell::OnceCell::new();
        let os_user_name = || passwd.get_or_init(system.os_user).0.clone();
        let env = Environment {
            var: &var,
            os_user: &os_user_name,
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from)
                .or_else(|| passwd.get_or_init(system.os_user).1.clone()),
        };
        let database = database.as_ref().map(|(text, from)| Given { text, from });
        let mut info = ConnInfo::resolve(database, &env).classify(Failure::Usage)?;
        if let Some(hb) = heartbeat {
            // Let the kernel notice a dead peer too, on the same time scale as the heartbeat,
            // unless the connection string tuned these itself. TCP only; a Unix socket cannot
            // silently lose its peer.
            let idle = hb.interval.max(Duration::from_secs(1));
            info.keepalives_idle
                .get_or_insert(Duration::from_secs(idle.as_secs()));
            info.keepalives_interval
                .get_or_insert(Duration::from_secs(1));
            info.keepalives_count.get_or_insert(3);
            info.tcp_user_timeout
                .get_or_insert(hb.interval + hb.timeout);
        }
        let connect_timeout = args
            .connect_timeout
            .or(info.connect_timeout)
            .unwrap_or(conninfo::DEFAULT_CONNECT_TIMEOUT);
        let application_name = info
            .application_name
            .clone()
            .unwrap_or_else(|| appname::format(label, &(system.host_name)(), std::process::id()));
        Ok(Dial {
            info,
            connect_timeout,
            application_name,
        })
    }
}

/// The `--database` string, from the flag or `HEIMDALL_DATABASE_URL`; an empty value counts as
/// unset, as libpq treats empty settings.
pub(super) fn given(args: &ConnArgs) -> Option<&str> {
    args.database.as_deref().filter(|v| !v.is_empty())
}

/// Where the `--database` string came from, for its errors: the flag, or its environment twin
/// when that holds the same text (clap reads the variable when the flag is not given; when it
/// is, with the same text, the variable is as wrong as the flag).
fn given_as(database: &str) -> &'static str {
    const TWIN: &str = "HEIMDALL_DATABASE_URL";
    if std::env::var(TWIN).is_ok_and(|v| v == database) {
        TWIN
    } else {
        "--database"
    }
}

/// An environment variable heimdall reads, which must be UTF-8 if set. The message names the
/// variable, never its value (it may hold a password).
fn utf8_var(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(anyhow::anyhow!(
            "the environment variable {name} is not valid UTF-8; fix or unset it"
        ))
        .classify(Failure::Usage),
    }
}
