//! The shape of the code, checked: no import cycles between the scheduler's
//! modules, the domain rooms free of wire types, and no source file in the
//! workspace over the size at which we split files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines at which a file is split (STYLE: "split a file when it passes ~800 lines").
const MAX_LINES: usize = 800;

/// Scheduler modules that hold domain logic: no tonic, no protobuf types.
const DOMAIN: &[&str] = &["clock", "jobs", "leases", "registry", "probes", "stream", "webhook"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())).flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target" && !n.to_string_lossy().starts_with('.')) {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src` (`jobs::planner`), `None` for
/// the crate root and for test modules kept in files of their own.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.is_empty() || parts == ["lib"] || parts.last().is_some_and(|p| p.ends_with("_tests")) {
        return None;
    }
    Some(parts.join("::"))
}

/// The code of a file: without comments (a doc link is no dependency) and
/// without its test module (kept at the end).
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let text = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => &text,
    };
    text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

/// The modules `text` refers to with `crate::...` paths, resolved to the
/// longest known module.
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let path: String = text[at + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        for n in (1..=parts.len()).rev() {
            let candidate = parts[..n].join("::");
            if modules.contains(&candidate) {
                out.insert(candidate);
                break;
            }
        }
    }
    out
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == next).unwrap_or(0);
                    let mut found = path[start..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                Some(_) => {}
                None => {
                    if let Some(found) = visit(next, graph, state, path) {
                        return Some(found);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node) {
            if let Some(found) = visit(node, graph, &mut state, &mut Vec::new()) {
                return Some(found);
            }
        }
    }
    None
}

fn scheduler_sources() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    (src, files)
}

#[test]
fn the_scheduler_modules_import_each_other_without_cycles() {
    let (src, files) = scheduler_sources();
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    assert!(modules.contains("jobs::planner") && modules.contains("grpc::forward"), "{modules:?}");
    let mut graph = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        let mut deps = uses(&code(file), &modules);
        // A module may use itself and its ancestors' items (`mod.rs` helpers).
        deps.retain(|d| *d != module && !module.starts_with(&format!("{d}::")));
        graph.insert(module, deps);
    }
    assert_eq!(cycle(&graph), None, "an import cycle between scheduler modules");
}

#[test]
fn the_domain_rooms_use_no_wire_types() {
    let (src, files) = scheduler_sources();
    let mut offenders = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        let top = module.split("::").next().unwrap_or_default();
        if !DOMAIN.contains(&top) {
            continue;
        }
        let text = code(file);
        for word in ["tonic::", "use tonic", "pb::", "ferry_proto"] {
            if text.contains(word) {
                offenders.push(format!("{module} mentions {word}"));
            }
        }
    }
    assert!(offenders.is_empty(), "domain code converts at the edge (grpc/):\n{}", offenders.join("\n"));
}

#[test]
fn no_source_file_in_the_workspace_passes_the_split_size() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).ok()?.lines().count();
            (lines > MAX_LINES).then(|| format!("{} has {lines} lines", f.display()))
        })
        .collect();
    assert!(files.len() > 50, "found only {} files", files.len());
    assert!(long.is_empty(), "split these files (over {MAX_LINES} lines):\n{}", long.join("\n"));
}

#[test]
fn a_cycle_is_found_and_named() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["c".to_string()])),
        ("c".to_string(), BTreeSet::from(["a".to_string()])),
        ("d".to_string(), BTreeSet::new()),
    ]
    .into();
    assert_eq!(cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let modules: BTreeSet<String> = ["jobs".to_string(), "jobs::planner".to_string()].into();
    assert_eq!(uses("use crate::jobs::planner::{Action, View};", &modules), BTreeSet::from(["jobs::planner".into()]));
    assert_eq!(uses("crate::jobs::Foo", &modules), BTreeSet::from(["jobs".into()]));
}
