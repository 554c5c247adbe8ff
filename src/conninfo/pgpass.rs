//! libpq's password file (`~/.pgpass`, `PGPASSFILE`, `passfile=`): finding the file, refusing it
//! when others can read it, and matching `hostname:port:database:username:password` lines.
//! See <https://www.postgresql.org/docs/current/libpq-pgpass.html>.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{PasswordSource, SOCKET_DIRS, Secret};

/// The connection a password is looked up for.
pub struct Login<'a> {
    pub first_host: Option<&'a str>,
    pub first_hostaddr: Option<IpAddr>,
    pub port: u16,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// The password for `login` from the file at `path`, and where it came from; `Err` is the
/// warning for a file that others can read, which libpq ignores. Only the first host is
/// looked up, as the connection string names it (or its address, or `localhost`); libpq tries
/// `localhost` for the default socket directory as well.
pub fn password_for(
    path: &Path,
    login: &Login<'_>,
) -> Result<(Option<Secret>, PasswordSource), String> {
    let port = login.port.to_string();
    let mut candidates = match (login.first_host, login.first_hostaddr) {
        (Some(h), _) => vec![h.to_owned()],
        (None, Some(a)) => vec![a.to_string()],
        (None, None) => vec!["localhost".to_owned()],
    };
    if login.first_host.is_some_and(|h| SOCKET_DIRS.contains(&h)) {
        candidates.push("localhost".to_owned());
    }
    let target = Target {
        hosts: candidates.iter().map(String::as_str).collect(),
        port: &port,
        dbname: login.dbname,
        user: login.user,
    };
    match lookup(path, &target) {
        Lookup::Found { password, line } => Ok((
            Some(Secret(password)),
            PasswordSource::PassFile {
                path: path.to_owned(),
                line,
            },
        )),
        Lookup::Insecure => Err(format!(
            "password file {} has group or world access and is ignored; permissions should be u=rw (0600) or less",
            path.display()
        )),
        Lookup::NoMatch | Lookup::Missing => Ok((None, PasswordSource::None)),
    }
}

/// What a lookup needs to know about the connection.
pub struct Target<'a> {
    /// Host names the file's first field may match (libpq tries `localhost` for the default
    /// socket directory as well as the directory itself).
    pub hosts: Vec<&'a str>,
    pub port: &'a str,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// The result of a lookup, with enough context for `-v` to explain it.
pub enum Lookup {
    Found {
        password: String,
        line: usize,
    },
    NoMatch,
    Missing,
    /// libpq ignores a password file that the group or others can access; so do we, with the
    /// same warning.
    Insecure,
}

/// libpq's default: `$HOME/.pgpass`, with the home directory from the password database when
/// `HOME` is unset.
pub fn default_path(home: Option<PathBuf>) -> Option<PathBuf> {
    home.map(|h| h.join(".pgpass"))
}

pub fn lookup(path: &Path, target: &Target<'_>) -> Lookup {
    let Ok(meta) = std::fs::metadata(path) else {
        return Lookup::Missing;
    };
    if !meta.is_file() {
        return Lookup::Missing;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Lookup::Insecure;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Lookup::Missing;
    };
    find(&text, target)
}

fn find(text: &str, target: &Target<'_>) -> Lookup {
    for (index, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some([host, port, dbname, user, password]) = split_fields(line) else {
            continue;
        };
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if target.hosts.iter().any(|h| matches(&host, h))
            && matches(&port, target.port)
            && matches(&dbname, target.dbname)
            && matches(&user, target.user)
        {
            return Lookup::Found {
                password,
                line: index + 1,
            };
        }
    }
    Lookup::NoMatch
}

/// Splits on unescaped colons; `\:` and `\\` stand for themselves. The password, the last field,
/// takes the rest of the line.
fn split_fields(line: &str) -> Option<[String; 5]> {
    let mut fields: Vec<String> = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut()?.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut()?.push(c),
        }
    }
    fields.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target<'a>(hosts: Vec<&'a str>) -> Target<'a> {
        Target {
            hosts,
            port: "5432",
            dbname: "app",
            user: "alice",
        }
    }

    fn password(text: &str, t: &Target<'_>) -> Option<(String, usize)> {
        match find(text, t) {
            Lookup::Found { password, line } => Some((password, line)),
            _ => None,
        }
    }

    #[test]
    fn first_matching_line_wins_and_wildcards_match() {
        let text = "# comment\n\nother:5432:app:alice:no\n*:5432:*:alice:yes\n*:*:*:*:late\n";
        assert_eq!(
            password(text, &target(vec!["db1"])),
            Some(("yes".into(), 4))
        );
    }

    #[test]
    fn escaped_colons_and_backslashes_are_literal() {
        let text = r"db1:5432:app:alice:pa\:ss\\word:tail";
        assert_eq!(
            password(text, &target(vec!["db1"])),
            Some((r"pa:ss\word:tail".into(), 1))
        );
    }

    #[test]
    fn short_lines_and_other_users_do_not_match() {
        let text = "db1:5432:app\ndb1:5432:app:bob:x\n";
        assert_eq!(password(text, &target(vec!["db1"])), None);
    }

    #[test]
    fn socket_connections_can_match_localhost() {
        let text = "localhost:5432:app:alice:sock\n";
        assert_eq!(
            password(text, &target(vec!["/var/run/postgresql", "localhost"])),
            Some(("sock".into(), 1))
        );
    }
}
