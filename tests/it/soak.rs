//! Contention soak: many heimdall processes on one lock, first well-behaved, then with holders
//! SIGKILLed and backends terminated at random moments. The commands record when they ran and
//! whether the job before them still ran, and the test checks that no two ever overlapped
//! (beyond what a lost lock allows and heimdall bounds; a SIGKILLed heimdall's keeper allows
//! none), that nothing is left running and that no lock is left held.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders};
use crate::support::procs::group_runs_sh;
use crate::support::runs::locked_std;
use crate::support::{RUN_LIMIT, busy_wait, shared, unique_name, wait_child};

fn run_under_lock(name: &str, extra: &[&str], script: &str, args: &[&str]) -> Command {
    let mut cmd = locked_std("soak", name);
    cmd.args(extra)
        .args(["sh", "-c", script, "sh"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// No session holds `soak/name`: the server's view, where
/// [`crate::support::runs::lock_is_free`] asks a probing heimdall.
fn no_advisory_lock_left(name: &str) -> bool {
    holders(&mut shared().client(), LockId::of("soak", name)).is_empty()
}

#[test]
fn a_hundred_simultaneous_runs_never_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("held");
    let count = dir.path().join("ran");
    let name = unique_name("hundred");
    // mkdir fails if the marker exists, that is, if another command is inside right now.
    let script = "mkdir \"$1\" || exit 99; echo x >> \"$2\"; sleep 0.02; rmdir \"$1\"";
    let marker_arg = marker.to_str().unwrap();
    let count_arg = count.to_str().unwrap();

    let mut children: Vec<Child> = (0..100)
        .map(|_| {
            run_under_lock(&name, &[], script, &[marker_arg, count_arg])
                .spawn()
                .unwrap()
        })
        .collect();
    let mut codes: HashMap<Option<i32>, usize> = HashMap::new();
    for child in &mut children {
        let code = wait_child(child, RUN_LIMIT).and_then(|s| s.code());
        *codes.entry(code).or_default() += 1;
    }
    let ran = std::fs::read_to_string(&count).map_or(0, |t| t.lines().count());
    eprintln!("100 simultaneous runs: exit codes {codes:?}, commands run {ran}");
    assert_eq!(
        codes.get(&Some(99)),
        None,
        "two commands overlapped: {codes:?}"
    );
    assert_eq!(
        codes.get(&Some(0)).copied().unwrap_or(0) + codes.get(&Some(75)).copied().unwrap_or(0),
        100,
        "every run either ran (0) or was refused (75): {codes:?}"
    );
    assert!(ran >= 1, "at least one command ran");
    assert_eq!(ran, codes[&Some(0)], "every 0 is a command that ran");
    assert!(no_advisory_lock_left(&name));
}

/// One command's stay in the critical section, as recorded by the command itself.
struct Stay {
    heimdall: u32,
    start: u128,
    end: Option<u128>,
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[test]
fn runs_under_kills_and_terminated_backends_never_overlap_beyond_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let name = unique_name("chaos");
    let heartbeat = Duration::from_millis(200);
    let kill_after = Duration::from_millis(500);
    // Each command logs its heimdall's pid (its parent), its own pid, and the start and end
    // times; a command that is stopped by SIGTERM logs its end too. First it looks whether any
    // process of the job before it (its group: the pid in `current`) still runs, and logs that
    // as `alive PGID`: a SIGKILLed holder's job leaves no end line, so only this shows whether
    // it was gone before the next took the lock.
    let script = format!(
        "log() {{ echo \"$PPID $$ $1 $(date +%s%N)\" >> \"$LOG\"; }}; \
         prev=$(cat \"$CURRENT\" 2>/dev/null); echo $$ > \"$CURRENT\"; \
         if [ -n \"$prev\" ] && {}; then log \"alive-$prev\"; fi; \
         log start; trap 'log end; exit 143' TERM; \
         sleep 0.15 & wait $!; log end",
        group_runs_sh("$prev")
    );
    let extra = ["--heartbeat", "200ms", "--kill-after", "500ms"];

    let mut running: Vec<Child> = Vec::new();
    let mut finished: HashMap<u32, Option<i32>> = HashMap::new();
    let mut killed_at: HashMap<u32, u128> = HashMap::new();
    let mut exited_at: HashMap<u32, u128> = HashMap::new();
    let mut terminations = 0;
    let started = Instant::now();
    let mut round = 0_u32;
    while started.elapsed() < Duration::from_secs(4) {
        round += 1;
        let mut cmd = run_under_lock(&name, &extra, &script, &[]);
        cmd.env("LOG", &log)
            .env("CURRENT", dir.path().join("current"));
        running.push(cmd.spawn().unwrap());

        // Chaos, at pseudo-random moments (a fixed pattern keeps failures reproducible).
        if round % 7 == 3 {
            // SIGKILL whichever heimdall currently runs its command, if any.
            if let Some(holder) = current_holder(&log, &finished)
                && let Some(child) = running.iter_mut().find(|c| c.id() == holder)
            {
                child.kill().unwrap();
                killed_at.insert(holder, now_ns());
            }
        } else if round % 7 == 6 {
            let mut client = shared().client();
            let n = client
                .execute(
                    "select pg_terminate_backend(pid) from pg_stat_activity \
                     where application_name like $1 and pid in \
                     (select pid from pg_locks where locktype = 'advisory' and granted)",
                    &[&format!("heimdall soak/{name} @%")],
                )
                .unwrap();
            terminations += n;
        }
        std::thread::sleep(Duration::from_millis(25));
        reap_finished(&mut running, &mut finished, &mut exited_at);
    }
    for child in &mut running {
        let pid = child.id();
        let code = wait_child(child, RUN_LIMIT).and_then(|s| s.code());
        exited_at.insert(pid, now_ns());
        finished.insert(pid, code);
    }

    // Exit codes: ran (0), busy (75), lock lost (76), or killed by this test (no code); or 69,
    // when a termination hit a backend that had just been granted the lock in the message that
    // takes it: the run could not take the lock, and its command never ran.
    let mut codes: HashMap<Option<i32>, usize> = HashMap::new();
    for (pid, code) in &finished {
        *codes.entry(*code).or_default() += 1;
        match code {
            Some(0 | 69 | 75 | 76) => {}
            None => assert!(
                killed_at.contains_key(pid),
                "heimdall {pid} died of a signal"
            ),
            other => panic!("heimdall {pid} exited with {other:?}"),
        }
    }

    // A SIGKILLed heimdall's keeper stops its job before the lock can go, so no command may
    // find such a job still running; only a lost lock (76) excuses it, bounded below.
    let heimdall_of = command_heimdalls(&log);
    for (runner, job) in jobs_found_alive(&log) {
        let owner = heimdall_of.get(&job).copied();
        let code = owner.and_then(|h| finished.get(&h).copied().flatten());
        assert!(
            code == Some(76),
            "heimdall {runner} ran its command while the job (group {job}) of heimdall {owner:?} \
             still ran; that heimdall was SIGKILLed: {}, exited {code:?}",
            owner.is_some_and(|h| killed_at.contains_key(&h))
        );
    }

    // Overlap: sort stays by start; each must begin after the previous one ended, except
    // after a stay whose lock was lost (76: heimdall stopped it within its bound). A SIGKILLed
    // holder's stay ends when it was killed, at the latest for this check; the check above
    // covers what its job did after.
    let stays = read_stays(&log);
    let bound = heartbeat + heartbeat + kill_after + Duration::from_secs(2);
    let mut overlaps_after_loss = 0;
    let mut longest = Duration::ZERO;
    for pair in stays.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let prev_end = prev
            .end
            .or_else(|| killed_at.get(&prev.heimdall).copied())
            .or_else(|| exited_at.get(&prev.heimdall).copied())
            .expect("every stay ends");
        if next.start >= prev_end {
            continue;
        }
        let overlap = Duration::from_nanos((prev_end - next.start) as u64);
        let prev_code = finished.get(&prev.heimdall).copied().flatten();
        let excused = prev_code == Some(76);
        assert!(
            excused,
            "heimdall {} ran its command while heimdall {} (exit {prev_code:?}) still ran its own, for {overlap:?}",
            next.heimdall, prev.heimdall
        );
        assert!(
            overlap <= bound,
            "a lost lock's command ran on for {overlap:?}"
        );
        overlaps_after_loss += 1;
        longest = longest.max(overlap);
    }
    eprintln!(
        "chaos soak: {} runs, {} commands ran, {} SIGKILLs, {terminations} backends terminated, \
         {overlaps_after_loss} overlaps right after a loss (longest {longest:?}, bound {bound:?}); \
         exit codes {codes:?}",
        finished.len(),
        stays.len(),
        killed_at.len()
    );
    assert!(
        stays.len() >= 5,
        "the soak ran too few commands to mean anything"
    );
    assert!(
        !killed_at.is_empty() && terminations > 0,
        "the chaos did happen"
    );

    // Nothing left: no command process alive, no lock held.
    let commands = command_pids(&log);
    assert!(
        busy_wait(RUN_LIMIT, || commands.iter().all(
            |pid| !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid)
        )),
        "a command outlived its heimdall"
    );
    assert!(
        busy_wait(RUN_LIMIT, || no_advisory_lock_left(&name)),
        "a lock was left held"
    );
}

/// The heimdall whose command has started and not yet ended, by the log.
fn current_holder(log: &std::path::Path, finished: &HashMap<u32, Option<i32>>) -> Option<u32> {
    read_stays(log)
        .into_iter()
        .rev()
        .find(|s| s.end.is_none() && !finished.contains_key(&s.heimdall))
        .map(|s| s.heimdall)
}

fn reap_finished(
    running: &mut Vec<Child>,
    finished: &mut HashMap<u32, Option<i32>>,
    exited_at: &mut HashMap<u32, u128>,
) {
    running.retain_mut(|child| match child.try_wait() {
        Ok(Some(status)) => {
            finished.insert(child.id(), status.code());
            exited_at.insert(child.id(), now_ns());
            false
        }
        _ => true,
    });
}

fn read_stays(log: &std::path::Path) -> Vec<Stay> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut stays: Vec<Stay> = Vec::new();
    let mut open: HashMap<u32, usize> = HashMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [heimdall, _pid, what, at] = parts[..] else {
            continue;
        };
        let (Ok(heimdall), Ok(at)) = (heimdall.parse::<u32>(), at.parse::<u128>()) else {
            continue;
        };
        match what {
            "start" => {
                open.insert(heimdall, stays.len());
                stays.push(Stay {
                    heimdall,
                    start: at,
                    end: None,
                });
            }
            "end" => {
                if let Some(&i) = open.get(&heimdall) {
                    stays[i].end = Some(at);
                }
            }
            _ => {}
        }
    }
    stays.sort_by_key(|s| s.start);
    stays
}

/// Each command's heimdall, by the command's pid (its process group), from the `start` lines.
fn command_heimdalls(log: &std::path::Path) -> HashMap<u32, u32> {
    log_lines(log)
        .filter(|(_, _, what)| what == "start")
        .map(|(heimdall, pid, _)| (pid, heimdall))
        .collect()
}

/// (heimdall, group) for each command that found the job of `group` still running.
fn jobs_found_alive(log: &std::path::Path) -> Vec<(u32, u32)> {
    log_lines(log)
        .filter_map(|(heimdall, _, what)| {
            Some((heimdall, what.strip_prefix("alive-")?.parse().ok()?))
        })
        .collect()
}

/// The log's lines as (heimdall, command pid, what).
fn log_lines(log: &std::path::Path) -> impl Iterator<Item = (u32, u32, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let heimdall = fields.next()?.parse().ok()?;
            let pid = fields.next()?.parse().ok()?;
            Some((heimdall, pid, fields.next()?.to_owned()))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

fn command_pids(log: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rfind(')')
                .map(|i| s[i + 1..].trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}
