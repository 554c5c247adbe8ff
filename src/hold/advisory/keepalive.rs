//! The server's keepalive for the holding session, sent and checked: the statement that sets the
//! settings `domain::heartbeat` derives from the watchdog's timing (why and how long is there),
//! and, at `-v`, whether the server took them.

use std::time::Duration;

use crate::log;

/// `; SELECT …` to append to the lock's message: sets the settings for the holding transaction
/// (`set_config(…, true)`, i.e. `SET LOCAL`) and answers with what took effect, as
/// `name=value …` in base units (column `keepalive`). It cannot fail the transaction that holds the lock: a setting
/// the server does not know (`tcp_user_timeout` before PostgreSQL 12, `transaction_timeout`
/// before 17) is skipped rather than an error, and one the platform cannot apply shows in the
/// answer. Empty for no settings.
pub fn set_sql(settings: &[(&'static str, String)]) -> String {
    if settings.is_empty() {
        return String::new();
    }
    let values: Vec<String> = settings
        .iter()
        .map(|(name, value)| format!("('{name}', '{value}')"))
        .collect();
    format!(
        "; SELECT pg_catalog.string_agg(pg_catalog.concat_ws('=', s.n, \
         pg_catalog.set_config(s.n, s.v, true)), ' ') AS keepalive FROM (VALUES {}) s(n, v) \
         WHERE pg_catalog.current_setting(s.n, true) IS NOT NULL",
        values.join(", ")
    )
}

/// At `-v`, from the answer to [`set_sql`]: what a cut means, or a warning that the server did
/// not apply a setting. PostgreSQL ignores a socket option the platform lacks
/// (`tcp_user_timeout` off Linux, `tcp_keepalives_count` on Windows) and shows the old value;
/// over a Unix socket it shows every one as 0, and there is no network to cut.
pub fn report(settings: &[(&'static str, String)], answer: &str) {
    if settings.is_empty() {
        return;
    }
    log::debug(format!(
        "the server's keepalive for the holding session: {answer}"
    ));
    let shown: Vec<(&str, &str)> = answer
        .split(' ')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    if !shown.is_empty() && shown.iter().all(|(_, value)| *value == "0") {
        log::debug("connected over a Unix socket: no network to cut, keepalive does not apply");
        return;
    }
    let missing: Vec<String> = settings
        .iter()
        .filter_map(|(name, value)| {
            let now = shown.iter().find(|(n, _)| n == name).map(|(_, v)| *v);
            (!applied(value, now))
                .then(|| format!("{name} is {} (wanted {value})", now.unwrap_or("unknown")))
        })
        .collect();
    if missing.is_empty() {
        log::info(format!(
            "if the network to the server is cut, the server drops this session and the lock {} after the last packet from heimdall ({answer})",
            settings_summary(settings),
        ));
    } else {
        log::info(format!(
            "warning: the server did not apply every keepalive setting ({}); if this host is cut off, the lock may stay held until the server's own keepalive gives up",
            missing.join(", ")
        ));
    }
}

/// The server shows these GUCs as a bare number in their base unit.
fn applied(wanted: &str, shown: Option<&str>) -> bool {
    shown == Some(wanted.trim_end_matches(|c: char| c.is_ascii_alphabetic()))
}

/// D, from the settings themselves: idle + count × interval.
fn settings_summary(settings: &[(&'static str, String)]) -> String {
    let number = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| {
                v.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let total = number("tcp_keepalives_idle")
        + number("tcp_keepalives_count") * number("tcp_keepalives_interval");
    humantime::format_duration(Duration::from_secs(total)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::timing::{Heartbeat, server_settings};

    #[test]
    fn settings_are_set_for_the_transaction_and_skipped_where_unknown() {
        let second = Duration::from_secs(1);
        let hb = Heartbeat {
            interval: second,
            timeout: second,
        };
        let s = server_settings(Some(hb), second);
        let sql = set_sql(&s);
        assert!(
            sql.contains(
                "(VALUES ('tcp_keepalives_idle', '1s'), ('tcp_keepalives_interval', '1s'), \
                 ('tcp_keepalives_count', '4'), ('tcp_user_timeout', '5000ms'))"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("set_config(s.n, s.v, true)"),
            "SET LOCAL: {sql}"
        );
        assert!(
            sql.contains("current_setting(s.n, true) IS NOT NULL"),
            "{sql}"
        );
    }

    #[test]
    fn no_settings_set_nothing() {
        assert_eq!(set_sql(&[]), "");
    }

    #[test]
    fn a_setting_counts_as_applied_when_the_server_shows_the_number() {
        assert!(applied("17s", Some("17")));
        assert!(applied("22000ms", Some("22000")));
        assert!(applied("5", Some("5")));
        assert!(!applied("22000ms", Some("0")));
        assert!(!applied("5", None));
    }
}
