//! The name of a table heimdall keeps, checked and schema-qualified once: the lease table
//! (`--lease-table`) and the run record (`--run-table`) follow the same rules.
//!
//! A name must mean the same table for every role and session in a database, or two holders
//! run at once (or two runs each find no record of the other). So a name is never resolved through `search_path`, which differs per session:
//! `pg_temp` comes first in every path (through a transaction pool, another client's temporary
//! table of the same name on the same server connection would capture the lease), and
//! `"$user"` comes first by default (two roles would each use a table of their own). An
//! unqualified name is qualified with [`DEFAULT_SCHEMA`], and the temporary schema is refused.
//!
//! Not here: the tables' DDL and the check of their shapes (`hold/table.rs`, with the columns
//! in `hold/lease/table.rs` and `hold/record/table.rs`).

/// The schema of a table given without one, for every role and session.
pub const DEFAULT_SCHEMA: &str = "public";

/// A validated table name, schema-qualified, quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: String,
    name: String,
    /// The name as SQL: `"schema"."name"`.
    sql: String,
}

/// `--lease-table`'s.
pub type LeaseTable = TableName;

/// `--run-table`'s: the run record.
pub type RunTable = TableName;

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sql)
    }
}

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

impl TableName {
    /// [`TableName::parse_for`] `--lease-table`.
    pub fn parse(text: &str) -> std::result::Result<TableName, String> {
        TableName::parse_for("--lease-table", text)
    }

    /// `leases` (in [`DEFAULT_SCHEMA`]) or `ops.leases`: one or two plain identifiers
    /// (letters, digits, `_`, `$`, not starting with a digit), folded to lower case as
    /// PostgreSQL folds unquoted names. Anything else is refused rather than quoted, so a typo
    /// can never create an odd table; so is the temporary schema. `flag` names the option in
    /// the message.
    pub fn parse_for(flag: &str, text: &str) -> std::result::Result<TableName, String> {
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
                    "invalid {flag} '{text}': give TABLE (in schema {DEFAULT_SCHEMA}) or SCHEMA.TABLE, each a plain identifier (letters, digits, _)"
                ));
            }
        };
        let (schema, name) = (schema.to_ascii_lowercase(), name.to_ascii_lowercase());
        Ok(TableName {
            sql: format!("\"{schema}\".\"{name}\""),
            schema,
            name,
        })
    }

    /// `schema.name`, which [`TableName::parse`] reads back as the same table: what the
    /// command's `HEIMDALL_LOCK_TABLE` says.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// The name as SQL, quoted and schema-qualified: `"schema"."name"`.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The name as a string literal of SQL, for `'…'::pg_catalog.regclass`: the quoted,
    /// qualified name, whose characters need no escaping (plain identifiers only).
    pub fn literal(&self) -> String {
        format!("'{}'", self.sql)
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
}
