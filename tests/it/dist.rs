//! The release files that `make dist` writes to target/dist, installed the way README.md's
//! Install section and the recipes in docs/examples say, on a machine without Rust: the
//! documented commands are read from those files and run with only the download location
//! changed (a `file://` URL of target/dist instead of the release page) and the install
//! directory moved into a temp dir. Each installed binary then prints its version and runs a
//! real locked command against the shared test cluster.
//!
//! Every test is `#[ignore]`d, because target/dist comes from `make dist` (minutes), not from
//! `cargo test`. `make dist-test` builds it and runs exactly these tests with `--ignored`. Run
//! without target/dist, a test fails and says how to build it; none skips.
//!
//! Not checked here: a real download from the release page, `docker build`, a CI runner, an old
//! distribution's glibc (the symbol versions are checked instead).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::recipes::{example, substitute, systemd_verify};
use crate::support::{
    RUN_LIMIT, busy_wait, clean_command, output_of, render_man_page, shared, text, unique_name,
    wait_child,
};
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The glibc the binary promises to run on: no symbol version newer than this.
const OLDEST_GLIBC: (u32, u32) = (2, 17);
/// Where the docs say the release files are downloaded from, up to the tag.
const RELEASES: &str = "https://github.com/ORG/heimdall/releases/download/v";

// ---------------------------------------------------------------------------
// The artifacts
// ---------------------------------------------------------------------------

fn dist_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dist");
    assert!(
        dir.join("SHA256SUMS").is_file(),
        "{} has no release files: run `make dist-test`, which builds them with `make dist` and then runs these tests",
        dir.display()
    );
    dir
}

fn tarball_name() -> String {
    format!("heimdall-{VERSION}-x86_64-linux.tar.gz")
}

fn deb_name() -> String {
    format!("heimdall_{VERSION}_amd64.deb")
}

/// `file:///…/target/dist`, standing in for the release page of the tag.
fn local_release() -> String {
    format!("file://{}", dist_dir().display())
}

// ---------------------------------------------------------------------------
// Running things
// ---------------------------------------------------------------------------

/// Runs `cmd` and insists that it succeeds; returns its stdout.
fn succeeds(cmd: &mut Command) -> String {
    let out = output_of(cmd);
    assert_ok(&out, &format!("{cmd:?}"))
}

/// A documented shell snippet, run the way its place runs it (`sh -e` for a README block or a
/// GitLab script, bash with errexit and pipefail for a GitHub step) in `dir`.
fn shell(shell: &[&str], script: &str, dir: &Path, env: &[(&str, &str)]) -> Output {
    output_of(
        clean_command(shell[0])
            .args(&shell[1..])
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .envs(env.iter().copied()),
    )
}

const SH: &[&str] = &["sh", "-e"];
/// What GitHub Actions runs a `run:` block with.
const GITHUB_BASH: &[&str] = &["bash", "--noprofile", "--norc", "-eo", "pipefail"];

/// Insists that `out` is a success; returns its stdout.
fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn sha256_of(path: &Path) -> String {
    let line = succeeds(Command::new("sha256sum").arg(path));
    line.split_whitespace().next().unwrap().to_owned()
}

/// The installed binary says which version it is, and runs a command under a real lock: while
/// its first run holds the lock, a second run of it is refused with the busy code (75), and the
/// first ends with its command's status once released.
fn runs_a_locked_command(bin: &Path) {
    let version = succeeds(clean_command(bin).arg("--version"));
    assert_eq!(version.trim(), format!("heimdall {VERSION}"));

    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("dist");
    let locked = |command: &[&str]| {
        let mut cmd = clean_command(bin);
        cmd.args([
            "--database",
            &shared().url(),
            "--namespace",
            "dist",
            "--name",
        ])
        .arg(&name)
        .arg("--")
        .args(command);
        cmd
    };
    let job = "touch \"$0/started\"; while [ ! -e \"$0/release\" ]; do sleep 0.02; done";
    let mut holder = locked(&["sh", "-c", job, dir.path().to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        busy_wait(RUN_LIMIT, || dir.path().join("started").exists()),
        "the installed binary never ran its command"
    );
    let refused = output_of(&mut locked(&["true"]));
    assert_eq!(
        refused.status.code(),
        Some(75),
        "a second run while the first holds the lock: {}",
        text(&refused.stderr)
    );
    assert!(text(&refused.stderr).contains("is held by"));
    fs::write(dir.path().join("release"), "").unwrap();
    let status = wait_child(&mut holder, RUN_LIMIT).expect("the holder hung after its release");
    assert_eq!(status.code(), Some(0));
}

/// The first ```sh block after the line that starts with `heading` in README.md.
fn readme_block(heading: &str) -> String {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let at = readme
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("README.md has no line starting with {heading:?}"));
    let after = &readme[at..];
    let start = after.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let len = after[start..].find("```\n").expect("the block's end");
    after[start..start + len].to_owned()
}

/// The README's tarball steps, fetching from target/dist and installing the binary into
/// `bin_dir` and the man page into `man_dir` (a MANPATH entry: `man1/heimdall.1` under it).
fn readme_tarball_steps(bin_dir: &Path, man_dir: &Path) -> String {
    substitute(
        &readme_block("**The tarball**"),
        &[
            // The README's version is the one being released.
            (
                &format!("VERSION={VERSION}\n"),
                &format!("VERSION={VERSION}\n"),
            ),
            (
                &format!("BASE={RELEASES}$VERSION\n"),
                &format!("BASE={}\n", local_release()),
            ),
            ("sudo install", "install"),
            (
                "/usr/local/bin/heimdall",
                bin_dir.join("heimdall").to_str().unwrap(),
            ),
            (
                "/usr/local/share/man/man1/heimdall.1",
                man_dir.join("man1/heimdall.1").to_str().unwrap(),
            ),
        ],
    )
}

/// PATH with `dir` first, as a user's PATH would find the installed binary.
fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap())
}

/// The newest `GLIBC_x.y[.z]` version the binary asks for, as (major, minor): from its dynamic
/// symbols (`objdump -T`) and its version references (`objdump -p`). A version that is not a
/// number, such as `GLIBC_ABI_DT_RELR` (packed relocations, glibc 2.36), fails the test: it
/// would tie the binary to a new glibc as surely as a new symbol.
fn newest_glibc(bin: &Path) -> (u32, u32) {
    let tables = succeeds(Command::new("objdump").args(["-T", "-p"]).arg(bin));
    tables
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .map(|v| {
            let mut parts = v.split('.').map(str::parse::<u32>);
            match (parts.next(), parts.next()) {
                (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
                _ => panic!(
                    "{} needs GLIBC_{v}, not a plain glibc version",
                    bin.display()
                ),
            }
        })
        .max()
        .unwrap_or_else(|| panic!("no GLIBC_ version in objdump -T -p {}", bin.display()))
}

// ---------------------------------------------------------------------------
// What make dist writes
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn dist_holds_the_tarball_the_deb_and_sha256sums_that_verify_them() {
    let dist = dist_dir();
    let mut names: Vec<String> = fs::read_dir(&dist)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected = vec!["SHA256SUMS".to_owned(), deb_name(), tarball_name()];
    expected.sort();
    assert_eq!(names, expected);

    let checked = succeeds(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(&dist),
    );
    assert_eq!(
        checked,
        format!("{}: OK\n{}: OK\n", tarball_name(), deb_name())
    );

    // The check bites: one changed byte in a copy of the tarball fails it.
    let copy = tempfile::tempdir().unwrap();
    for name in &expected {
        fs::copy(dist.join(name), copy.path().join(name)).unwrap();
    }
    let mut bytes = fs::read(copy.path().join(tarball_name())).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(copy.path().join(tarball_name()), bytes).unwrap();
    let tampered = output_of(
        Command::new("sha256sum")
            .args(["-c", "SHA256SUMS"])
            .current_dir(copy.path()),
    );
    assert!(!tampered.status.success());
    assert!(text(&tampered.stdout).contains(&format!("{}: FAILED", tarball_name())));
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn tarball_holds_the_binary_man_page_completions_readme_and_license() {
    let listing = succeeds(
        Command::new("tar")
            .arg("-tzf")
            .arg(dist_dir().join(tarball_name())),
    );
    let mut files: Vec<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
    files.sort_unstable();
    let top = format!("heimdall-{VERSION}-x86_64-linux");
    let mut expected: Vec<String> = [
        "LICENSE",
        "README.md",
        "completions/_heimdall",
        "completions/heimdall.bash",
        "completions/heimdall.fish",
        "heimdall",
        "heimdall.1",
    ]
    .iter()
    .map(|f| format!("{top}/{f}"))
    .collect();
    expected.sort();
    assert_eq!(files, expected);
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn tarball_binary_needs_no_glibc_symbol_newer_than_2_17() {
    let dir = tempfile::tempdir().unwrap();
    succeeds(
        Command::new("tar")
            .arg("-xzf")
            .arg(dist_dir().join(tarball_name()))
            .arg("-C")
            .arg(dir.path()),
    );
    let bin = dir
        .path()
        .join(format!("heimdall-{VERSION}-x86_64-linux/heimdall"));
    let newest = newest_glibc(&bin);
    assert!(
        newest <= OLDEST_GLIBC,
        "the binary needs GLIBC_{}.{}; it must run on glibc {}.{} (objdump -T)",
        newest.0,
        newest.1,
        OLDEST_GLIBC.0,
        OLDEST_GLIBC.1
    );
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn deb_lists_the_binary_the_man_page_and_the_completions_and_needs_glibc_2_17() {
    let deb = dist_dir().join(deb_name());
    let listing = succeeds(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/bin/heimdall",
        "./usr/share/man/man1/heimdall.1.gz",
        "./usr/share/bash-completion/completions/heimdall",
        "./usr/share/zsh/vendor-completions/_heimdall",
        "./usr/share/fish/vendor_completions.d/heimdall.fish",
        "./usr/share/doc/heimdall/copyright",
        "./usr/share/doc/heimdall/changelog.gz",
        "./usr/share/doc/heimdall/README.md.gz",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "dpkg-deb -c lacks {path}:\n{listing}"
        );
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" ./usr/bin/heimdall")),
        "the binary is executable:\n{listing}"
    );
    let field = |name: &str| {
        succeeds(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "heimdall");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(field("Depends"), "libc6 (>= 2.17)");
}

// ---------------------------------------------------------------------------
// The README's install steps
// ---------------------------------------------------------------------------

/// The README's tarball steps followed by `more`, in one `sh -e` in a temp dir, with the binary
/// installed into its `bin` (first on the PATH) and the man page under its `man`. Returns the
/// temp dir and the steps' stdout, after checking that `sha256sum -c` passed the tarball.
fn readme_steps(more: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("bin");
    fs::create_dir(&bin_dir).unwrap();
    let script = format!(
        "{}{more}",
        readme_tarball_steps(&bin_dir, &dir.path().join("man"))
    );
    let out = shell(SH, &script, dir.path(), &[("PATH", &path_with(&bin_dir))]);
    let stdout = assert_ok(&out, "the README's install steps");
    let verified = format!("{}: OK\n", tarball_name());
    assert!(stdout.contains(&verified), "{stdout}");
    (dir, stdout)
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn readme_tarball_steps_verify_and_install_a_binary_that_runs_a_locked_command() {
    let (dir, stdout) = readme_steps("");
    // The last step, `heimdall --version`, found the installed binary on the PATH.
    let version = format!("heimdall {VERSION}\n");
    assert!(stdout.ends_with(&version), "{stdout}");
    let bin = dir.path().join("bin/heimdall");
    runs_a_locked_command(&bin);

    // The man page the steps install renders, and it is what the systemd recipe's
    // Documentation=man:heimdall(1) needs: systemd-analyze verify passes with it on the MANPATH,
    // and fails without it.
    let man = dir.path().join("man");
    let shown = render_man_page(&man.join("man1/heimdall.1"));
    assert!(shown.contains("EXIT STATUS"), "{shown}");
    if let Err(said) = systemd_verify(&bin, &man) {
        panic!("the recipe's units after the README's install steps: {said}");
    }
    let no_man = tempfile::tempdir().unwrap();
    let without = systemd_verify(&bin, no_man.path()).expect_err("verify without the man page");
    assert!(without.contains("man heimdall(1)"), "{without}");
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn readme_deb_steps_verify_it_and_the_unpacked_package_works_with_its_man_page() {
    // The .deb block goes on in the tarball block's shell: VERSION, BASE and SHA256SUMS.
    let deb_steps = substitute(
        &readme_block("**The .deb**"),
        &[(
            "sudo dpkg -i \"heimdall_${VERSION}_amd64.deb\"",
            "dpkg-deb -x \"heimdall_${VERSION}_amd64.deb\" root",
        )],
    );
    let (dir, stdout) = readme_steps(&deb_steps);
    assert!(
        stdout.contains(&format!("{}: OK\n", deb_name())),
        "{stdout}"
    );

    let root = dir.path().join("root");
    runs_a_locked_command(&root.join("usr/bin/heimdall"));
    let shown = render_man_page(&root.join("usr/share/man/man1/heimdall.1.gz"));
    for heading in ["NAME", "SYNOPSIS", "EXIT STATUS", "ENVIRONMENT"] {
        assert!(shown.contains(heading), "man lacks {heading}:\n{shown}");
    }
    // bash loads the completion and registers it for heimdall.
    let completion = root.join("usr/share/bash-completion/completions/heimdall");
    let registered = succeeds(
        clean_command("bash")
            .args([
                "--noprofile",
                "--norc",
                "-c",
                ". \"$0\" && complete -p heimdall",
            ])
            .arg(&completion),
    );
    assert!(registered.trim_end().ends_with(" heimdall"), "{registered}");
    // Debian's machine-readable format, pointing at the licence Debian ships, not repeating it.
    let copyright = fs::read_to_string(root.join("usr/share/doc/heimdall/copyright")).unwrap();
    assert!(
        copyright.starts_with(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        ),
        "{copyright}"
    );
    assert!(copyright.contains("\nLicense: Apache-2.0\n"), "{copyright}");
    assert!(
        copyright.contains("/usr/share/common-licenses/Apache-2.0"),
        "{copyright}"
    );
}

/// lintian, Debian's package checker, as a Debian developer would run it on the .deb: no error and
/// no warning (the informational and pedantic tags are not counted).
#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn lintian_finds_no_error_and_no_warning_in_the_deb() {
    let on_path = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join("lintian").is_file());
    assert!(
        on_path,
        "lintian not found: apt-get install lintian (scripts/ensure-dist-tools, which make dist runs, installs it)"
    );
    let out = output_of(
        Command::new("lintian")
            .arg("--no-tag-display-limit")
            .arg(dist_dir().join(deb_name())),
    );
    let said = text(&out.stdout);
    let tags: Vec<&str> = said
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        out.status.code().is_some() && tags.is_empty(),
        "lintian ({}):\n{said}{}",
        out.status,
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// The recipes' install steps
// ---------------------------------------------------------------------------

/// `KEY: "value"` in a YAML mapping, the one line of `text` that has it.
fn yaml_value(text: &str, key: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with(&format!("{key}: ")))
        .collect();
    assert_eq!(lines.len(), 1, "one {key}: line expected, found {lines:?}");
    let value = lines[0].trim_start()[key.len() + 2..].trim();
    value.trim_matches('"').to_owned()
}

/// The lines under `opener` (a YAML key whose value is a block) that are indented deeper than
/// it, with that common indent removed.
fn yaml_block(text: &str, opener: &str) -> Vec<String> {
    let mut lines = text.lines().skip_while(|l| l.trim() != opener);
    let head = lines.next().unwrap_or_else(|| panic!("no {opener:?} line"));
    let indent = head.len() - head.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .map(|l| l.trim().to_owned())
        .collect()
}

/// A CI example, which pins this version and leaves the sum for its user to fill in.
fn ci_file(name: &str) -> String {
    let yaml = example(name);
    assert_eq!(yaml_value(&yaml, "HEIMDALL_VERSION"), VERSION, "{name}");
    assert_eq!(
        yaml_value(&yaml, "HEIMDALL_SHA256"),
        "",
        "{name}: committed unset"
    );
    yaml
}

/// A recipe's install steps, run three times in `dir` with HEIMDALL_VERSION and HEIMDALL_SHA256
/// set (and `env`), after `prepare` each time: with the committed empty sum and with another
/// file's sum they must fail and install nothing, which is what the pinned sum is for; with the
/// tarball's sum they must succeed and install a binary at `installed` that runs a locked command.
fn pinned_sum_decides(
    what: &str,
    shell_argv: &[&str],
    script: &str,
    dir: &Path,
    env: &[(&str, &str)],
    installed: &Path,
    prepare: impl Fn(),
) {
    let run = |sum: &str| {
        prepare();
        let mut all = vec![("HEIMDALL_VERSION", VERSION), ("HEIMDALL_SHA256", sum)];
        all.extend_from_slice(env);
        shell(shell_argv, script, dir, &all)
    };
    for (sum, which) in [
        (String::new(), "the empty sum"),
        (
            sha256_of(&dist_dir().join(deb_name())),
            "another file's sum",
        ),
    ] {
        let out = run(&sum);
        assert!(
            !out.status.success(),
            "{what} with {which} must fail:\n{}",
            text(&out.stderr)
        );
        assert!(
            !installed.exists(),
            "{what} with {which} installed {installed:?}"
        );
    }
    assert_ok(&run(&sha256_of(&dist_dir().join(tarball_name()))), what);
    runs_a_locked_command(installed);
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn dockerfile_stage_checks_the_pinned_sum_and_installs_a_binary_that_runs_a_locked_command() {
    let dockerfile = example("Dockerfile");
    for expected in [
        "FROM debian:12-slim AS heimdall\n",
        &format!("ARG HEIMDALL_VERSION={VERSION}\n"),
        "ARG HEIMDALL_SHA256=\n",
        "COPY --from=heimdall /usr/local/bin/heimdall /usr/local/bin/heimdall\n",
        "RUN [\"heimdall\", \"--version\"]\n",
    ] {
        assert!(
            dockerfile.contains(expected),
            "Dockerfile lacks {expected:?}"
        );
    }
    // ADD puts the tarball where RUN reads it; here the copy from target/dist does.
    let add = format!(
        "ADD {RELEASES}${{HEIMDALL_VERSION}}/heimdall-${{HEIMDALL_VERSION}}-x86_64-linux.tar.gz /tmp/heimdall.tar.gz\n"
    );
    assert!(dockerfile.contains(&add), "Dockerfile lacks {add:?}");
    // The first stage's RUN, its continuation lines joined as the shell joins them.
    let mut run = Vec::new();
    for line in dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("RUN echo"))
    {
        run.push(line.trim_end_matches('\\').trim());
        if !line.ends_with('\\') {
            break;
        }
    }
    let run = run.join(" ");
    let run = run
        .strip_prefix("RUN ")
        .expect("the first stage's RUN echo …");

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_str().unwrap();
    fs::create_dir_all(dir.path().join("tmp")).unwrap();
    fs::create_dir_all(dir.path().join("usr/local/bin")).unwrap();
    let run = substitute(
        run,
        &[
            (
                "/tmp/heimdall.tar.gz",
                &format!("{root}/tmp/heimdall.tar.gz"),
            ),
            ("-C /tmp ", &format!("-C {root}/tmp ")),
            (
                "\"/tmp/heimdall-${HEIMDALL_VERSION}",
                &format!("\"{root}/tmp/heimdall-${{HEIMDALL_VERSION}}"),
            ),
            (
                " /usr/local/bin/heimdall",
                &format!(" {root}/usr/local/bin/heimdall"),
            ),
        ],
    );
    pinned_sum_decides(
        "the Dockerfile's RUN",
        SH,
        &run,
        dir.path(),
        &[],
        &dir.path().join("usr/local/bin/heimdall"),
        || {
            let tarball = dist_dir().join(tarball_name());
            fs::copy(tarball, dir.path().join("tmp/heimdall.tar.gz")).unwrap();
        },
    );
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn github_actions_step_checks_the_pinned_sum_and_puts_heimdall_on_the_later_steps_path() {
    let yaml = ci_file("github-actions.yml");
    let script = yaml_block(&yaml, "run: |").join("\n");
    let script = substitute(
        &script,
        &[(
            &format!("{RELEASES}$HEIMDALL_VERSION"),
            local_release().as_str(),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let runner_temp = dir.path().join("runner-temp");
    let work = dir.path().join("work");
    fs::create_dir(&runner_temp).unwrap();
    fs::create_dir(&work).unwrap();
    let github_path = dir.path().join("github_path");
    let installed = runner_temp.join(format!("heimdall-{VERSION}-x86_64-linux/heimdall"));
    pinned_sum_decides(
        "the GitHub step",
        GITHUB_BASH,
        &script,
        &work,
        &[
            ("RUNNER_TEMP", runner_temp.to_str().unwrap()),
            ("GITHUB_PATH", github_path.to_str().unwrap()),
        ],
        &installed,
        || fs::write(&github_path, "").unwrap(),
    );
    // The runner prepends each line of $GITHUB_PATH to the PATH of the steps after this one.
    let added = fs::read_to_string(&github_path).unwrap();
    let added: Vec<&str> = added.lines().collect();
    assert_eq!(added.len(), 1, "{added:?}");
    let found = succeeds(
        clean_command("sh")
            .args(["-c", "command -v heimdall"])
            .env("PATH", path_with(Path::new(added[0]))),
    );
    assert_eq!(Path::new(found.trim()), installed);
}

#[test]
#[ignore = "needs target/dist: run `make dist-test`"]
fn gitlab_ci_before_script_checks_the_pinned_sum_and_installs_heimdall() {
    let yaml = ci_file("gitlab-ci.yml");
    let items: Vec<String> = yaml_block(&yaml, "before_script:")
        .iter()
        .map(|l| {
            l.strip_prefix("- ")
                .unwrap_or_else(|| panic!("not a list item: {l:?}"))
                .to_owned()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = dir.path().join("usr-local-bin");
    fs::create_dir(&bin_dir).unwrap();
    let script = substitute(
        &items.join("\n"),
        &[
            (
                &format!("{RELEASES}$HEIMDALL_VERSION"),
                local_release().as_str(),
            ),
            ("-C /usr/local/bin ", &format!("-C {} ", bin_dir.display())),
        ],
    );
    pinned_sum_decides(
        "the GitLab before_script",
        SH,
        &script,
        dir.path(),
        &[],
        &bin_dir.join("heimdall"),
        || {},
    );
    assert!(
        !dir.path().join("heimdall.tar.gz").exists(),
        "the job cleans up"
    );
}
