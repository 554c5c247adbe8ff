//! The lease table's columns: the [`Shape`] the lease protocol relies on. Its DDL, its creation
//! and the check of its shape follow the rules of every table heimdall keeps (`hold/table.rs`);
//! the name is checked and qualified once, in `domain/lease_table.rs`.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::lease_table::LeaseTable;

    #[test]
    fn the_ddl_is_the_one_dbas_have_run_since_lease_mode_began() {
        let ddl = SHAPE.ddl(&LeaseTable::parse("leases").unwrap());
        assert_eq!(
            ddl,
            "CREATE TABLE IF NOT EXISTS \"public\".\"leases\" (\n    lock_key    pg_catalog.text        PRIMARY KEY,\n    version     pg_catalog.int8        NOT NULL,\n    lock_name   pg_catalog.text        NOT NULL,\n    holder      pg_catalog.text        NOT NULL,\n    acquired_at pg_catalog.timestamptz NOT NULL,\n    expires_at  pg_catalog.timestamptz NOT NULL\n);"
        );
    }
}
