//! A throwaway pgpool-II in streaming-replication mode in front of a primary and its hot
//! standby, with load balancing on, for the tests of a proxy that routes statements one by one
//! (`../shared/POOLERS.md`, "Proxies that route by statement").

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

/// Debian's package `pgpool2` installs it here.
const CANDIDATES: [&str; 2] = ["/usr/sbin/pgpool", "/usr/bin/pgpool"];
/// How long pgpool gets to accept connections and to find the primary.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// A primary, its streaming standby and pgpool-II in front of both.
pub struct Cluster {
    pub pgpool: PgPool,
    /// Dropped after pgpool (fields drop in order), so pgpool never sees its backends vanish.
    pub _standby: TestPostgres,
    pub primary: TestPostgres,
}

/// The pgpool-II process of a [`Cluster`].
pub struct PgPool {
    port: u16,
    server: Mutex<Option<Child>>,
    log_path: PathBuf,
    _dir: TempDir,
}

/// Where pgpool sends a lone `SELECT` of functions it takes for reads.
#[derive(Debug, Clone, Copy)]
pub enum Reads {
    /// Either node, half each: pgpool's picture of a balanced cluster.
    Balanced,
    /// The standby takes every read (`backend_weight0 = 0`): a misrouted statement is seen at once.
    Standby,
}

impl Cluster {
    /// Starts a primary, a streaming standby (`pg_basebackup -R`) and pgpool-II with
    /// `load_balance_mode = on` and `extra` lines for `pgpool.conf`.
    pub fn start(reads: Reads, extra: &str) -> Cluster {
        let binary = CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "pgpool-II not found at {CANDIDATES:?}: install it with `apt-get install pgpool2` (Debian/Ubuntu); `make test` does this for you"
                )
            });
        let primary = TestPostgres::start();
        let standby = primary.start_standby();
        let primary_weight = match reads {
            Reads::Balanced => 1,
            Reads::Standby => 0,
        };
        for _ in 0..5 {
            let dir = new_root();
            let log_path = dir.path().join("pgpool.log");
            let config_path = dir.path().join("pgpool.conf");
            let pcp_path = dir.path().join("pcp.conf");
            let port = free_port();
            let config = format!(
                "backend_clustering_mode = 'streaming_replication'\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 socket_dir = '{dir}'\n\
                 pcp_listen_addresses = ''\n\
                 pcp_port = {pcp_port}\n\
                 pcp_socket_dir = '{dir}'\n\
                 backend_hostname0 = '127.0.0.1'\n\
                 backend_port0 = {primary_port}\n\
                 backend_weight0 = {primary_weight}\n\
                 backend_flag0 = 'DISALLOW_TO_FAILOVER'\n\
                 backend_hostname1 = '127.0.0.1'\n\
                 backend_port1 = {standby_port}\n\
                 backend_weight1 = 1\n\
                 backend_flag1 = 'DISALLOW_TO_FAILOVER'\n\
                 enable_pool_hba = off\n\
                 pool_passwd = ''\n\
                 num_init_children = 16\n\
                 max_pool = 1\n\
                 load_balance_mode = on\n\
                 sr_check_period = 0\n\
                 sr_check_user = '{user}'\n\
                 sr_check_password = ''\n\
                 health_check_period = 0\n\
                 failover_on_backend_error = off\n\
                 pid_file_name = '{dir}/pgpool.pid'\n\
                 logdir = '{dir}'\n\
                 log_destination = 'stderr'\n\
                 {extra}\n",
                dir = dir.path().display(),
                pcp_port = free_port(),
                primary_port = primary.port(),
                standby_port = standby.port(),
                user = primary.superuser(),
            );
            fs::write(&config_path, config).expect("cannot write pgpool.conf");
            fs::write(&pcp_path, "").expect("cannot write pcp.conf");
            give_to_cluster_owner(&config_path);
            give_to_cluster_owner(&pcp_path);
            give_to_cluster_owner(dir.path());
            let log = fs::File::create(&log_path).expect("cannot create pgpool.log");
            give_to_cluster_owner(&log_path);
            let mut cmd = clean_command(&binary);
            cmd.arg("-n")
                .arg("-f")
                .arg(&config_path)
                .arg("-F")
                .arg(&pcp_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cannot share pgpool.log"))
                .stderr(log)
                .process_group(0);
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
            let child = spawn_from_keeper(cmd).expect("cannot start pgpool");
            let pool = PgPool {
                port,
                server: Mutex::new(Some(child)),
                log_path,
                _dir: dir,
            };
            let deadline = Instant::now() + READY_LIMIT;
            while Instant::now() < deadline {
                if pool.knows_its_primary(primary.superuser()) {
                    return Cluster {
                        pgpool: pool,
                        _standby: standby,
                        primary,
                    };
                }
                if let Some(child) = lock(&pool.server).as_mut()
                    && child.try_wait().ok().flatten().is_some()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let tail = log_tail(&pool.log_path);
            if !tail.contains("Address already in use") {
                panic!("pgpool-II did not become ready\n{tail}");
            }
            // The port was taken between our probe and its bind: drop (stop) it, try another.
        }
        panic!("pgpool-II: no free port after 5 attempts")
    }

    /// `postgres://USER@127.0.0.1:PORT/postgres?sslmode=disable`, through pgpool.
    pub fn url(&self, user: &str) -> String {
        self.pgpool.url(user)
    }
}

impl PgPool {
    /// `postgres://USER@127.0.0.1:PORT/postgres?sslmode=disable`, through pgpool.
    pub fn url(&self, user: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// pgpool answers, and has found which backend is the primary (`SHOW pool_nodes`).
    fn knows_its_primary(&self, user: &str) -> bool {
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5));
        let Ok(mut client) = config.connect(postgres::NoTls) else {
            return false;
        };
        let Ok(messages) = client.simple_query("SHOW pool_nodes") else {
            return false;
        };
        messages.iter().any(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => {
                (0..row.len()).any(|i| row.get(i) == Some("primary"))
            }
            _ => false,
        })
    }
}

impl Drop for PgPool {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.server).take()
            && let Err(e) = stop_server(&mut child, libc::SIGINT)
        {
            eprintln!("pgpool-II: {e}\n{}", log_tail(&self.log_path));
        }
    }
}
