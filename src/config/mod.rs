//! Turns the command line and the environment into validated, typed settings, once. Nothing
//! downstream parses strings or reads the environment again. The one step beyond that is
//! [`Connection::open`], which connects (through `db.rs`) and reports what resolving the
//! settings warned about.

use std::ffi::{CStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::cli::{ConnArgs, LockArgs, OutputArgs, RunCli, Wait};
use crate::conninfo::{self, ConnSettings, Environment};
use crate::domain::appname;
use crate::domain::key::LockKey;
use crate::exit::{Classify, Failure};
use crate::log::Level;

/// Which lock, for messages, queries and the command's environment.
#[derive(Debug, Clone)]
pub struct LockTarget {
    /// The lock's key; with `--slots`, the key of slot 0.
    pub key: LockKey,
    /// `Some((namespace, name))` unless `--key` was given.
    pub names: Option<(String, String)>,
    pub slots: u16,
}

impl LockTarget {
    pub fn from_args(args: &LockArgs) -> Result<LockTarget> {
        let (key, names) = match (args.key, &args.namespace, &args.name) {
            (Some(key), _, _) => (key, None),
            (None, Some(ns), Some(name)) => (
                LockKey::derive(args.hash, ns, name),
                Some((ns.clone(), name.clone())),
            ),
            // clap enforces the pair unless --key is given; keep the message for safety.
            _ => {
                return Err(anyhow::anyhow!(
                    "--namespace and --name are required unless --key is given"
                ))
                .classify(Failure::Usage);
            }
        };
        Ok(LockTarget {
            key,
            names,
            slots: args.slots,
        })
    }

    /// Every key this lock may be held under: one, or one per slot.
    pub fn slot_keys(&self) -> Vec<LockKey> {
        (0..self.slots).map(|i| self.key.slot(i)).collect()
    }

    /// `billing/nightly-invoices (keys 1,2)` or `key 42`, with the slot count when slotted.
    pub fn describe(&self) -> String {
        match (&self.names, self.slots) {
            (Some((ns, name)), 1) => format!("{ns}/{name} (keys {})", self.key),
            (Some((ns, name)), n) => format!("{ns}/{name} (keys {}, {n} slots)", self.key),
            (None, 1) => format!("key {}", self.key),
            (None, n) => format!("key {} ({n} slots)", self.key),
        }
    }

    /// `billing/nightly-invoices` or `key 42`: what `application_name` carries.
    pub fn short(&self) -> String {
        match &self.names {
            Some((ns, name)) => format!("{ns}/{name}"),
            None => format!("key {}", self.key),
        }
    }
}

/// Exclusive or shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Exclusive,
    Shared,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Connection {
    pub conn: ConnSettings,
    /// The effective per-host limit: `--connect-timeout`, else the connection string's or
    /// `PGCONNECT_TIMEOUT`, else 10s. Zero means wait forever.
    pub connect_timeout: Duration,
    pub application_name: String,
    /// What the command gets as `HEIMDALL_DATABASE_URL`: the `--database` string (flag or
    /// environment) without its password, so a heimdall it starts locks on the same database.
    /// `None` when heimdall's settings came from `DATABASE_URL` or `PG*`, which the command
    /// inherits as they are.
    pub database_for_command: Option<String>,
}

impl Connection {
    /// Resolves the connection. `label` goes into heimdall's own application_name.
    pub fn from_args(
        args: &ConnArgs,
        label: &str,
        heartbeat: Option<Heartbeat>,
    ) -> Result<Connection> {
        // An empty value counts as unset, as libpq treats empty settings.
        let given = args.database.clone().filter(|v| !v.is_empty());
        let database = match given.clone() {
            Some(database) => Some(database),
            None => utf8_var("DATABASE_URL")?.filter(|v| !v.is_empty()),
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
        let os_user_name = || passwd.get_or_init(os_user).0.clone();
        let env = Environment {
            var: &var,
            os_user: &os_user_name,
            home: std::env::var_os("HOME")
                .filter(|h| !h.is_empty())
                .map(PathBuf::from)
                .or_else(|| passwd.get_or_init(os_user).1.clone()),
        };
        let mut conn = ConnSettings::resolve(database.as_deref(), &env).classify(Failure::Usage)?;
        if let Some(hb) = heartbeat {
            // Let the kernel notice a dead peer too, on the same time scale as the heartbeat,
            // unless the connection string tuned these itself. TCP only; a Unix socket cannot
            // silently lose its peer.
            let idle = hb.interval.max(Duration::from_secs(1));
            conn.keepalives_idle
                .get_or_insert(Duration::from_secs(idle.as_secs()));
            conn.keepalives_interval
                .get_or_insert(Duration::from_secs(1));
            conn.keepalives_count.get_or_insert(3);
            conn.tcp_user_timeout
                .get_or_insert(hb.interval + hb.timeout);
        }
        let connect_timeout = args
            .connect_timeout
            .or(conn.connect_timeout)
            .unwrap_or(conninfo::DEFAULT_CONNECT_TIMEOUT);
        let application_name = conn
            .application_name
            .clone()
            .unwrap_or_else(|| appname::format(label, &host_name(), std::process::id()));
        let database_for_command = given.and(conn.database_without_password.clone());
        Ok(Connection {
            conn,
            connect_timeout,
            application_name,
            database_for_command,
        })
    }
}

impl Connection {
    /// Connects. Warnings about these settings (a password file ignored for its permissions)
    /// are printed once connected; when the connection fails they lead its error instead, so
    /// that a failure carries its reason even under -q, and the warning is not said twice.
    pub fn open(&self) -> Result<crate::db::Conn> {
        match crate::db::connect(self) {
            Ok(conn) => {
                for warning in &self.conn.warnings {
                    crate::log::warn(warning);
                }
                Ok(conn)
            }
            Err(err) if self.conn.warnings.is_empty() => Err(err),
            Err(err) => Err(err.context(self.conn.warnings.join("; "))),
        }
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

impl Level {
    pub fn from_args(args: &OutputArgs) -> Level {
        if args.quiet {
            Level::Quiet
        } else if args.debug || args.verbose >= 2 {
            Level::Debug
        } else if args.verbose == 1 {
            Level::Verbose
        } else {
            Level::Normal
        }
    }
}

/// Everything a run needs.
#[derive(Debug)]
pub struct Settings {
    pub connection: Connection,
    pub lock: LockTarget,
    pub mode: Mode,
    /// `None`: do not wait for a busy lock.
    pub wait: Option<Wait>,
    pub command: Vec<OsString>,
    pub timeout: Option<Duration>,
    pub kill_after: Duration,
    pub busy_exit_code: u8,
    pub heartbeat: Option<Heartbeat>,
    /// `--lock-delay`; None: the default, which `lockdelay::length` derives.
    pub lock_delay: Option<Duration>,
    /// Keep the lock at least this long after taking it.
    pub min_hold: Option<Duration>,
    /// The environment says this heimdall runs inside a command that already holds the same
    /// lock, the same way, and names that command's heimdall and its mode; still to be proved
    /// ([`crate::reentry`]).
    pub reentrant: Option<crate::reentry::Outer>,
    /// `--lease-table`: hold a lease row instead of an advisory lock.
    pub lease: Option<LeaseMode>,
    pub level: Level,
}

/// Lease mode's table and timing.
#[derive(Debug, Clone)]
pub struct LeaseMode {
    pub table: crate::hold::lease::LeaseTable,
    pub timing: crate::hold::lease::LeaseTiming,
}

/// The watchdog's timing: a check every `interval`, each allowed `timeout` for its answer.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Settings {
    /// `lock` is `cli.lock`, parsed: the run's report is labelled with it even when the rest
    /// of the settings fail.
    pub fn from_cli(cli: RunCli, lock: LockTarget) -> Result<Settings> {
        let heartbeat = (!cli.heartbeat.is_zero()).then(|| Heartbeat {
            interval: cli.heartbeat,
            timeout: cli
                .heartbeat_timeout
                .filter(|t| !t.is_zero())
                .unwrap_or(cli.heartbeat),
        });
        let connection = Connection::from_args(&cli.conn, &lock.short(), heartbeat)?;
        let mode = if cli.shared {
            Mode::Shared
        } else {
            Mode::Exclusive
        };
        let lease = match cli.lease.lease_table {
            None => None,
            Some(_) if mode == Mode::Shared => {
                return Err(anyhow::anyhow!(
                    "--shared is not supported with --lease-table: a lease has one holder"
                ))
                .classify(Failure::Usage);
            }
            Some(table) => Some(LeaseMode {
                table,
                timing: crate::hold::lease::LeaseTiming::new(cli.lease_ttl, cli.kill_after)
                    .map_err(anyhow::Error::msg)
                    .classify(Failure::Usage)?,
            }),
        };
        let table = lease.as_ref().map(|l| &l.table);
        let reentrant = crate::environ::already_held(&lock, table, &connection, |name| {
            std::env::var(name).ok()
        });
        Ok(Settings {
            connection,
            lock,
            mode,
            wait: cli.wait.filter(|w| *w != Wait::Up(Duration::ZERO)),
            command: cli.command,
            timeout: cli.timeout.filter(|t| !t.is_zero()),
            kill_after: cli.kill_after,
            busy_exit_code: cli.busy_exit_code,
            heartbeat,
            lock_delay: cli.lock_delay,
            min_hold: cli.min_hold.filter(|d| !d.is_zero()),
            reentrant,
            lease,
            level: Level::from_args(&cli.output),
        })
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it unless
    // the name is truncated, and the last byte stays 0 because we pass len - 1.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if rc != 0 {
        return "unknown-host".to_owned();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned())
}

/// libpq's default user and home directory: the effective user's entry in the password database.
fn os_user() -> (Option<String>, Option<PathBuf>) {
    let mut buf = vec![0u8; 4096];
    // SAFETY: passwd is plain data; getpwuid_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call; getpwuid_r writes strings into `buf`, which
    // outlives the CStrs read below.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return (std::env::var("USER").ok(), None);
    }
    // SAFETY: on success both fields point to NUL-terminated strings inside `buf`.
    let (name, home) = unsafe { (CStr::from_ptr(pwd.pw_name), CStr::from_ptr(pwd.pw_dir)) };
    (
        Some(name.to_string_lossy().into_owned()),
        Some(PathBuf::from(home.to_string_lossy().into_owned())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_descriptions_name_keys_and_slots() {
        let target = |names: Option<(&str, &str)>, slots| LockTarget {
            key: LockKey::Pair(1, 2),
            names: names.map(|(a, b)| (a.to_owned(), b.to_owned())),
            slots,
        };
        assert_eq!(target(Some(("a", "b")), 1).describe(), "a/b (keys 1,2)");
        assert_eq!(
            target(Some(("a", "b")), 3).describe(),
            "a/b (keys 1,2, 3 slots)"
        );
        assert_eq!(target(None, 1).describe(), "key 1,2");
        assert_eq!(target(None, 3).describe(), "key 1,2 (3 slots)");
    }
}
