//! What is locked and how: the lock's keys, names and slots ([`LockTarget`]), its [`Mode`], and
//! how long to [`Wait`] for it when it is busy. Built once from the command line (`config`);
//! read everywhere after.

use std::time::{Duration, Instant};

use super::key::LockKey;

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

/// How long to wait for a busy lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Forever,
    Up(Duration),
}

impl Wait {
    /// When a wait that began at `started` gives up; `None`: never. The advisory lock's wait in
    /// the server's queue and a lease's polling both count from here. A deadline past the
    /// clock's end never comes, as for `--timeout` (a `--wait` is at most a year, so that is
    /// only a guard).
    pub fn deadline(self, started: Instant) -> Option<Instant> {
        match self {
            Wait::Forever => None,
            Wait::Up(d) => started.checked_add(d),
        }
    }
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

    #[test]
    fn a_wait_ends_at_its_deadline_or_never() {
        let now = Instant::now();
        assert_eq!(Wait::Forever.deadline(now), None);
        let five = Duration::from_secs(5);
        assert_eq!(Wait::Up(five).deadline(now), Some(now + five));
        assert_eq!(Wait::Up(Duration::MAX).deadline(now), None);
    }
}
