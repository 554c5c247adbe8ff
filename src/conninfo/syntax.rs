//! The two spellings of a connection string: a `postgres://` URL and libpq's `key=value`
//! string, parsed into raw parameters, and written back without the password. Errors never
//! quote a password.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

use super::{DEFAULT_PORT, NOT_YET, PasswordSource, SUPPORTED};

/// `original` with the same settings and no password. A string without a password is kept as
/// it was written; otherwise every parameter but the password is written back as
/// `key='value'`, which [`parse_keyword_value`] reads back to the same values. Both describe
/// the same server, database and user, so a heimdall started under the lock finds the same
/// database (and recognises a lock it already holds), while the password stays with heimdall.
pub fn without_password(original: &str, params: &Params) -> String {
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
pub struct Value {
    pub text: String,
    pub source: PasswordSource,
}

impl Value {
    fn given(text: String) -> Value {
        Value {
            text,
            source: PasswordSource::ConnectionString,
        }
    }
    pub fn env(text: String) -> Value {
        Value {
            text,
            source: PasswordSource::Environment,
        }
    }
}

pub type Params = BTreeMap<String, Value>;

/// What to do about a URL that cannot be parsed and may hold a password: heimdall cannot know
/// where the password ends, so it quotes nothing and says how to write it.
const PERCENT_ENCODE_HINT: &str = "if the password contains special characters (/ ? # @ : % & or spaces), percent-encode them (e.g. / as %2F, @ as %40)";

/// Parses a URL or a key=value string, given as `from` (`--database`, an environment
/// variable), into raw parameters. Errors never quote a password.
pub fn parse(s: &str, from: &str) -> Result<Params> {
    let trimmed = s.trim();
    let params = if let Some(rest) = trimmed
        .strip_prefix("postgresql://")
        .or_else(|| trimmed.strip_prefix("postgres://"))
    {
        parse_url(rest).map_err(|e| {
            if rest.contains('@') {
                anyhow::anyhow!("invalid URL in {from}: {e:#}; {PERCENT_ENCODE_HINT}")
            } else {
                anyhow::anyhow!("invalid URL in {from}: {e:#}")
            }
        })?
    } else if trimmed.contains("://") {
        bail!("invalid URL in {from}: the scheme must be postgres:// or postgresql://")
    } else {
        parse_keyword_value(trimmed)
            .map_err(|e| anyhow::anyhow!("invalid connection string in {from}: {e:#}"))?
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

/// The supported parameter closest to a mistyped `key` (`sslmdoe`: `sslmode`), if one is close
/// enough to be what was meant.
pub fn closest_key(key: &str) -> Option<&'static str> {
    SUPPORTED
        .iter()
        .map(|(k, _)| (strsim::jaro_winkler(key, k), *k))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
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
    // A password in the user part ends before the host (see `split_userinfo`), so a key in the
    // query is no piece of it; one given as `password=` in the query ends at the next '&'.
    let mut password_in_query = false;
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        // Once a password was given, a malformed or unknown pair may be the rest of a password
        // that held an '&' (or a character that cut the URL short): say what is wrong without
        // quoting it, unless it is a typo of a known key after a password in the user part.
        let after_password = out.contains_key("password");
        let Some((k, v)) = pair.split_once('=') else {
            if after_password {
                bail!("a query parameter has no '=value'");
            }
            bail!("query parameter '{pair}' has no '=value'");
        };
        let key = percent_decode(k, "query parameter")?;
        if after_password && !known_key(&key) {
            match closest_key(&key) {
                Some(meant) if !password_in_query => {
                    bail!("unknown query parameter '{key}'; did you mean {meant}?")
                }
                meant => bail!(
                    "an unknown query parameter follows the password{}; percent-encode an '&' in a password as %26",
                    meant.map_or_else(String::new, |k| format!(" (did you mean {k}?)"))
                ),
            }
        }
        password_in_query |= key == "password";
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
            bail!("unterminated '[' in an IPv6 host");
        };
        let host = &rest[..end];
        return match &rest[end + 1..] {
            "" => Ok((host, None)),
            p => match p.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => bail!("unexpected text after ']'"),
            },
        };
    }
    Ok(match spec.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (spec, None),
    })
}

fn percent_decode(s: &str, what: &str) -> Result<String> {
    // The crate passes a malformed escape through as it is; libpq refuses it, and so does
    // heimdall (without quoting it: it may be part of a password).
    let malformed = s.split('%').skip(1).any(|rest| {
        !rest
            .get(..2)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if malformed {
        bail!("bad percent-encoding in the {what}");
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| anyhow::anyhow!("the {what} is not UTF-8"))
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
                "an unknown word follows the password{}; write a password with spaces in single quotes: password='...'",
                closest_key(&key).map_or_else(String::new, |k| format!(" (did you mean {k}?)"))
            );
        }
        if chars.next() != Some('=') {
            bail!("expected '=' after '{key}' (write key=value pairs, or a postgres:// URL)");
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
                        bail!("unterminated quoted value for '{key}'")
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
    use crate::conninfo::tests::resolve_with;
    use crate::conninfo::tls::SslMode;

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
    fn a_mistyped_key_is_named_with_the_closest_one_unless_it_may_be_a_password() {
        let err = |s: &str| format!("{:#}", resolve_with(Some(s), &[]).unwrap_err());
        assert!(!err("colour=blue").contains("did you mean"));
        assert!(
            err("sslmdoe=require")
                .contains("unknown connection option 'sslmdoe'; did you mean sslmode?")
        );
        // A password in the user part ends before the host: a key after it is no piece of it.
        assert!(
            err("postgres://u:pw@h/db?applicaton_name=x").contains(
                "unknown query parameter 'applicaton_name'; did you mean application_name?"
            )
        );
        assert!(err("postgres://u:pw@h/db?colour=blue").contains("follows the password;"));
        // One in the query may have held an '&': the key is not quoted, the closest one is said.
        assert!(
            err("postgres://h/db?password=pw&applicaton_name=x").contains(
                "an unknown query parameter follows the password (did you mean application_name?)"
            )
        );
        assert!(err("mysql://h/db").contains("invalid URL in --database: the scheme"));
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
}
