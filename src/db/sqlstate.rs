//! The SQLSTATEs heimdall acts on, by name (PostgreSQL's `errcodes.txt`, as the `postgres` crate
//! spells them) instead of as codes: `SqlState::UNDEFINED_TABLE`, not `"42P01"`.

pub use postgres::error::SqlState;

/// Whether `e` is a server error with one of `states`.
pub fn any_of(e: &postgres::Error, states: &[SqlState]) -> bool {
    e.code().is_some_and(|code| states.contains(code))
}
