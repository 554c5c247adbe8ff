//! Test support shared by the integration tests: a throwaway PostgreSQL cluster
//! ([`TestPostgres`]), builders for the binary under test ([`heimdall`],
//! [`heimdall_std`]) and other programs ([`clean_command`]) that never inherit the developer's
//! connection settings, the limits every test waits within ([`START_LIMIT`], [`RUN_LIMIT`],
//! [`REACT_LIMIT`]), and polling helpers ([`busy_wait`], [`wait_child`],
//! [`process_group_alive`]). [`runs`] runs heimdall to the end or holds a lock in the
//! background; [`procs`] runs it in the background around a shell script and watches the
//! processes it starts; [`locks`] reads `pg_locks`.
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

pub mod events;
pub mod locks;
pub mod netns;
pub mod pgbouncer;
pub mod pgpool;
pub mod procs;
pub mod proxy;
pub mod runs;
pub mod tls;
pub mod wedged;

use std::ffi::{CStr, CString};
use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A role that must authenticate with [`PW_PASSWORD`] (scram-sha-256), over TCP
/// and over the socket; every other role is trusted.
pub const PW_USER: &str = "heimdall_pw";
/// The password of [`PW_USER`].
pub const PW_PASSWORD: &str = "s3cr3t-PW";

/// How long a server gets to become connectable.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// How long a server gets to finish a shutdown before SIGKILL.
const STOP_LIMIT: Duration = Duration::from_secs(20);
/// Fresh ports to try when the one we picked was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;
/// Unix socket paths are limited to 107 bytes (`sun_path`), and the server adds
/// `/.s.PGSQL.NNNNN` to the directory; a long `$TMPDIR` falls back to /tmp.
const MAX_TEMP_BASE: usize = 60;

pub const PG_HBA: &str = "\
# Written by tests/support: one password role, everything else trusted.
host        all          heimdall_pw  127.0.0.1/32  scram-sha-256
local       all          heimdall_pw                scram-sha-256
local       all          all                        trust
host        all          all          127.0.0.1/32  trust
local       replication  all                        trust
host        replication  all          127.0.0.1/32  trust
";

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

// One set for every test, generous for a loaded 2-core machine: a test that passes never waits
// them out, so only a failing test pays for their size.

/// How long a command gets to start (write its pid file, touch its marker, queue for a lock).
pub const START_LIMIT: Duration = Duration::from_secs(20);
/// How long any one heimdall run (or other program) may take before the test gives up on it.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);
/// How long heimdall gets to react to a signal or a release, and processes to vanish after one.
pub const REACT_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The binary under test, and other programs
// ---------------------------------------------------------------------------

/// `heimdall` as an `assert_cmd::Command`, with a 60 s timeout and a clean
/// connection environment (see [`heimdall_std`]).
pub fn heimdall() -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::from_std(heimdall_std());
    cmd.timeout(Duration::from_secs(60));
    cmd
}

/// `heimdall` as a `std::process::Command`, for tests that need a background
/// `Child`. Every `PG*`, `HEIMDALL_*` and `DATABASE_URL` variable is removed so
/// the developer's environment never leaks into a test.
///
/// The lock-delay is switched off (`HEIMDALL_LOCK_DELAY=0`): every test cluster has just
/// started, so with the default each run would hold its lock some 20 s before starting its
/// command. Tests about the delay remove the variable or pass `--lock-delay`.
pub fn heimdall_std() -> Command {
    let mut cmd = clean_command(env!("CARGO_BIN_EXE_heimdall"));
    cmd.env(LOCK_DELAY_ENV, "0");
    cmd
}

/// The lock-delay's environment twin, which [`heimdall_std`] sets to 0.
pub const LOCK_DELAY_ENV: &str = "HEIMDALL_LOCK_DELAY";

/// `program` without this process's connection settings (see [`is_connection_variable`]), so
/// that a developer's `PGHOST` or `DATABASE_URL` never reaches heimdall, a shell that runs it,
/// or a server the tests start.
pub fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if is_connection_variable(&key) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// `cmd` run by another program: `program args... CMD CMD_ARGS...` (`ip netns exec NAME`,
/// `strace ...`). Program, arguments, environment changes and working directory carry over;
/// stdio is the caller's to set.
pub fn run_under(program: &str, args: &[&str], cmd: &Command) -> Command {
    let mut under = Command::new(program);
    under.args(args).arg(cmd.get_program()).args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => under.env(key, value),
            None => under.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        under.current_dir(dir);
    }
    under
}

/// `PG*` (libpq's), `HEIMDALL_*` (heimdall's env twins) and `DATABASE_URL`.
pub fn is_connection_variable(name: &std::ffi::OsStr) -> bool {
    let k = name.as_bytes();
    k.starts_with(b"PG") || k.starts_with(b"HEIMDALL_") || k == b"DATABASE_URL"
}

/// Bytes a program wrote, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cmd` to its end with stdin closed and stdout and stderr captured; panics if it takes
/// longer than [`RUN_LIMIT`] (killing it) or cannot start.
pub fn output_of(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    wait_output(child)
}

/// Waits for `child`, whose stdout and stderr are piped, and returns what it wrote; the pipes
/// are read meanwhile, so a chatty child cannot block on a full one. Past [`RUN_LIMIT`] the
/// child is killed and the test fails.
pub fn wait_output(child: Child) -> std::process::Output {
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("cannot read the child's output"),
        Err(_) => {
            // SAFETY: plain syscall; the child is not reaped before wait_with_output returns,
            // which it has not, so the pid is still our child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("process {pid} did not finish within {RUN_LIMIT:?}; killed it");
        }
    }
}

/// `man -l PAGE` as a reader sees it (`MANWIDTH`=80, paged through cat); panics with what man
/// said if it fails or is missing.
pub fn render_man_page(page: &Path) -> String {
    let out = clean_command("man")
        .arg("-l")
        .arg(page)
        .env("MANWIDTH", "80")
        .env("MANPAGER", "cat")
        .env("PAGER", "cat")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run man(1): {e}; install it with `apt-get install man-db` (scripts/ensure-deps does)")
        });
    assert!(
        out.status.success(),
        "man -l {}: {}",
        page.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
}

// ---------------------------------------------------------------------------
// Polling helpers
// ---------------------------------------------------------------------------

/// Polls `cond` every ~10 ms until it returns true (→ true) or `limit` passes
/// (→ false). Tests poll instead of sleeping a guessed amount.
pub fn busy_wait(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits up to `limit` for `child` to exit. On expiry the child is killed and
/// reaped, and the result is `None`, so a hung child never outlives its test.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let mut status = None;
    busy_wait(limit, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// This machine's host name, as heimdall puts it in its application_name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length, and the last byte stays 0 for the terminator.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    assert_eq!(rc, 0, "gethostname failed");
    CStr::from_bytes_until_nul(&buf)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Fails the test unless it runs as root, saying that `what` needs root and how to run it:
/// a test that cannot do its job says so instead of passing unseen.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root; this test process runs as uid {euid}. Run the suite as root, as CI \
         does."
    );
}

/// A name unique to this test process and call (prefix, pid, counter), so tests
/// running in parallel against one cluster never contend for the same lock.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// True if any process that is not a zombie belongs to process group `pgid`.
pub fn process_group_alive(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            return false;
        };
        // The process may vanish between read_dir and read: that is "not alive".
        // The fields are: state ppid pgrp ...
        let Some(fields) = proc_stat_fields(pid) else {
            return false;
        };
        let state = fields.first().map(String::as_str);
        let pgrp = fields.get(2).and_then(|f| f.parse::<i32>().ok());
        pgrp == Some(pgid) && !matches!(state, Some("Z" | "X"))
    })
}

/// The fields of /proc/PID/stat from field 3 (state) on, None if the process is gone. Field 2
/// (the command name) is in parentheses and may itself contain spaces and ')', so the fixed
/// fields start after the *last* ')'.
pub fn proc_stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    Some(after_comm.split_whitespace().map(str::to_owned).collect())
}

// ---------------------------------------------------------------------------
// TestPostgres
// ---------------------------------------------------------------------------

/// A throwaway PostgreSQL cluster: temp dir, free port on 127.0.0.1, private
/// socket dir, trust auth except for [`PW_USER`]. An owned instance
/// ([`TestPostgres::start`]) is stopped and deleted on drop; [`shared`] gives
/// the one cluster of this test binary, stopped at process exit.
pub struct TestPostgres {
    port: u16,
    superuser: String,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// `listen_addresses`, for a restart on the same addresses.
    listen_addresses: String,
    server: Mutex<Option<Child>>,
    dir: Mutex<Option<TempDir>>,
    shared: bool,
}

impl TestPostgres {
    /// Starts a fresh cluster owned by the caller; dropping it stops the server
    /// and removes its files.
    pub fn start() -> TestPostgres {
        TestPostgres::start_with(ClusterConfig::default())
    }

    /// [`TestPostgres::start`] with extra `postgresql.conf` lines, another
    /// `pg_hba.conf` and extra files in the data dir (see [`ClusterConfig`]).
    pub fn start_with(config: ClusterConfig) -> TestPostgres {
        let root = new_root();
        let data_dir = root.path().join("data");
        let owner = cluster_owner();
        let mut initdb = pg_command(&tool("initdb"), root.path());
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", &owner.superuser])
            .args(["--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync"]);
        run_to_completion(&mut initdb, "initdb");
        let hba = config.hba.as_deref().unwrap_or(PG_HBA);
        fs::write(data_dir.join("pg_hba.conf"), hba)
            .unwrap_or_else(|e| panic!("TestPostgres: cannot write pg_hba.conf: {e}"));
        config.apply_to(&data_dir);

        let pg = launch(root, data_dir, false, &config.listen_addresses);
        let mut client = pg.client();
        client
            .batch_execute(&format!(
                "SET password_encryption = 'scram-sha-256';
                 CREATE ROLE {PW_USER} LOGIN PASSWORD '{PW_PASSWORD}';"
            ))
            .unwrap_or_else(|e| panic!("TestPostgres: cannot create role {PW_USER}: {e}"));
        pg
    }

    /// Starts a hot standby of this cluster (`pg_basebackup -R -X stream`) on
    /// its own port and socket dir. Returns once it accepts connections and
    /// reports `pg_is_in_recovery()`.
    pub fn start_standby(&self) -> TestPostgres {
        let root = new_root();
        let data_dir = root.path().join("data");
        let mut basebackup = pg_command(&tool("pg_basebackup"), root.path());
        basebackup
            .arg("-D")
            .arg(&data_dir)
            .args(["-R", "-X", "stream", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", &self.superuser]);
        run_to_completion(&mut basebackup, "pg_basebackup");
        launch(root, data_dir, true, &[])
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The private directory holding this server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The role that owns the cluster: `postgres` when the tests run as root,
    /// otherwise the current OS user.
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's stdout/stderr, for diagnosing a failed test.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `postgres://SUPERUSER@127.0.0.1:PORT/postgres?sslmode=disable`
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/postgres?sslmode=disable",
            self.superuser, self.port
        )
    }

    /// [`TestPostgres::url`] as `user`, with no password.
    pub fn url_as(&self, user: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// A new login role of its own with `settings` (`name = 'value'` each, by `ALTER ROLE ...
    /// SET`); returns its name and [`TestPostgres::url_as`] it.
    pub fn role_with(&self, settings: &[&str]) -> (String, String) {
        let role = unique_name("role").replace('-', "_");
        let mut sql = format!("CREATE ROLE {role} LOGIN;");
        for setting in settings {
            sql.push_str(&format!(" ALTER ROLE {role} SET {setting};"));
        }
        self.client()
            .batch_execute(&sql)
            .unwrap_or_else(|e| panic!("cannot create role {role}: {e}"));
        let url = self.url_as(&role);
        (role, url)
    }

    /// Writes a password file at `path` with permission bits `mode`, giving [`PW_USER`]'s
    /// password for this server's TCP address.
    pub fn write_pgpass(&self, path: &Path, mode: u32) {
        fs::write(
            path,
            format!(
                "# written by tests/it/support\n127.0.0.1:{}:postgres:{PW_USER}:{PW_PASSWORD}\n",
                self.port
            ),
        )
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
        .unwrap_or_else(|e| panic!("cannot write the password file {}: {e}", path.display()));
    }

    /// The same TCP connection as [`TestPostgres::url`], in key=value form.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname=postgres sslmode=disable",
            self.port, self.superuser
        )
    }

    /// A fresh superuser connection through the unix socket.
    pub fn client(&self) -> postgres::Client {
        try_connect(&self.socket_dir, self.port, &self.superuser).unwrap_or_else(|e| {
            panic!(
                "TestPostgres: cannot connect to port {} as {}: {e}\n{}",
                self.port,
                self.superuser,
                log_tail(&self.log_path)
            )
        })
    }

    /// Immediate shutdown (SIGQUIT to the postmaster, as after a crash), and
    /// waits until it is gone. For fault tests on an owned instance.
    pub fn stop_immediate(&self) {
        self.stop(events::Shutdown::Immediate);
    }

    /// Stops the server (fast shutdown) and removes the files; returns what went
    /// wrong instead of panicking, because it runs in `Drop` and at exit.
    fn shutdown(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut child) = lock(&self.server).take()
            && let Err(e) = stop_server(&mut child, libc::SIGINT)
        {
            problems.push(e);
        }
        if let Some(dir) = lock(&self.dir).take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                problems.push(format!("cannot remove {}: {e}", path.display()));
            }
        }
        problems
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        for problem in self.shutdown() {
            eprintln!("TestPostgres (port {}): {problem}", self.port);
        }
    }
}

/// The cluster shared by all tests of this test binary, started on first use.
/// Tests share it by using their own lock names ([`unique_name`]).
pub fn shared() -> &'static TestPostgres {
    // A failed start is remembered, so the other tests fail fast with the same
    // message instead of each waiting for their own 30 s timeout.
    static SHARED: OnceLock<Result<TestPostgres, String>> = OnceLock::new();
    // Statics are never dropped: stop the server and remove its files at exit.
    extern "C" fn stop_shared_at_exit() {
        if let Some(Ok(pg)) = SHARED.get() {
            for problem in pg.shutdown() {
                eprintln!("TestPostgres (shared, port {}): {problem}", pg.port);
            }
        }
    }
    let started = SHARED.get_or_init(|| {
        let result = panic::catch_unwind(AssertUnwindSafe(TestPostgres::start));
        result
            .map(|mut pg| {
                pg.shared = true;
                // SAFETY: registers a plain function with no captured state;
                // atexit has no other preconditions.
                if unsafe { libc::atexit(stop_shared_at_exit) } != 0 {
                    eprintln!("TestPostgres: atexit failed; the shared server stops on exit by PDEATHSIG only");
                }
                pg
            })
            .map_err(|payload| panic_message(&*payload))
    });
    match started {
        Ok(pg) => pg,
        Err(message) => panic!("the shared TestPostgres failed to start: {message}"),
    }
}

/// A login role on `pg` unique to this call (`prefix` and a counter), with `settings`
/// (`name = 'value'` each) applied by ALTER ROLE. Returns the role and its direct TCP URL.
pub fn login_role(pg: &TestPostgres, prefix: &str, settings: &[&str]) -> (String, String) {
    let role = unique_name(prefix).replace('-', "_");
    let mut sql = format!("CREATE ROLE {role} LOGIN;");
    for setting in settings {
        sql.push_str(&format!(" ALTER ROLE {role} SET {setting};"));
    }
    pg.client()
        .batch_execute(&sql)
        .unwrap_or_else(|e| panic!("cannot create role {role}: {e}"));
    let url = format!(
        "postgres://{role}@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port()
    );
    (role, url)
}

/// What [`TestPostgres::start_with`] changes in a fresh cluster; the default
/// changes nothing, which is [`TestPostgres::start`].
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// Lines appended to `postgresql.conf`, e.g. `ssl = on`.
    pub conf: Vec<String>,
    /// Replaces the fixture's `pg_hba.conf`. It must keep `local all all trust`:
    /// the fixture connects through the socket as the superuser.
    pub hba: Option<String>,
    /// Files written into the data dir, owned by the cluster owner (the server
    /// refuses a key file it does not own, or that others can read).
    pub files: Vec<DataFile>,
    /// Addresses the server listens on besides 127.0.0.1 (they must exist when it starts),
    /// e.g. the host end of a [`netns::Netns`]. Connections from them need an `hba` line.
    pub listen_addresses: Vec<String>,
}

/// One file for [`ClusterConfig::files`].
#[derive(Debug, Clone)]
pub struct DataFile {
    /// Relative to the data dir, e.g. `server.key`.
    pub name: String,
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o600`.
    pub mode: u32,
}

impl ClusterConfig {
    fn apply_to(&self, data_dir: &Path) {
        for file in &self.files {
            let path = data_dir.join(&file.name);
            fs::write(&path, &file.contents)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(file.mode)))
                .unwrap_or_else(|e| panic!("TestPostgres: cannot write {}: {e}", path.display()));
            give_to_cluster_owner(&path);
        }
        if !self.conf.is_empty() {
            let path = data_dir.join("postgresql.conf");
            let mut conf = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("TestPostgres: cannot read {}: {e}", path.display()));
            conf.push_str("\n# Added by tests/support (ClusterConfig)\n");
            for line in &self.conf {
                conf.push_str(line);
                conf.push('\n');
            }
            fs::write(&path, conf)
                .unwrap_or_else(|e| panic!("TestPostgres: cannot write {}: {e}", path.display()));
        }
    }
}

// ---------------------------------------------------------------------------
// Starting and stopping servers
// ---------------------------------------------------------------------------

/// Starts `postgres` on `data_dir` (already initialised) on a free port and
/// waits until it is ready. Takes ownership of `root` so a failed start cleans up.
fn launch(root: TempDir, data_dir: PathBuf, standby: bool, also_listen: &[String]) -> TestPostgres {
    let owner = cluster_owner();
    let listen_addresses = ["127.0.0.1".to_owned()]
        .iter()
        .chain(also_listen)
        .cloned()
        .collect::<Vec<_>>()
        .join(",");
    let socket_dir = root.path().join("s");
    fs::create_dir(&socket_dir)
        .unwrap_or_else(|e| panic!("TestPostgres: cannot create {}: {e}", socket_dir.display()));
    give_to_cluster_owner(&socket_dir);
    let log_path = root.path().join("server.log");

    for _ in 0..PORT_ATTEMPTS {
        let port = free_port();
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("TestPostgres: cannot create {}: {e}", log_path.display()));
        let cmd = postmaster(&data_dir, &socket_dir, port, &listen_addresses, log);
        let child = spawn_from_keeper(cmd).unwrap_or_else(|e| {
            panic!(
                "TestPostgres: cannot start {}: {e}",
                tool("postgres").display()
            )
        });

        let pg = TestPostgres {
            port,
            superuser: owner.superuser.clone(),
            data_dir: data_dir.clone(),
            socket_dir: socket_dir.clone(),
            log_path: log_path.clone(),
            listen_addresses: listen_addresses.clone(),
            server: Mutex::new(Some(child)),
            dir: Mutex::new(None),
            shared: false,
        };
        match wait_until_ready(&pg, standby) {
            Ready::Yes => {
                *lock(&pg.dir) = Some(root);
                return pg;
            }
            Ready::PortTaken => {
                // Someone bound the port between our probe and the server's bind.
                drop(pg);
                continue;
            }
            Ready::Failed(why) => {
                let tail = log_tail(&log_path);
                drop(pg);
                panic!("TestPostgres: server on port {port} {why}\n{tail}");
            }
        }
    }
    panic!(
        "TestPostgres: no free port after {PORT_ATTEMPTS} attempts\n{}",
        log_tail(&log_path)
    );
}

/// The server on `data_dir`, on `port`, writing to `log`: the fixture's settings (no fsync,
/// asynchronous commit), in a process group of its own, and stopped (SIGINT) if the test
/// process dies.
fn postmaster(
    data_dir: &Path,
    socket_dir: &Path,
    port: u16,
    listen_addresses: &str,
    log: File,
) -> Command {
    let log_err = log
        .try_clone()
        .expect("TestPostgres: cannot duplicate the log fd");
    let mut cmd = pg_command(&tool("postgres"), data_dir.parent().unwrap_or(data_dir));
    cmd.arg("-D")
        .arg(data_dir)
        .args(["-p", &port.to_string(), "-k"])
        .arg(socket_dir)
        .args(["-c", &format!("listen_addresses={listen_addresses}")])
        .args(["-c", "fsync=off"])
        .args(["-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off"])
        .args(["-c", "max_connections=300"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a test that signals its own group, or a
        // Ctrl-C in the terminal, must not hit the cluster.
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: runs in the forked child before exec; prctl and getppid are
    // async-signal-safe and nothing here allocates or takes locks.
    unsafe {
        cmd.pre_exec(move || {
            // std applies uid/gid before pre_exec hooks, so this is set after
            // the credential change that would otherwise clear it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody will stop us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd
}

enum Ready {
    Yes,
    PortTaken,
    Failed(String),
}

/// Ready means a real connection works (and, for a standby, it is in recovery).
fn wait_until_ready(pg: &TestPostgres, standby: bool) -> Ready {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        if let Some(child) = lock(&pg.server).as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let log = fs::read_to_string(&pg.log_path).unwrap_or_default();
            if log.contains("Address already in use") {
                return Ready::PortTaken;
            }
            return Ready::Failed(format!("exited during startup ({status})"));
        }
        let last_error = match try_connect(&pg.socket_dir, pg.port, &pg.superuser) {
            Ok(client) if !standby => {
                let _ = client.close();
                return Ready::Yes;
            }
            Ok(mut client) => match client.query_one("select pg_is_in_recovery()", &[]) {
                Ok(row) if row.get::<_, bool>(0) => return Ready::Yes,
                Ok(_) => "standby is not in recovery".to_string(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Ready::Failed(format!(
                "was not ready within {READY_LIMIT:?} (last error: {last_error})"
            ));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn try_connect(
    socket_dir: &Path,
    port: u16,
    user: &str,
) -> Result<postgres::Client, postgres::Error> {
    postgres::Config::new()
        .host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5))
        .connect(postgres::NoTls)
}

/// Sends `signal` to the postmaster (SIGINT = fast, SIGQUIT = immediate
/// shutdown), waits for it, and SIGKILLs it if it does not stop in time.
fn stop_server(child: &mut Child, signal: libc::c_int) -> Result<(), String> {
    if let Ok(Some(_)) = child.try_wait() {
        return Ok(());
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscall; `pid` is our unreaped child, so it cannot have
    // been reused by another process.
    if unsafe { libc::kill(pid, signal) } != 0 {
        let e = io::Error::last_os_error();
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("cannot signal postmaster {pid}: {e}; killed it"));
    }
    match wait_child(child, STOP_LIMIT) {
        Some(_) => Ok(()),
        None => Err(format!(
            "postmaster {pid} did not stop within {STOP_LIMIT:?} of signal {signal}; killed it"
        )),
    }
}

/// Spawns `cmd` from one thread that lives until the process exits.
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not
/// the process, and test threads end with their test: a server forked from
/// one would be shut down under the tests still using it.
fn spawn_from_keeper(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static KEEPER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("test-postgres-keeper".into())
            .spawn(move || {
                // The sender lives in a static, so this loop never ends.
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("TestPostgres: cannot start the keeper thread");
        tx
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    keeper
        .send((cmd, reply_tx))
        .expect("TestPostgres: keeper thread is gone");
    reply_rx
        .recv()
        .expect("TestPostgres: keeper thread is gone")
}

// ---------------------------------------------------------------------------
// Binaries, users, files
// ---------------------------------------------------------------------------

/// Names the directory of the PostgreSQL server binaries to test against (initdb, pg_ctl,
/// postgres, and pg_basebackup if the standby tests are to run): the version matrix sets it to
/// another major's binaries (`scripts/fetch-postgres`, `scripts/test-postgres`). Unset, the
/// server is found on PATH or in Debian's `/usr/lib/postgresql/*/bin`.
pub const PG_BIN_VAR: &str = "HEIMDALL_TEST_PG_BIN";

/// A PostgreSQL program. With [`PG_BIN_VAR`] set, from that directory and nowhere else: a tool
/// of another major (Debian's pg_basebackup beside an 18 server, say) would test a mix no user
/// runs. Otherwise the server (`postgres`) is looked up on PATH, else in the highest
/// `/usr/lib/postgresql/*/bin`; the other tools are taken from the server's own directory
/// first, so their major version matches the server's (on Debian, `/usr/bin/pg_basebackup` is
/// pg_wrapper, not a real binary).
fn tool(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(PG_BIN_VAR).filter(|d| !d.is_empty()) {
        let path = Path::new(&dir).join(name);
        assert!(
            is_executable(&path),
            "TestPostgres: {PG_BIN_VAR}={} has no {name}. The embedded-postgres binaries of the \
             version matrix lack pg_basebackup, so the tests that start a hot standby cannot run \
             against them: scripts/test-postgres leaves them out by name",
            Path::new(&dir).display()
        );
        return path;
    }
    static SERVER_DIR: OnceLock<PathBuf> = OnceLock::new();
    let server_dir = SERVER_DIR.get_or_init(|| {
        let server = find_on_path_or_lib("postgres");
        let initdb = find_on_path_or_lib("initdb");
        match (server, initdb) {
            (Some(server), Some(_)) => {
                let real = fs::canonicalize(&server).unwrap_or(server);
                real.parent().map(Path::to_owned).unwrap_or_default()
            }
            (server, initdb) => {
                let missing: Vec<&str> = [("postgres", server), ("initdb", initdb)]
                    .into_iter()
                    .filter(|(_, found)| found.is_none())
                    .map(|(name, _)| name)
                    .collect();
                panic!("{}", missing_binaries_message(&missing.join(" and ")));
            }
        }
    });
    let beside_server = server_dir.join(name);
    if is_executable(&beside_server) {
        return beside_server;
    }
    find_on_path_or_lib(name).unwrap_or_else(|| panic!("{}", missing_binaries_message(name)))
}

fn missing_binaries_message(missing: &str) -> String {
    format!(
        "TestPostgres: cannot find the PostgreSQL program(s) {missing} on PATH or in \
         /usr/lib/postgresql/*/bin. The integration tests need a local PostgreSQL server \
         installation: `apt-get install postgresql` (Debian/Ubuntu), or {PG_BIN_VAR} naming \
         the directory of initdb, pg_ctl and postgres."
    )
}

fn find_on_path_or_lib(name: &str) -> Option<PathBuf> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(versioned_lib_dirs())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// `/usr/lib/postgresql/*/bin`, highest version first (`16` > `15` > `9.6`).
fn versioned_lib_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

fn is_executable(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    path.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
}

/// Who runs initdb and the server, and so which role is the superuser.
struct ClusterOwner {
    /// Set when we are root: initdb and postgres refuse to run as root.
    run_as: Option<(u32, u32)>,
    superuser: String,
}

fn cluster_owner() -> &'static ClusterOwner {
    static OWNER: OnceLock<ClusterOwner> = OnceLock::new();
    OWNER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            let (name, uid, gid) = passwd_by_name("postgres").unwrap_or_else(|| {
                panic!(
                    "TestPostgres: running as root, but there is no `postgres` OS user to run \
                     initdb and the server as (both refuse to run as root). Install the server \
                     package, which creates it: `apt-get install postgresql` (Debian/Ubuntu), or \
                     run the tests as an ordinary user."
                )
            });
            ClusterOwner {
                run_as: Some((uid, gid)),
                superuser: name,
            }
        } else {
            let superuser = passwd_by_uid(euid)
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| panic!("TestPostgres: cannot find the user name of uid {euid}"));
            ClusterOwner {
                run_as: None,
                superuser,
            }
        }
    })
}

fn passwd_by_name(name: &str) -> Option<(String, u32, u32)> {
    let c_name = CString::new(name).ok()?;
    read_passwd(|pwd, buf, result| {
        // SAFETY: all pointers are valid for the call; buf.len() is the true size.
        unsafe { libc::getpwnam_r(c_name.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
}

fn passwd_by_uid(uid: u32) -> Option<String> {
    read_passwd(|pwd, buf, result| {
        // SAFETY: all pointers are valid for the call; buf.len() is the true size.
        unsafe { libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), result) }
    })
    .map(|(name, _, _)| name)
}

/// The reentrant getpw*_r calls: tests run on parallel threads.
fn read_passwd(
    call: impl FnOnce(&mut libc::passwd, &mut [libc::c_char], &mut *mut libc::passwd) -> libc::c_int,
) -> Option<(String, u32, u32)> {
    // SAFETY: passwd is plain old data; all-zero is a valid (empty) value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result = std::ptr::null_mut();
    if call(&mut pwd, &mut buf, &mut result) != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string inside `buf`.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Some((name, pwd.pw_uid, pwd.pw_gid))
}

/// A command for a PostgreSQL program: clean connection environment, run from
/// the cluster's temp dir, as the cluster owner.
fn pg_command(program: &Path, cwd: &Path) -> Command {
    let mut cmd = clean_command(program);
    // The owner may not be allowed into our working directory.
    cmd.current_dir(cwd);
    if let Some((uid, gid)) = cluster_owner().run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn run_to_completion(cmd: &mut Command, what: &str) {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("TestPostgres: cannot run {what}: {e}"));
    if !output.status.success() {
        panic!(
            "TestPostgres: {what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A new temp dir for one cluster, owned by the cluster owner.
fn new_root() -> TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > MAX_TEMP_BASE {
        PathBuf::from("/tmp")
    } else {
        base
    };
    let root = TempDir::with_prefix_in("heimdall-pg-", &base).unwrap_or_else(|e| {
        panic!(
            "TestPostgres: cannot create a temp dir in {}: {e}",
            base.display()
        )
    });
    give_to_cluster_owner(root.path());
    root
}

fn give_to_cluster_owner(path: &Path) {
    if let Some((uid, gid)) = cluster_owner().run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("TestPostgres: cannot chown {}: {e}", path.display()));
    }
}

/// A port nothing listens on: TCP port 1 (tcpmux) is unused on any machine we test on, and
/// unlike a port bound and released, no other process can take it meanwhile.
pub const REFUSED_PORT: u16 = 1;

/// A temp dir of a test's own, removed when dropped.
pub fn new_dir() -> tempfile::TempDir {
    tempfile::TempDir::with_prefix("heimdall-it-").expect("cannot create a temp dir")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|e| panic!("TestPostgres: cannot find a free port on 127.0.0.1: {e}"))
}

fn log_tail(path: &Path) -> String {
    let text = fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("--- last lines of {} ---\n{tail}", path.display())
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Poisoning only means another test panicked while holding the lock; the data
/// (a child handle or a dir) is still valid.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
