//! Supervision: from before the command starts until it is gone, heimdall waits for the first of
//! the command's exit, a signal to forward, or the `--timeout` deadline. Signals are caught from
//! the very start, so one that arrives before the command started stops heimdall without ever
//! starting the command. Every signal whose default action would end heimdall is caught: dying
//! of one would leave the job running while the lock goes (see [`STOPPING`]). SIGCHLD reaps the
//! orphans that heimdall, as the subreaper, inherits, as they exit.
//!
//! No handler is installed: the signals are blocked in every thread from before the first
//! thread starts ([`block_signals`]) and the signal thread takes them with `sigwaitinfo`. One
//! `rt_sigprocmask` instead of two `rt_sigaction` per signal (about a hundred), and none of a
//! handler library's registration work (signal-hook's copy-on-write registry cost 0.6 million
//! instructions per run, 30% of heimdall's own). The command starts with the mask heimdall
//! inherited and the default action for every signal heimdall takes, even one heimdall started
//! with ignored (`process/child.rs` sets both in the forked child before exec).

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use libc::{SIGPWR, SIGSTKFLT};
use signal_hook::consts::{
    SIGALRM, SIGCHLD, SIGCONT, SIGHUP, SIGINT, SIGIO, SIGPROF, SIGQUIT, SIGSYS, SIGTERM, SIGTRAP,
    SIGUSR1, SIGUSR2, SIGVTALRM, SIGXCPU, SIGXFSZ,
};

pub mod watchdog;

use crate::db::cancel::Canceller;
use crate::domain::ending::{ChildEnd, signal_name};
use crate::domain::timing::Limits;
use crate::exit::Outcome;
use crate::log;
use crate::process::child::{self, Child};
use crate::process::mark::InChild;
use crate::process::{keeper, reap};

mod stop;

use stop::{end_job, job_alive, lock_lost, stop_group};

/// The signals heimdall forwards to the command's process group (as tini does).
pub const FORWARDED: [i32; 6] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2];

/// The forwarded signals whose default action ends a process.
const TERMINATING: [i32; 4] = [SIGINT, SIGTERM, SIGHUP, SIGQUIT];

/// The other signals whose default action would end heimdall, and that can be caught
/// (SIGKILL and SIGSTOP cannot; SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGABRT report heimdall's own
/// faults). They are not forwarded, since the command may use them for its own ends (timers,
/// profilers): heimdall stops the job as on `--timeout`, releases the lock and exits 128+N. The
/// real-time signals, which also end a process by default, are added by [`stopping_signals`].
const STOPPING: [i32; 10] = [
    SIGALRM, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGPWR, SIGSYS, SIGTRAP, SIGSTKFLT, SIGIO,
];

/// [`STOPPING`] and every real-time signal the C library leaves to programs.
fn stopping_signals() -> Vec<i32> {
    STOPPING
        .into_iter()
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
        .collect()
}

/// Every signal the signal thread handles: [`FORWARDED`], [`stopping_signals`] and SIGCHLD.
fn handled() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in FORWARDED
            .into_iter()
            .chain(stopping_signals())
            .chain([SIGCHLD])
        {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// Blocks every handled signal in the calling thread, and so in every thread it starts later.
/// Called before heimdall's first thread (after the keeper's fork, which keeps its own
/// dispositions): a handled signal must never reach a thread where it is not blocked, since
/// without a handler its default action would end heimdall while the job runs. A signal that
/// arrives before the signal thread starts stays pending until it does.
pub fn block_signals() -> Result<()> {
    child::block_signals(&handled()).context("cannot block signals")
}

/// The next handled signal (blocked by [`block_signals`]), waiting as long as it takes.
fn next_signal(set: &libc::sigset_t) -> i32 {
    loop {
        // SAFETY: `set` is initialised; a null siginfo pointer is allowed.
        let signal = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if signal > 0 {
            return signal;
        }
        // EINTR (a stop and continue): wait again.
    }
}

/// What the supervisor waits for.
pub enum Event {
    ChildExited,
    Signal(i32),
    /// The watchdog sent a heartbeat; its answer is due within this long (the heartbeat
    /// timeout).
    HeartbeatSent(Duration),
    /// The heartbeat was answered, after this long.
    HeartbeatOk(Duration),
    /// The session that holds the lock is gone or changed, and why.
    LockLost(String),
    /// A replacer (named) asks for the lock, which is still held.
    Replaced(String),
    /// A lease renewal succeeded; it was sent at this moment.
    Renewed(Instant),
}

/// A deadline the supervisor wakes up for, with the limit it enforces.
#[derive(Clone, Copy)]
enum Due {
    /// `--timeout`.
    Timeout(Duration),
    /// The heartbeat timeout.
    HeartbeatAnswer(Duration),
    /// A lease's budget.
    LeaseBudget(Duration),
}

/// Where heimdall is, as the signal thread sees it.
enum Gate {
    /// Before the command started; the optional canceller ends a wait in the server's lock
    /// queue, which closing the connection alone would not end.
    BeforeStart(Option<Canceller>),
    /// A signal came during a wait in the server's queue and cancelled it; the main thread
    /// ends the session in order, then the signal thread exits. The command never starts.
    Cancelled,
    Running,
}

/// How long a signal during a wait may spend cancelling it, and then how long the main thread
/// may spend ending the session in order, before heimdall exits anyway.
const CANCEL_LIMIT: Duration = Duration::from_secs(2);

/// Owns signal handling from start-up to exit.
pub struct Supervisor {
    gate: Arc<Mutex<Gate>>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Tells the signal thread that a cancelled wait's session is closed.
    closed: Sender<()>,
}

impl Supervisor {
    /// Starts the signal thread ([`block_signals`] must have run before any thread). Until
    /// [`Supervisor::start`] has started the command, a forwarded signal ends heimdall at once
    /// with 128+N; closing the process closes the connection, which releases the lock if it was
    /// already taken.
    pub fn install() -> Result<Supervisor> {
        block_signals()?;
        let set = handled();
        let gate = Arc::new(Mutex::new(Gate::BeforeStart(None)));
        let (tx, rx) = mpsc::channel();
        let (closed, closed_rx) = mpsc::channel();
        let thread_gate = Arc::clone(&gate);
        let thread_tx = tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                loop {
                    let signal = next_signal(&set);
                    if signal == SIGCHLD {
                        reap::reap_orphans();
                        continue;
                    }
                    let mut gate = thread_gate.lock().unwrap_or_else(|e| e.into_inner());
                    let exit_code = Outcome::Signaled(signal).code();
                    match &mut *gate {
                        Gate::BeforeStart(cancel) => {
                            log::warn(format!(
                                "received {} before the command started; exiting without running it",
                                signal_name(signal)
                            ));
                            let Some(token) = cancel.take() else {
                                // Exit while holding the gate, so the command cannot start
                                // meanwhile; exiting closes the connection.
                                log::exit(exit_code);
                            };
                            *gate = Gate::Cancelled;
                            drop(gate);
                            cancel_wait(token);
                            // The wait returns with the cancel's answer; the main thread then
                            // closes the session in order and says so.
                            if closed_rx.recv_timeout(CANCEL_LIMIT).is_err() {
                                log::info("ending the cancelled wait took too long; exiting anyway");
                            }
                            log::exit(exit_code);
                        }
                        Gate::Cancelled => {}
                        Gate::Running => {
                            let _ = thread_tx.send(Event::Signal(signal));
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Supervisor {
            gate,
            tx,
            rx,
            closed,
        })
    }

    /// Arms (or, with `None`, disarms) cancelling a wait in the server's lock queue on a
    /// signal. Disarming answers whether a signal has cancelled the wait meanwhile: then the
    /// caller ends the session in order and calls [`Supervisor::exit_cancelled`].
    pub fn set_cancel(&self, canceller: Option<Canceller>) -> bool {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *gate {
            Gate::BeforeStart(cancel) => {
                *cancel = canceller;
                false
            }
            Gate::Cancelled => true,
            Gate::Running => false,
        }
    }

    /// After a wait cancelled by a signal, once the session is closed: the signal thread exits
    /// with 128+N. Never returns.
    pub fn exit_cancelled(&self) -> ! {
        let _ = self.closed.send(());
        loop {
            std::thread::park();
        }
    }

    /// Starts the command through `spawn`, atomically with respect to incoming signals, and
    /// starts watching for its exit. `spawn` gets what the forked child does with the job's
    /// mark (see `process/mark.rs`).
    pub fn start(&self, spawn: impl FnOnce(InChild) -> Result<Child>) -> Result<Child> {
        let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*gate, Gate::Cancelled) {
            // A signal is ending heimdall; the command must not start.
            drop(gate);
            self.exit_cancelled();
        }
        keeper::job_spawning();
        let mark = keeper::child_mark();
        let child = child::spawn_leader(|| spawn(mark)).inspect_err(|_| keeper::job_gone())?;
        *gate = Gate::Running;
        let pid = child.pid;
        keeper::job_started(pid);
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("child".into())
            .spawn(move || {
                if let Err(e) = reap::wait_exited(pid) {
                    log::debug(format!("waitid({pid}): {e}"));
                }
                let _ = tx.send(Event::ChildExited);
            })
            .context("cannot start the child-watching thread")?;
        Ok(child)
    }

    /// A sender for the watchdog's reports.
    pub fn events(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Waits until the command is gone and says how it ended. Stops the command's process group
    /// when the timeout expires or the lock is lost. In lease mode, `lease_sent` is when the
    /// acquiring statement was sent, where the lease's first budget starts.
    pub fn supervise(
        &self,
        mut child: Child,
        limits: &Limits,
        lease_sent: Option<Instant>,
        lock: &str,
    ) -> Result<Outcome> {
        let started = Instant::now();
        // Durations are bounded when parsed; a deadline past the clock's end means never.
        let due = |from: Instant, limit: Duration, due: fn(Duration) -> Due| {
            from.checked_add(limit).map(|at| (at, due(limit)))
        };
        let timeout = limits.timeout.and_then(|t| due(started, t, Due::Timeout));
        let mut heartbeat: Option<(Instant, Due)> = None;
        let mut lease = limits
            .lease_budget
            .zip(lease_sent)
            .and_then(|(budget, sent)| due(sent, budget, Due::LeaseBudget));
        tell_keeper(lease, limits);
        loop {
            let next = [timeout, heartbeat, lease]
                .into_iter()
                .flatten()
                .min_by_key(|(at, _)| *at);
            let event = match next {
                Some((at, due)) => {
                    match self
                        .rx
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(event) => Ok(event),
                        Err(RecvTimeoutError::Timeout) => Err(due),
                        Err(RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
                    }
                }
                None => Ok(self.rx.recv().expect("we hold a sender")),
            };
            match event {
                Ok(Event::Signal(signal)) if !FORWARDED.contains(&signal) => {
                    log::error(format!(
                        "received {}; stopping the command, then releasing the lock",
                        signal_name(signal)
                    ));
                    stop_group(&mut child, limits.kill_after);
                    let end = end_job(child)?;
                    log::info(format!("command {} after {}", end, signal_name(signal)));
                    return Ok(Outcome::Signaled(signal));
                }
                Ok(Event::Signal(signal)) => {
                    log::info(format!(
                        "forwarding {} to the command's process group {}",
                        signal_name(signal),
                        child.pid
                    ));
                    child.signal_group(signal);
                    // A stopped command would keep a terminating signal pending forever, and
                    // heimdall would hold the lock for it; wake it so it can act (as timeout(1)
                    // does). USR1/USR2 leave a deliberately stopped job stopped.
                    if TERMINATING.contains(&signal) {
                        child.signal_group(SIGCONT);
                    }
                }
                Ok(Event::HeartbeatSent(answer_within)) => {
                    heartbeat = due(Instant::now(), answer_within, Due::HeartbeatAnswer);
                }
                Ok(Event::HeartbeatOk(rtt)) => {
                    heartbeat = None;
                    log::debug(format!("heartbeat answered in {} us", rtt.as_micros()));
                }
                Ok(Event::LockLost(reason)) => {
                    return lock_lost(child, limits, lock, started, &reason);
                }
                Ok(Event::Replaced(by)) => {
                    return stop::replaced(child, limits, lock, started, &by);
                }
                Ok(Event::Renewed(sent)) => {
                    lease = limits
                        .lease_budget
                        .and_then(|budget| due(sent, budget, Due::LeaseBudget));
                    tell_keeper(lease, limits);
                }
                Err(Due::LeaseBudget(budget)) => {
                    let reason = format!(
                        "no lease renewal succeeded for {}; stopping the command before the lease can expire",
                        humantime::format_duration(budget)
                    );
                    return lock_lost(child, limits, lock, started, &reason);
                }
                Err(Due::HeartbeatAnswer(timeout)) => {
                    let reason = format!(
                        "no answer to the heartbeat within {}",
                        humantime::format_duration(timeout)
                    );
                    return lock_lost(child, limits, lock, started, &reason);
                }
                Ok(Event::ChildExited) => {
                    if job_alive(&mut child) {
                        log::warn(format!(
                            "the command exited but left processes in its process group {} or that left it; stopping them, as they must not run without the lock",
                            child.pid
                        ));
                        stop_group(&mut child, limits.kill_after);
                    }
                    let end = end_job(child)?;
                    log::info(format!(
                        "command {} after {} ms",
                        end,
                        started.elapsed().as_millis()
                    ));
                    return Ok(match end {
                        ChildEnd::Exited(code) => Outcome::Exited(code),
                        ChildEnd::Signaled(signal) => Outcome::Signaled(signal),
                    });
                }
                Err(Due::Timeout(timeout)) => {
                    // A failure of the job, not a notice: -q must not hide it from cron's mail.
                    log::error(format!(
                        "--timeout of {} expired; stopping the command",
                        humantime::format_duration(timeout)
                    ));
                    stop_group(&mut child, limits.kill_after);
                    let end = end_job(child)?;
                    log::info(format!("command {} after the timeout", end));
                    return Ok(Outcome::TimedOut);
                }
            }
        }
    }
}

impl Supervisor {
    /// Waits until `until` (for `--min-hold`); a terminating signal ends the wait early, since
    /// the command has finished and nothing is left to protect but the timing.
    pub fn hold_until(&self, until: Instant) {
        loop {
            match self
                .rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(Event::Signal(signal))
                    if TERMINATING.contains(&signal) || !FORWARDED.contains(&signal) =>
                {
                    log::info(format!(
                        "received {} during --min-hold; releasing the lock now",
                        signal_name(signal)
                    ));
                    return;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// Lease mode: the keeper kills the job itself when the supervisor's own stop (SIGTERM when the
/// lease's budget is out, SIGKILL `kill_after` later) should have ended it and has not, because
/// heimdall was stopped or wedged: the lease may expire then.
fn tell_keeper(lease: Option<(Instant, Due)>, limits: &Limits) {
    if let Some(gone_by) = lease.and_then(|(due, _)| due.checked_add(limits.kill_after)) {
        keeper::job_deadline(gone_by);
    }
}

/// Asks the server to cancel the wait, on a thread with a deadline: the cancel request opens a
/// connection of its own, which must not keep a signalled heimdall from exiting.
fn cancel_wait(canceller: Canceller) {
    let (tx, rx) = mpsc::channel();
    let _ = std::thread::Builder::new()
        .name("cancel".into())
        .spawn(move || {
            let _ = tx.send(canceller.cancel(CANCEL_LIMIT));
        });
    match rx.recv_timeout(CANCEL_LIMIT + Duration::from_millis(100)) {
        Ok(said) => log::info(said),
        Err(_) => log::info("cancelling the wait took too long; exiting anyway"),
    }
}
