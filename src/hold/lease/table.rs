//! The lease table: its name, checked and schema-qualified once; its DDL; and the check that
//! the table found under that name has the shape the lease protocol relies on.
//!
//! A name must mean the same table for every role and session in a database, or two holders
//! run at once. So a name is never resolved through `search_path`, which differs per session:
//! `pg_temp` comes first in every path (through a transaction pool, another client's temporary
//! table of the same name on the same server connection would capture the lease), and
//! `"$user"` comes first by default (two roles would each use a table of their own). An
//! unqualified name is qualified with [`DEFAULT_SCHEMA`], and the temporary schema is refused.

/// The schema of a `--lease-table` given without one, for every role and session.
pub const DEFAULT_SCHEMA: &str = "public";

/// A validated table name, schema-qualified, quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTable {
    schema: String,
    name: String,
    /// The name as SQL: `"schema"."name"`.
    pub(super) sql: String,
}

impl std::fmt::Display for LeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sql)
    }
}

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

/// Whether `schema` is a session's temporary schema, under any of its names.
fn is_temporary(schema: &str) -> bool {
    let schema = schema.trim_matches('"').to_ascii_lowercase();
    let numbered = |prefix: &str| {
        schema
            .strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    schema == "pg_temp" || numbered("pg_temp_") || numbered("pg_toast_temp_")
}

impl LeaseTable {
    /// `leases` (in [`DEFAULT_SCHEMA`]) or `ops.leases`: one or two plain identifiers
    /// (letters, digits, `_`, `$`, not starting with a digit), folded to lower case as
    /// PostgreSQL folds unquoted names. Anything else is refused rather than quoted, so a typo
    /// can never create an odd table; so is the temporary schema.
    pub fn parse(text: &str) -> std::result::Result<LeaseTable, String> {
        let parts: Vec<&str> = text.split('.').collect();
        if parts.len() == 2 && is_temporary(parts[0]) {
            return Err(format!(
                "'{text}' is a temporary table, one session's own: every holder would have a lease table of its own; name a table in a permanent schema"
            ));
        }
        let plain = |p: &str| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                && p.len() <= 63
        };
        let (schema, name) = match parts[..] {
            [name] if plain(name) => (DEFAULT_SCHEMA, name),
            [schema, name] if plain(schema) && plain(name) => (schema, name),
            _ => {
                return Err(format!(
                    "invalid --lease-table '{text}': give TABLE (in schema {DEFAULT_SCHEMA}) or SCHEMA.TABLE, each a plain identifier (letters, digits, _)"
                ));
            }
        };
        let (schema, name) = (schema.to_ascii_lowercase(), name.to_ascii_lowercase());
        Ok(LeaseTable {
            sql: format!("\"{schema}\".\"{name}\""),
            schema,
            name,
        })
    }

    /// `schema.name`, which [`LeaseTable::parse`] reads back as the same table: what the
    /// command's `HEIMDALL_LOCK_TABLE` says.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The table heimdall creates when it is missing, for a DBA to run by hand.
    pub fn ddl(&self) -> String {
        let columns: Vec<String> = COLUMNS
            .iter()
            .map(|c| format!("    {:<11} {:<22} {}", c.name, c.ddl_type, c.constraint))
            .collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n{}\n);",
            self.sql,
            columns.join(",\n")
        )
    }

    /// [`LeaseTable::ddl`] on one line, for a message.
    pub fn ddl_line(&self) -> String {
        let words = self.ddl().split_whitespace().collect::<Vec<_>>().join(" ");
        words.replace("( ", "(").replace(" )", ")")
    }

    /// The table's OID, resolved without `search_path` (the name is qualified). A missing
    /// table is an error, `undefined_table`, as it would be for a statement on it.
    fn oid_sql(&self) -> String {
        format!("'{}'::pg_catalog.regclass", self.sql)
    }

    /// One boolean: the table is a permanent table with every column of [`COLUMNS`], of its
    /// type. The cheap form of [`LeaseTable::shape_sql`] that a statement carries along; the
    /// unique index that `ON CONFLICT (lock_key)` needs is checked by the server itself.
    pub(super) fn fits_sql(&self) -> String {
        let oid = self.oid_sql();
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

    /// The table's kind, persistence and unique index on `lock_key`, then one row per column
    /// (name, type OID, type modifier, type as shown), for [`LeaseTable::misfits`].
    pub(super) fn shape_sql(&self) -> String {
        let oid = self.oid_sql();
        format!(
            "SELECT c.relkind, c.relpersistence, EXISTS (SELECT FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_attribute k ON k.attrelid OPERATOR(pg_catalog.=) i.indrelid \
             AND k.attnum OPERATOR(pg_catalog.=) i.indkey[0] \
             WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indimmediate \
             AND i.indpred IS NULL AND i.indexprs IS NULL \
             AND i.indnkeyatts OPERATOR(pg_catalog.=) 1 AND k.attname OPERATOR(pg_catalog.=) 'lock_key'), \
             a.attname, a.atttypid, a.atttypmod, pg_catalog.format_type(a.atttypid, a.atttypmod) \
             FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_attribute a \
             ON a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0 \
             AND NOT a.attisdropped WHERE c.oid OPERATOR(pg_catalog.=) {oid} ORDER BY a.attnum"
        )
    }

    /// What keeps the table [`LeaseTable::shape_sql`] described from being a lease table; empty
    /// when nothing does.
    pub(super) fn misfits(rows: &[Vec<Option<String>>]) -> Vec<String> {
        let field = |row: &Vec<Option<String>>, i: usize| -> String {
            row.get(i).cloned().flatten().unwrap_or_default()
        };
        let Some(first) = rows.first() else {
            return vec!["it is not there".to_owned()];
        };
        let mut problems = Vec::new();
        match field(first, 0).as_str() {
            "r" | "p" => {}
            "v" => problems.push("it is a view, not a table".to_owned()),
            "m" => problems.push("it is a materialized view, not a table".to_owned()),
            "f" => problems.push("it is a foreign table".to_owned()),
            other => problems.push(format!("it is not a table (relkind {other})")),
        }
        match field(first, 1).as_str() {
            "p" => {}
            "u" => problems.push(
                "it is unlogged (a crash empties it, and frees every lease at once)".to_owned(),
            ),
            _ => problems.push("it is temporary".to_owned()),
        }
        for c in &COLUMNS {
            match rows.iter().find(|r| field(r, 3) == c.name) {
                None => problems.push(format!("it has no column {} ({})", c.name, c.shown)),
                Some(row) => {
                    let fits = field(row, 4) == c.type_oid.to_string()
                        && field(row, 5).parse::<i32>().is_ok_and(|m| m < 0);
                    if !fits {
                        problems.push(format!(
                            "column {} {} is not {}",
                            c.name,
                            field(row, 6),
                            c.shown
                        ));
                    }
                }
            }
        }
        if field(first, 2) != "t" {
            problems.push("lock_key has no unique index of its own (PRIMARY KEY)".to_owned());
        }
        problems
    }

    /// The message for a table that is not a lease table: what is wrong, and the DDL.
    pub(super) fn misfit_message(&self, problems: &[String]) -> String {
        format!(
            "the lease table {} cannot hold leases safely: {}; it must be as this statement creates it: {}",
            self.sql,
            problems.join("; "),
            self.ddl_line()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_qualified_with_public_when_unqualified() {
        assert_eq!(
            LeaseTable::parse("leases").unwrap().sql,
            "\"public\".\"leases\""
        );
        let table = LeaseTable::parse("Ops.Heimdall_Leases").unwrap();
        assert_eq!(table.sql, "\"ops\".\"heimdall_leases\"");
        assert_eq!(LeaseTable::parse(&table.qualified()), Ok(table));
        for bad in ["", "a.b.c", "1x", "x;drop", "x\"y", "a b", "a.", ".a"] {
            assert!(LeaseTable::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_temporary_schema_is_refused_under_every_name() {
        for temp in [
            "pg_temp.x",
            "PG_TEMP.x",
            "\"pg_temp\".x",
            "pg_temp_12.x",
            "pg_toast_temp_1.x",
        ] {
            let err = LeaseTable::parse(temp).unwrap_err();
            assert!(err.contains("temporary"), "{temp}: {err}");
        }
        for fine in ["pg_temporary.x", "pg_temp_x.x", "x.pg_temp"] {
            assert!(LeaseTable::parse(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn the_ddl_names_every_type_schema_qualified() {
        let ddl = LeaseTable::parse("leases").unwrap().ddl();
        assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"public\".\"leases\" ("));
        assert_eq!(ddl.matches("pg_catalog.").count(), COLUMNS.len(), "{ddl}");
    }

    #[test]
    fn a_table_of_the_right_shape_has_no_misfits_and_each_wrong_one_is_named() {
        let row = |name: &str, oid: &str, typmod: &str, shown: &str| {
            ["r", "p", "t", name, oid, typmod, shown]
                .map(|s| Some(s.to_owned()))
                .to_vec()
        };
        let good: Vec<_> = COLUMNS
            .iter()
            .map(|c| row(c.name, &c.type_oid.to_string(), "-1", c.shown))
            .collect();
        assert!(LeaseTable::misfits(&good).is_empty());
        let mut wrong = good.clone();
        wrong[5] = row("expires_at", "1114", "-1", "timestamp without time zone");
        wrong[4] = row("acquired_at", "1184", "0", "timestamp(0) with time zone");
        wrong.remove(3);
        for r in &mut wrong {
            r[1] = Some("u".to_owned());
        }
        let problems = LeaseTable::misfits(&wrong);
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems[0].contains("unlogged"));
        assert!(problems[1].contains("no column holder"));
        assert!(problems[2].contains("acquired_at timestamp(0) with time zone"));
        assert!(problems[3].contains("expires_at timestamp without time zone"));
        assert_eq!(LeaseTable::misfits(&[]), ["it is not there"]);
    }
}
