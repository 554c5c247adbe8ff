//! The statements of the lease protocol, as text: acquire, renew or release, the holders, and
//! the re-entrancy proof. What their answers mean is in `hold/lease/mod.rs`.
//!
//! Every name in them means the same whatever the session's `search_path`: the table is
//! schema-qualified ([`LeaseTable`]), and so is every function, operator and type
//! (`pg_catalog.…`, `OPERATOR(pg_catalog.=)`), since a role or another client of a pooled
//! server connection may put objects of the same names first.

use super::table;
use crate::db::DURABLE_COMMIT;
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::LockTarget;

/// A string literal that means the same whatever `standard_conforming_strings` says.
pub fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `clock_timestamp() + ttl`, on the server's clock.
pub fn expiry(ttl_ms: u128) -> String {
    format!(
        "pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) \
         pg_catalog.make_interval(secs => {ttl_ms}::pg_catalog.float8 OPERATOR(pg_catalog./) 1000)"
    )
}

/// The key of a slot's row: the advisory keys heimdall would use, so `--key`, `--hash` and
/// `--slots` name the same leases as they name advisory locks.
pub fn slot_key(lock: &LockTarget, slot: u16) -> String {
    lock.key.slot(slot).to_string()
}

/// `lock_key = ANY (ARRAY[…])` over every slot of `lock`.
fn any_slot(lock: &LockTarget) -> String {
    let keys: Vec<String> = (0..lock.slots)
        .map(|s| literal(&slot_key(lock, s)))
        .collect();
    format!(
        "lock_key OPERATOR(pg_catalog.=) ANY (ARRAY[{}])",
        keys.join(", ")
    )
}

/// What a lease is taken as.
pub struct Grant<'a> {
    pub key: &'a str,
    pub name: &'a str,
    pub holder: &'a str,
    pub ttl_ms: u128,
}

/// Insert the row, or take it over when it has expired: one statement, on the server's clock,
/// committed durably (a grant lost in a crash would let the next holder in beside this one).
/// With `check`, the statement first checks the table's shape ([`LeaseTable::fits_sql`]) and
/// takes nothing from a table that does not fit. One row: whether the table `fits`, and the
/// `version` taken (NULL when the lease is held).
pub fn acquire(table: &LeaseTable, grant: &Grant, check: bool) -> String {
    let fits = if check {
        table::fits_sql(table)
    } else {
        "true".to_owned()
    };
    format!(
        "{DURABLE_COMMIT}; WITH ok AS (SELECT {fits} AS fits), taken AS (\
         INSERT INTO {t} AS l (lock_key, version, lock_name, holder, acquired_at, expires_at) \
         SELECT {key}, 1, {name}, {holder}, pg_catalog.clock_timestamp(), {expiry} \
         FROM ok WHERE ok.fits \
         ON CONFLICT (lock_key) DO UPDATE SET version = l.version OPERATOR(pg_catalog.+) 1, \
         lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder, \
         acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at \
         WHERE l.expires_at OPERATOR(pg_catalog.<=) pg_catalog.clock_timestamp() \
         RETURNING l.version) \
         SELECT ok.fits, (SELECT version FROM taken) AS version FROM ok",
        t = table.sql(),
        key = literal(grant.key),
        name = literal(grant.name),
        holder = literal(grant.holder),
        expiry = expiry(grant.ttl_ms),
    )
}

/// Sets the row's expiry to `expires_at` only while it carries `version` and `holder`; a row
/// back means it did. The holder too: a row lost with the server (asynchronous replication and a
/// failover) can be granted again with the same version, and must not pass for this one.
/// Durably: a renewal lost in a crash would leave the earlier expiry, before the end of the
/// budget heimdall counts from this renewal.
pub fn update(
    table: &LeaseTable,
    key: &str,
    version: i64,
    holder: &str,
    expires_at: &str,
) -> String {
    format!(
        "{DURABLE_COMMIT}; UPDATE {} SET expires_at = {expires_at} WHERE lock_key OPERATOR(pg_catalog.=) {} \
         AND version OPERATOR(pg_catalog.=) {version} AND holder OPERATOR(pg_catalog.=) {} \
         RETURNING version",
        table.sql(),
        literal(key),
        literal(holder),
    )
}

/// One boolean, `held`: does one of `lock`'s slots carry a live lease of version `token`?
pub fn holds(table: &LeaseTable, lock: &LockTarget, token: i64) -> String {
    format!(
        "SELECT EXISTS (SELECT FROM {table} WHERE {} \
         AND version OPERATOR(pg_catalog.=) {token} \
         AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp()) AS held",
        any_slot(lock)
    )
}

/// The live leases on `lock`'s keys, or on every key with `None`: `lock_key`, `lock_name`,
/// `holder`, `version`, and `expires_in` (seconds until expiry).
pub fn live(table: &LeaseTable, lock: Option<&LockTarget>) -> String {
    let filter = lock.map_or_else(|| "true".to_owned(), any_slot);
    format!(
        "SELECT lock_key, lock_name, holder, version, pg_catalog.date_part('epoch', expires_at \
         OPERATOR(pg_catalog.-) pg_catalog.clock_timestamp()) AS expires_in, \
         pg_catalog.date_part('epoch', pg_catalog.clock_timestamp() OPERATOR(pg_catalog.-) \
         acquired_at) AS held_for FROM {table} WHERE {filter} \
         AND expires_at OPERATOR(pg_catalog.>) pg_catalog.clock_timestamp() \
         ORDER BY lock_name, lock_key"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::key::LockKey;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"E'a\'b\\c'");
    }

    /// Every operator is written `OPERATOR(pg_catalog.x)` and every cast names pg_catalog:
    /// nothing is left for `search_path` to resolve.
    #[test]
    fn no_statement_leaves_a_type_or_operator_to_the_search_path() {
        let table = LeaseTable::parse("leases").unwrap();
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 2,
        };
        let grant = Grant {
            key: "1,2",
            name: "a/b",
            holder: "h",
            ttl_ms: 30_000,
        };
        for sql in [
            acquire(&table, &grant, true),
            update(&table, "1,2", 7, "h", &expiry(30_000)),
            holds(&table, &lock, 7),
            live(&table, Some(&lock)),
            live(&table, None),
        ] {
            assert_eq!(crate::db::unqualified(&sql), [""; 0], "{sql}");
        }
    }
}
