//! The command that `make bench`'s handoff phase runs under each lock: it appends the time it
//! started to one file and the time it is about to exit to another, as nanoseconds since the
//! Unix epoch, one line each. It stands in for `sh -c 'date +%s%N >>starts; date +%s%N >>ends'`,
//! whose shell and two `date` processes would otherwise be most of the gap measured between one
//! holder's end and the next one's start.
//!
//! Not a clock for anything else: the realtime clock can be stepped (the gap between two runs
//! can then be off by the step); std offers no monotonic clock that two processes can compare.
//! Each line is one `write(2)` to a file opened with O_APPEND, so concurrent writers do not
//! interleave.

use std::fs::OpenOptions;
use std::io::Write;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [starts, ends] = args.as_slice() else {
        eprintln!("usage: stamp STARTS-FILE ENDS-FILE");
        return ExitCode::from(2);
    };
    // The start is read before anything else; the end after the start is written.
    let written = append(starts, now_ns()).and_then(|()| append(ends, now_ns()));
    if let Err(e) = written {
        eprintln!("stamp: {e}");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// One `write(2)` of "NS\n" at the end of PATH.
fn append(path: &str, ns: u128) -> Result<(), String> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut file| file.write_all(format!("{ns}\n").as_bytes()))
        .map_err(|e| format!("{path}: {e}"))
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
