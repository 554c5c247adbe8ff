//! The run table's columns: one row per lock, its last run. Its DDL, its creation and the
//! check of its shape follow the rules of every table heimdall keeps (`hold/table.rs`).

use crate::hold::table::{BIGINT, INTEGER, Shape, TEXT, TIMESTAMPTZ, column};

pub const SHAPE: Shape = Shape {
    what: "run table",
    purpose: "keep the run record",
    columns: &[
        // The lock's keys, as the lease table keys its rows: `k1,k2` or `N`.
        column("lock_key", TEXT, "PRIMARY KEY"),
        // `namespace/name` or `key N`, for a person reading the table.
        column("lock_name", TEXT, "NOT NULL"),
        // How many runs of the lock have started.
        column("runs", BIGINT, "NOT NULL"),
        // On the server's clock, as every rule that reads them.
        column("started_at", TIMESTAMPTZ, "NOT NULL"),
        // NULL until the run ends: an end that never came is a run that was killed.
        column("ended_at", TIMESTAMPTZ, ""),
        // heimdall's exit status for the run, and what it came to (`ran`, `signaled`,
        // `timeout`, `lost`).
        column("exit_code", INTEGER, ""),
        column("outcome", TEXT, ""),
        // Who ran it: the host and heimdall's pid.
        column("host", TEXT, "NOT NULL"),
        column("pid", INTEGER, "NOT NULL"),
    ],
};
