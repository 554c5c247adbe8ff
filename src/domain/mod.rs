//! The leaf types every layer shares: what is locked (`key`, `lock`, `lease_table`), how it is
//! watched and for how long (`timing`, `guard`), how the command ended (`ending`), the outer
//! heimdall of a nested run (`outer`) and heimdall's `application_name` (`appname`). Nothing
//! here imports anything of heimdall's but its siblings, and nothing here does I/O.

pub mod appname;
pub mod ending;
pub mod guard;
pub mod key;
pub mod lease_table;
pub mod lock;
pub mod outer;
pub mod timing;
