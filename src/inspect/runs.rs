//! The run record in `status` and `list`: each lock's last run, told running or killed by who
//! holds the lock now, and the locks that have a record but no holder.

use std::collections::BTreeSet;

use anyhow::Result;

use crate::cli::{DEFAULT_RUN_TABLE, RecordArgs};
use crate::db::Session;
use crate::domain::appname;
use crate::domain::key::LockKey;
use crate::domain::lease_table::RunTable;
use crate::exit::{Classify, Failure};
use crate::hold::record::{self, LastRun};

use super::identify::{Named, identify};

/// The last runs the record has.
pub struct Runs(Vec<LastRun>);

impl Runs {
    /// The last runs of `keys` (of every lock with `None`) in `--run-table`, else the default
    /// table; none when that table does not exist yet.
    pub fn read(session: &mut Session, args: &RecordArgs, keys: Option<&[String]>) -> Result<Runs> {
        let table = match &args.run_table {
            Some(table) => table.clone(),
            None => RunTable::parse_for("--run-table", DEFAULT_RUN_TABLE)
                .map_err(anyhow::Error::msg)
                .classify(Failure::Internal)?,
        };
        let runs = record::last_runs(session, &table, keys)
            .map_err(anyhow::Error::msg)
            .classify(Failure::Unavailable)?;
        Ok(Runs(runs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The last run of the lock with `key`.
    pub fn of(&self, key: &str) -> Option<&LastRun> {
        self.0.iter().find(|r| r.key == key)
    }

    /// The last runs of locks whose keys are not in `held`.
    pub fn free<'a>(&'a self, held: &'a BTreeSet<String>) -> impl Iterator<Item = &'a LastRun> {
        self.0.iter().filter(|r| !held.contains(&r.key))
    }
}

/// Whether `last` is the run that holds its lock now, by the `application_name`s of the
/// holders: one that names its host and heimdall's pid, or one that says nothing of who it is
/// (set by the user), counts. A lock held by another heimdall means the recorded run ended
/// without a word.
pub fn running<'a>(last: &LastRun, holders: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    holders
        .into_iter()
        .any(|app| match app.and_then(appname::parse) {
            Some((_, host, pid)) => host == last.host && i64::from(pid) == i64::from(last.pid),
            None => true,
        })
}

/// `status`'s second line.
pub fn line(last: &LastRun, running: bool) -> String {
    format!("last run: {}", last.describe(running))
}

/// `list --json`'s item for a lock with a record and no holder.
pub fn free_json(last: &LastRun) -> serde_json::Value {
    let names = last
        .key
        .parse::<LockKey>()
        .ok()
        .and_then(|key| match identify(&last.name, key) {
            Named::Known { names, .. } => names,
            _ => None,
        });
    let (namespace, name) = names.unzip();
    serde_json::json!({
        "lock": last.name,
        "namespace": namespace,
        "name": name,
        "keys": last.key,
        "held": false,
        "last_run": last.to_json(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(host: &str, pid: i32) -> LastRun {
        LastRun {
            key: "1,2".to_owned(),
            name: "a/b".to_owned(),
            runs: 1,
            started_at: String::new(),
            ended_at: None,
            exit_code: None,
            outcome: None,
            host: host.to_owned(),
            pid,
            age: 1.0,
            duration: None,
        }
    }

    #[test]
    fn a_run_without_an_end_is_running_only_while_its_own_heimdall_holds_the_lock() {
        let ours = appname::format("a/b", "web-3", 4242);
        let other = appname::format("a/b", "web-4", 4242);
        assert!(running(&last("web-3", 4242), [Some(ours.as_str())]));
        assert!(!running(&last("web-3", 4242), [Some(other.as_str())]));
        assert!(running(&last("web-3", 4242), [Some("my own name")]));
        assert!(!running(&last("web-3", 4242), []));
    }

    #[test]
    fn a_free_lock_is_listed_with_its_names_when_they_hash_to_its_key() {
        let key = LockKey::derive(crate::domain::key::Hash::Siphash, "ns", "job");
        let mut run = last("web-3", 1);
        run.key = key.to_string();
        run.name = "ns/job".to_owned();
        let item = free_json(&run);
        assert_eq!(item["namespace"], "ns");
        assert_eq!(item["name"], "job");
        assert_eq!(item["held"], false);
        assert_eq!(item["last_run"]["outcome"], "killed");
    }
}
