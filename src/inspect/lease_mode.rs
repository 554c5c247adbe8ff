//! `status` and `list` in lease mode (`--lease-table`): the live leases, with the run record's
//! last runs as for an advisory lock.

use std::collections::BTreeSet;

use anyhow::Result;

use super::runs::{self, Runs};
use super::{Taken, print};
use crate::cli::{ListCli, StatusCli};
use crate::db::Session;
use crate::domain::lease_table::LeaseTable;
use crate::domain::lock::LockTarget;
use crate::exit::{Classify, Failure};
use crate::hold::lease::{self, LeaseHolder};

/// `status --lease-table`: the live leases on the lock's keys, and its last run.
pub fn status(
    cli: &StatusCli,
    lock: &LockTarget,
    session: &mut Session,
    table: &LeaseTable,
) -> Result<u8> {
    let held = lease::lock_holders(session, table, lock)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    // One row per key, the table's primary key: each live lease is one slot taken.
    let taken = Taken {
        taken: held.len(),
        slots: lock.slots,
    };
    let runs = Runs::read(session, &cli.record, Some(&[lock.key.to_string()]))?;
    let last = runs.of(&lock.key.to_string());
    let running =
        last.is_some_and(|last| runs::running(last, held.iter().map(|h| Some(h.holder.as_str()))));
    let mut out = Vec::new();
    if cli.json {
        let json = serde_json::json!({
            "lock": lock.short(),
            "keys": lock.key.to_string(),
            "slots": lock.slots,
            "lease_table": table.to_string(),
            "taken": taken.taken,
            "free": taken.free(),
            "holders": held.iter().map(LeaseHolder::to_json).collect::<Vec<_>>(),
            "last_run": last.map(|last| last.to_json(running)),
        });
        out.push(json.to_string());
    } else {
        let each: Vec<String> = held
            .iter()
            .map(|h| format!("{} {}", h.name, h.describe()))
            .collect();
        out.push(taken.text(
            &format!("{} (lease in {table})", lock.describe()),
            &format!("held by {}", each.join("; ")),
        ));
        out.extend(last.map(|last| runs::line(last, running)));
    }
    print(&out)?;
    Ok(taken.code(cli.busy_exit_code))
}

/// `list --lease-table`: every live lease in the table, and every lock with a run record.
pub fn list(cli: &ListCli, session: &mut Session, table: &LeaseTable) -> Result<u8> {
    let leases = lease::all_holders(session, table)
        .map_err(anyhow::Error::msg)
        .classify(Failure::Unavailable)?;
    let runs = Runs::read(session, &cli.record, None)?;
    let held: BTreeSet<String> = leases.iter().map(|l| l.key.clone()).collect();
    let last_of = |l: &LeaseHolder| {
        runs.of(&l.key)
            .map(|last| (last, runs::running(last, [Some(l.holder.as_str())])))
    };
    let mut out = Vec::new();
    if cli.json {
        let items: Vec<serde_json::Value> = leases
            .iter()
            .map(|l| {
                let mut value = l.to_json();
                value["held"] = true.into();
                value["last_run"] = last_of(l).map(|(last, r)| last.to_json(r)).into();
                value
            })
            .chain(runs.free(&held).map(runs::free_json))
            .collect();
        out.push(serde_json::Value::Array(items).to_string());
    } else if leases.is_empty() && runs.is_empty() {
        out.push(format!("no live leases in {table}"));
    } else {
        let last = (!runs.is_empty()).then_some("LAST RUN");
        out.push(row(
            &["LOCK", "KEYS", "VERSION", "HOLDER", "EXPIRES IN"],
            last,
        ));
        for l in &leases {
            let expires = l
                .expires_in_seconds
                .map_or_else(|| "?".to_owned(), |s| format!("{s:.1}s"));
            let version = l.version.to_string();
            let last = (!runs.is_empty())
                .then(|| last_of(l).map_or_else(|| "-".to_owned(), |(last, r)| last.describe(r)));
            let cells = [&l.name, &l.key, &version, &l.holder, &expires];
            out.push(row(&cells.map(String::as_str), last.as_deref()));
        }
        for last in runs.free(&held) {
            let cells = [last.name.as_str(), &last.key, "-", "(free)", "-"];
            out.push(row(&cells, Some(&last.describe(false))));
        }
    }
    print(&out)?;
    Ok(0)
}

/// One line of `list --lease-table`, with the last run when the record has any.
fn row(cells: &[&str; 5], last: Option<&str>) -> String {
    let [lock, keys, version, holder, expires] = cells;
    let row = format!("{lock:<32} {keys:<24} {version:<8} {holder:<44} ");
    match last {
        Some(last) => format!("{row}{expires:<12} {last}"),
        None => format!("{row}{expires}"),
    }
}
