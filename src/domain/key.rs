//! Lock key derivation: how a namespace and a name become PostgreSQL advisory-lock keys.
//!
//! This is public interface. Two binaries that derive different keys for the same name do not
//! exclude each other, so every hash here is pinned by test vectors and must never change.
//! Nothing here talks to the database.

use std::fmt;

use siphasher::sip::SipHasher24;

/// Which function turns a namespace and a name into the two `int4` keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Hash {
    /// SipHash-2-4 with the all-zero key over the raw UTF-8 bytes; low 32 bits.
    Siphash,
    /// 32-bit FNV-1 (not FNV-1a), bit-identical to the Go heimdall.
    Fnv1,
}

impl Hash {
    /// The name `--hash` takes.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Siphash => "siphash",
            Hash::Fnv1 => "fnv1",
        }
    }

    pub fn key(self, text: &str) -> i32 {
        match self {
            Hash::Siphash => siphash_low32(text.as_bytes()),
            Hash::Fnv1 => fnv1_32(text.as_bytes()),
        }
    }
}

/// The key of one advisory lock, in one of PostgreSQL's two key spaces. The spaces never
/// collide: `pg_locks` tells them apart by `objsubid` (1 for the bigint form, 2 for the pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKey {
    /// `pg_advisory_lock(int4, int4)`.
    Pair(i32, i32),
    /// `pg_advisory_lock(int8)`.
    Single(i64),
}

impl LockKey {
    pub fn derive(hash: Hash, namespace: &str, name: &str) -> LockKey {
        LockKey::Pair(hash.key(namespace), hash.key(name))
    }

    /// The key of slot `i` of a `--slots` semaphore: the second key plus `i` (wrapping), or the
    /// bigint plus `i`. Slot 0 is the lock itself, so `--slots 1` is the plain lock and every
    /// slotted run excludes a plain run of the same name while it holds slot 0.
    pub fn slot(self, i: u16) -> LockKey {
        match self {
            LockKey::Pair(a, b) => LockKey::Pair(a, b.wrapping_add(i32::from(i))),
            LockKey::Single(k) => LockKey::Single(k.wrapping_add(i64::from(i))),
        }
    }

    /// The key of waiting place `i` of a `--queue` bound on the lock whose key is this one
    /// (slot 0's, with `--slots`): the bigint key whose 64 bits are SipHash-2-4 with key (0, 0)
    /// over the UTF-8 text `heimdall queue KEYS I`, KEYS as `--key` takes them (`A,B` or `N`)
    /// and I in decimal. The bigint form (`objsubid` 1) keeps places off every `--slots` key of a
    /// named lock (the pair form); a hash, off any bigint an application picks, but by a chance
    /// of one in 2^64 per key; the text's prefix, off the keys of another tool that hashes the
    /// same numbers.
    pub fn place(self, i: u16) -> LockKey {
        let text = format!("heimdall queue {self} {i}");
        LockKey::Single(SipHasher24::new_with_keys(0, 0).hash(text.as_bytes()) as i64)
    }

    /// The key of the takeover request on the lock whose key is this one (`--replace`,
    /// `heimdall stop`): the bigint key whose 64 bits are SipHash-2-4 with key (0, 0) over the
    /// UTF-8 text `heimdall replace KEYS`, KEYS as `--key` takes them. A replacer holds it, in
    /// shared mode, in the transaction that waits for the lock, so the request goes with the wait;
    /// the holder's heartbeat looks for it in `pg_locks`. Kept off the other keys as
    /// [`LockKey::place`]'s are.
    pub fn request(self) -> LockKey {
        let text = format!("heimdall replace {self}");
        LockKey::Single(SipHasher24::new_with_keys(0, 0).hash(text.as_bytes()) as i64)
    }

    /// The argument list for the `pg_*advisory*` functions. Integers only, so it is safe to put
    /// into a simple-protocol query, which saves the round trip of a prepared statement.
    pub fn sql_args(self) -> String {
        match self {
            LockKey::Pair(a, b) => format!("{a},{b}"),
            LockKey::Single(k) => format!("{k}"),
        }
    }

    /// How the lock shows in `pg_locks`: `(classid, objid, objsubid)`. The keys are stored as
    /// unsigned oids; a bigint key is split into its high and low 32 bits.
    pub fn pg_locks_ids(self) -> (u32, u32, i16) {
        match self {
            LockKey::Pair(a, b) => (a as u32, b as u32, 2),
            LockKey::Single(k) => ((k >> 32) as u32, k as u32, 1),
        }
    }

    /// SQL: whether `row`, a row of `pg_locks` (or `pg_lock_status()`), is this key's lock, by
    /// its [`LockKey::pg_locks_ids`]. Every operator and cast is schema-qualified, so that no
    /// `search_path` can change what it means.
    pub fn pg_locks_condition(self, row: &str) -> String {
        let (classid, objid, objsubid) = self.pg_locks_ids();
        let eq = "OPERATOR(pg_catalog.=)";
        format!(
            "({row}.classid {eq} {classid}::pg_catalog.oid AND {row}.objid {eq} {objid}::pg_catalog.oid \
             AND {row}.objsubid {eq} {objsubid}::pg_catalog.int2)"
        )
    }
}

/// Formats as `--key` accepts it back (and as `HEIMDALL_KEY` carries it): `N` or `A,B`.
impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKey::Pair(a, b) => write!(f, "{a},{b}"),
            LockKey::Single(k) => write!(f, "{k}"),
        }
    }
}

impl std::str::FromStr for LockKey {
    type Err = String;

    fn from_str(s: &str) -> Result<LockKey, String> {
        let bad = || {
            format!("'{s}' is not a lock key: expected a bigint (e.g. 42) or two int4 (e.g. 1,2)")
        };
        match s.split_once(',') {
            Some((a, b)) => {
                let a = a.trim().parse().map_err(|_| bad())?;
                let b = b.trim().parse().map_err(|_| bad())?;
                Ok(LockKey::Pair(a, b))
            }
            None => s.trim().parse().map(LockKey::Single).map_err(|_| bad()),
        }
    }
}

/// Hashes the bytes themselves. Rust's `Hash for str` would append a 0xFF terminator and change
/// every key.
fn siphash_low32(bytes: &[u8]) -> i32 {
    SipHasher24::new_with_keys(0, 0).hash(bytes) as u32 as i32
}

fn fnv1_32(bytes: &[u8]) -> i32 {
    const OFFSET_BASIS: u32 = 2_166_136_261;
    const PRIME: u32 = 16_777_619;
    // FNV-1 multiplies, then xors; FNV-1a does it the other way round. The Go tool used FNV-1.
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        hash.wrapping_mul(PRIME) ^ u32::from(b)
    }) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_the_published_vectors() {
        for (text, key) in [
            ("joker", 614772915),
            ("test", -849833650),
            ("heimdall", -1723526308),
            ("", 1937178839),
            ("nightly-backup", 624393788),
        ] {
            assert_eq!(Hash::Siphash.key(text), key, "siphash of {text:?}");
        }
    }

    #[test]
    fn fnv1_matches_the_go_tool() {
        for (text, key) in [
            ("joker", 856429646),
            ("test", -1137964055),
            ("heimdall", 1421297779),
            ("nightly-backup", 345143511),
        ] {
            assert_eq!(Hash::Fnv1.key(text), key, "fnv1 of {text:?}");
        }
    }

    #[test]
    fn namespace_and_name_give_the_pair() {
        assert_eq!(
            LockKey::derive(Hash::Siphash, "joker", "test"),
            LockKey::Pair(614772915, -849833650)
        );
    }

    #[test]
    fn keys_parse_and_print_back() {
        assert_eq!("42".parse(), Ok(LockKey::Single(42)));
        assert_eq!("-1,2".parse(), Ok(LockKey::Pair(-1, 2)));
        assert_eq!(LockKey::Pair(-1, 2).to_string(), "-1,2");
        assert!("1,2,3".parse::<LockKey>().is_err());
        assert!("2147483648,1".parse::<LockKey>().is_err());
        assert!("x".parse::<LockKey>().is_err());
    }

    #[test]
    fn slot_keys_follow_the_documented_vectors() {
        let joker_test = LockKey::derive(Hash::Siphash, "joker", "test");
        assert_eq!(joker_test.slot(0), joker_test);
        assert_eq!(joker_test.slot(1), LockKey::Pair(614772915, -849833649));
        assert_eq!(joker_test.slot(2), LockKey::Pair(614772915, -849833648));
        assert_eq!(
            LockKey::Pair(1, i32::MAX).slot(1),
            LockKey::Pair(1, i32::MIN)
        );
        assert_eq!(LockKey::Single(41).slot(1), LockKey::Single(42));
    }

    #[test]
    fn place_keys_follow_the_documented_vectors() {
        let joker_test = LockKey::derive(Hash::Siphash, "joker", "test");
        // Checked against an independent SipHash-2-4 of the text.
        assert_eq!(joker_test.place(0), LockKey::Single(5153113288598006574));
        assert_eq!(joker_test.place(1), LockKey::Single(-530299362065820428));
        assert_eq!(
            LockKey::Single(42).place(0),
            LockKey::Single(-6068736911779686817)
        );
        assert_eq!(
            joker_test.place(0).pg_locks_ids(),
            (1199802683, 3459951406, 1)
        );
        // Every place of a lock differs from the others and from every slot of it.
        let places: Vec<LockKey> = (0..1000).map(|i| joker_test.place(i)).collect();
        for (i, place) in places.iter().enumerate() {
            assert!(matches!(place, LockKey::Single(_)), "{place:?}");
            assert!(!places[..i].contains(place), "place {i} repeats");
        }
    }

    #[test]
    fn request_keys_follow_the_documented_vectors() {
        let joker_test = LockKey::derive(Hash::Siphash, "joker", "test");
        assert_eq!(
            joker_test.request(),
            LockKey::Single(-8_278_163_406_523_780_816)
        );
        assert_eq!(
            LockKey::Single(42).request(),
            LockKey::Single(4_518_366_763_238_341_587)
        );
        assert_ne!(joker_test.request(), joker_test.place(0));
        assert_ne!(LockKey::Single(42).request(), LockKey::Single(42).place(0));
    }

    #[test]
    fn pg_locks_shows_keys_as_unsigned_oids() {
        assert_eq!(LockKey::Pair(-1, 2).pg_locks_ids(), (u32::MAX, 2, 2));
        assert_eq!(LockKey::Single((7_i64 << 32) | 9).pg_locks_ids(), (7, 9, 1));
        assert_eq!(LockKey::Single(-1).pg_locks_ids(), (u32::MAX, u32::MAX, 1));
    }
}
