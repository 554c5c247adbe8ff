//! The processes: the command (`child`: spawned in its own group, signalled, reaped), heimdall's
//! own children (`reap`), the job's mark (`mark`), the keeper that outlives heimdall to stop the
//! job (`keeper/`), reading /proc (`procfs`), finding the program before connecting
//! (`program`), the descriptor limit (`fdlimit`) and who and where heimdall runs (`identity`).
//!
//! Nothing here knows about the lock or the database, and only this layer sends signals.

pub mod child;
pub mod fdlimit;
pub mod identity;
pub mod keeper;
pub mod mark;
pub mod procfs;
pub mod program;
pub mod reap;
