//! heimdall's integration tests, as one test binary: one link instead of one per file, and one
//! shared throwaway PostgreSQL cluster (`support::shared()`) for the whole run. Each module is
//! one behaviour family; every test uses lock names of its own, so they run in parallel.

mod support;

mod cli;
mod connection;
mod dist;
mod docs;
mod escapes;
mod failover;
mod faults;
mod fdlimits;
mod hardening;
mod holding;
mod lease;
mod lease_table;
mod messages;
mod modes;
mod monitoring;
mod multihost;
mod pooler;
mod queue;
mod recipes;
mod reentry;
mod restarts;
mod run;
mod schedule;
mod secrets;
mod signals;
mod soak;
mod support_smoke;
mod takeover;
mod terminal;
mod tls;
mod wedged;
