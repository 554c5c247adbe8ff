//! What each connection parameter means once parsed: which keys are allowed, the hosts, their
//! addresses and ports, host routing, the TCP settings and libpq's `connect_timeout` rounding.
//! The precedence that picks each value is in `conninfo/mod.rs`; the TLS ones are in `tls/`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use postgres::config::{LoadBalanceHosts, TargetSessionAttrs};

use super::syntax::{Params, closest_key};
use super::{DEFAULT_PORT, NOT_YET, SOCKET_DIRS, SUPPORTED};

/// Refuses what heimdall cannot honour, and what libpq would not know either.
pub fn check_keys(params: &Params) -> Result<()> {
    for key in params.keys() {
        if NOT_YET.contains(&key.as_str()) {
            bail!("connection option '{key}' is not supported by heimdall; remove it");
        }
        if !SUPPORTED.iter().any(|(k, _)| k == key) {
            match closest_key(key) {
                Some(meant) => bail!("unknown connection option '{key}'; did you mean {meant}?"),
                None => bail!("unknown connection option '{key}'"),
            }
        }
    }
    Ok(())
}

/// Where the host came from, for a failure to connect: libpq's default socket is a guess that
/// the message should own up to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFrom {
    /// The connection string, `PGHOST` or `PGHOSTADDR`.
    Given,
    /// libpq's default socket directory; other settings were given.
    Default,
    /// libpq's default socket directory, and nothing else was given either: no connection
    /// string, no `PG*` variable.
    NothingGiven,
}

impl HostFrom {
    /// Where the host of `params` (the connection string's, then the `PG*` variables') comes
    /// from.
    pub fn of(params: &Params) -> HostFrom {
        if params.contains_key("host") || params.contains_key("hostaddr") {
            HostFrom::Given
        } else if params.is_empty() {
            HostFrom::NothingGiven
        } else {
            HostFrom::Default
        }
    }
}

/// Where to dial: hosts (or socket directories), their addresses, and ports, with libpq's rules
/// for how many of each go together.
pub struct Endpoints {
    pub hosts: Vec<String>,
    pub hostaddrs: Vec<std::net::IpAddr>,
    pub ports: Vec<u16>,
}

impl Endpoints {
    pub fn from_params(take: &mut impl FnMut(&str) -> Option<String>) -> Result<Endpoints> {
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
        Ok(Endpoints {
            hosts,
            hostaddrs,
            ports,
        })
    }
}

/// Which of several hosts to try first, and which kind of server to accept.
pub fn routing(
    take: &mut impl FnMut(&str) -> Option<String>,
) -> Result<(LoadBalanceHosts, TargetSessionAttrs)> {
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
        Some(other) => {
            bail!("invalid target_session_attrs '{other}': expected any, read-write or read-only")
        }
    };
    Ok((load_balance_hosts, target_session_attrs))
}

/// The socket's keepalive and user-timeout settings.
pub struct Tcp {
    pub keepalives: bool,
    pub keepalives_idle: Option<Duration>,
    pub keepalives_interval: Option<Duration>,
    pub keepalives_count: Option<u32>,
    pub tcp_user_timeout: Option<Duration>,
}

impl Tcp {
    pub fn from_params(take: &mut impl FnMut(&str) -> Option<String>) -> Result<Tcp> {
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
        Ok(Tcp {
            keepalives,
            keepalives_idle,
            keepalives_interval,
            keepalives_count,
            tcp_user_timeout,
        })
    }
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
pub fn libpq_connect_timeout(value: &str) -> Result<Duration> {
    let secs: i64 = value.trim().parse().map_err(|_| {
        anyhow::anyhow!("invalid connect_timeout '{value}': expected whole seconds")
    })?;
    Ok(match secs {
        ..=0 => Duration::ZERO,
        1 => Duration::from_secs(2),
        n => Duration::from_secs(n as u64),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::conninfo::tests::resolve_with;

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
    fn port_count_must_fit_host_count() {
        assert!(resolve_with(Some("host=a,b,c port=1,2"), &[]).is_err());
        let s = resolve_with(Some("host=a,b port=1"), &[]).unwrap();
        assert_eq!(s.ports, [1]);
    }
}
