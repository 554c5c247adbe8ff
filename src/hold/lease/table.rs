//! The lease table's DDL, and the check that the table found under its name has the shape the
//! lease protocol relies on. The name itself is checked and qualified once, in
//! `domain/lease_table.rs`.

use crate::db::Row;
use crate::domain::lease_table::LeaseTable;

/// One column the protocol reads or writes. Each type is checked by its OID, fixed for the
/// built-in types in every PostgreSQL version (`pg_type.dat`), so no name lookup is involved.
struct Column {
    name: &'static str,
    type_oid: u32,
    /// As the DDL writes it: schema-qualified, so a role's `search_path` cannot put a type of
    /// its own (a domain named `text`) in its place.
    ddl_type: &'static str,
    /// As `format_type()` shows it.
    shown: &'static str,
    constraint: &'static str,
}

const TEXT: (u32, &str, &str) = (25, "pg_catalog.text", "text");
const BIGINT: (u32, &str, &str) = (20, "pg_catalog.int8", "bigint");
/// With a time zone: holders in sessions with different `TimeZone` settings must read the same
/// instant. Without a precision (`atttypmod` -1): `timestamptz(0)` would round an expiry to
/// the second, up to half a second early.
const TIMESTAMPTZ: (u32, &str, &str) = (1184, "pg_catalog.timestamptz", "timestamp with time zone");

const fn column(
    name: &'static str,
    ty: (u32, &'static str, &'static str),
    constraint: &'static str,
) -> Column {
    Column {
        name,
        type_oid: ty.0,
        ddl_type: ty.1,
        shown: ty.2,
        constraint,
    }
}

const COLUMNS: [Column; 6] = [
    column("lock_key", TEXT, "PRIMARY KEY"),
    column("version", BIGINT, "NOT NULL"),
    column("lock_name", TEXT, "NOT NULL"),
    column("holder", TEXT, "NOT NULL"),
    column("acquired_at", TIMESTAMPTZ, "NOT NULL"),
    column("expires_at", TIMESTAMPTZ, "NOT NULL"),
];

/// The table heimdall creates when it is missing, for a DBA to run by hand.
pub fn ddl(table: &LeaseTable) -> String {
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("    {:<11} {:<22} {}", c.name, c.ddl_type, c.constraint))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\n{}\n);",
        table.sql(),
        columns.join(",\n")
    )
}

/// [`ddl`] on one line, for a message.
pub fn ddl_line(table: &LeaseTable) -> String {
    let words = ddl(table).split_whitespace().collect::<Vec<_>>().join(" ");
    words.replace("( ", "(").replace(" )", ")")
}

/// The table's OID, resolved without `search_path` (the name is qualified). A missing
/// table is an error, `undefined_table`, as it would be for a statement on it.
fn oid_sql(table: &LeaseTable) -> String {
    format!("'{}'::pg_catalog.regclass", table.sql())
}

/// One boolean: the table is a permanent table with every column of [`COLUMNS`], of its
/// type. The cheap form of [`shape_sql`] that a statement carries along; the
/// unique index that `ON CONFLICT (lock_key)` needs is checked by the server itself.
pub(super) fn fits_sql(table: &LeaseTable) -> String {
    let oid = oid_sql(table);
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|c| {
            format!(
                "(a.attname OPERATOR(pg_catalog.=) '{}' AND a.atttypid OPERATOR(pg_catalog.=) {})",
                c.name, c.type_oid
            )
        })
        .collect();
    format!(
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute a \
         WHERE a.attrelid OPERATOR(pg_catalog.=) {oid} AND NOT a.attisdropped \
         AND a.atttypmod OPERATOR(pg_catalog.<) 0 AND ({})) OPERATOR(pg_catalog.=) {} \
         AND EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) {oid} \
         AND c.relpersistence OPERATOR(pg_catalog.=) 'p' \
         AND (c.relkind OPERATOR(pg_catalog.=) 'r' OR c.relkind OPERATOR(pg_catalog.=) 'p'))",
        columns.join(" OR "),
        COLUMNS.len()
    )
}

/// The table's kind, persistence and unique index on `lock_key` (`relkind`, `relpersistence`,
/// `unique_key`), then one row per column (`attname`, `atttypid`, `atttypmod`, and the type as
/// `shown`), for [`misfits`].
pub(super) fn shape_sql(table: &LeaseTable) -> String {
    let oid = oid_sql(table);
    format!(
        "SELECT c.relkind, c.relpersistence, EXISTS (SELECT FROM pg_catalog.pg_index i \
         JOIN pg_catalog.pg_attribute k ON k.attrelid OPERATOR(pg_catalog.=) i.indrelid \
         AND k.attnum OPERATOR(pg_catalog.=) i.indkey[0] \
         WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indimmediate \
         AND i.indpred IS NULL AND i.indexprs IS NULL \
         AND i.indnkeyatts OPERATOR(pg_catalog.=) 1 AND k.attname OPERATOR(pg_catalog.=) 'lock_key') \
         AS unique_key, a.attname, a.atttypid, a.atttypmod, \
         pg_catalog.format_type(a.atttypid, a.atttypmod) AS shown \
         FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_attribute a \
         ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
         AND NOT a.attisdropped WHERE c.oid OPERATOR(pg_catalog.=) {oid} ORDER BY a.attnum"
    )
}

/// What keeps the table [`shape_sql`] described from being a lease table; empty
/// when nothing does.
pub(super) fn misfits(rows: &[Row]) -> Vec<String> {
    let field = |row: &Row, name: &str| row.text(name).unwrap_or_default().to_owned();
    let Some(first) = rows.first() else {
        return vec!["it is not there".to_owned()];
    };
    let mut problems = Vec::new();
    match field(first, "relkind").as_str() {
        "r" | "p" => {}
        "v" => problems.push("it is a view, not a table".to_owned()),
        "m" => problems.push("it is a materialized view, not a table".to_owned()),
        "f" => problems.push("it is a foreign table".to_owned()),
        other => problems.push(format!("it is not a table (relkind {other})")),
    }
    match field(first, "relpersistence").as_str() {
        "p" => {}
        "u" => problems
            .push("it is unlogged (a crash empties it, and frees every lease at once)".to_owned()),
        _ => problems.push("it is temporary".to_owned()),
    }
    for c in &COLUMNS {
        match rows.iter().find(|r| r.text("attname") == Some(c.name)) {
            None => problems.push(format!("it has no column {} ({})", c.name, c.shown)),
            Some(row) => {
                let fits = row.get::<u32>("atttypid") == Some(c.type_oid)
                    && row.get::<i32>("atttypmod").is_some_and(|m| m < 0);
                if !fits {
                    problems.push(format!(
                        "column {} {} is not {}",
                        c.name,
                        field(row, "shown"),
                        c.shown
                    ));
                }
            }
        }
    }
    if !first.is_true("unique_key") {
        problems.push("lock_key has no unique index of its own (PRIMARY KEY)".to_owned());
    }
    problems
}

/// The message for a table that is not a lease table: what is wrong, and the DDL.
pub(super) fn misfit_message(table: &LeaseTable, problems: &[String]) -> String {
    format!(
        "the lease table {} cannot hold leases safely: {}; it must be as this statement creates it: {}",
        table.sql(),
        problems.join("; "),
        ddl_line(table)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ddl_names_every_type_schema_qualified() {
        let ddl = ddl(&LeaseTable::parse("leases").unwrap());
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"leases\" ("));
        assert_eq!(ddl.matches("pg_catalog.").count(), COLUMNS.len(), "{ddl}");
    }

    #[test]
    fn a_table_of_the_right_shape_has_no_misfits_and_each_wrong_one_is_named() {
        let names: std::sync::Arc<[String]> = [
            "relkind",
            "relpersistence",
            "unique_key",
            "attname",
            "atttypid",
            "atttypmod",
            "shown",
        ]
        .map(String::from)
        .into();
        let table = |persistence: &str, columns: &[(&str, &str, &str, &str)]| -> Vec<Row> {
            columns
                .iter()
                .map(|(name, oid, typmod, shown)| {
                    let values = ["r", persistence, "t", name, oid, typmod, shown];
                    Row::new(names.clone(), values.map(|s| Some(s.to_owned())).to_vec())
                })
                .collect()
        };
        let oids: Vec<String> = COLUMNS.iter().map(|c| c.type_oid.to_string()).collect();
        let mut columns: Vec<(&str, &str, &str, &str)> = COLUMNS
            .iter()
            .zip(&oids)
            .map(|(c, oid)| (c.name, oid.as_str(), "-1", c.shown))
            .collect();
        assert!(misfits(&table("p", &columns)).is_empty());
        columns[5] = ("expires_at", "1114", "-1", "timestamp without time zone");
        columns[4] = ("acquired_at", "1184", "0", "timestamp(0) with time zone");
        columns.remove(3);
        let wrong = table("u", &columns);
        let problems = misfits(&wrong);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("unlogged"));
        assert!(problems[1].contains("no column holder"));
        assert!(problems[2].contains("acquired_at timestamp(0) with time zone"));
        assert!(problems[3].contains("expires_at timestamp without time zone"));
        assert_eq!(misfits(&[]), ["it is not there"]);
    }
}
