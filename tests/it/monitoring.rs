//! What heimdall tells monitoring and the shell around it: the Prometheus metrics file, the JSON
//! report, --min-hold, and the generated completions (the manual page: cli.rs).

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::procs::Job;
use crate::support::runs::{Holder, lock_is_free, locked, locked_std};
use crate::support::{
    REACT_LIMIT, RUN_LIMIT, busy_wait, heimdall, shared, unique_name, wait_child,
};

/// Parses Prometheus text: `metric{labels} value` lines into "metric{labels}" → value, after
/// checking that every sample has HELP and TYPE lines.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.push(rest.split_whitespace().next().unwrap().to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let metric = series.split('{').next().unwrap();
        assert!(
            typed.iter().any(|t| t == metric),
            "{metric} has no TYPE line"
        );
        samples.insert(series.to_owned(), value.parse().expect("numeric value"));
    }
    samples
}

fn sample(samples: &HashMap<String, f64>, metric: &str, extra: &str, name: &str) -> f64 {
    let key = format!("{metric}{{namespace=\"mon\",name=\"{name}\",keys=\"");
    *samples
        .iter()
        .find(|(k, _)| k.starts_with(&key) && k.ends_with(&format!("\"{extra}}}")))
        .unwrap_or_else(|| panic!("no {metric} {extra} in {samples:?}"))
        .1
}

#[test]
fn metrics_file_reports_a_run_that_ran() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.prom");
    let name = unique_name("ran");
    locked("mon", &name)
        .arg("--metrics-file")
        .arg(&path)
        .args(["sh", "-c", "sleep 0.2; exit 3"])
        .assert()
        .code(3);
    let samples = parse_prometheus(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(
        sample(&samples, "heimdall_run_outcome", ",outcome=\"ran\"", &name),
        1.0
    );
    assert_eq!(
        sample(&samples, "heimdall_run_outcome", ",outcome=\"busy\"", &name),
        0.0
    );
    assert_eq!(sample(&samples, "heimdall_run_exit_code", "", &name), 3.0);
    let held = sample(&samples, "heimdall_run_held_seconds", "", &name);
    assert!(held >= 0.2, "held {held}s around a 0.2s command");
    let start = sample(&samples, "heimdall_run_start_timestamp_seconds", "", &name);
    let end = sample(&samples, "heimdall_run_end_timestamp_seconds", "", &name);
    assert!(
        end >= start + 0.2 && start > 1.6e9,
        "start {start} end {end}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "only the metrics file, no temp file");
}

#[test]
fn busy_and_failed_runs_are_reported_too() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("busy");
    let holder = Holder::start(&shared().url(), "mon", &name);

    let path = dir.path().join("busy.prom");
    let out = locked("mon", &name)
        .arg("--metrics-file")
        .arg(&path)
        .args(["--report", "json", "true"])
        .assert()
        .code(75);
    let samples = parse_prometheus(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(
        sample(&samples, "heimdall_run_outcome", ",outcome=\"busy\"", &name),
        1.0
    );
    assert_eq!(sample(&samples, "heimdall_run_exit_code", "", &name), 75.0);
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    let json_line = stderr.lines().last().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(json_line).expect("last stderr line is JSON");
    assert_eq!(report["outcome"], "busy");
    assert_eq!(report["exit_code"], 75);
    assert_eq!(report["name"], name.as_str());
    holder.stop();

    let path = dir.path().join("error.prom");
    let out = heimdall()
        .args([
            "--database",
            "postgres://nobody@127.0.0.1:1/x?connect_timeout=2",
        ])
        .args(["--namespace", "mon", "--name", &name])
        .arg("--metrics-file")
        .arg(&path)
        .args(["--report", "json", "true"])
        .assert()
        .code(69);
    // The error line comes first; the report is the last line, where a parser looks for it.
    let stderr = String::from_utf8_lossy(&out.get_output().stderr).into_owned();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].starts_with("heimdall: cannot connect"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(lines[1]).expect("last line is JSON");
    assert_eq!(report["outcome"], "error");
    let samples = parse_prometheus(&std::fs::read_to_string(&path).unwrap());
    assert_eq!(
        sample(
            &samples,
            "heimdall_run_outcome",
            ",outcome=\"error\"",
            &name
        ),
        1.0
    );
    assert_eq!(sample(&samples, "heimdall_run_exit_code", "", &name), 69.0);
}

#[test]
fn json_report_gives_wait_and_hold_times() {
    let name = unique_name("json");
    let holder = Holder::start(&shared().url(), "mon", &name);
    let started = Instant::now();
    let mut waiter = locked_std("mon", &name)
        .args(["--wait", "--report", "json", "sh", "-c", "sleep 0.3"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The waiter is in the server's lock queue; it stays there at least QUEUED.
    const QUEUED: Duration = Duration::from_millis(500);
    let mut client = shared().client();
    let pattern = format!("heimdall mon/{name} @%");
    assert!(
        busy_wait(RUN_LIMIT, || {
            client
                .query_one(
                    "select count(*) from pg_stat_activity \
                     where application_name like $1 and wait_event_type = 'Lock'",
                    &[&pattern],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        }),
        "the second run never queued for the lock"
    );
    let queued = Instant::now();
    busy_wait(RUN_LIMIT, || queued.elapsed() >= QUEUED);
    holder.stop();
    let status = wait_child(&mut waiter, RUN_LIMIT).expect("the waiter ends once it ran");
    let total = started.elapsed().as_secs_f64();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut waiter.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{status}: {stderr}");
    let report: serde_json::Value = serde_json::from_str(stderr.trim()).expect("one JSON line");
    assert_eq!(report["outcome"], "ran");
    assert_eq!(report["namespace"], "mon");
    assert!(report["held_seconds"].as_f64().unwrap() >= 0.3, "{report}");
    let waited = report["wait_seconds"].as_f64().unwrap();
    assert!(
        waited >= QUEUED.as_secs_f64() && waited < total,
        "waited {waited}s of {total}s: {report}"
    );
    assert!(report["keys"].as_str().unwrap().contains(','), "{report}");
}

#[test]
fn min_hold_keeps_the_lock_after_a_short_command_and_keeps_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let done = dir.path().join("done");
    let name = unique_name("min-hold");
    let started = Instant::now();
    let mut first = locked_std("mon", &name)
        // Long enough for the second run below to start and connect within the hold on a
        // loaded machine.
        .args([
            "--min-hold",
            "10s",
            "sh",
            "-c",
            "touch \"$1\"; exit 4",
            "sh",
        ])
        .arg(&done)
        .spawn()
        .unwrap();
    assert!(
        busy_wait(RUN_LIMIT, || done.exists()),
        "the short command ran"
    );
    // The command has finished, but the lock is still held: a second run is refused.
    locked("mon", &name).arg("true").assert().code(75);
    let status = wait_child(&mut first, RUN_LIMIT).expect("heimdall ends after the hold");
    assert_eq!(
        status.code(),
        Some(4),
        "the command's own status is reported"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "held for at least --min-hold"
    );
    locked("mon", &name).arg("true").assert().success();
}

/// "A terminating signal ends the hold early": heimdall releases the lock at once and still
/// exits with the command's own status.
fn a_signal_ends_min_hold_early(signal: i32, name: &str) {
    let mut job = Job::start(
        "mon",
        &format!("min-hold-{name}"),
        &["-v", "--min-hold", "10m"],
        "echo $$ > pid; exit 4",
    );
    // The command has ended, and heimdall holds the lock for its --min-hold.
    assert!(
        busy_wait(RUN_LIMIT, || job
            .run
            .stderr()
            .contains("more for --min-hold")),
        "heimdall never said it holds for --min-hold: {}",
        job.run.stderr()
    );
    assert!(
        !lock_is_free("mon", &job.name),
        "the lock is free during --min-hold"
    );
    job.run.signal(signal);
    let stderr = job.run.expect_exit(4, REACT_LIMIT);
    assert!(
        stderr.contains(&format!(
            "received SIG{name} during --min-hold; releasing the lock now"
        )),
        "{stderr}"
    );
    assert!(lock_is_free("mon", &job.name), "the lock is still held");
}

#[test]
fn sigterm_ends_min_hold_early_with_the_commands_status() {
    a_signal_ends_min_hold_early(libc::SIGTERM, "TERM");
}

#[test]
fn sigint_ends_min_hold_early_with_the_commands_status() {
    a_signal_ends_min_hold_early(libc::SIGINT, "INT");
}

#[test]
fn bash_completion_loads_and_completes_flags() {
    let out = heimdall().args(["completions", "bash"]).assert().success();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("heimdall.bash");
    std::fs::write(&script, &out.get_output().stdout).unwrap();
    let check = Command::new("bash")
        .arg("-c")
        .arg(
            "source \"$1\" && complete -p heimdall && \
             COMP_WORDS=(heimdall --heart) COMP_CWORD=1 COMP_LINE='heimdall --heart' COMP_POINT=16 \
             && _heimdall heimdall --heart heimdall && printf '%s\\n' \"${COMPREPLY[@]}\"",
        )
        .arg("bash")
        .arg(&script)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        stdout.contains("--heartbeat"),
        "completes --heartbeat: {stdout}"
    );
    for shell in ["zsh", "fish"] {
        heimdall().args(["completions", shell]).assert().success();
    }
}
