//! The statements of the lease protocol, as text: acquire, renew or release, the holders, and
//! the re-entrancy proof. What their answers mean is in `hold/lease/mod.rs`.
//!
//! Every name in them means the same whatever the session's `search_path`: the table is
//! schema-qualified ([`LeaseTable`]), and so is every function, operator and type
//! (`pg_catalog.…`, `OPERATOR(pg_catalog.=)`), since a role or another client of a pooled
//! server connection may put objects of the same names first.

use super::table::SHAPE;
use crate::config::RecordMode;
use crate::db::DURABLE_COMMIT;
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::LockTarget;
use crate::hold::record::sql as record;
use crate::hold::sql::{CLOCK, literal, millis};

/// `clock_timestamp() + ttl`, on the server's clock.
pub fn expiry(ttl_ms: u128) -> String {
    format!("{CLOCK} OPERATOR(pg_catalog.+) {}", millis(ttl_ms))
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
/// With `check`, the statement first checks the tables' shapes ([`crate::hold::table::Shape`])
/// and takes nothing from a table that does not fit. One row: whether the table `fits`, and the
/// `version` taken (NULL when the lease is held).
///
/// With the run record (`record`), the same statement writes the run's start (see
/// `record::sql`), and with `--min-interval` takes nothing when a run started within it: by the
/// record, and by the lease row's own `acquired_at`, checked on the row's newest version, so a
/// run that raced this one cannot slip past. The answer then has the record's columns, and
/// `skipped` (the interval, not a live lease, kept the lease from being taken), with the lease
/// row's `lease_holder` and `lease_age` for a message when the record has no row.
pub fn acquire(
    table: &LeaseTable,
    grant: &Grant,
    check: bool,
    record: Option<(&RecordMode, &LockTarget)>,
) -> String {
    let fits = if check {
        SHAPE.fits_sql(table)
    } else {
        "true".to_owned()
    };
    let t = table.sql();
    let key = literal(grant.key);
    let (mut read, mut allowed, mut rule, mut started, mut columns, mut joined) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    if let Some((mode, lock)) = record {
        read = format!("{}, ", record::read_ctes(mode, lock, check));
        allowed = format!(" AND rec_ok.fits AND NOT {}", record::recent(mode));
        let source = record::Source {
            from: "taken",
            when: "true",
            started_at: "taken.acquired_at",
            rule: false,
        };
        started = format!(", {}", record::started_cte(mode, lock, &source));
        columns = format!(", {}", record::answer_columns());
        joined = format!(", {}", record::JOINED);
        if let Some(min) = mode.min_interval {
            let since = record::since(min);
            rule = format!(" AND l.acquired_at OPERATOR(pg_catalog.<=) ({since})");
            read.push_str(&format!(
                "lease_before AS (SELECT l.holder, l.expires_at OPERATOR(pg_catalog.>) {CLOCK} AS live, \
                 l.acquired_at OPERATOR(pg_catalog.>) ({since}) AS recent, \
                 pg_catalog.date_part('epoch', {CLOCK} OPERATOR(pg_catalog.-) l.acquired_at) AS age \
                 FROM {t} l WHERE l.lock_key OPERATOR(pg_catalog.=) {key}), "
            ));
            columns.push_str(&format!(
                ", lease_before.holder AS lease_holder, lease_before.age AS lease_age, \
                 (NOT COALESCE(lease_before.live, false) AND ({} OR COALESCE(lease_before.recent, false))) AS skipped",
                record::recent(mode)
            ));
            joined.push_str(" LEFT JOIN lease_before ON true");
        }
    }
    format!(
        "{DURABLE_COMMIT}; WITH ok AS (SELECT {fits} AS fits), {read}taken AS (\
         INSERT INTO {t} AS l (lock_key, version, lock_name, holder, acquired_at, expires_at) \
         SELECT {key}, 1, {name}, {holder}, {CLOCK}, {expiry} \
         FROM ok{from_record} WHERE ok.fits{allowed} \
         ON CONFLICT (lock_key) DO UPDATE SET version = l.version OPERATOR(pg_catalog.+) 1, \
         lock_name = EXCLUDED.lock_name, holder = EXCLUDED.holder, \
         acquired_at = EXCLUDED.acquired_at, expires_at = EXCLUDED.expires_at \
         WHERE l.expires_at OPERATOR(pg_catalog.<=) {CLOCK}{rule} AND {request} IS NULL \
         RETURNING l.version, l.acquired_at){started} \
         SELECT ok.fits, (SELECT version FROM taken) AS version{columns} FROM ok{joined}",
        from_record = if record.is_some() { ", rec_ok" } else { "" },
        name = literal(grant.name),
        holder = literal(grant.holder),
        expiry = expiry(grant.ttl_ms),
        request = request_of("l", "EXCLUDED.holder"),
    )
}

/// A lease's row as this holder has it: the row is still the lease while it carries `version`
/// and `holder`.
pub struct Mine<'a> {
    pub table: &'a LeaseTable,
    pub key: &'a str,
    pub version: i64,
    pub holder: &'a str,
}

/// Sets the row's expiry to `expires_at` only while it carries `version` and `holder`; a row
/// back means it did. The holder too: a row lost with the server (asynchronous replication and a
/// failover) can be granted again with the same version, and must not pass for this one.
/// Durably: a renewal lost in a crash would leave the earlier expiry, before the end of the
/// budget heimdall counts from this renewal.
pub fn update(mine: &Mine, expires_at: &str) -> String {
    format!(
        "{DURABLE_COMMIT}; {} RETURNING version, {} AS replacer",
        set_expiry(mine, expires_at),
        request_of("r", &literal(mine.holder))
    )
}

/// [`update`] that also writes the run's end (`record::sql::end`, given whether the lease was
/// still this run's, `held`), in the same statement: the release of a run with a record.
pub fn update_ending(mine: &Mine, expires_at: &str, end: impl FnOnce(&str) -> String) -> String {
    format!(
        "{DURABLE_COMMIT}; WITH l AS ({} RETURNING version), e AS ({}) SELECT version FROM l",
        set_expiry(mine, expires_at),
        end("EXISTS (SELECT FROM l)")
    )
}

fn set_expiry(mine: &Mine, expires_at: &str) -> String {
    format!(
        "UPDATE {} AS r SET expires_at = {expires_at} WHERE lock_key OPERATOR(pg_catalog.=) {} \
         AND version OPERATOR(pg_catalog.=) {} AND holder OPERATOR(pg_catalog.=) {}",
        mine.table.sql(),
        literal(mine.key),
        mine.version,
        literal(mine.holder),
    )
}

/// The takeover request that the row `row` carries for a holder other than `holder` (an SQL
/// text expression), while it stands: the replacer's `holder` string, or NULL. Read through
/// `to_jsonb`, so that the statement runs on a table without the request's columns too
/// ([`super::table::takeover_columns_ddl`], added by the first replacer): the row simply has none.
fn request_of(row: &str, holder: &str) -> String {
    let field =
        |name: &str| format!("(pg_catalog.to_jsonb({row}) OPERATOR(pg_catalog.->>) '{name}')");
    format!(
        "CASE WHEN {until}::pg_catalog.timestamptz OPERATOR(pg_catalog.>) {CLOCK} \
         AND {by} OPERATOR(pg_catalog.<>) {holder} THEN {by} END",
        until = field("replace_until"),
        by = field("replacer"),
    )
}

/// A replacer's request on the live lease of `key` held by another: `replacer` and until when
/// the request stands (`until_ms` from now), refreshed at every poll of its wait, so that a
/// replacer that gave up or died stops asking by itself. One row, `asked`, per live lease
/// asked. Needs [`super::table::takeover_columns_ddl`].
pub fn request(table: &LeaseTable, key: &str, replacer: &str, until_ms: u128) -> String {
    format!(
        "UPDATE {} SET replacer = {by}, replace_until = {CLOCK} OPERATOR(pg_catalog.+) {} \
         WHERE lock_key OPERATOR(pg_catalog.=) {} AND expires_at OPERATOR(pg_catalog.>) {CLOCK} \
         AND holder OPERATOR(pg_catalog.<>) {by} RETURNING true AS asked",
        table.sql(),
        millis(until_ms),
        literal(key),
        by = literal(replacer),
    )
}

/// Withdraws `replacer`'s request on `key` (it took the lease, or gave up).
pub fn withdraw(table: &LeaseTable, key: &str, replacer: &str) -> String {
    format!(
        "UPDATE {} SET replace_until = NULL WHERE lock_key OPERATOR(pg_catalog.=) {} \
         AND replacer OPERATOR(pg_catalog.=) {}",
        table.sql(),
        literal(key),
        literal(replacer),
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

    const GRANT: Grant = Grant {
        key: "1,2",
        name: "a/b",
        holder: "h",
        ttl_ms: 30_000,
    };

    fn interval() -> RecordMode {
        record::test_mode(Some(std::time::Duration::from_secs(60)))
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
        let (grant, mode) = (GRANT, interval());
        let mine = Mine {
            table: &table,
            key: "1,2",
            version: 7,
            holder: "h",
        };
        let one = LockTarget {
            slots: 1,
            ..lock.clone()
        };
        let mut without_interval = mode.clone();
        without_interval.min_interval = None;
        for sql in [
            acquire(&table, &grant, true, None),
            acquire(&table, &grant, true, Some((&mode, &one))),
            acquire(&table, &grant, false, Some((&without_interval, &one))),
            update(&mine, &expiry(30_000)),
            update_ending(&mine, CLOCK, |held| format!("SELECT {held}")),
            holds(&table, &lock, 7),
            live(&table, Some(&lock)),
            live(&table, None),
        ] {
            assert_eq!(record::unqualified(&sql), [""; 0], "{sql}");
        }
    }

    #[test]
    fn with_an_interval_the_lease_is_not_taken_over_within_it_of_its_last_acquisition() {
        let table = LeaseTable::parse("leases").unwrap();
        let (grant, mode) = (GRANT, interval());
        let lock = LockTarget {
            key: LockKey::Pair(1, 2),
            names: None,
            slots: 1,
        };
        let sql = acquire(&table, &grant, true, Some((&mode, &lock)));
        let conflict = &sql[sql.find("ON CONFLICT (lock_key)").unwrap()..];
        let rule = conflict
            .find("AND l.acquired_at OPERATOR(pg_catalog.<=)")
            .unwrap();
        assert!(rule < conflict.find("RETURNING").unwrap(), "{sql}");
        assert!(
            sql.contains("WHERE ok.fits AND rec_ok.fits AND NOT EXISTS (SELECT FROM rec_before"),
            "{sql}"
        );
        assert!(
            sql.find("taken AS (").unwrap() < sql.find("rec_started AS (").unwrap(),
            "{sql}"
        );
        for column in [
            "record_fits",
            "run",
            "skipped",
            "lease_holder",
            "lease_age",
            "last_started_at",
        ] {
            assert!(sql.contains(&format!(" AS {column}")), "{column}: {sql}");
        }
        assert!(
            !acquire(&table, &grant, true, None).contains("rec_"),
            "no record, no change"
        );
    }
}
