//! The floor that `make bench` compares heimdall's wrap overhead against: the least a client of
//! the same `postgres` crate (sync, NoTls) can do to run a command under an advisory lock.
//! Connect, `SELECT pg_try_advisory_lock(1,2)` as one simple query, run the command, exit;
//! closing the connection releases the lock.
//!
//! Not a tool: no watchdog, no signal handling, no process group, no unlock, no busy check.
//! Everything heimdall does beyond this is what the overhead figure measures.

use std::process::{Command, ExitCode};

use postgres::{Client, NoTls};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(conninfo), Some(program)) = (args.next(), args.next()) else {
        eprintln!("usage: floor CONNINFO COMMAND [ARGS]...");
        return ExitCode::from(2);
    };
    let mut client = match Client::connect(&conninfo, NoTls) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("floor: cannot connect: {e}");
            return ExitCode::from(69);
        }
    };
    // The answer is not checked: run back to back, the previous run's backend may still be
    // releasing (1,2) as it exits, and either way the cost is the same one round trip.
    if let Err(e) = client.simple_query("SELECT pg_try_advisory_lock(1,2)") {
        eprintln!("floor: cannot take the lock: {e}");
        return ExitCode::from(69);
    }
    match Command::new(&program).args(args).status() {
        Ok(status) => ExitCode::from(status.code().unwrap_or(125).clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("floor: cannot run {program}: {e}");
            ExitCode::from(127)
        }
    }
}
