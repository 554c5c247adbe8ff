//! A throwaway PgBouncer in front of a [`TestPostgres`], for the pooler tests.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    TestPostgres, clean_command, cluster_owner, free_port, give_to_cluster_owner, lock, log_tail,
    new_root, spawn_from_keeper, stop_server,
};

/// Debian installs it here, off an ordinary user's PATH.
const CANDIDATES: [&str; 2] = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"];

pub struct PgBouncer {
    port: u16,
    server: Mutex<Option<Child>>,
    log_path: PathBuf,
    _dir: TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer with `pool_mode` (`session`, `transaction` or `statement`) in front of
    /// `pg`. Server connections are handed out round-robin, so consecutive transactions of one
    /// client land on different server connections whenever more than one is idle.
    pub fn start(pg: &TestPostgres, pool_mode: &str) -> PgBouncer {
        PgBouncer::start_with(pg, pool_mode, "")
    }

    /// [`PgBouncer::start`] with `extra` lines for the `[pgbouncer]` section.
    pub fn start_with(pg: &TestPostgres, pool_mode: &str, extra: &str) -> PgBouncer {
        let binary = CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "PgBouncer not found at {CANDIDATES:?}: install it with `apt-get install pgbouncer` (Debian/Ubuntu); `make test` does this for you"
                )
            });
        for _ in 0..5 {
            let dir = new_root();
            let log_path = dir.path().join("pgbouncer.log");
            let config_path = dir.path().join("pgbouncer.ini");
            let port = free_port();
            let config = format!(
                "[databases]\n\
                 postgres = host=127.0.0.1 port={} dbname=postgres user={}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = any\n\
                 pool_mode = {pool_mode}\n\
                 server_round_robin = 1\n\
                 default_pool_size = 4\n\
                 logfile = {}\n\
                 {extra}",
                pg.port(),
                pg.superuser(),
                log_path.display()
            );
            fs::write(&config_path, config).expect("cannot write pgbouncer.ini");
            give_to_cluster_owner(&config_path);
            let mut cmd = clean_command(&binary);
            cmd.arg(&config_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0);
            // PgBouncer refuses to run as root.
            if let Some((uid, gid)) = cluster_owner().run_as {
                cmd.uid(uid).gid(gid);
            }
            // SAFETY: prctl is async-signal-safe; nothing here allocates.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                    Ok(())
                });
            }
            let child = spawn_from_keeper(cmd).expect("cannot start pgbouncer");
            let bouncer = PgBouncer {
                port,
                server: Mutex::new(Some(child)),
                log_path: log_path.clone(),
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if bouncer.config().connect(postgres::NoTls).is_ok() {
                    return bouncer;
                }
                if let Some(child) = lock(&bouncer.server).as_mut()
                    && child.try_wait().ok().flatten().is_some()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let tail = log_tail(&bouncer.log_path);
            if !tail.contains("Address already in use") {
                panic!("PgBouncer did not become ready\n{tail}");
            }
            // The port was taken between our probe and its bind: drop (stop) it and try another.
        }
        panic!("PgBouncer: no free port after 5 attempts")
    }

    /// `postgres://USER@127.0.0.1:PORT/postgres?sslmode=disable`, through the pooler.
    pub fn url(&self, user: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Opens `n` server connections in the pool (n clients in a transaction at once), so that
    /// consecutive transactions of one client can land on different ones.
    pub fn warm(&self, n: usize) {
        let mut clients: Vec<postgres::Client> = (0..n)
            .map(|_| self.config().connect(postgres::NoTls).unwrap())
            .collect();
        for client in &mut clients {
            client.batch_execute("BEGIN; SELECT 1").unwrap();
        }
        for client in &mut clients {
            client.batch_execute("COMMIT").unwrap();
        }
    }

    pub fn config(&self) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        config
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.server).take()
            && let Err(e) = stop_server(&mut child, libc::SIGINT)
        {
            eprintln!("PgBouncer: {e}");
        }
    }
}
