//! The README and docs/ as a reader follows them: every option `heimdall --help` knows is in the
//! README's table with its environment twin and default, and every relative link leads to a file
//! and a heading that exist, so moving a section cannot strand a reader (or a comment that names
//! it). The exit table is checked against `src/exit.rs` by a unit test there; the install steps by
//! `dist.rs`; the recipes by `recipes.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::support::{heimdall, text};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    fs::read_to_string(root().join("README.md")).expect("README.md")
}

/// What `--help` says of each option: its environment twin and its `[default: …]`, if any.
#[derive(Debug, Default, PartialEq)]
struct Documented {
    env: Option<String>,
    default: Option<String>,
}

/// The options of `heimdall --help`, by every name they go by (`-v` and `--verbose` alike).
fn help_options() -> BTreeMap<String, Documented> {
    let out = heimdall().arg("--help").output().expect("heimdall --help");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let help = text(&out.stdout);
    let options = help
        .split("\nOptions:\n")
        .nth(1)
        .expect("an Options: section")
        .split("\n\n\n")
        .next()
        .unwrap()
        .to_owned();
    let mut found = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    let mut current = Documented::default();
    let mut flush = |names: &mut Vec<String>, current: &mut Documented| {
        for name in names.drain(..) {
            let documented = Documented {
                env: current.env.clone(),
                default: current.default.clone(),
            };
            found.insert(name, documented);
        }
        *current = Documented::default();
    };
    for line in options.lines() {
        let trimmed = line.trim();
        // An option's first line is indented by 2 (`  -v, --verbose...`) or 6 (`      --name`).
        if trimmed.starts_with('-') && (line.starts_with("  -") || line.starts_with("      --")) {
            flush(&mut names, &mut current);
            names = trimmed
                .split([',', ' ', '[', '<', '='])
                .map(|w| w.trim_end_matches("..."))
                .filter(|w| w.starts_with('-'))
                .map(str::to_owned)
                .collect();
        } else if let Some(env) = trimmed.strip_prefix("[env: ") {
            current.env = Some(env.trim_end_matches(']').to_owned());
        } else if let Some(default) = trimmed.strip_prefix("[default: ") {
            current.default = Some(default.trim_end_matches(']').to_owned());
        }
    }
    flush(&mut names, &mut current);
    found
}

/// The README's options table: for each row, the option names in its first cell, its env twin
/// cell and its default cell.
fn readme_options() -> Vec<(Vec<String>, String, String)> {
    let readme = readme();
    let table = readme
        .split("\n### Options\n")
        .nth(1)
        .expect("README has an Options section");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            // `\|` is a pipe inside a cell (`siphash\|fnv1`), not a cell's end.
            let row = row.replace("\\|", "/");
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let names = cells[1]
                .split(['`', ' ', ','])
                .filter(|w| w.starts_with('-'))
                .map(str::to_owned)
                .collect();
            (names, cells[2].to_owned(), cells[3].to_owned())
        })
        .collect()
}

#[test]
fn the_readme_options_table_lists_every_option_of_help_with_its_env_twin_and_default() {
    let help = help_options();
    let rows = readme_options();
    let in_readme: BTreeSet<&String> = rows.iter().flat_map(|(names, _, _)| names).collect();
    let in_help: BTreeSet<&String> = help.keys().collect();
    assert_eq!(
        in_readme, in_help,
        "the README's options table and heimdall --help list different options"
    );
    for (names, env, default) in &rows {
        for name in names {
            let documented = &help[name];
            match &documented.env {
                Some(twin) => assert!(
                    env.starts_with(&format!("`{twin}`")),
                    "{name}: --help says env {twin}, the README says {env:?}"
                ),
                None => assert!(
                    !env.contains("HEIMDALL_"),
                    "{name}: the README gives it an env twin ({env:?}) that --help does not show"
                ),
            }
            if let Some(value) = &documented.default {
                assert!(
                    default.contains(&format!("`{value}`")),
                    "{name}: --help says [default: {value}], the README's default is {default:?}"
                );
            }
        }
    }
}

/// The markdown files a reader of the repository reaches: the README and everything in docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    for entry in fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            docs.push(path);
        }
    }
    docs.sort();
    docs
}

/// The anchors GitHub gives a document's headings: lower case, punctuation but `-` and `_`
/// dropped, spaces made `-`, a repeated one suffixed `-1`, `-2`, ….
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        anchors.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    anchors
}

/// The targets of the inline links `[text](target)` outside code blocks and code spans.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        if fenced {
            continue;
        }
        // Drop code spans, where `](` is no link.
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist() {
    let mut broken = Vec::new();
    for doc in documents() {
        let markdown = fs::read_to_string(&doc).unwrap();
        for target in link_targets(&markdown) {
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (file, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let path = if file.is_empty() {
                doc.clone()
            } else {
                doc.parent().unwrap().join(file)
            };
            if !path.exists() {
                broken.push(format!("{}: {target}: no such file", doc.display()));
                continue;
            }
            if !anchor.is_empty() {
                let text = fs::read_to_string(&path).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{}: {target}: no such heading", doc.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
