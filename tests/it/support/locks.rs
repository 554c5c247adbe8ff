//! What `pg_locks` shows of an advisory lock: its ids ([`LockId`]), from the command's
//! `HEIMDALL_KEY` or from `heimdall key --json`, and the backends that hold it ([`holders`]) or
//! are queued for it ([`waiters`]). Every test asks `pg_locks` through these, in one form.
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use serde_json::Value;

use super::{heimdall, text};

/// One advisory lock as `pg_locks` shows it: two int4 keys as unsigned oids with objsubid 2,
/// or a bigint key split into its high and low halves with objsubid 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockId {
    pub classid: u32,
    pub objid: u32,
    pub objsubid: i16,
}

impl LockId {
    /// The lock of the two int4 keys `A,B`, `HEIMDALL_KEY`'s form (a trailing newline is fine).
    pub fn from_key(key: &str) -> LockId {
        let (a, b) = key
            .trim()
            .split_once(',')
            .unwrap_or_else(|| panic!("HEIMDALL_KEY is A,B, not {key:?}"));
        let (a, b): (i32, i32) = (a.parse().unwrap(), b.parse().unwrap());
        LockId {
            classid: a as u32,
            objid: b as u32,
            objsubid: 2,
        }
    }

    /// Slot 0 of `namespace/name`, the plain lock.
    pub fn of(namespace: &str, name: &str) -> LockId {
        LockId::slots(namespace, name, 1)[0]
    }

    /// Each slot of `namespace/name` with `--slots slots`, as `heimdall key --json` documents
    /// them (the key vectors themselves are pinned in modes.rs).
    pub fn slots(namespace: &str, name: &str, slots: u16) -> Vec<LockId> {
        LockId::listed(namespace, name, "--slots", slots, "slots")
    }

    /// Each waiting place of `namespace/name` with `--queue places`, as `heimdall key --json
    /// --queue N` documents them (the key vectors themselves are pinned in `domain/key.rs`):
    /// bigint keys, so `objsubid` 1.
    pub fn places(namespace: &str, name: &str, places: u16) -> Vec<LockId> {
        LockId::listed(namespace, name, "--queue", places, "places")
    }

    /// The locks `heimdall key --json FLAG N` lists under `field`.
    fn listed(namespace: &str, name: &str, flag: &str, n: u16, field: &str) -> Vec<LockId> {
        let out = heimdall()
            .args(["key", "--namespace", namespace, "--name", name, "--json"])
            .args([flag, &n.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "heimdall key {flag} failed: {}",
            text(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        json[field]
            .as_array()
            .unwrap_or_else(|| panic!("heimdall key --json lists no {field}: {json}"))
            .iter()
            .map(|s| LockId {
                classid: s["classid"].as_u64().unwrap() as u32,
                objid: s["objid"].as_u64().unwrap() as u32,
                objsubid: s["objsubid"].as_i64().unwrap() as i16,
            })
            .collect()
    }
}

/// The backends that hold `id`, by pid.
pub fn holders(client: &mut postgres::Client, id: LockId) -> Vec<i32> {
    backends(client, id, true)
}

/// The backends queued for `id` (an ungranted row each), by pid.
pub fn waiters(client: &mut postgres::Client, id: LockId) -> Vec<i32> {
    backends(client, id, false)
}

fn backends(client: &mut postgres::Client, id: LockId, granted: bool) -> Vec<i32> {
    client
        .query(
            "select pid from pg_locks where locktype = 'advisory' and granted = $1 \
             and classid = $2::text::oid and objid = $3::text::oid and objsubid = $4 \
             order by pid",
            &[
                &granted,
                &id.classid.to_string(),
                &id.objid.to_string(),
                &id.objsubid,
            ],
        )
        .unwrap_or_else(|e| panic!("cannot read pg_locks: {e}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}
