//! `heimdall stop`: an operator's takeover request, without running anything. Asks the heimdall
//! run holding the lock to stop its command and let go, and waits until it has
//! (`hold::advisory::takeover`); a lock held by a session that is not heimdall's is reported,
//! never terminated.

use std::time::Duration;

use anyhow::Result;

use super::{held_by, print};
use crate::cli::StopCli;
use crate::config::{self, Dial};
use crate::db;
use crate::domain::timing;
use crate::exit::{Classify, Failure};
use crate::hold::advisory::holders::Holder;
use crate::hold::advisory::takeover::{self, StopEnd};
use crate::log;
use crate::process::identity;

/// Exit 0 once the holder has let go (or when nothing held the lock), the busy code when it
/// is still held as the wait ends or held by a session that is not heimdall's.
pub fn stop(cli: StopCli) -> Result<u8> {
    log::set_level(config::level(&cli.output));
    let lock = config::lock_target(&cli.lock)?;
    if cli.lease.lease_table.is_some() {
        return Err(anyhow::anyhow!(
            "heimdall stop does not support --lease-table in this version: a lease's renewals do not look for a replacer"
        ))
        .classify(Failure::Usage);
    }
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
    let end = takeover::stop(&mut session, &lock, limit)?;
    session.close();
    let name = lock.describe();
    let (result, code, text, holders, waited) = match &end {
        StopEnd::Free => (
            "free",
            0,
            format!("lock {name}: free, nothing to stop"),
            &[][..],
            None,
        ),
        StopEnd::NotHeimdall(held) => (
            "not_heimdall",
            cli.busy_exit_code,
            format!(
                "lock {name}: {}, which is not a heimdall run: not asked to stop, and not terminated",
                held_by(held)
            ),
            &held[..],
            None,
        ),
        StopEnd::Stopped(held, took) => (
            "stopped",
            0,
            format!(
                "lock {name}: the holder let go after {:.1}s (was {})",
                took.as_secs_f64(),
                held_by(held)
            ),
            &held[..],
            Some(*took),
        ),
        StopEnd::TimedOut(held, waited, why) => (
            "timeout",
            cli.busy_exit_code,
            format!(
                "lock {name}: still {} after waiting {:.1}s: {why}",
                held_by(held),
                waited.as_secs_f64()
            ),
            &held[..],
            Some(*waited),
        ),
    };
    if cli.json {
        let json = serde_json::json!({
            "lock": lock.short(),
            "keys": lock.key.to_string(),
            "result": result,
            "holders": holders.iter().map(Holder::to_json).collect::<Vec<_>>(),
            "waited_ms": waited.map(|w| w.as_millis() as u64),
        });
        print(&[json.to_string()])?;
    } else if code == 0 {
        print(&[text])?;
    } else {
        log::warn(text);
    }
    Ok(code)
}
