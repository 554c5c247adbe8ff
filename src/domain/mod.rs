//! The leaf types every layer shares. Nothing here imports anything of heimdall's but its
//! own siblings, and nothing here does I/O.

pub mod appname;
pub mod key;
