//! The recipes of docs/recipes.md, run as written. Each test reads its example file under
//! docs/examples, takes the heimdall command out of it, substitutes only what cannot be the same
//! here (the binary's path, the database, the job, the lock name, durations that would make the
//! test slow, the metrics file's directory) and runs it the way the scheduler would: `sh -c` for
//! cron and CI, the unit's ExecStart= with its EnvironmentFile=, the CronJob's args with the
//! variable its secretKeyRef provides. Every substitution asserts that the text it replaces is
//! there, so a recipe edited without its test fails here.
//!
//! Not checked here: a real cron daemon, systemd as PID 1, a Kubernetes cluster or a CI runner.
//! The unit files are checked by `systemd-analyze verify`; the Kubernetes manifest only by
//! string assertions and by running its args.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::locks::{LockId, holders, waiters};
use crate::support::{
    LOCK_DELAY_ENV, PW_PASSWORD, PW_USER, RUN_LIMIT, START_LIMIT, busy_wait, clean_command,
    heimdall, heimdall_std, shared, text, unique_name, wait_output,
};
const BIN: &str = env!("CARGO_BIN_EXE_heimdall");
/// The installed path the committed examples use.
const INSTALLED_BIN: &str = "/usr/local/bin/heimdall";

// ---------------------------------------------------------------------------
// Reading the examples
// ---------------------------------------------------------------------------

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples")
}

pub(crate) fn example(name: &str) -> String {
    let path = examples_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Replaces each `from` with its `to`, insisting that every `from` occurs: a substitution that
/// silently matches nothing would run something other than the recipe.
pub(crate) fn substitute(text: &str, pairs: &[(&str, &str)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in pairs {
        assert!(
            out.contains(from),
            "the recipe no longer contains {from:?}; update tests/it/recipes.rs with it:\n{text}"
        );
        out = out.replace(from, to);
    }
    out
}

/// The one line of `text` that contains `needle`.
fn the_line<'a>(text: &'a str, needle: &str) -> &'a str {
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one line containing {needle:?}, found {lines:?}"
    );
    lines[0]
}

/// `KEY="value"` / `KEY=value` lines (an EnvironmentFile=, or a crontab's environment lines),
/// with matching quotes removed as systemd and cron remove them. Comments and blanks are skipped.
fn env_assignment(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let valid_name = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_name {
        return None;
    }
    let value = value.trim();
    let unquoted = ["\"", "'"]
        .iter()
        .find_map(|q| value.strip_prefix(q).and_then(|v| v.strip_suffix(q)))
        .unwrap_or(value);
    Some((key.to_owned(), unquoted.to_owned()))
}

// ---------------------------------------------------------------------------
// Jobs and the database they lock on
// ---------------------------------------------------------------------------

/// The shared cluster as the password role, with no password in the URL: it must come from
/// `PGPASSWORD` or a password file, as the recipes say. The role may use the run table the
/// recipes' `--min-interval` keeps, as a DBA would have granted it.
fn password_role_url() -> String {
    grant_run_table();
    format!(
        "postgresql://{PW_USER}@127.0.0.1:{}/postgres?sslmode=disable",
        shared().port()
    )
}

/// The run table (`public.heimdall_runs`) for the password role: created from `heimdall
/// run-ddl`, as a DBA would, unless a run created it first, and granted.
fn grant_run_table() {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let ddl = heimdall().arg("run-ddl").output().unwrap();
        assert!(ddl.status.success(), "{}", text(&ddl.stderr));
        let mut client = shared().client();
        // A run elsewhere may be creating it at this moment: it is there either way.
        let _ = client.batch_execute(&text(&ddl.stdout));
        client
            .batch_execute(&format!(
                "GRANT SELECT, INSERT, UPDATE ON public.heimdall_runs TO {PW_USER}"
            ))
            .unwrap();
    });
}

/// A home directory with a `.pgpass` (mode 0600) for [`password_role_url`].
fn home_with_pgpass(dir: &Path) -> PathBuf {
    let home = dir.join("home");
    fs::create_dir(&home).unwrap();
    shared().write_pgpass(&home.join(".pgpass"), 0o600);
    home
}

fn write_script(path: &Path, body: &str) -> String {
    fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    path.to_str().unwrap().to_owned()
}

/// A job that notes that it ran in `runs`, then stays until `release` exists, so a test decides
/// how long the lock is held. It prints nothing: cron would mail nothing for it.
fn held_job(dir: &Path) -> (String, PathBuf, PathBuf) {
    let runs = dir.join("runs");
    let release = dir.join("release");
    let script = write_script(
        &dir.join("held-job.sh"),
        &format!(
            "echo ran >> '{}'\nwhile [ ! -e '{}' ]; do sleep 0.02; done\n",
            runs.display(),
            release.display()
        ),
    );
    (script, runs, release)
}

/// A job that fails if another copy of it is running (`mkdir` is atomic) and otherwise logs
/// `start`, stays until `release` exists, and logs `end`: two runs that overlap cannot both log
/// cleanly, and the test decides how long the first one holds the lock.
fn exclusive_job(dir: &Path) -> (String, PathBuf, PathBuf) {
    let log = dir.join("log");
    let inside = dir.join("inside");
    let release = dir.join("release");
    let script = write_script(
        &dir.join("exclusive-job.sh"),
        &format!(
            "mkdir '{inside}' 2>/dev/null || {{ echo overlap >> '{log}'; exit 99; }}\n\
             echo start >> '{log}'\nwhile [ ! -e '{release}' ]; do sleep 0.02; done\n\
             echo end >> '{log}'\nrmdir '{inside}'\n",
            inside = inside.display(),
            log = log.display(),
            release = release.display()
        ),
    );
    (script, log, release)
}

/// Two runs of `command` (an [`exclusive_job`] under `--wait`, on the lock `namespace/name`)
/// started at once: the one that gets the lock runs its job while the other is seen queued
/// behind it in `pg_locks`; only then is the job released, and both must run, one after the
/// other.
fn second_run_waits(
    command: &str,
    env: &[(String, String)],
    lock: LockId,
    log: &Path,
    release: &Path,
) {
    let first = spawn_sh(command, env);
    let second = spawn_sh(command, env);
    let mut client = shared().client();
    let competed = busy_wait(START_LIMIT, || {
        lines_in(log) == 1
            && holders(&mut client, lock).len() == 1
            && waiters(&mut client, lock).len() == 1
    });
    fs::write(release, "").unwrap();
    let (first, second) = (finish(first), finish(second));
    assert!(
        competed,
        "the second run never queued behind the first; log {:?}; stderr: {} {}",
        fs::read_to_string(log).unwrap_or_default(),
        text(&first.1.stderr),
        text(&second.1.stderr)
    );
    assert_eq!(
        (first.0, second.0),
        (0, 0),
        "both runs ran: {} {}",
        text(&first.1.stderr),
        text(&second.1.stderr)
    );
    assert_eq!(
        fs::read_to_string(log).unwrap(),
        "start\nend\nstart\nend\n",
        "one run after the other"
    );
}

fn lines_in(path: &Path) -> usize {
    fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

/// `sh -c COMMAND` with a clean connection environment plus `env`, output captured.
fn spawn_sh(command: &str, env: &[(String, String)]) -> Child {
    clean_command("sh")
        .arg("-c")
        .arg(command)
        // As for every test's heimdall (support::heimdall_std): on a cluster that started less
        // than the lock-delay ago, a run would hold its lock some 20 s before its job starts.
        .env(LOCK_DELAY_ENV, "0")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sh -c {command:?}: {e}"))
}

/// Waits for `child` (see [`wait_output`]) and returns its exit code and output.
fn finish(child: Child) -> (i32, Output) {
    let output = wait_output(child);
    let code = output
        .status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {:?}", output.status));
    (code, output)
}

/// Two runs started at once: waits until one has exited (the one that found the lock held),
/// then creates `release` so the job of the other can end. Returns (code, output) of the run that
/// exited first, then of the other.
fn race(first: Child, second: Child, release: &Path) -> ((i32, Output), (i32, Output)) {
    let mut children = [Some(first), Some(second)];
    let mut done = None;
    assert!(
        busy_wait(RUN_LIMIT, || {
            for (i, child) in children.iter_mut().enumerate() {
                if let Some(c) = child
                    && c.try_wait().unwrap().is_some()
                {
                    done = Some(i);
                    return true;
                }
            }
            false
        }),
        "neither run ended: both ran, or neither could connect"
    );
    let early = children[done.unwrap()].take().unwrap();
    let early = finish(early);
    fs::write(release, "").unwrap();
    let late = children.iter_mut().find_map(Option::take).unwrap();
    (early, finish(late))
}

/// Prometheus text → the value of `metric` whose labels end with `suffix` (e.g.
/// `outcome="busy"}`, or `}` for the unlabelled gauges).
fn metric(prom: &str, metric: &str, suffix: &str) -> f64 {
    prom.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.starts_with(&format!("{metric}{{")) && series.ends_with(suffix))
                .then(|| value.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {metric} ...{suffix} in:\n{prom}"))
}

// ---------------------------------------------------------------------------
// cron
// ---------------------------------------------------------------------------

struct CronJob {
    fields: Vec<String>,
    command: String,
}

/// A user crontab: environment lines and jobs (five time fields, then the command).
fn parse_crontab(text: &str) -> (Vec<(String, String)>, Vec<CronJob>) {
    let mut env = Vec::new();
    let mut jobs = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let starts_like_a_job = trimmed.starts_with(|c: char| c.is_ascii_digit() || c == '*');
        if !starts_like_a_job {
            let assignment = env_assignment(trimmed)
                .unwrap_or_else(|| panic!("neither a job nor an environment line: {line:?}"));
            env.push(assignment);
            continue;
        }
        let mut rest = trimmed;
        let mut fields = Vec::new();
        for _ in 0..5 {
            let (field, after) = rest
                .split_once(char::is_whitespace)
                .unwrap_or_else(|| panic!("fewer than five time fields and a command: {line:?}"));
            fields.push(field.to_owned());
            rest = after.trim_start();
        }
        jobs.push(CronJob {
            fields,
            command: rest.to_owned(),
        });
    }
    (env, jobs)
}

/// One time field: `*`, `N`, `A-B`, each with an optional `/STEP`, comma-separated, in range.
fn valid_cron_field(field: &str, min: u32, max: u32) -> bool {
    let number = |s: &str| s.parse::<u32>().ok().filter(|n| (min..=max).contains(n));
    field.split(',').all(|item| {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step_ok = step.is_none_or(|s| s.parse::<u32>().is_ok_and(|n| n > 0));
        let range_ok = range == "*"
            || number(range).is_some()
            || range.split_once('-').is_some_and(
                |(a, b)| matches!((number(a), number(b)), (Some(a), Some(b)) if a <= b),
            );
        step_ok && range_ok
    })
}

fn crontab_job(jobs: &[CronJob], needle: &str) -> String {
    let found: Vec<&CronJob> = jobs.iter().filter(|j| j.command.contains(needle)).collect();
    assert_eq!(found.len(), 1, "expected one crontab job with {needle:?}");
    found[0].command.clone()
}

#[test]
fn crontab_has_five_valid_time_fields_and_a_command_on_every_job_line() {
    let (env, jobs) = parse_crontab(&example("crontab"));
    assert_eq!(jobs.len(), 2, "the once-a-night job and the --wait job");
    // minute, hour, day of month, month, day of week (0 and 7 are Sunday).
    let ranges = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];
    for job in &jobs {
        for (field, (min, max)) in job.fields.iter().zip(ranges) {
            assert!(
                valid_cron_field(field, min, max),
                "bad time field {field:?} in {:?}",
                job.command
            );
        }
        assert!(
            job.command.starts_with(&format!("{INSTALLED_BIN} ")),
            "{:?}",
            job.command
        );
        // cron turns an unescaped % into a newline and feeds the rest to stdin.
        assert!(!job.command.contains('%'), "{:?}", job.command);
    }
    let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["CRON_TZ", "HEIMDALL_DATABASE_URL", "MAILTO"]);
    // Hosts in different time zones must agree on when the job is due.
    assert_eq!(env[0].1, "UTC");
}

#[test]
fn crontab_line_runs_on_one_host_while_the_other_skips_without_a_word() {
    let dir = tempfile::tempdir().unwrap();
    let (env, jobs) = parse_crontab(&example("crontab"));
    let command = crontab_job(&jobs, " -q ");
    let (job, runs, release) = held_job(dir.path());
    let name = unique_name("cron-invoices");
    let on_host = |host: &str| {
        let metrics = dir.path().join(format!("{host}.prom"));
        substitute(
            &command,
            &[
                (INSTALLED_BIN, BIN),
                (
                    "/var/lib/prometheus/node-exporter/heimdall-invoices.prom",
                    metrics.to_str().unwrap(),
                ),
                ("--name nightly-invoices", &format!("--name {name}")),
                ("/opt/billing/send-invoices.sh", &job),
            ],
        )
    };
    // The crontab's own environment, with the URL pointed here; the password is in ~/.pgpass.
    let home = home_with_pgpass(dir.path());
    let mut env: Vec<(String, String)> = env
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "HEIMDALL_DATABASE_URL" => (k, password_role_url()),
            _ => (k, v),
        })
        .collect();
    env.push(("HOME".into(), home.to_str().unwrap().into()));

    let ((skipped_code, skipped), (ran_code, ran)) = race(
        spawn_sh(&on_host("host-a"), &env),
        spawn_sh(&on_host("host-b"), &env),
        &release,
    );
    assert_eq!(skipped_code, 75, "stderr: {}", text(&skipped.stderr));
    assert!(
        skipped.stdout.is_empty() && skipped.stderr.is_empty(),
        "a skipped run under -q must print nothing (cron would mail it): {:?} {:?}",
        text(&skipped.stdout),
        text(&skipped.stderr)
    );
    assert_eq!(ran_code, 0, "stderr: {}", text(&ran.stderr));
    assert!(ran.stdout.is_empty() && ran.stderr.is_empty());
    assert_eq!(lines_in(&runs), 1, "the job ran exactly once");

    // Each host's metrics file tells node_exporter what that host did.
    let outcomes: Vec<(f64, f64)> = ["host-a", "host-b"]
        .iter()
        .map(|host| {
            let prom = fs::read_to_string(dir.path().join(format!("{host}.prom"))).unwrap();
            (
                metric(&prom, "heimdall_run_outcome", "outcome=\"ran\"}"),
                metric(&prom, "heimdall_run_exit_code", "\"}"),
            )
        })
        .collect();
    let mut sorted = outcomes.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(sorted, [(0.0, 75.0), (1.0, 0.0)], "{outcomes:?}");
}

#[test]
fn crontab_min_interval_makes_a_host_whose_cron_fires_late_skip_a_short_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_, jobs) = parse_crontab(&example("crontab"));
    let command = crontab_job(&jobs, " -q ");
    let runs = dir.path().join("runs");
    let job = write_script(
        &dir.path().join("short-job.sh"),
        &format!("echo ran >> '{}'\n", runs.display()),
    );
    let name = unique_name("cron-skew");
    let metrics = dir.path().join("host.prom");
    let command = substitute(
        &command,
        &[
            (INSTALLED_BIN, BIN),
            (
                "/var/lib/prometheus/node-exporter/heimdall-invoices.prom",
                metrics.to_str().unwrap(),
            ),
            // Half a day, scaled down to 10 seconds: room for the late run to start and connect
            // within the interval on a loaded machine.
            ("--min-interval=12h", "--min-interval=10s"),
            ("--name nightly-invoices", &format!("--name {name}")),
            ("/opt/billing/send-invoices.sh", &job),
        ],
    );
    let env = [("HEIMDALL_DATABASE_URL".to_owned(), shared().url())];
    let (code, on_time) = finish(spawn_sh(&command, &env));
    // The run started (on the server's clock) before it finished here: the interval, counted
    // from its start, is surely over once it has passed since this moment.
    let first_done = Instant::now();
    assert_eq!(code, 0, "stderr: {}", text(&on_time.stderr));
    assert_eq!(lines_in(&runs), 1, "the job ran");
    // The job has finished and let the lock go; this host's cron fires "late", within the
    // interval.
    let (late_code, late) = finish(spawn_sh(&command, &env));
    assert_eq!(late_code, 75, "stderr: {}", text(&late.stderr));
    assert!(late.stdout.is_empty() && late.stderr.is_empty());
    let prom = fs::read_to_string(&metrics).unwrap();
    assert_eq!(
        metric(&prom, "heimdall_run_outcome", "outcome=\"skipped\"}"),
        1.0
    );
    assert_eq!(lines_in(&runs), 1, "the short job ran once");
    // After the interval, the next night's run runs the job again.
    let interval = Duration::from_secs(10);
    assert!(
        busy_wait(interval + RUN_LIMIT, || first_done.elapsed() > interval),
        "the clock stopped"
    );
    assert_eq!(finish(spawn_sh(&command, &env)).0, 0);
    assert_eq!(lines_in(&runs), 2);
}

#[test]
fn crontab_wait_line_runs_on_every_host_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_, jobs) = parse_crontab(&example("crontab"));
    let command = crontab_job(&jobs, "--wait=");
    let (job, log, release) = exclusive_job(dir.path());
    let name = unique_name("cron-upload");
    let command = substitute(
        &command,
        &[
            (INSTALLED_BIN, BIN),
            ("--name nas-upload", &format!("--name {name}")),
            ("/opt/backup/upload-local.sh", &job),
        ],
    );
    let env = [("HEIMDALL_DATABASE_URL".to_owned(), shared().url())];
    second_run_waits(&command, &env, LockId::of("backup", &name), &log, &release);
}

// ---------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------

const UNIT: &str = "heimdall-invoices.service";
const TIMER: &str = "heimdall-invoices.timer";

/// The value of `Key=` in a unit file (exactly one such line).
fn unit_value(unit: &str, key: &str) -> String {
    let line = the_line(unit, &format!("{key}="));
    line.strip_prefix(&format!("{key}="))
        .unwrap_or_else(|| panic!("{key}= is not at the start of {line:?}"))
        .trim()
        .to_owned()
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[test]
fn systemd_service_and_timer_pass_systemd_analyze_verify() {
    // verify checks that ExecStart's binary exists and that Documentation=man:heimdall(1)
    // resolves: point both at this build.
    let man = tempfile::tempdir().unwrap();
    let man1 = man.path().join("man1");
    fs::create_dir_all(&man1).unwrap();
    let page = Command::new(BIN).arg("man").output().unwrap();
    assert!(page.status.success());
    fs::write(man1.join("heimdall.1"), page.stdout).unwrap();

    let said = systemd_verify(Path::new(BIN), man.path());
    assert!(said.is_ok(), "{}", said.unwrap_err());
}

/// `systemd-analyze verify` of the systemd recipe's unit and timer, as committed but for
/// ExecStart's binary (`bin`), with `man` as the MANPATH in which `Documentation=man:heimdall(1)`
/// must resolve. `Err` carries what verify said about our units: even a warning fails it.
pub(crate) fn systemd_verify(bin: &Path, man: &Path) -> Result<(), String> {
    let analyze = find_program("systemd-analyze").unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found: the systemd recipe's unit files are checked with it. \
             Install it with `apt-get install systemd` (scripts/ensure-deps does, when it is missing)."
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let service = substitute(&example(UNIT), &[(INSTALLED_BIN, bin.to_str().unwrap())]);
    fs::write(dir.path().join(UNIT), service).unwrap();
    fs::write(dir.path().join(TIMER), example(TIMER)).unwrap();

    let output = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join(UNIT))
        .arg(dir.path().join(TIMER))
        .env("MANPATH", man)
        .output()
        .unwrap();
    // verify exits 0 on an unknown key; it only says so on stderr, so what it says must be
    // empty too, but for lines about other units on this machine (verify loads the units ours
    // name, such as the targets, and Debian's pgpool2.service draws a warning of its own).
    let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|line| !about_another_unit(line, dir.path()))
        .collect();
    if output.status.success() && about_ours.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "systemd-analyze verify ({}):\n{said}",
            output.status
        ))
    }
}

/// A line of `systemd-analyze verify` that names a unit file outside `ours` as its subject
/// (`/lib/systemd/system/x.service:11: ...`).
fn about_another_unit(line: &str, ours: &Path) -> bool {
    const UNIT_KINDS: [&str; 7] = [
        "service", "timer", "socket", "target", "mount", "path", "slice",
    ];
    let subject = line.split(':').next().unwrap_or("");
    let path = Path::new(subject);
    subject.starts_with('/')
        && !path.starts_with(ours)
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| UNIT_KINDS.contains(&e))
}

/// The busy code `heimdall --help` documents, from its exit-status table.
fn documented_busy_code() -> String {
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = text(&help.stdout);
    let exit_table = help
        .split_once("Exit status:")
        .expect("--help ends with an exit-status table")
        .1;
    the_line(exit_table, "the lock is held elsewhere")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// The unit's ExecStart= and its EnvironmentFile=, pointed at the shared cluster as the password
/// role: URL and password replaced, the rest as committed.
fn exec_start_with_environment(
    dir: &Path,
    job: &str,
    name: &str,
) -> (Vec<String>, Vec<(String, String)>) {
    let unit = example(UNIT);
    assert_eq!(
        unit_value(&unit, "EnvironmentFile"),
        "/etc/heimdall/invoices.env",
        "the unit reads docs/examples/heimdall-invoices.env"
    );
    let env: Vec<(String, String)> = example("heimdall-invoices.env")
        .lines()
        .filter_map(env_assignment)
        .map(|(k, _)| match k.as_str() {
            "HEIMDALL_DATABASE_URL" => (k, password_role_url()),
            "PGPASSWORD" => (k, PW_PASSWORD.to_owned()),
            _ => panic!("unexpected variable {k} in heimdall-invoices.env"),
        })
        .collect();
    assert_eq!(env.len(), 2, "HEIMDALL_DATABASE_URL and PGPASSWORD");
    let metrics = dir.join("invoices.prom");
    let exec_start = substitute(
        &unit_value(&unit, "ExecStart"),
        &[
            (INSTALLED_BIN, BIN),
            (
                "/var/lib/prometheus/node-exporter/heimdall-invoices.prom",
                metrics.to_str().unwrap(),
            ),
            ("--name nightly-invoices", &format!("--name {name}")),
            ("/opt/billing/send-invoices.sh", job),
        ],
    );
    // No quoting in this ExecStart=, so systemd splits it on whitespace.
    assert!(!exec_start.contains(['"', '\'', '\\', '$', '%']));
    let argv = exec_start.split_whitespace().map(str::to_owned).collect();
    (argv, env)
}

fn spawn_argv(argv: &[String], env: &[(String, String)]) -> Child {
    let mut cmd = heimdall_std();
    assert_eq!(argv[0], BIN);
    cmd.args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

#[test]
fn systemd_success_exit_status_is_the_code_of_a_skipped_run() {
    let unit = example(UNIT);
    let busy = documented_busy_code();
    assert_eq!(busy, "75");
    assert_eq!(unit_value(&unit, "SuccessExitStatus"), busy);
    assert!(!unit.contains("--busy-exit-code"));

    // And a run of the unit's ExecStart=, with its EnvironmentFile=, that finds the lock held
    // really exits with it, while the one that holds it exits 0.
    let dir = tempfile::tempdir().unwrap();
    let (job, runs, release) = held_job(dir.path());
    let (argv, env) = exec_start_with_environment(dir.path(), &job, &unique_name("unit"));
    let ((skipped_code, skipped), (ran_code, ran)) =
        race(spawn_argv(&argv, &env), spawn_argv(&argv, &env), &release);
    assert_eq!(
        skipped_code.to_string(),
        busy,
        "stderr: {}",
        text(&skipped.stderr)
    );
    assert_eq!(ran_code, 0, "stderr: {}", text(&ran.stderr));
    assert_eq!(lines_in(&runs), 1);
}

#[test]
fn environment_file_works_sourced_by_a_shell_too() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("invoices.env");
    let contents = substitute(
        &example("heimdall-invoices.env"),
        &[
            (
                "postgresql://invoices@db.internal:5432/app?sslmode=verify-full&sslrootcert=system",
                &password_role_url(),
            ),
            (
                "PGPASSWORD=\"change-me\"",
                &format!("PGPASSWORD=\"{PW_PASSWORD}\""),
            ),
        ],
    );
    fs::write(&file, contents).unwrap();
    let committed = example("heimdall-invoices.env");
    let sourced = the_line(&committed, "set -a;");
    assert!(sourced.contains("`set -a; . /etc/heimdall/invoices.env; set +a`"));
    let name = unique_name("sourced");
    let command = format!(
        "set -a; . '{}'; set +a; exec {BIN} --namespace billing --name {name} -- sh -c 'echo \"$HEIMDALL_LOCK_HELD\"'",
        file.display()
    );
    let (code, output) = finish(spawn_sh(&command, &[]));
    assert_eq!(code, 0, "stderr: {}", text(&output.stderr));
    assert_eq!(text(&output.stdout), "1\n");
}

// ---------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------

/// The container's args: the `- ITEM` lines under `args:`, after `command: ["heimdall"]`.
fn cronjob_args(yaml: &str) -> Vec<String> {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != "command: [\"heimdall\"]");
    assert!(
        lines.next().is_some(),
        "no command: [\"heimdall\"] in cronjob.yaml"
    );
    let args_line = lines.next().expect("args: after command:");
    assert_eq!(args_line.trim(), "args:");
    let indent = args_line.len() - args_line.trim_start().len();
    lines
        .take_while(|l| l.len() - l.trim_start().len() > indent)
        .map(|l| {
            l.trim()
                .strip_prefix("- ")
                .unwrap_or_else(|| panic!("not a list item: {l:?}"))
                .to_owned()
        })
        .collect()
}

#[test]
fn cronjob_reads_the_url_from_a_secret_and_counts_a_skipped_run_as_success() {
    let yaml = example("cronjob.yaml");
    for expected in [
        "kind: CronJob",
        "concurrencyPolicy: Forbid",
        "restartPolicy: Never",
        "terminationGracePeriodSeconds: 120",
        "- name: HEIMDALL_DATABASE_URL\n                  valueFrom:\n                    secretKeyRef:\n                      name: heimdall-db\n                      key: url\n",
    ] {
        assert!(yaml.contains(expected), "cronjob.yaml lacks {expected:?}");
    }
    assert!(
        !yaml.contains("kind: Secret"),
        "no password in the manifest"
    );
    let args = cronjob_args(&yaml);
    assert!(args.contains(&"--busy-exit-code=0".to_owned()), "{args:?}");
    assert!(args.contains(&"--report=json".to_owned()), "{args:?}");

    // Run the container's command line, with the variable the secretKeyRef provides.
    let dir = tempfile::tempdir().unwrap();
    let (job, runs, release) = held_job(dir.path());
    let name = unique_name("k8s");
    let args = substitute(
        &args.join("\n"),
        &[
            ("--name=nightly-invoices", &format!("--name={name}")),
            ("/app/send-invoices.sh", &job),
        ],
    );
    let argv: Vec<String> = std::iter::once(BIN.to_owned())
        .chain(args.lines().map(str::to_owned))
        .collect();
    let env = [("HEIMDALL_DATABASE_URL".to_owned(), shared().url())];
    let ((skipped_code, skipped), (ran_code, ran)) =
        race(spawn_argv(&argv, &env), spawn_argv(&argv, &env), &release);
    assert_eq!(lines_in(&runs), 1);
    assert_eq!((skipped_code, ran_code), (0, 0), "both pods succeed");
    let report = |output: &Output| -> serde_json::Value {
        let stderr = text(&output.stderr);
        let line = stderr.lines().last().expect("a --report=json line");
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let skipped = report(&skipped);
    assert_eq!(
        skipped["outcome"], "busy",
        "the pod log still tells: {skipped}"
    );
    assert_eq!(skipped["exit_code"], 0);
    assert_eq!(report(&ran)["outcome"], "ran");
}

// ---------------------------------------------------------------------------
// CI
// ---------------------------------------------------------------------------

/// The shell line of a CI file's deploy step: the line with `heimdall --wait=30m`, without its
/// YAML (`run: ` or a list's `- `).
fn ci_shell_line(file: &str) -> String {
    let yaml = example(file);
    let line = the_line(&yaml, "heimdall --wait=30m").trim();
    let line = line
        .strip_prefix("run: ")
        .or_else(|| line.strip_prefix("- "))
        .unwrap_or_else(|| panic!("neither `run: ` nor `- ` starts {line:?}"));
    line.to_owned()
}

fn deploys_serialise(file: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (job, log, release) = exclusive_job(dir.path());
    let name = unique_name("deploy");
    let command = substitute(
        &ci_shell_line(file),
        &[
            ("heimdall --wait=30m", &format!("{BIN} --wait=30m")),
            (
                "--namespace deploy --name production",
                &format!("--namespace deploy --name {name}"),
            ),
            ("./scripts/deploy.sh", &job),
        ],
    );
    // The URL comes from the CI's secret store as HEIMDALL_DATABASE_URL.
    let env = [("HEIMDALL_DATABASE_URL".to_owned(), shared().url())];
    second_run_waits(&command, &env, LockId::of("deploy", &name), &log, &release);
}

#[test]
fn github_actions_step_serialises_two_concurrent_deploys() {
    let yaml = example("github-actions.yml");
    assert!(yaml.contains("HEIMDALL_DATABASE_URL: ${{ secrets.HEIMDALL_DATABASE_URL }}"));
    deploys_serialise("github-actions.yml");
}

#[test]
fn gitlab_ci_job_serialises_two_concurrent_deploys() {
    deploys_serialise("gitlab-ci.yml");
}

// ---------------------------------------------------------------------------
// Passwords
// ---------------------------------------------------------------------------

#[test]
fn no_example_puts_a_password_where_ps_or_the_scheduler_shows_it() {
    for entry in fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name == "heimdall-invoices.env" {
            continue; // the one place the password goes (root's, mode 0600)
        }
        for line in fs::read_to_string(&path).unwrap().lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            let lower = line.to_lowercase();
            assert!(
                !lower.contains("password=") && !lower.contains("pgpassword"),
                "{name}: {line}"
            );
            if let Some((_, after)) = line.split_once("://") {
                let authority = after.split(['/', '?', '"']).next().unwrap();
                let userinfo = authority.rsplit_once('@').map_or("", |(u, _)| u);
                assert!(!userinfo.contains(':'), "{name}: a password in {line}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

#[test]
fn recipes_show_the_example_files_as_committed() {
    let page = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/recipes.md"))
        .expect("docs/recipes.md");
    for entry in fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let contents = fs::read_to_string(&path).unwrap();
        assert!(
            page.contains(&format!("\n{}\n```\n", contents.trim_end())),
            "docs/recipes.md does not show docs/examples/{name} verbatim in a code block"
        );
        assert!(
            page.contains(&format!("(examples/{name})")),
            "docs/recipes.md does not link docs/examples/{name}"
        );
    }
}
