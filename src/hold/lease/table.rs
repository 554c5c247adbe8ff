//! The lease table's columns: the [`Shape`] the lease protocol relies on. Its DDL, its creation
//! and the check of its shape follow the rules of every table heimdall keeps (`hold/table.rs`);
//! the name is checked and qualified once, in `domain/lease_table.rs`.

use crate::domain::lease_table::LeaseTable;
use crate::hold::table::{BIGINT, Shape, TEXT, TIMESTAMPTZ, column};

pub const SHAPE: Shape = Shape {
    what: "lease table",
    purpose: "hold leases safely",
    columns: &[
        column("lock_key", TEXT, "PRIMARY KEY"),
        column("version", BIGINT, "NOT NULL"),
        column("lock_name", TEXT, "NOT NULL"),
        column("holder", TEXT, "NOT NULL"),
        column("acquired_at", TIMESTAMPTZ, "NOT NULL"),
        column("expires_at", TIMESTAMPTZ, "NOT NULL"),
    ],
};

/// The columns of a takeover request (`--replace`, `heimdall stop`), which no statement but
/// the request's needs: a table without them still fits [`SHAPE`], and the first replacer on it
/// adds them (this statement; `heimdall lease-ddl` prints it for a DBA). A holder reads them
/// through `to_jsonb`, so it sees a request on a table that got them after it started.
pub fn takeover_columns_ddl(table: &LeaseTable) -> String {
    format!(
        "ALTER TABLE {} ADD COLUMN IF NOT EXISTS replacer pg_catalog.text, \
         ADD COLUMN IF NOT EXISTS replace_until pg_catalog.timestamptz;",
        table.sql()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_is_the_one_dbas_have_run_since_lease_mode_began() {
        let ddl = SHAPE.ddl(&LeaseTable::parse("leases").unwrap());
        assert_eq!(
            ddl,
            "CREATE TABLE IF NOT EXISTS \"public\".\"leases\" (\n    lock_key    pg_catalog.text        PRIMARY KEY,\n    version     pg_catalog.int8        NOT NULL,\n    lock_name   pg_catalog.text        NOT NULL,\n    holder      pg_catalog.text        NOT NULL,\n    acquired_at pg_catalog.timestamptz NOT NULL,\n    expires_at  pg_catalog.timestamptz NOT NULL\n);"
        );
    }
}
