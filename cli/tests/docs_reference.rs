//! The reference pages keep up with the code: every command and flag that
//! `ferry --help` shows (walked recursively through the real binary) is in
//! `docs/reference/cli.md`, and every key of the scheduler's and the
//! worker's config structs is in `docs/reference/config.md`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The help of `ferry <path> --help`.
fn help(path: &[String]) -> String {
    let args: Vec<&str> = path.iter().map(String::as_str).chain(["--help"]).collect();
    let out = common::ferry(&args);
    assert!(out.status.success(), "ferry {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of a help section ("Commands:", "Options:").
fn section<'a>(help: &'a str, title: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| l.trim() != title)
        .skip(1)
        .take_while(|l| !l.trim().is_empty() || l.starts_with("  "))
        .filter(|l| l.starts_with("  "))
        .collect()
}

/// Every (command path, flag) under `path`, depth first.
fn walk(path: Vec<String>, out: &mut BTreeSet<(String, String)>) {
    let text = help(&path);
    for line in section(&text, "Options:") {
        // The flag column: `-s, --long <VALUE>`, then the help text.
        for word in line.split_whitespace().take_while(|w| w.starts_with('-') || w.starts_with('<')) {
            let flag = word.trim_end_matches(',');
            if flag.starts_with("--") && flag != "--help" && flag != "--version" {
                out.insert((path.join(" "), flag.to_string()));
            }
        }
    }
    for line in section(&text, "Commands:") {
        let Some(name) = line.split_whitespace().next() else { continue };
        // A command's own line starts at column 2; wrapped text goes further in.
        if name == "help" || !line.starts_with("  ") || line.starts_with("   ") {
            continue;
        }
        let mut sub = path.clone();
        sub.push(name.to_string());
        out.insert((sub.join(" "), String::new()));
        walk(sub, out);
    }
}

#[test]
fn every_command_and_flag_of_the_binary_is_in_the_cli_reference() {
    let doc = read("docs/reference/cli.md");
    let mut found = BTreeSet::new();
    walk(Vec::new(), &mut found);
    assert!(found.len() > 100, "walked only {} commands and flags", found.len());
    let missing: Vec<String> =
        found
            .iter()
            .filter(|(command, flag)| {
                if flag.is_empty() {
                    !doc.contains(&format!("ferry {command}"))
                } else {
                    !doc.contains(flag.as_str())
                }
            })
            .map(|(command, flag)| format!("ferry {command} {flag}"))
            .collect();
    assert!(missing.is_empty(), "not in docs/reference/cli.md:\n{}", missing.join("\n"));
}

/// The `pub` fields of struct `name` in the Rust file at `rel` that its
/// TOML file can set (not `#[serde(skip)]`).
fn fields(rel: &str, name: &str) -> Vec<String> {
    let text = read(rel);
    let start = text.find(&format!("pub struct {name} {{")).unwrap_or_else(|| panic!("{name} in {rel}"));
    let body = &text[start..];
    let body = &body[..body.find("\n}").unwrap_or(body.len())];
    let mut skip = false;
    let mut out = Vec::new();
    for line in body.lines().map(str::trim) {
        if line.starts_with("#[serde(skip") {
            skip = true;
        }
        let Some((field, _)) = line.strip_prefix("pub ").and_then(|l| l.split_once(':')) else { continue };
        if !std::mem::take(&mut skip) && !field.contains(' ') {
            out.push(field.trim().to_string());
        }
    }
    out
}

#[test]
fn every_config_key_is_in_the_config_reference() {
    let doc = read("docs/reference/config.md");
    let mut missing = Vec::new();
    for (rel, name) in [("scheduler/src/config.rs", "SchedulerConfig"), ("worker/src/config.rs", "WorkerConfig")] {
        let keys = fields(rel, name);
        assert!(keys.len() > 8, "{name}: found only {keys:?}");
        missing.extend(keys.into_iter().filter(|k| !doc.contains(&format!("`{k}`"))).map(|k| format!("{name}.{k}")));
    }
    assert!(missing.is_empty(), "not in docs/reference/config.md:\n{}", missing.join("\n"));
}
