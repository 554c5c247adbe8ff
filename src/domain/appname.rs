//! The `application_name` heimdall gives its own connections, `heimdall NS/NAME @HOST pid PID`:
//! written here, matched here (`heimdall list` finds heimdall's locks by it) and parsed back
//! here (the holder's host and pid in `status` and `list`). One format, kept in one place.
//!
//! PostgreSQL keeps only printable ASCII in application_name (anything else becomes `?`) and
//! 63 bytes of it, so the label carries the names percent-encoded: every byte outside
//! printable ASCII, and `%` itself, is written `%XX` ([`encode`], [`decode`]). A `/` is not
//! encoded, to keep the label readable in `pg_stat_activity`: where it splits a namespace that
//! has one of its own is for the reader to find out from the key (`inspect`), which is the
//! truth; the label is only a claim.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};

/// PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes.
const APPLICATION_NAME_MAX: usize = 63;

const PREFIX: &str = "heimdall ";

/// What [`format`] writes, as an SQL `LIKE` pattern.
pub const LIKE: &str = "heimdall % @% pid %";

/// `heimdall billing/nightly @web-3 pid 4211`, within the 63 bytes PostgreSQL keeps. When it
/// is too long, the lock label (then the host) is shortened, never the pid: a cut pid would
/// name another process. Cuts fall on character boundaries and are marked with `~`.
pub fn format(label: &str, host: &str, pid: u32) -> String {
    let label = encode(label);
    let pid_part = format!(" pid {pid}");
    // Room for "heimdall " + label + " @" + host + " pid N".
    let room = APPLICATION_NAME_MAX - PREFIX.len() - 2 - pid_part.len();
    let host = cut(
        host,
        room.saturating_sub(label.len().min(room / 2)).max(room / 2),
    );
    let label = cut(&label, room - host.len());
    format!("{PREFIX}{label} @{host}{pid_part}")
}

/// `text` if it fits in `max` bytes, else its longest prefix that does with a `~` appended.
/// The cut falls on a character boundary and never inside a `%XX` escape.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Some(at) = text[..end].rfind('%').filter(|at| end - at < 3) {
        end = at;
    }
    format!("{}~", &text[..end])
}

/// What [`encode`] escapes: controls and DEL, `%` itself, and (always, in the crate) every byte
/// beyond ASCII.
const ESCAPED: &AsciiSet = &CONTROLS.add(b'%');

/// `label` as application_name can carry it: printable ASCII but `%` as is, every other byte
/// (controls, UTF-8 beyond ASCII) as `%XX`.
pub fn encode(label: &str) -> String {
    utf8_percent_encode(label, ESCAPED).to_string()
}

/// The bytes [`encode`] was given; `None` when a `%` is not followed by two hex digits. A
/// label written by a heimdall before the encoding, with a `%` of its own, may decode to
/// something else: the key tells.
pub fn decode(label: &str) -> Option<Vec<u8>> {
    let well_formed = label.split('%').skip(1).all(|rest| {
        rest.get(..2)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    well_formed.then(|| percent_decode_str(label).collect())
}

/// Splits heimdall's application_name into the lock label, host and heimdall's pid.
pub fn parse(app: &str) -> Option<(String, String, u32)> {
    let rest = app.strip_prefix(PREFIX)?;
    let (label, tail) = rest.rsplit_once(" @")?;
    let (host, pid) = tail.rsplit_once(" pid ")?;
    Some((label.to_owned(), host.to_owned(), pid.parse().ok()?))
}

/// Who a session is, for a message: `heimdall on web-3 (pid 4211)` when its application_name
/// is heimdall's, else its backend pid and application_name as they are.
pub fn who(application_name: Option<&str>, backend_pid: i32) -> String {
    match application_name.and_then(parse) {
        Some((_, host, pid)) => format!("heimdall on {host} (pid {pid})"),
        None => match application_name.filter(|a| !a.is_empty()) {
            Some(app) => format!("backend pid {backend_pid} (\"{app}\")"),
            None => format!("backend pid {backend_pid}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_names_lock_host_and_pid() {
        assert_eq!(
            format("joker/test", "web-3", 4211),
            "heimdall joker/test @web-3 pid 4211"
        );
    }

    #[test]
    fn names_are_carried_as_printable_ascii_and_come_back_whole() {
        for label in ["a/b/c", "ns/é-ü", "100%/x\ny\u{1b}", "key 1,2", "?/ "] {
            let encoded = encode(label);
            assert!(
                encoded.bytes().all(|b| (b' '..=b'~').contains(&b)),
                "{encoded}"
            );
            assert_eq!(decode(&encoded).as_deref(), Some(label.as_bytes()));
        }
        assert_eq!(encode("a/b é%"), "a/b %C3%A9%25");
        assert_eq!(decode("50%"), None);
        assert_eq!(decode("50%zz"), None);
    }

    #[test]
    fn a_long_application_name_keeps_the_pid_and_cuts_on_a_character_boundary() {
        let name = format(&"é".repeat(40), "h", 4_194_304);
        assert!(name.len() <= 63, "{name}");
        assert!(name.len() >= 59, "cut as late as possible: {name}");
        assert!(name.starts_with("heimdall %C3%A9%C3%A9"), "{name}");
        assert!(name.ends_with("~ @h pid 4194304"), "{name}");
        let label = parse(&name).unwrap().0;
        assert!(
            label.trim_end_matches('~').len().is_multiple_of(3),
            "no escape is cut: {name}"
        );
        let name = format("a/b", &"h".repeat(80), 7);
        assert!(
            name.len() <= 63 && name.starts_with("heimdall a/b @hhh"),
            "{name}"
        );
        assert!(name.ends_with("~ pid 7"), "{name}");
        let name = format(&"n".repeat(60), &"h".repeat(60), 99);
        assert!(
            name.len() <= 63 && name.ends_with(" pid 99") && name.contains(" @h"),
            "{name}"
        );
    }

    #[test]
    fn a_session_is_named_by_host_and_pid_when_it_is_heimdall() {
        let app = format("a/b", "web-3", 4211);
        assert_eq!(who(Some(&app), 7), "heimdall on web-3 (pid 4211)");
        assert_eq!(who(Some("psql"), 7), "backend pid 7 (\"psql\")");
        assert_eq!(who(None, 7), "backend pid 7");
    }

    #[test]
    fn application_names_split_into_lock_host_and_pid() {
        assert_eq!(
            parse("heimdall billing/x @web-3 pid 4211"),
            Some(("billing/x".into(), "web-3".into(), 4211))
        );
        assert_eq!(
            parse("heimdall key 1,2 @h pid 7"),
            Some(("key 1,2".into(), "h".into(), 7))
        );
        assert_eq!(parse("psql"), None);
    }

    #[test]
    fn what_is_written_is_parsed_back_and_matched_by_the_like_pattern() {
        for (label, host, pid) in [
            ("billing/nightly", "web-3", 4211),
            ("key 1,2", "h", 7),
            ("a @b pid 3/c", "host pid 9", 4_194_304),
            (&*"é".repeat(40), "h", 1),
        ] {
            let name = format(label, host, pid);
            let (l, h, p) = parse(&name).expect(&name);
            assert_eq!(p, pid, "{name}");
            assert!(encode(label).starts_with(l.trim_end_matches('~')), "{name}");
            assert!(host.starts_with(h.trim_end_matches('~')), "{name}");
            assert!(like(LIKE, &name), "{name} does not match {LIKE}");
        }
        assert!(!like(LIKE, "psql"));
    }

    /// SQL `LIKE` with `%` only, enough for [`LIKE`].
    fn like(pattern: &str, text: &str) -> bool {
        let parts: Vec<&str> = pattern.split('%').collect();
        let (first, rest) = parts.split_first().unwrap();
        let Some(mut text) = text.strip_prefix(first) else {
            return false;
        };
        for (i, part) in rest.iter().enumerate() {
            if i == rest.len() - 1 {
                return text.ends_with(part);
            }
            match text.find(part) {
                Some(at) => text = &text[at + part.len()..],
                None => return false,
            }
        }
        text.is_empty()
    }
}
