//! Pieces of SQL the statements of `hold` share: string literals and intervals that mean the
//! same whatever the session's settings and `search_path`.

use std::time::Duration;

/// A string literal that means the same whatever `standard_conforming_strings` says.
pub fn literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// An interval of `ms` milliseconds, exactly.
pub fn millis(ms: u128) -> String {
    format!("pg_catalog.make_interval(secs => {ms}::pg_catalog.float8 OPERATOR(pg_catalog./) 1000)")
}

/// [`millis`] of a duration.
pub fn interval(d: Duration) -> String {
    millis(d.as_millis())
}

/// `pg_catalog.clock_timestamp()`: the server's clock as the statement runs, the one clock
/// every lease expiry and every run record is written and read by.
pub const CLOCK: &str = "pg_catalog.clock_timestamp()";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_survive_quotes_and_backslashes() {
        assert_eq!(literal(r"a'b\c"), r"E'a\'b\\c'");
    }

    #[test]
    fn intervals_are_exact_and_leave_nothing_to_the_search_path() {
        let sql = interval(Duration::from_millis(1500));
        assert!(sql.contains("1500::pg_catalog.float8"), "{sql}");
        assert_eq!(crate::db::unqualified(&sql), [""; 0], "{sql}");
    }
}
