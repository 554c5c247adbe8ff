//! The lease table's name, checked and quoted once, and its DDL.

/// A validated table name, possibly schema-qualified, quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTable {
    /// The name as SQL: each part double-quoted.
    pub(super) sql: String,
}

impl std::fmt::Display for LeaseTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sql)
    }
}

impl LeaseTable {
    /// `leases` or `ops.leases`: one or two plain identifiers (letters, digits, `_`, `$`, not
    /// starting with a digit). Anything else is refused rather than quoted, so a typo can never
    /// create an odd table.
    pub fn parse(text: &str) -> std::result::Result<LeaseTable, String> {
        let parts: Vec<&str> = text.split('.').collect();
        let plain = |p: &str| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                && p.len() <= 63
        };
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(format!(
                "invalid --lease-table '{text}': give TABLE or SCHEMA.TABLE, each a plain identifier (letters, digits, _)"
            ));
        }
        Ok(LeaseTable {
            sql: parts
                .iter()
                .map(|p| format!("\"{}\"", p.to_ascii_lowercase()))
                .collect::<Vec<_>>()
                .join("."),
        })
    }

    /// The table heimdall creates when it is missing, for a DBA to run by hand.
    pub fn ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
             lock_key    text        PRIMARY KEY,\n    \
             version     bigint      NOT NULL,\n    \
             lock_name   text        NOT NULL,\n    \
             holder      text        NOT NULL,\n    \
             acquired_at timestamptz NOT NULL,\n    \
             expires_at  timestamptz NOT NULL\n);",
            self.sql
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_optionally_schema_qualified() {
        assert_eq!(LeaseTable::parse("leases").unwrap().sql, "\"leases\"");
        assert_eq!(
            LeaseTable::parse("Ops.Heimdall_Leases").unwrap().sql,
            "\"ops\".\"heimdall_leases\""
        );
        for bad in ["", "a.b.c", "1x", "x;drop", "x\"y", "a b", "a."] {
            assert!(LeaseTable::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
