//! Events in a server's life that end every session, and with them every advisory lock: a
//! restart (fast or immediate), a crash reinitialisation after one backend was SIGKILLed, and
//! the promotion of a standby. Each returns once the server accepts connections again. For an
//! owned [`TestPostgres`] only: the shared cluster serves every other test.
//!
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::fs::{self, OpenOptions};

use super::{
    READY_LIMIT, Ready, TestPostgres, busy_wait, lock, log_tail, postmaster, spawn_from_keeper,
    stop_server, wait_until_ready,
};

/// How a server is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// `pg_ctl stop -m fast` (SIGINT): sessions are ended, then a shutdown checkpoint.
    Fast,
    /// `pg_ctl stop -m immediate` (SIGQUIT): every process quits at once, as in a crash; the
    /// next start recovers from the WAL.
    Immediate,
}

impl Shutdown {
    fn signal(self) -> libc::c_int {
        match self {
            Shutdown::Fast => libc::SIGINT,
            Shutdown::Immediate => libc::SIGQUIT,
        }
    }
}

impl TestPostgres {
    fn assert_owned(&self, what: &str) {
        assert!(
            !self.shared,
            "{what} would break every test using shared(); use TestPostgres::start()"
        );
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&self, how: Shutdown) {
        self.assert_owned("stop()");
        if let Some(mut child) = lock(&self.server).take()
            && let Err(e) = stop_server(&mut child, how.signal())
        {
            panic!("TestPostgres: {e}");
        }
    }

    /// `pg_ctl restart -m fast|immediate`: stops the server, starts it again on the same port,
    /// and returns once it accepts connections.
    pub fn restart(&self, how: Shutdown) {
        self.stop(how);
        let log = OpenOptions::new()
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| {
                panic!("TestPostgres: cannot open {}: {e}", self.log_path.display())
            });
        let cmd = postmaster(
            &self.data_dir,
            &self.socket_dir,
            self.port,
            &self.listen_addresses,
            log,
        );
        let child = spawn_from_keeper(cmd)
            .unwrap_or_else(|e| panic!("TestPostgres: cannot start the server again: {e}"));
        *lock(&self.server) = Some(child);
        match wait_until_ready(self, false) {
            Ready::Yes => {}
            Ready::PortTaken => panic!("TestPostgres: port {} was taken meanwhile", self.port),
            Ready::Failed(why) => panic!(
                "TestPostgres: server on port {} {why}\n{}",
                self.port,
                log_tail(&self.log_path)
            ),
        }
    }

    /// SIGKILLs one backend of its own, idle, as the OOM killer might: the postmaster ends every
    /// other session, reinitialises shared memory and recovers from the WAL, without a restart
    /// (`pg_postmaster_start_time()` stays). Returns once it accepts connections again.
    pub fn crash_one_backend(&self) {
        self.assert_owned("crash_one_backend()");
        const READY: &str = "database system is ready to accept connections";
        let ready_before = self.log_count(READY);
        let mut victim = self.client();
        let pid: i32 = victim
            .query_one("SELECT pg_backend_pid()", &[])
            .expect("cannot read the victim's backend pid")
            .get(0);
        // SAFETY: plain syscall on a backend of our own server, alive while `victim` is open.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill({pid})");
        drop(victim);
        let back = busy_wait(READY_LIMIT, || self.log_count(READY) > ready_before);
        assert!(
            back,
            "TestPostgres: the server did not reinitialise within {READY_LIMIT:?}\n{}",
            log_tail(&self.log_path)
        );
    }

    /// Promotes this standby (`pg_promote()`, which waits until it is done).
    pub fn promote(&self) {
        let promoted: bool = self
            .client()
            .query_one("SELECT pg_promote(true, 60)", &[])
            .unwrap_or_else(|e| panic!("TestPostgres: cannot promote: {e}"))
            .get(0);
        assert!(
            promoted,
            "TestPostgres: the standby was not promoted within 60 s\n{}",
            log_tail(&self.log_path)
        );
    }

    /// Creates a login role that has no privileges beyond PUBLIC's; durably, though the
    /// fixture's servers commit asynchronously, so that a crash right after keeps it.
    pub fn create_role(&self, role: &str) {
        self.client()
            .batch_execute(&format!(
                "SET synchronous_commit = on; CREATE ROLE {role} LOGIN"
            ))
            .unwrap_or_else(|e| panic!("TestPostgres: cannot create role {role}: {e}"));
    }

    /// How many lines of the server's log contain `text`.
    pub fn log_count(&self, text: &str) -> usize {
        fs::read_to_string(&self.log_path)
            .map_or(0, |log| log.lines().filter(|l| l.contains(text)).count())
    }
}
