//! Rows by name and type. The simple protocol answers text, column by column; a [`Row`] keeps the
//! names its statement's columns have (the server's RowDescription), so a reader asks for
//! `backend_pid` as an `i32`, by the alias the select list gives it, instead of for field 3 of a
//! list written elsewhere.

use std::str::FromStr;
use std::sync::Arc;

use postgres::SimpleQueryMessage;

/// One row of an answer: its values, as text, and the names of its columns.
#[derive(Debug, Clone, Default)]
pub struct Row {
    names: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl Row {
    /// A row of these columns and values, in order.
    #[cfg(test)]
    pub fn new(names: Arc<[String]>, values: Vec<Option<String>>) -> Row {
        Row { names, values }
    }

    /// The text of column `name`; `None` for NULL, or when the row has no such column.
    pub fn text(&self, name: &str) -> Option<&str> {
        let i = self.names.iter().position(|n| n == name)?;
        self.values.get(i)?.as_deref()
    }

    /// Whether the row has a column `name` (NULL or not).
    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Column `name` parsed as a `T`; `None` for NULL, a missing column or text that does not
    /// parse.
    pub fn get<T: FromStr>(&self, name: &str) -> Option<T> {
        self.text(name)?.parse().ok()
    }

    /// Whether column `name` is a boolean true.
    pub fn is_true(&self, name: &str) -> bool {
        self.text(name) == Some("t")
    }

    /// Column `name` owned; `None` for NULL or a missing column.
    pub fn string(&self, name: &str) -> Option<String> {
        self.text(name).map(str::to_owned)
    }
}

/// The rows of a simple-protocol answer, from every statement of the message in turn, each
/// with the names of its own statement's columns.
pub(super) fn from_messages(messages: &[SimpleQueryMessage]) -> Vec<Row> {
    let mut names: Arc<[String]> = Arc::from([]);
    let mut rows = Vec::new();
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                names = columns.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(row) => rows.push(Row {
                names: Arc::clone(&names),
                values: (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            }),
            _ => {}
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_read_by_name_and_type() {
        let names: Arc<[String]> = ["pid", "held", "since", "none"].map(String::from).into();
        let row = Row::new(
            names,
            vec![Some("42".into()), Some("t".into()), Some("x".into()), None],
        );
        assert_eq!(row.get::<i32>("pid"), Some(42));
        assert!(row.is_true("held"));
        assert_eq!(row.get::<i32>("since"), None, "text that does not parse");
        assert_eq!(row.text("none"), None, "NULL");
        assert_eq!(row.text("missing"), None);
        assert!(!Row::default().is_true("held"));
    }
}
