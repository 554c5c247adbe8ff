//! What happened, for monitoring: a Prometheus text-format file for node_exporter's textfile
//! collector (`--metrics-file`, written atomically) and one JSON line on stderr (`--report
//! json`). Built from facts the run records; no I/O but the final write.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::domain::lock::LockTarget;
use crate::exit::Outcome;
use crate::log;

/// Formats for `--report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Json,
}

/// How a run ended, in monitoring's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The command ran (whatever its exit status).
    Ran,
    Busy,
    /// `--min-interval`: a run started within the interval, so this one did not.
    Skipped,
    /// The lock was busy and every place of the `--queue` bound was taken: not even a wait.
    QueueFull,
    Lost,
    /// A replacer (`--replace`, `heimdall stop`) asked for the lock, and the command was stopped.
    Replaced,
    Timeout,
    /// heimdall failed before or around the command: connection, usage, unsafe server, spawn.
    Error,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Ran,
        Kind::Busy,
        Kind::Skipped,
        Kind::QueueFull,
        Kind::Lost,
        Kind::Replaced,
        Kind::Timeout,
        Kind::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ran => "ran",
            Kind::Busy => "busy",
            Kind::Skipped => "skipped",
            Kind::QueueFull => "queue-full",
            Kind::Lost => "lost",
            Kind::Replaced => "replaced",
            Kind::Timeout => "timeout",
            Kind::Error => "error",
        }
    }

    pub fn of(result: Option<Outcome>) -> Kind {
        match result {
            Some(Outcome::Exited(_) | Outcome::Signaled(_)) => Kind::Ran,
            Some(Outcome::Busy(_)) => Kind::Busy,
            Some(Outcome::Skipped(_)) => Kind::Skipped,
            Some(Outcome::QueueFull(_)) => Kind::QueueFull,
            Some(Outcome::LockLost) => Kind::Lost,
            Some(Outcome::Replaced) => Kind::Replaced,
            Some(Outcome::TimedOut) => Kind::Timeout,
            None => Kind::Error,
        }
    }
}

/// Timestamps the run records as it goes.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    pub started: Option<SystemTime>,
    /// When heimdall began to ask for the lock (after connecting).
    pub asked: Option<SystemTime>,
    /// When the lock was granted.
    pub acquired: Option<SystemTime>,
    /// When the lock was released or found lost.
    pub released: Option<SystemTime>,
    pub ended: Option<SystemTime>,
}

/// One run's report.
pub struct Report<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub keys: &'a str,
    pub kind: Kind,
    pub exit_code: u8,
    pub facts: &'a Facts,
}

impl Report<'_> {
    /// Seconds between asking for the lock and getting it (or giving up).
    fn waited(&self) -> f64 {
        let until = self.facts.acquired.or(self.facts.ended);
        span(self.facts.asked, until)
    }

    fn held(&self) -> f64 {
        span(
            self.facts.acquired,
            self.facts.released.or(self.facts.ended),
        )
    }

    pub fn prometheus(&self) -> String {
        let labels = format!(
            "namespace=\"{}\",name=\"{}\",keys=\"{}\"",
            escape_label(self.namespace),
            escape_label(self.name),
            escape_label(self.keys)
        );
        let mut out = String::new();
        let mut metric = |name: &str, help: &str, lines: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
            for (extra, value) in lines {
                out.push_str(&format!("{name}{{{labels}{extra}}} {value}\n"));
            }
        };
        metric(
            "heimdall_run_outcome",
            "How the last run ended: 1 for its outcome (ran, busy, skipped, queue-full, lost, replaced, timeout, error), 0 for the others.",
            Kind::ALL
                .iter()
                .map(|k| {
                    (
                        format!(",outcome=\"{}\"", k.name()),
                        u8::from(*k == self.kind).to_string(),
                    )
                })
                .collect(),
        );
        metric(
            "heimdall_run_exit_code",
            "The exit code heimdall returned for the last run.",
            vec![(String::new(), self.exit_code.to_string())],
        );
        metric(
            "heimdall_run_wait_seconds",
            "Seconds the last run waited for the lock.",
            vec![(String::new(), format!("{:.6}", self.waited()))],
        );
        metric(
            "heimdall_run_held_seconds",
            "Seconds the last run held the lock.",
            vec![(String::new(), format!("{:.6}", self.held()))],
        );
        metric(
            "heimdall_run_start_timestamp_seconds",
            "When the last run started, in seconds since the Unix epoch.",
            vec![(String::new(), format!("{:.3}", epoch(self.facts.started)))],
        );
        metric(
            "heimdall_run_end_timestamp_seconds",
            "When the last run ended, in seconds since the Unix epoch.",
            vec![(String::new(), format!("{:.3}", epoch(self.facts.ended)))],
        );
        out
    }

    pub fn json(&self) -> String {
        serde_json::json!({
            "namespace": self.namespace,
            "name": self.name,
            "keys": self.keys,
            "outcome": self.kind.name(),
            "exit_code": self.exit_code,
            "wait_seconds": self.waited(),
            "held_seconds": self.held(),
            "start_timestamp": epoch(self.facts.started),
            "end_timestamp": epoch(self.facts.ended),
        })
        .to_string()
    }
}

/// One run's report in the making: where it goes (`--metrics-file`, `--report`), which lock
/// it is about, and the phases it has watched pass.
pub struct Recorder {
    metrics_file: Option<PathBuf>,
    format: Option<ReportFormat>,
    /// Namespace, name and keys; empty until the lock target is known.
    labels: (String, String, String),
    facts: Facts,
}

impl Recorder {
    /// Starts the clock: the run begins now.
    pub fn begin(metrics_file: Option<PathBuf>, format: Option<ReportFormat>) -> Recorder {
        Recorder {
            metrics_file,
            format,
            labels: Default::default(),
            facts: Facts {
                started: Some(SystemTime::now()),
                ..Default::default()
            },
        }
    }

    pub fn label(&mut self, lock: &LockTarget) {
        let (namespace, name) = lock.names.clone().unwrap_or_default();
        self.labels = (namespace, name, lock.key.to_string());
    }

    /// Watches the asking for the lock: it began now, and it was granted when `take`'s answer
    /// is `granted`.
    pub fn acquiring<T>(
        &mut self,
        take: impl FnOnce() -> Result<T>,
        granted: impl FnOnce(&T) -> bool,
    ) -> Result<T> {
        self.facts.asked = Some(SystemTime::now());
        let taken = take();
        if taken.as_ref().is_ok_and(granted) {
            self.facts.acquired = Some(SystemTime::now());
        }
        taken
    }

    /// Watches the lock go: released (or found lost) when `release` returns.
    pub fn releasing<T>(&mut self, release: impl FnOnce() -> T) -> T {
        let released = release();
        self.facts.released = Some(SystemTime::now());
        released
    }

    /// The run is over, whatever its outcome.
    pub fn ended(&mut self) {
        self.facts.ended = Some(SystemTime::now());
    }

    /// Writes the report where it was asked for, if anywhere; `outcome` is `None` when
    /// heimdall failed.
    pub fn publish(self, outcome: Option<Outcome>, exit_code: u8) {
        if self.metrics_file.is_none() && self.format.is_none() {
            return;
        }
        let (namespace, name, keys) = &self.labels;
        let summary = Report {
            namespace,
            name,
            keys,
            kind: Kind::of(outcome),
            exit_code,
            facts: &self.facts,
        };
        if let Some(path) = &self.metrics_file {
            match write_atomically(path, &summary.prometheus()) {
                Ok(Written::Yes) => {}
                Ok(Written::NotAFile(kind)) => log::warn(format!(
                    "not writing --metrics-file {}: it is a {kind}, and heimdall replaces only a regular file or a symlink (or creates the file); name a file in node_exporter's textfile directory",
                    path.display()
                )),
                Err(e) => log::error(format!("{e:#}")),
            }
        }
        if self.format == Some(ReportFormat::Json) {
            log::line(summary.json());
        }
    }
}

/// Whether [`write_atomically`] wrote the file.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Yes,
    /// Something that is not a file is at the path (named here), and was left alone.
    NotAFile(&'static str),
}

/// Writes next to the target and renames, so the collector never reads half a file.
///
/// heimdall often runs as root, and a textfile directory may belong to another user, who could
/// plant a symlink at any name heimdall can predict. So the temporary file gets an unpredictable
/// name and is created with `O_CREAT|O_EXCL` (tempfile's `NamedTempFile`), which never follows a
/// symlink: an existing name, link or not, makes it pick another. `rename` then replaces the
/// directory entry at `path`: a symlink planted there is replaced itself, its target untouched.
/// The name ends in `.tmp`, which node_exporter skips (it reads `*.prom` only).
///
/// A rename replaces whatever is at `path`, a device node or a FIFO too: `--metrics-file
/// /dev/null` as root would replace the system's /dev/null. So only nothing, a regular file or
/// a symlink is replaced. The check is made before the temporary file is created and again
/// just before the rename; what could slip between that check and the rename can only be put
/// there by someone who may write to the directory, and a device node only by root.
pub fn write_atomically(path: &Path, text: &str) -> Result<Written> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .with_context(|| format!("--metrics-file {} names no file", path.display()))?;
    if let Some(kind) = not_a_file(path) {
        return Ok(Written::NotAFile(kind));
    }
    let write = || -> std::io::Result<Written> {
        let prefix = format!(".{}.", file_name.to_string_lossy());
        let mut file = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .tempfile_in(dir)?;
        // 0644 whatever the umask: the collector usually runs as another user. fchmod, on the
        // file just created, not on a name.
        file.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
        file.write_all(text.as_bytes())?;
        file.as_file().sync_all()?;
        if let Some(kind) = not_a_file(path) {
            // Dropping `file` removes the temporary file.
            return Ok(Written::NotAFile(kind));
        }
        // On failure the temporary file is removed when the error drops it.
        file.persist(path).map_err(|e| e.error)?;
        // The rename itself survives a crash only once the directory is synced.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(Written::Yes)
    };
    write().map_err(|e| {
        anyhow::anyhow!(
            "cannot write --metrics-file {}: {}",
            path.display(),
            why_not_written(&e, dir)
        )
    })
}

/// Why the file could not be written, in terms of the directory the user named: the
/// temporary file's name, which the error carries, means nothing to them.
fn why_not_written(e: &std::io::Error, dir: &Path) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound if !dir.exists() => {
            format!("the directory {} does not exist", dir.display())
        }
        ErrorKind::NotADirectory => format!("{} is not a directory", dir.display()),
        ErrorKind::PermissionDenied => {
            format!("no permission to create a file in {}", dir.display())
        }
        // The kind's own words ("no storage space", "read-only filesystem or storage medium").
        kind => std::io::Error::from(kind).to_string(),
    }
}

/// What is at `path` (lstat: a symlink is not followed), when it is something the metrics file
/// must not replace. A path that cannot be looked at is left to the write to report.
fn not_a_file(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::symlink_metadata(path).ok()?.file_type();
    if kind.is_file() || kind.is_symlink() {
        None
    } else if kind.is_fifo() {
        Some("FIFO")
    } else if kind.is_char_device() {
        Some("character device")
    } else if kind.is_block_device() {
        Some("block device")
    } else if kind.is_socket() {
        Some("socket")
    } else if kind.is_dir() {
        Some("directory")
    } else {
        Some("special file")
    }
}

fn span(from: Option<SystemTime>, to: Option<SystemTime>) -> f64 {
    match (from, to) {
        (Some(from), Some(to)) => to
            .duration_since(from)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64(),
        _ => 0.0,
    }
}

fn epoch(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Prometheus label values escape backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(facts: &Facts) -> Report<'_> {
        Report {
            namespace: "bill\"ing",
            name: "a\\b\nc",
            keys: "1,2",
            kind: Kind::Ran,
            exit_code: 3,
            facts,
        }
    }

    #[test]
    fn outcomes_are_named_for_monitoring() {
        assert_eq!(Kind::of(Some(Outcome::Exited(1))), Kind::Ran);
        assert_eq!(Kind::of(Some(Outcome::Signaled(9))), Kind::Ran);
        assert_eq!(Kind::of(Some(Outcome::Busy(75))), Kind::Busy);
        assert_eq!(Kind::of(Some(Outcome::Skipped(75))), Kind::Skipped);
        assert_eq!(Kind::of(Some(Outcome::QueueFull(75))), Kind::QueueFull);
        assert_eq!(Kind::QueueFull.name(), "queue-full");
        assert_eq!(Kind::of(Some(Outcome::LockLost)), Kind::Lost);
        assert_eq!(Kind::of(Some(Outcome::TimedOut)), Kind::Timeout);
        assert_eq!(Kind::of(None), Kind::Error);
    }

    #[test]
    fn prometheus_text_has_one_outcome_set_and_escaped_labels() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let facts = Facts {
            started: Some(t0),
            asked: Some(t0),
            acquired: Some(t0 + Duration::from_millis(500)),
            released: Some(t0 + Duration::from_secs(3)),
            ended: Some(t0 + Duration::from_secs(3)),
        };
        let text = report(&facts).prometheus();
        let labels = r#"namespace="bill\"ing",name="a\\b\nc",keys="1,2""#;
        assert!(
            text.contains(&format!(
                "heimdall_run_outcome{{{labels},outcome=\"ran\"}} 1\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "heimdall_run_outcome{{{labels},outcome=\"busy\"}} 0\n"
        )));
        assert!(text.contains(&format!("heimdall_run_exit_code{{{labels}}} 3\n")));
        assert!(text.contains(&format!("heimdall_run_wait_seconds{{{labels}}} 0.500000\n")));
        assert!(text.contains(&format!("heimdall_run_held_seconds{{{labels}}} 2.500000\n")));
        assert!(text.contains(&format!(
            "heimdall_run_start_timestamp_seconds{{{labels}}} 1000.000\n"
        )));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("heimdall_run_"), "{line}");
        }
    }

    #[test]
    fn json_report_is_one_line() {
        let facts = Facts::default();
        let line = report(&facts).json();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["outcome"], "ran");
        assert_eq!(v["exit_code"], 3);
    }

    #[test]
    fn metrics_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("heimdall-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.prom");
        assert_eq!(write_atomically(&path, "first\n").unwrap(), Written::Yes);
        assert_eq!(write_atomically(&path, "second\n").unwrap(), Written::Yes);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "second\n");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
