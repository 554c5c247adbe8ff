//! What `list` can say of a held advisory key from its holder's `application_name`: the lock's
//! names, but only once they hash to the key.

use crate::domain::appname;
use crate::domain::key::{Hash, LockKey};

/// The highest slot number: `--slots` allows at most 1000.
const MAX_SLOT: u16 = 999;
/// The highest `--queue` place: `--queue` allows at most 1000.
const MAX_PLACE: u16 = 999;

/// What `list` can say of a held key from the label in its holder's application_name. The key
/// is the truth and the label only a claim: a name is printed only once it hashes to the key.
#[derive(Debug, PartialEq, Eq)]
pub enum Named {
    /// `lock` (`NS/NAME` or `key K`) hashes to the key, in `slot` of it.
    Known {
        lock: String,
        names: Option<(String, String)>,
        slot: u16,
    },
    /// The label was cut to fit application_name; its beginning, marked with `~`.
    Cut(String),
    /// The key is not the lock's but a waiter's: a `--queue` place or a takeover request
    /// (`--replace`, `heimdall stop`) on `lock`. Not a holder, so `list` leaves it out.
    Waiter { lock: String },
    /// The label does not hash to the key: written by another program, or by a heimdall that
    /// let PostgreSQL turn the name's non-ASCII characters into `?`.
    Unknown,
}

impl Named {
    pub fn why(&self) -> &'static str {
        match self {
            Named::Known { .. } | Named::Waiter { .. } => "",
            Named::Cut(_) => "the names were cut to fit application_name's 63 bytes",
            Named::Unknown => "the names in application_name do not hash to the key",
        }
    }
}

/// Finds the lock behind `label` (`key K` or `NS/NAME`, percent-encoded by `appname`) and the
/// slot of it that `key` is: every split at a `/` (a namespace may hold one), with either
/// --hash (the label does not say which), and slots 0 to 999.
pub fn identify(label: &str, key: LockKey) -> Named {
    if let Some(start) = label.strip_suffix('~') {
        let bytes = appname::decode(start).unwrap_or_else(|| start.as_bytes().to_vec());
        let start = String::from_utf8_lossy(&bytes);
        return Named::Cut(format!("{}~", start.trim_end_matches('\u{fffd}')));
    }
    let slot_of = |base: LockKey| (0..=MAX_SLOT).find(|i| base.slot(*i) == key);
    // Places and requests are bigint keys: a pair is neither, and needs no thousand hashes.
    let waits_on = |base: LockKey| {
        matches!(key, LockKey::Single(_))
            && (base.request() == key || (0..=MAX_PLACE).any(|i| base.place(i) == key))
    };
    // A label a heimdall wrote before the encoding is tried as it is, too.
    let decoded = appname::decode(label).and_then(|b| String::from_utf8(b).ok());
    for text in decoded.iter().map(String::as_str).chain([label]) {
        let by_key = text.strip_prefix("key ").and_then(|k| k.parse().ok());
        if by_key.is_some_and(waits_on) {
            let lock = text.to_owned();
            return Named::Waiter { lock };
        }
        if let Some(slot) = by_key.and_then(slot_of) {
            let lock = text.to_owned();
            return Named::Known {
                lock,
                names: None,
                slot,
            };
        }
        for (at, _) in text.match_indices('/') {
            let (ns, name) = (&text[..at], &text[at + 1..]);
            for hash in [Hash::Siphash, Hash::Fnv1] {
                let base = LockKey::derive(hash, ns, name);
                if waits_on(base) {
                    let lock = text.to_owned();
                    return Named::Waiter { lock };
                }
                if let Some(slot) = slot_of(base) {
                    let names = Some((ns.to_owned(), name.to_owned()));
                    let lock = text.to_owned();
                    return Named::Known { lock, names, slot };
                }
            }
        }
    }
    Named::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_of(label: &str, key: LockKey) -> Option<u16> {
        match identify(label, key) {
            Named::Known { slot, .. } => Some(slot),
            _ => None,
        }
    }

    #[test]
    fn slots_are_found_from_the_label_whatever_the_hash() {
        let siphash = LockKey::derive(Hash::Siphash, "a/b", "c");
        assert_eq!(slot_of("a/b/c", siphash.slot(7)), Some(7));
        assert_eq!(slot_of("a/b/c", siphash), Some(0));
        let fnv1 = LockKey::derive(Hash::Fnv1, "joker", "test");
        assert_eq!(slot_of("joker/test", fnv1.slot(999)), Some(999));
        assert_eq!(slot_of("key 42", LockKey::Single(45)), Some(3));
        assert_eq!(slot_of("key 1,2", LockKey::Pair(1, 4)), Some(2));
        assert_eq!(slot_of("joker/te~", fnv1), None);
        assert_eq!(slot_of("key 42", LockKey::Single(41)), None);
    }

    #[test]
    fn a_waiters_queue_place_or_takeover_request_is_named_as_a_waiters_not_a_holders() {
        let key = LockKey::derive(Hash::Siphash, "ns", "job");
        let waiter = |k| identify("ns/job", k);
        let of = |lock: &str| Named::Waiter {
            lock: lock.to_owned(),
        };
        assert_eq!(waiter(key.place(0)), of("ns/job"));
        assert_eq!(waiter(key.place(999)), of("ns/job"));
        assert_eq!(waiter(key.request()), of("ns/job"));
        let single = LockKey::Single(42);
        assert_eq!(identify("key 42", single.request()), of("key 42"));
        assert_eq!(identify("key 42", single.place(3)), of("key 42"));
        assert!(matches!(waiter(key), Named::Known { slot: 0, .. }));
    }

    #[test]
    fn names_come_from_the_split_that_hashes_to_the_key_or_not_at_all() {
        let key = LockKey::derive(Hash::Siphash, "a/b", "c");
        let Named::Known { names, lock, .. } = identify("a/b/c", key) else {
            panic!("a/b/c not found");
        };
        assert_eq!(names, Some(("a/b".to_owned(), "c".to_owned())));
        assert_eq!(lock, "a/b/c");
        let key = LockKey::derive(Hash::Siphash, "ns", "jöb 100%");
        let encoded = appname::encode("ns/jöb 100%");
        let Named::Known { names, .. } = identify(&encoded, key) else {
            panic!("{encoded} not found");
        };
        assert_eq!(names, Some(("ns".to_owned(), "jöb 100%".to_owned())));
        assert_eq!(
            identify("ns/j?b 100%", key),
            Named::Unknown,
            "PostgreSQL's '?'"
        );
        assert_eq!(identify("ns/other", key), Named::Unknown);
        assert_eq!(
            identify("ns/j%C3%B6%C3~", key),
            Named::Cut("ns/jö~".to_owned()),
            "a cut character is dropped"
        );
    }
}
