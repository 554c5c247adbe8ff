//! Re-entrancy, proved or not: a heimdall inside a job that holds the same lock runs its
//! command directly only once it has proved the outer heimdall holds it; a failed proof is an
//! ordinary run that takes the lock itself. These tests break the proof every way a user
//! might (a copied environment, a role's float formatting, a lease inside an advisory lock and
//! the reverse, a lease in another table) and check that the run neither runs beside another
//! holder nor refuses a lock that is free.

use std::process::Output;
use std::time::Duration;

use crate::support::procs::{Running, shared_sh};
use crate::support::runs::locked;
use crate::support::{heimdall, login_role, new_dir, shared, unique_name};

const NS: &str = "reentry";
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// heimdall on `url` holding `NS/name` with `flags`, whose command is `sh -c script`, with `$HB`
/// (the binary), `$URL` and `$NAME` in the script's environment; run to its end in `dir`.
fn outer(dir: &std::path::Path, url: &str, name: &str, flags: &[&str], script: &str) -> Output {
    heimdall()
        .current_dir(dir)
        .env("HB", env!("CARGO_BIN_EXE_heimdall"))
        .env("URL", url)
        .env("NAME", name)
        .args(["--database", url, "--namespace", NS, "--name", name])
        .args(flags)
        .args(["--", "sh", "-c", script])
        .timeout(RUN_LIMIT)
        .output()
        .unwrap()
}

/// An inner heimdall on the same lock with `flags` and `-v`, running `sh -c 'echo inner; exit
/// 7'`, then the line `inner-exit=N`.
fn inner(flags: &str) -> String {
    format!(
        "\"$HB\" --database \"$URL\" --namespace {NS} --name \"$NAME\" -v {flags} -- \
         sh -c 'echo inner; exit 7'; echo \"inner-exit=$?\""
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A table name of this test's own.
fn table_name(prefix: &str) -> String {
    unique_name(prefix).replace('-', "_")
}

#[test]
fn a_copied_environment_of_a_holder_that_has_finished_is_an_ordinary_run() {
    for mode in [&[][..], &["--shared"]] {
        let dir = new_dir();
        let name = unique_name("copied");
        let mut holder = Running::spawn(shared_sh(NS, dir.path(), &name, mode, "env > env.txt"));
        holder.expect_exit(0, RUN_LIMIT);
        // The lock is free; the copy still says it is held, by a heimdall that is gone.
        let env = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
        let mut copy = locked(NS, &name);
        for line in env.lines() {
            if let Some((k, v)) = line.split_once('=')
                && k.starts_with("HEIMDALL_")
            {
                copy.env(k, v);
            }
        }
        let out = copy
            .current_dir(dir.path())
            .args(["--", "touch", "copy-ran"])
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{mode:?}: {stderr}");
        assert!(dir.path().join("copy-ran").exists(), "{mode:?}: {stderr}");
        assert!(!stderr.contains("shared mode"), "{mode:?}: {stderr}");
    }
}

#[test]
fn a_nested_run_is_proved_whatever_the_roles_extra_float_digits() {
    for digits in ["0", "-3"] {
        let setting = format!("extra_float_digits = {digits}");
        let (_, url) = login_role(shared(), "floats", &[&setting]);
        let dir = new_dir();
        let name = unique_name("floats");
        let out = outer(dir.path(), &url, &name, &[], &inner(""));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{setting}: {stderr}");
        assert_eq!(
            text(&out.stdout),
            "inner\ninner-exit=7\n",
            "{setting}: {stderr}"
        );
        assert!(stderr.contains("already held"), "{setting}: {stderr}");
    }
}

/// An outer run on a lock with `outer_flags` runs an inner one on the same lock with
/// `inner_flags`, which must take its own lock (`acquired`, `lock` or `lease`) and run.
fn takes_its_own(outer_flags: &[&str], inner_flags: &str, acquired: &str) {
    let dir = new_dir();
    let name = unique_name("own");
    let out = outer(
        dir.path(),
        &shared().url(),
        &name,
        outer_flags,
        &inner(inner_flags),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "inner\ninner-exit=7\n", "{stderr}");
    let taken = format!("acquired {acquired} {NS}/{name}");
    assert!(stderr.contains(&taken), "{stderr}");
    assert!(!stderr.contains("shared mode"), "{stderr}");
}

#[test]
fn an_advisory_run_inside_a_lease_run_of_the_same_name_takes_its_own_lock() {
    let table = table_name("reentry_leases");
    takes_its_own(&["--lease-table", &table], "", "lock");
}

#[test]
fn a_lease_run_inside_an_advisory_run_of_the_same_name_takes_its_own_lease() {
    let table = table_name("reentry_leases");
    takes_its_own(&[], &format!("--lease-table {table}"), "lease");
}

/// The outer run's lease is version 1 in its table; another holder's lease on the same lock in
/// another table is version 1 too. The inner run on that other table must not take the
/// version for proof that the outer run holds that lease.
#[test]
fn a_lease_run_inside_a_lease_run_on_another_table_is_busy_while_that_lease_is_held() {
    let dir = new_dir();
    let name = unique_name("other-table");
    let (outer_table, other_table) = (table_name("outer_leases"), table_name("other_leases"));
    let other_flags = ["--lease-table", other_table.as_str()];
    let mut other = Running::spawn(shared_sh(
        NS,
        dir.path(),
        &name,
        &other_flags,
        "touch other-holds; sleep 30",
    ));
    assert!(
        crate::support::busy_wait(RUN_LIMIT, || dir.path().join("other-holds").exists()),
        "the other holder never ran: {}",
        other.stderr()
    );
    let script = format!(
        "echo \"token=$HEIMDALL_FENCING_TOKEN\"; \
         \"$HB\" --database \"$URL\" --namespace {NS} --name \"$NAME\" --lease-table {other_table} \
         -- touch inner-ran; echo \"inner-exit=$?\""
    );
    let flags = ["--lease-table", outer_table.as_str()];
    let out = outer(dir.path(), &shared().url(), &name, &flags, &script);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "token=1\ninner-exit=75\n", "{stderr}");
    assert!(
        !dir.path().join("inner-ran").exists(),
        "the inner run ran beside the other table's holder"
    );
    other.signal(libc::SIGTERM);
    other.finish(RUN_LIMIT);
}
