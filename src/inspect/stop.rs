//! `heimdall stop`: an operator's takeover request, without running anything. Asks the heimdall
//! run holding the lock to stop its command and let go, and waits until it has
//! (`hold::advisory::takeover`, `hold::lease::takeover`); a lock held by a session that is not
//! heimdall's is reported, never terminated.

use std::time::Duration;

use anyhow::Result;

use super::{held_by, print};
use crate::cli::StopCli;
use crate::config::{self, Dial};
use crate::db;
use crate::domain::lock::LockTarget;
use crate::domain::timing;
use crate::exit::{Classify, Failure};
use crate::hold::advisory::holders::Holder;
use crate::hold::advisory::takeover::{self, StopEnd};
use crate::hold::lease::{self, LeaseHolder, takeover::LeaseStop};
use crate::log;
use crate::process::identity;

/// Exit 0 once the holder has let go (or when nothing held the lock), the busy code when it
/// is still held as the wait ends or held by a session that is not heimdall's.
pub fn stop(cli: StopCli) -> Result<u8> {
    log::set_level(config::level(&cli.output));
    let lock = config::lock_target(&cli.lock)?;
    if lock.slots > 1 {
        return Err(anyhow::anyhow!(
            "heimdall stop does not take --slots: a semaphore's holders run together, so there is no one run to stop"
        ))
        .classify(Failure::Usage);
    }
    let limit = cli
        .wait
        .filter(|w| !w.is_zero())
        .unwrap_or_else(|| timing::takeover_bound(None, Duration::from_secs(10)));
    let label = format!("stop {}", lock.short());
    let dial = Dial::from_args(&cli.conn, &label, None, &identity::SYSTEM)?;
    let mut session = db::open(&dial)?;
    let name = lock.describe();
    let said = if let Some(table) = &cli.lease.lease_table {
        let me = &dial.application_name;
        let end = lease::takeover::stop(&mut session, table, &lock, me, limit)?;
        let leases = |held: &[LeaseHolder]| {
            let each: Vec<String> = held.iter().map(LeaseHolder::describe).collect();
            format!("held by lease {}", each.join("; "))
        };
        let json = |held: &[LeaseHolder]| held.iter().map(LeaseHolder::to_json).collect();
        match &end {
            LeaseStop::Free => Said::free(&name),
            LeaseStop::Stopped(held, took) => {
                Said::stopped(&name, &leases(held), json(held), *took)
            }
            LeaseStop::TimedOut(held, waited) => Said::timed_out(
                &name,
                &leases(held),
                json(held),
                *waited,
                lease::takeover::NO_ANSWER,
                cli.busy_exit_code,
            ),
        }
    } else {
        let end = takeover::stop(&mut session, &lock, limit)?;
        let json = |held: &[Holder]| held.iter().map(Holder::to_json).collect();
        match &end {
            StopEnd::Free => Said::free(&name),
            StopEnd::NotHeimdall(held) => Said {
                result: "not_heimdall",
                code: cli.busy_exit_code,
                text: format!(
                    "lock {name}: {}, which is not a heimdall run: not asked to stop, and not terminated",
                    held_by(held)
                ),
                holders: json(held),
                waited: None,
            },
            StopEnd::Stopped(held, took) => Said::stopped(&name, &held_by(held), json(held), *took),
            StopEnd::TimedOut(held, waited, why) => Said::timed_out(
                &name,
                &held_by(held),
                json(held),
                *waited,
                why,
                cli.busy_exit_code,
            ),
        }
    };
    session.close();
    said.print(&cli, &lock)
}

/// What `stop` says: on stdout when it succeeded (or as JSON), else as a warning.
struct Said {
    result: &'static str,
    code: u8,
    text: String,
    holders: Vec<serde_json::Value>,
    waited: Option<Duration>,
}

impl Said {
    fn free(name: &str) -> Said {
        Said {
            result: "free",
            code: 0,
            text: format!("lock {name}: free, nothing to stop"),
            holders: Vec::new(),
            waited: None,
        }
    }

    fn stopped(name: &str, held: &str, holders: Vec<serde_json::Value>, took: Duration) -> Said {
        Said {
            result: "stopped",
            code: 0,
            text: format!(
                "lock {name}: the holder let go after {:.1}s (was {held})",
                took.as_secs_f64()
            ),
            holders,
            waited: Some(took),
        }
    }

    fn timed_out(
        name: &str,
        held: &str,
        holders: Vec<serde_json::Value>,
        waited: Duration,
        why: &str,
        code: u8,
    ) -> Said {
        Said {
            result: "timeout",
            code,
            text: format!(
                "lock {name}: still {held} after waiting {:.1}s: {why}",
                waited.as_secs_f64()
            ),
            holders,
            waited: Some(waited),
        }
    }

    fn print(self, cli: &StopCli, lock: &LockTarget) -> Result<u8> {
        if cli.json {
            let json = serde_json::json!({
                "lock": lock.short(),
                "keys": lock.key.to_string(),
                "result": self.result,
                "holders": self.holders,
                "waited_ms": self.waited.map(|w| w.as_millis() as u64),
            });
            print(&[json.to_string()])?;
        } else if self.code == 0 {
            print(&[self.text])?;
        } else {
            log::warn(self.text);
        }
        Ok(self.code)
    }
}
