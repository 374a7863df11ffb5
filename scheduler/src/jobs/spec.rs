//! A job request, and checking it against the registered workers before
//! anything moves: every problem names the field.

use std::path::{Component, Path};

use ferry_storage::{FileEntry, WorkerRecord};
use serde::{Deserialize, Serialize};

/// Default whole-job deadline.
pub const DEFAULT_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Longest deadline or grace period accepted.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
/// Largest chunk a source may report.
pub const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;
/// Most files in one job: each is indexed by the source at submit and
/// its manifest goes into one log entry with the job.
pub const MAX_FILES: usize = 1000;
/// Most target names in one job (a selector has no such limit).
pub const MAX_TARGETS: usize = 10_000;
/// Longest path.
pub const MAX_PATH_BYTES: usize = 4096;
/// Default grace period for a disconnected target.
pub const DEFAULT_GRACE_MS: u64 = 30 * 1000;

/// A job as a client asks for it: 0 and empty mean "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRequest {
    /// The worker that has the files.
    pub source: String,
    /// Absolute paths on the source.
    pub files: Vec<String>,
    /// Target workers by name.
    pub targets: Vec<String>,
    /// Target workers by label selector, `k=v,k2=v2`.
    pub selector: String,
    /// Where the files go (see [`destinations`]).
    pub destination: String,
    /// A hook named in each target's config, run after install.
    pub hook: String,
    /// Where the final report is POSTed.
    pub callback_url: String,
    /// The whole job's deadline (0: [`DEFAULT_TIMEOUT_MS`]).
    pub timeout_ms: u64,
    /// How long a target may stay disconnected (0: [`DEFAULT_GRACE_MS`]).
    pub grace_ms: u64,
}

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The source worker.
    pub source: WorkerRecord,
    /// Target names, sorted, with each file's destination on that target.
    pub targets: Vec<(String, Vec<String>)>,
    /// Deadline.
    pub timeout_ms: u64,
    /// Grace period for disconnected targets.
    pub grace_ms: u64,
}

fn clean_absolute(p: &str) -> bool {
    let path = Path::new(p);
    path.is_absolute() && !path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

fn under(path: &str, roots: &[String]) -> bool {
    roots.iter().any(|r| Path::new(path).starts_with(r) && Path::new(path) != Path::new(r))
}

/// Where each file goes on a target with `roots`.
pub fn destinations(dest: &str, files: &[String], roots: &[String]) -> Result<Vec<String>, String> {
    if !dest.is_empty() && !dest.ends_with('/') && files.len() > 1 {
        return Err("destination: several files need a directory destination ending in /".into());
    }
    let base = if dest.is_empty() || dest.starts_with('/') {
        dest.to_string()
    } else {
        let root = roots.first().ok_or("destination: the target has no allowed root")?;
        format!("{}/{dest}", root.trim_end_matches('/'))
    };
    let mut out = Vec::new();
    for f in files {
        let name = Path::new(f).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let d = if base.is_empty() {
            f.clone()
        } else if base.ends_with('/') {
            format!("{base}{name}")
        } else {
            base.clone()
        };
        if !clean_absolute(&d) {
            return Err(format!("destination: {d} must be an absolute path without . or .."));
        }
        if out.contains(&d) {
            return Err(format!("destination: two files would both be written to {d}"));
        }
        out.push(d);
    }
    Ok(out)
}

/// Checks `spec` against the registered `workers`.
pub fn check(spec: &JobRequest, workers: &[WorkerRecord]) -> Result<Checked, String> {
    let source = workers
        .iter()
        .find(|w| w.name == spec.source)
        .ok_or_else(|| {
            if spec.source.is_empty() {
                "source: must name a worker".to_string()
            } else {
                format!("source: unknown worker {}", spec.source)
            }
        })?
        .clone();
    if spec.files.is_empty() {
        return Err("files: at least one file is needed".into());
    }
    if spec.files.len() > MAX_FILES {
        return Err(format!("files: at most {MAX_FILES} files in one job, got {}; split it", spec.files.len()));
    }
    if spec.targets.len() > MAX_TARGETS {
        return Err(format!("targets: at most {MAX_TARGETS} names, got {}; use a selector", spec.targets.len()));
    }
    for (field, text) in
        [("files", spec.files.iter().max_by_key(|f| f.len())), ("destination", Some(&spec.destination))]
    {
        if text.is_some_and(|t| t.len() > MAX_PATH_BYTES) {
            return Err(format!("{field}: paths are at most {MAX_PATH_BYTES} bytes"));
        }
    }
    if spec.hook.len() > 128 {
        return Err("hook: at most 128 bytes".into());
    }
    for f in &spec.files {
        if !clean_absolute(f) {
            return Err(format!("files: {f} must be an absolute path without . or .."));
        }
        if !under(f, &source.roots) {
            return Err(format!("files: {f} is outside {}'s allowed roots", source.name));
        }
    }
    let selector = ferry_storage::kv::parse_selector(&spec.selector)?;
    let mut names: Vec<String> = Vec::new();
    for t in spec.targets.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        if !workers.iter().any(|w| w.name == t) {
            return Err(format!("targets: unknown worker {t}"));
        }
        names.push(t.to_string());
    }
    if !selector.is_empty() {
        for w in workers {
            if ferry_storage::kv::selects(&selector, &w.labels) {
                names.push(w.name.clone());
            }
        }
    }
    if spec.targets.iter().all(|t| t.trim().is_empty()) && selector.is_empty() {
        return Err("targets: name target workers or give a selector".into());
    }
    names.sort();
    names.dedup();
    names.retain(|n| *n != source.name);
    if names.is_empty() {
        return Err("targets: no worker matches (the source is never its own target)".into());
    }
    if !spec.callback_url.is_empty() {
        crate::webhook::check_url(&spec.callback_url, "callback_url")?;
    }
    let mut targets = Vec::new();
    for name in names {
        let Some(w) = workers.iter().find(|w| w.name == name) else { continue };
        if !spec.hook.is_empty() && !w.hooks.contains(&spec.hook) {
            return Err(format!("hook: worker {name} has no hook named {}", spec.hook));
        }
        let dests = destinations(&spec.destination, &spec.files, &w.roots)?;
        if let Some(d) = dests.iter().find(|d| !under(d, &w.roots)) {
            return Err(format!("destination: {d} is outside {name}'s allowed roots"));
        }
        targets.push((name, dests));
    }
    let timeout_ms = if spec.timeout_ms == 0 { DEFAULT_TIMEOUT_MS } else { spec.timeout_ms };
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(format!("timeout_ms: must be at most {MAX_TIMEOUT_MS} (7 days)"));
    }
    let grace_ms = if spec.grace_ms == 0 { DEFAULT_GRACE_MS } else { spec.grace_ms };
    if grace_ms > MAX_TIMEOUT_MS {
        return Err(format!("grace_ms: must be at most {MAX_TIMEOUT_MS} (7 days)"));
    }
    Ok(Checked { source, targets, timeout_ms, grace_ms })
}

/// Checks the manifest a source sent: one entry per requested file, in
/// order, each covered by contiguous chunks of sane size.
pub fn check_manifest(requested: &[String], files: &[FileEntry]) -> Result<(), String> {
    if files.len() != requested.len() || files.iter().zip(requested).any(|(f, r)| f.path != *r) {
        return Err("the source's manifest does not match the requested files".into());
    }
    for f in files {
        let mut next = 0u64;
        for c in &f.chunks {
            if c.offset != next || c.len == 0 || c.len > MAX_CHUNK_BYTES {
                return Err(format!("the source's manifest of {} has a bad chunk at {}", f.path, c.offset));
            }
            next = next.checked_add(c.len).ok_or("chunk offsets overflow")?;
        }
        if next != f.size {
            return Err(format!("the source's manifest of {} covers {next} of {} bytes", f.path, f.size));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, root: &str, labels: &[(&str, &str)]) -> WorkerRecord {
        WorkerRecord {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            roots: vec![root.into()],
            hooks: vec!["reload".into()],
            version: "0".into(),
            registered_ms: 0,
        }
    }

    fn spec(f: impl FnOnce(&mut JobRequest)) -> JobRequest {
        let mut s = JobRequest {
            source: "s".into(),
            files: vec!["/srv/s/a.bin".into()],
            targets: vec!["t1".into()],
            ..Default::default()
        };
        f(&mut s);
        s
    }

    #[test]
    fn bad_requests_name_the_field() {
        let ws = vec![
            worker("s", "/srv/s", &[]),
            worker("t1", "/srv/t1", &[("role", "bidder")]),
            worker("t2", "/srv/t2", &[("role", "bidder")]),
        ];
        let err = |s: JobRequest| check(&s, &ws).unwrap_err();
        assert!(err(spec(|s| s.source = "nope".into())).starts_with("source:"));
        assert!(err(spec(|s| s.files = vec![])).starts_with("files:"));
        assert!(err(spec(|s| s.files = vec!["/etc/passwd".into()])).starts_with("files:"));
        assert!(err(spec(|s| s.files = vec!["/srv/s/../x".into()])).starts_with("files:"));
        assert!(err(spec(|s| s.targets = vec!["ghost".into()])).starts_with("targets: unknown worker ghost"));
        assert!(err(spec(|s| s.targets = vec![])).starts_with("targets:"));
        assert!(err(spec(|s| {
            s.targets = vec![];
            s.selector = "role=none".into()
        }))
        .starts_with("targets: no worker"));
        assert!(err(spec(|s| s.destination = "/etc/x".into())).starts_with("destination:"));
        assert!(err(spec(|s| s.hook = "rm-rf".into())).starts_with("hook:"));
        assert!(err(spec(|s| s.selector = "role".into())).starts_with("selector:"));
        assert!(err(spec(|s| {
            s.files = vec!["/srv/s/a".into(), "/srv/s/b".into()];
            s.destination = "/srv/t1/one".into()
        }))
        .starts_with("destination:"));
        assert!(err(spec(|s| s.callback_url = "ftp://x".into())).starts_with("callback_url:"));
        assert!(err(spec(|s| s.callback_url = "http://".into())).starts_with("callback_url:"));
        let ok = check(
            &spec(|s| {
                s.destination = "in/".into();
                s.callback_url = "https://ops.example/ferry".into()
            }),
            &ws,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn destinations_follow_the_rules() {
        let ws = vec![
            worker("s", "/srv/s", &[]),
            worker("t1", "/srv/t1", &[("role", "b")]),
            worker("t2", "/srv/t2", &[("role", "b")]),
        ];
        let c = check(
            &spec(|s| {
                s.targets = vec![];
                s.selector = "role=b".into();
                s.destination = "in/".into();
            }),
            &ws,
        )
        .unwrap();
        assert_eq!(
            c.targets,
            vec![("t1".into(), vec!["/srv/t1/in/a.bin".into()]), ("t2".into(), vec!["/srv/t2/in/a.bin".into()])]
        );
        let c = check(&spec(|s| s.destination = "/srv/t1/x/y.bin".into()), &ws).unwrap();
        assert_eq!(c.targets[0].1, vec!["/srv/t1/x/y.bin".to_string()]);
        assert_eq!(c.timeout_ms, DEFAULT_TIMEOUT_MS);
    }
}
