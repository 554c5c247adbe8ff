//! A question on a fresh connection of its own, through the async client, that gives the
//! server's or pooler's own words when a statement fails (see [`probe`]).

use postgres::NoTls;

use super::{connection_ended, describe_pg_error};
use crate::config::Dial;
use crate::conninfo::ConnInfo;
use crate::conninfo::tls;
use crate::log;

/// How a [`probe`] ended, when it did not run every statement.
#[derive(Debug)]
pub enum ProbeEnd {
    /// No connection: the host refused it, or did not answer within the connect timeout.
    NoConnection(String),
    /// Statement `step` (from 0) failed: the server's or pooler's own words, if it sent any,
    /// and whether the connection ended with it.
    Failed {
        step: usize,
        said: Option<String>,
        ended: bool,
    },
}

/// Opens a fresh connection to `host` and runs `statements` on it, one after the other, through
/// the async client, giving the first failure in the server's or pooler's own words.
///
/// The sync client cannot give those words when a pooler sends an ErrorResponse and closes at
/// once, as PgBouncer does for `query_wait_timeout`: while waiting for an answer it polls the
/// connection first, and the end of the connection, read in the same go as the error, wins
/// (a bare "connection closed"). The async client hands the error to the statement before its
/// connection task sees the end. No TLS `allow` fallback: a probe is an extra question, not
/// the connection that holds the lock.
pub fn probe(
    dial: &Dial,
    host: &ConnInfo,
    statements: &[&str],
) -> std::result::Result<(), ProbeEnd> {
    let no_connection = |why: String| ProbeEnd::NoConnection(why);
    let config = host.to_tokio_postgres(&dial.application_name, dial.connect_timeout);
    let connector = tls::connector(&host.tls).map_err(|e| no_connection(format!("{e:#}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| no_connection(e.to_string()))?;
    let limit = Some(dial.connect_timeout).filter(|t| !t.is_zero());
    runtime.block_on(async {
        let connecting = async {
            // The connection task runs beside the statements, on this runtime.
            match connector {
                Some(tls) => config.connect(tls).await.map(|(client, task)| {
                    tokio::spawn(task);
                    client
                }),
                None => config.connect(NoTls).await.map(|(client, task)| {
                    tokio::spawn(task);
                    client
                }),
            }
        };
        let client = match limit {
            Some(limit) => tokio::time::timeout(limit, connecting)
                .await
                .map_err(|_| no_connection("no answer within the connect timeout".into()))?,
            None => connecting.await,
        }
        .map_err(|e| no_connection(describe_pg_error(&e)))?;
        for (step, sql) in statements.iter().enumerate() {
            log::debug(format!("probe: {sql}"));
            if let Err(e) = client.simple_query(sql).await {
                return Err(ProbeEnd::Failed {
                    step,
                    said: e.as_db_error().map(|_| describe_pg_error(&e)),
                    ended: connection_ended(&e),
                });
            }
        }
        Ok(())
    })
}
