//! The tables heimdall keeps (the lease table, the run record), by one set of rules: each is
//! created on first use from its DDL, or by a DBA from the same DDL printed by a subcommand, and
//! a table found under its name is used only when it has the shape heimdall's statements rely
//! on. Each table's columns are its module's ([`Shape`]s in `lease/table.rs`,
//! `record/table.rs`); the name is checked and qualified once, in `domain/lease_table.rs`.

use anyhow::Result;

use crate::db::sqlstate::{self, SqlState};
use crate::db::{Row, Session, describe_pg_error};
use crate::domain::lease_table::TableName;
use crate::exit::{Failure, fail};

/// One column heimdall's statements read or write. Each type is checked by its OID, fixed for
/// the built-in types in every PostgreSQL version (`pg_type.dat`), so no name lookup is
/// involved.
pub struct Column {
    pub name: &'static str,
    type_oid: u32,
    /// As the DDL writes it: schema-qualified, so a role's `search_path` cannot put a type of
    /// its own (a domain named `text`) in its place.
    ddl_type: &'static str,
    /// As `format_type()` shows it.
    shown: &'static str,
    constraint: &'static str,
}

pub const TEXT: (u32, &str, &str) = (25, "pg_catalog.text", "text");
pub const BIGINT: (u32, &str, &str) = (20, "pg_catalog.int8", "bigint");
pub const INTEGER: (u32, &str, &str) = (23, "pg_catalog.int4", "integer");
/// With a time zone: sessions with different `TimeZone` settings must read the same instant.
/// Without a precision (`atttypmod` -1): `timestamptz(0)` would round an instant to the second
/// (a lease's expiry up to half a second early).
pub const TIMESTAMPTZ: (u32, &str, &str) =
    (1184, "pg_catalog.timestamptz", "timestamp with time zone");

pub const fn column(
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

/// One kind of table: its columns, the first of them its primary key, and how messages name it.
pub struct Shape {
    /// `lease table`, `run table`.
    pub what: &'static str,
    /// What a table of another shape cannot do: `hold leases safely`.
    pub purpose: &'static str,
    pub columns: &'static [Column],
}

impl Shape {
    fn key(&self) -> &'static str {
        self.columns[0].name
    }

    /// The table heimdall creates when it is missing, for a DBA to run by hand.
    pub fn ddl(&self, table: &TableName) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|c| {
                let line = format!("    {:<11} {:<22} {}", c.name, c.ddl_type, c.constraint);
                line.trim_end().to_owned()
            })
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n{}\n);",
            table.sql(),
            columns.join(",\n")
        )
    }

    /// [`Shape::ddl`] on one line, for a message.
    pub fn ddl_line(&self, table: &TableName) -> String {
        let words = self
            .ddl(table)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        words.replace("( ", "(").replace(" )", ")")
    }

    /// One boolean: the table is a permanent table with every column, of its type. The cheap
    /// form of [`Shape::shape_sql`] that a statement carries along; the unique index that `ON
    /// CONFLICT` needs is checked by the server itself. The table's OID is resolved without
    /// `search_path` (the name is qualified); a missing table is `undefined_table`, as it would
    /// be for a statement on it.
    pub fn fits_sql(&self, table: &TableName) -> String {
        let oid = format!("{}::pg_catalog.regclass", table.literal());
        let columns: Vec<String> = self
            .columns
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
            self.columns.len()
        )
    }

    /// The table's kind, persistence and unique index on the key (`relkind`, `relpersistence`,
    /// `unique_key`), then one row per column (`attname`, `atttypid`, `atttypmod`, and the type
    /// as `shown`), for [`Shape::misfits`].
    fn shape_sql(&self, table: &TableName) -> String {
        format!(
            "SELECT c.relkind, c.relpersistence, EXISTS (SELECT FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute k ON k.attrelid OPERATOR(pg_catalog.=) i.indrelid \
             AND k.attnum OPERATOR(pg_catalog.=) i.indkey[0] \
             WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indimmediate \
             AND i.indpred IS NULL AND i.indexprs IS NULL \
             AND i.indnkeyatts OPERATOR(pg_catalog.=) 1 AND k.attname OPERATOR(pg_catalog.=) '{key}') \
             AS unique_key, a.attname, a.atttypid, a.atttypmod, \
             pg_catalog.format_type(a.atttypid, a.atttypmod) AS shown \
             FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_attribute a \
             ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
             AND NOT a.attisdropped WHERE c.oid OPERATOR(pg_catalog.=) {}::pg_catalog.regclass \
             ORDER BY a.attnum",
            table.literal(),
            key = self.key(),
        )
    }

    /// What keeps the table [`Shape::shape_sql`] described from having this shape; empty when
    /// nothing does.
    fn misfits(&self, rows: &[Row]) -> Vec<String> {
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
            "u" => problems.push(
                "it is unlogged (a crash empties it, and frees every lease at once)".to_owned(),
            ),
            _ => problems.push("it is temporary".to_owned()),
        }
        for c in self.columns {
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
            problems.push(format!(
                "{} has no unique index of its own (PRIMARY KEY)",
                self.key()
            ));
        }
        problems
    }

    /// The message for a table of another shape: what is wrong, and the DDL.
    pub fn misfit_message(&self, table: &TableName, problems: &[String]) -> String {
        format!(
            "the {} {} cannot {}: {}; it must be as this statement creates it: {}",
            self.what,
            table.sql(),
            self.purpose,
            problems.join("; "),
            self.ddl_line(table)
        )
    }

    /// What keeps the table from having this shape (see [`Shape::misfits`]).
    pub fn check(
        &self,
        session: &mut Session,
        table: &TableName,
    ) -> std::result::Result<Vec<String>, String> {
        let rows = session
            .rows(&self.shape_sql(table))
            .map_err(|e| describe_pg_error(&e))?;
        Ok(self.misfits(&rows))
    }

    /// The error for a statement that found the table of another shape (`fits` false, or a
    /// statement that failed on it): what is wrong, with the DDL; `otherwise` when the table
    /// looks right after all.
    pub fn misfit(
        &self,
        session: &mut Session,
        table: &TableName,
        otherwise: impl FnOnce() -> String,
    ) -> anyhow::Error {
        let message = match self.check(session, table) {
            Ok(problems) if !problems.is_empty() => self.misfit_message(table, &problems),
            Ok(_) => otherwise(),
            Err(e) => format!("{}: cannot read its columns ({e})", otherwise()),
        };
        fail(Failure::Unavailable, message)
    }

    /// For `status` and `list`: an error naming the problem unless the table has this shape.
    pub fn checked(
        &self,
        session: &mut Session,
        table: &TableName,
    ) -> std::result::Result<(), String> {
        let unreadable = |e: String| format!("cannot read the {} {table}: {e}", self.what);
        let problems = self.check(session, table).map_err(unreadable)?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.misfit_message(table, &problems))
        }
    }

    /// Creates the table on first use, unless it is there: `CREATE TABLE IF NOT EXISTS`
    /// needs the privilege to create even when the table exists, which a role that uses a
    /// table a DBA created may well lack.
    pub fn ensure(&self, session: &mut Session, table: &TableName) -> Result<()> {
        let present = session.first_row(&present_sql(table)).map_err(|e| {
            fail(
                Failure::Unavailable,
                format!(
                    "cannot look for the {} {table}: {}",
                    self.what,
                    describe_pg_error(&e)
                ),
            )
        })?;
        if present.is_true("present") {
            return Ok(());
        }
        self.create(session, table)
    }

    /// Creates the table. A role without the privilege gets the DDL to hand a DBA.
    fn create(&self, session: &mut Session, table: &TableName) -> Result<()> {
        match session.rows(&self.ddl(table)) {
            Ok(_) => Ok(()),
            // Runs that start together all find the table missing and race to create it: IF
            // NOT EXISTS does not stop the losers from tripping over the winner's catalog rows
            // (unique_violation), table (duplicate_table) or row type (duplicate_object). The
            // table is there either way; the statement that uses it then checks its shape.
            Err(e) if sqlstate::any_of(&e, CREATED_MEANWHILE) => Ok(()),
            Err(e) => Err(fail(
                Failure::Unavailable,
                format!(
                    "the {} {} does not exist, and this role cannot create it ({}); ask a DBA to run: {}",
                    self.what,
                    table.sql(),
                    describe_pg_error(&e),
                    self.ddl_line(table)
                ),
            )),
        }
    }
}

/// One boolean, `present`: whether the table exists (without an error when it does not). The
/// volatile `pg_is_in_recovery()` sends it to the primary through a proxy that balances lone
/// reads (pgpool-II), where a standby that has not replayed the table yet would say it is not.
pub fn present_sql(table: &TableName) -> String {
    format!(
        "SELECT pg_catalog.to_regclass({}) IS NOT NULL AS present, \
         pg_catalog.pg_is_in_recovery() AS standby",
        table.literal()
    )
}

/// What the losers of a race to create a table trip over (see [`Shape::create`]).
const CREATED_MEANWHILE: &[SqlState] = &[
    SqlState::UNIQUE_VIOLATION,
    SqlState::DUPLICATE_TABLE,
    SqlState::DUPLICATE_OBJECT,
];

/// Whether a statement failed because the table it names is missing: then it is created, and
/// the statement tried again.
pub fn missing(e: &postgres::Error) -> bool {
    sqlstate::any_of(e, &[SqlState::UNDEFINED_TABLE])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: Shape = Shape {
        what: "test table",
        purpose: "serve",
        columns: &[
            column("lock_key", TEXT, "PRIMARY KEY"),
            column("count", BIGINT, "NOT NULL"),
            column("seen_at", TIMESTAMPTZ, ""),
            column("code", INTEGER, ""),
        ],
    };

    #[test]
    fn the_ddl_names_every_type_schema_qualified() {
        let ddl = SHAPE.ddl(&TableName::parse("t").unwrap());
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"t\" ("));
        assert_eq!(
            ddl.matches("pg_catalog.").count(),
            SHAPE.columns.len(),
            "{ddl}"
        );
        assert!(
            ddl.contains("pg_catalog.int4\n);"),
            "no trailing blank: {ddl}"
        );
        assert!(
            SHAPE
                .ddl_line(&TableName::parse("t").unwrap())
                .ends_with("code pg_catalog.int4);")
        );
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
        let oids: Vec<String> = SHAPE
            .columns
            .iter()
            .map(|c| c.type_oid.to_string())
            .collect();
        let mut columns: Vec<(&str, &str, &str, &str)> = SHAPE
            .columns
            .iter()
            .zip(&oids)
            .map(|(c, oid)| (c.name, oid.as_str(), "-1", c.shown))
            .collect();
        assert!(SHAPE.misfits(&table("p", &columns)).is_empty());
        columns[3] = ("code", "20", "-1", "bigint");
        columns[2] = ("seen_at", "1184", "0", "timestamp(0) with time zone");
        columns.remove(1);
        let problems = SHAPE.misfits(&table("u", &columns));
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("unlogged"));
        assert!(problems[1].contains("no column count"));
        assert!(problems[2].contains("seen_at timestamp(0) with time zone"));
        assert!(problems[3].contains("code bigint is not integer"));
        assert_eq!(SHAPE.misfits(&[]), ["it is not there"]);
    }
}
