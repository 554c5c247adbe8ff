//! The processes: the command (spawned, signalled, reaped), the keeper that outlives heimdall,
//! finding the program before connecting, and the descriptor limit.

pub mod child;
pub mod fdlimit;
pub mod keeper;
pub mod program;
