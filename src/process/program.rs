//! Finding the command's program before connecting, the way `execvp` will find it, so that "not
//! found" (127) and "cannot execute" (126) come at once instead of after the lock, which with
//! `--wait` can be hours later. The spawn itself still reports what only `exec` can tell
//! (a bad interpreter, a `noexec` mount).
//!
//! Not responsible for running anything: see `child.rs`.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::cli::subcommand_names;
use crate::exit::{Failure, fail};

/// glibc's `execvp` searches this when `PATH` is unset.
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Checks that the command's first word names a program heimdall can execute. `note` says, if
/// it is not found, how heimdall read the words before it (`--wait 5 min`).
pub fn check(command: &[OsString], note: Option<&str>) -> Result<()> {
    let Some(program) = command.first() else {
        return Err(fail(Failure::Usage, "no command given"));
    };
    let path = std::env::var_os("PATH");
    match find(program, path.as_deref()) {
        Found::Executable => Ok(()),
        Found::NotExecutable(path) => Err(fail(
            Failure::CannotExecute,
            format!(
                "cannot run {}: {} is not an executable file",
                program.to_string_lossy(),
                path.display()
            ),
        )),
        Found::Nothing => Err(fail(
            Failure::NotFound,
            match note {
                Some(note) => format!("{} ({note})", not_found(program)),
                None => not_found(program),
            },
        )),
    }
}

/// "command not found", with how to write it when the word looks like heimdall's own.
pub fn not_found(program: &OsStr) -> String {
    let name = program.to_string_lossy();
    if subcommand_names().any(|sub| sub == name) {
        format!(
            "command not found: {name} (heimdall's own '{name}' subcommand must be the first argument: heimdall {name} ...)"
        )
    } else if name.starts_with('-') {
        format!(
            "command not found: {name} (heimdall's options go before the '--'; after it comes the command)"
        )
    } else {
        format!("command not found: {name}")
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Found {
    Executable,
    /// Something by that name, but not an executable file (execvp's EACCES).
    NotExecutable(PathBuf),
    Nothing,
}

/// `execvp`'s rules: a name with a `/` is used as it is; any other is looked up in each `PATH`
/// entry in turn (an empty entry is the current directory), and the first executable file wins.
fn find(program: &OsStr, path: Option<&OsStr>) -> Found {
    if program.is_empty() {
        return Found::Nothing;
    }
    if program.as_bytes().contains(&b'/') {
        return classify(Path::new(program)).unwrap_or(Found::Nothing);
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut found = Found::Nothing;
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        match classify(&dir.join(program)) {
            Some(Found::Executable) => return Found::Executable,
            Some(other) if found == Found::Nothing => found = other,
            _ => {}
        }
    }
    found
}

/// `None` when nothing is there.
fn classify(path: &Path) -> Option<Found> {
    let meta = std::fs::metadata(path).ok()?;
    let executable = meta.is_file() && meta.permissions().mode() & 0o111 != 0 && may_execute(path);
    Some(if executable {
        Found::Executable
    } else {
        Found::NotExecutable(path.to_owned())
    })
}

/// access(2) with X_OK: the mode bits alone do not say whether this user may execute the file.
fn may_execute(path: &Path) -> bool {
    rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_as_execvp_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let tool = dir.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = OsString::from(format!("/nonexistent::{}", dir.path().display()));

        assert_eq!(find(OsStr::new("tool"), Some(&path)), Found::Executable);
        assert_eq!(find(OsStr::new("sh"), None), Found::Executable);
        assert_eq!(find(OsStr::new("absent"), Some(&path)), Found::Nothing);
        assert_eq!(find(OsStr::new(""), Some(&path)), Found::Nothing);
        assert_eq!(
            find(OsStr::new("plain"), Some(&path)),
            Found::NotExecutable(dir.path().join("plain"))
        );
        assert_eq!(find(tool.as_os_str(), None), Found::Executable);
        assert_eq!(
            find(dir.path().as_os_str(), None),
            Found::NotExecutable(dir.path().to_owned())
        );
        assert_eq!(
            find(dir.path().join("absent").as_os_str(), None),
            Found::Nothing
        );
    }

    #[test]
    fn words_that_look_like_heimdalls_own_get_a_hint() {
        assert!(not_found(OsStr::new("status")).contains("must be the first argument"));
        assert!(not_found(OsStr::new("--wiat")).contains("before the '--'"));
        assert_eq!(not_found(OsStr::new("x")), "command not found: x");
    }
}
