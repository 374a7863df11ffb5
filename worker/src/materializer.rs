//! The config materializer: keeps local files in step with keys of the
//! replicated config, per the worker's `[[config_files]]` rules.
//!
//! One task per rule watches its key or prefix (through `ferry-sdk`, which
//! follows the leader and resumes a broken watch from the last revision + 1,
//! so no change is missed). The first message of the watch, every change
//! under the rule's key or prefix, and a periodic resync trigger a render:
//! the values are read again (linearizable), each key with this worker's
//! labels so a gray variant meant for it is what it gets, rendered
//! ([`crate::render`]), and written atomically only if the bytes differ from
//! the file on disk ([`crate::atomic_file`]). Only after a write does the
//! rule's hook run.
//!
//! Nothing is written unless every read of a render succeeded, so when the
//! cluster is unreachable the last good file stays in place, untouched; the
//! render is retried with backoff. A key rule whose key does not exist (yet,
//! or any more), or a prefix rule with no key under its prefix, leaves its
//! file as it is: an empty answer is more often a wrong name or a fresh
//! cluster than a wish to empty the file.
//!
//! Gray variants are set and dropped without a watch event (and without a
//! new revision), so only the resync (`config_resync`) picks those changes
//! up; a change to the key's main value picks them up at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_sdk::pb;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::atomic_file::{self, Outcome};
use crate::config::{ConfigError, ConfigFileRule, FileFormat, CONFIG_FILE_FIELD};
use crate::metrics::WorkerMetrics;
use crate::render;
use crate::roots::Roots;

/// First pause before a failed render is tried again (doubles).
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest pause between retries of a failed render.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// A client for `schedulers` whose calls give up after a few seconds: a
/// render that cannot read is retried by the materializer with backoff, and
/// a short deadline keeps shutdown and logging prompt.
pub fn client(schedulers: &[String], security: &ferry_tls::Security) -> Result<ferry_sdk::Client, ConfigError> {
    let options = ferry_sdk::ClientOptions {
        request_timeout: Duration::from_secs(3),
        total_timeout: Duration::from_secs(5),
        security: Some(security.clone()),
        ..Default::default()
    };
    ferry_sdk::Client::with_options(schedulers, options)
        .map_err(|e| ConfigError { field: "schedulers", reason: e.to_string() })
}

/// Checks every rule's path on disk, symlinks resolved: it must stay in an
/// allowed root, and an existing file there must be a regular file.
pub fn check_paths(rules: &[ConfigFileRule], roots: &Roots) -> Result<(), ConfigError> {
    for (i, rule) in rules.iter().enumerate() {
        let bad = |reason: String| ConfigError {
            field: CONFIG_FILE_FIELD,
            reason: format!("rule {} ({}): path: {reason}", i + 1, rule.describe()),
        };
        let path = rule.path.to_str().ok_or_else(|| bad(format!("{} is not UTF-8", rule.path.display())))?;
        let resolved = roots.check_write(path).map_err(bad)?;
        if let Ok(meta) = resolved.symlink_metadata() {
            if !meta.is_file() {
                return Err(bad(format!("{path} exists and is not a regular file")));
            }
        }
    }
    Ok(())
}

/// What every rule's task shares.
pub struct Materializer {
    client: ferry_sdk::Client,
    /// This worker's labels, presented on every read (gray variants).
    labels: BTreeMap<String, String>,
    roots: Roots,
    hooks: BTreeMap<String, String>,
    metrics: Arc<WorkerMetrics>,
    resync: Duration,
}

/// Why a render wrote nothing.
enum Skip {
    /// The key does not exist, or no key is under the prefix: the file is
    /// left as it is.
    Missing,
    /// A read, the rendering or the write failed: retried later.
    Failed(String),
}

impl Materializer {
    /// A materializer reading from `client` as a worker with `config`'s
    /// labels, hooks and resync interval.
    pub fn new(
        config: &crate::WorkerConfig,
        client: ferry_sdk::Client,
        roots: Roots,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self {
            client,
            labels: config.labels.clone(),
            roots,
            hooks: config.hooks.clone(),
            metrics,
            resync: config.config_resync,
        }
    }

    /// Starts one task per rule; each stops when `shutdown` turns true.
    pub fn spawn(self: Arc<Self>, rules: &[ConfigFileRule], shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        rules.iter().map(|rule| tokio::spawn(self.clone().run(rule.clone(), shutdown.clone()))).collect()
    }

    async fn run(self: Arc<Self>, rule: ConfigFileRule, mut shutdown: watch::Receiver<bool>) {
        let what = rule.describe();
        let path = rule.path.display().to_string();
        let mut watch = self.client.watch(rule.watched(), 0);
        let mut resync = tokio::time::interval_at(Instant::now() + self.resync, self.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Newest revision the watch has reported, and whether it has
        // reported anything yet (the first message triggers the first render).
        let mut revision = 0u64;
        let mut connected = false;
        // When to render next (None: nothing pending).
        let mut due: Option<Instant> = None;
        let mut backoff = RETRY_FIRST;
        let mut last_problem = String::new();
        loop {
            let wake = due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            // Biased: messages already waiting are taken before a render,
            // so a burst of changes costs one render.
            tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                msg = watch.next() => match msg {
                    None => return,
                    Some(Err(e)) => {
                        let why = format!("watch: {e}");
                        if last_problem != why {
                            tracing::warn!(rule = %what, %path, error = %e, "config watch cannot reach the cluster; the file stays as it is, retrying");
                            last_problem = why;
                        }
                    }
                    Some(Ok(resp)) => {
                        let first = !connected;
                        connected = true;
                        revision = revision.max(resp.header.as_ref().map(|h| h.revision).unwrap_or(0));
                        if first || touches(&rule, &resp) {
                            due = Some(Instant::now());
                        }
                    }
                },
                _ = resync.tick() => {
                    if connected && due.is_none() {
                        due = Some(Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(wake), if due.is_some() => {
                    let outcome = tokio::select! {
                        r = self.render(&rule, revision) => r,
                        _ = shutdown.changed() => return,
                    };
                    match outcome {
                        Ok(()) => {
                            due = None;
                            backoff = RETRY_FIRST;
                            last_problem.clear();
                        }
                        Err(Skip::Missing) => {
                            due = None;
                            if last_problem != "missing" {
                                tracing::warn!(rule = %what, %path, "nothing to render (no such key, or no key under the prefix); the file is left as it is");
                                last_problem = "missing".into();
                            }
                        }
                        Err(Skip::Failed(why)) => {
                            self.metrics.config_errors.inc();
                            if last_problem != why {
                                tracing::warn!(rule = %what, %path, error = %why, "config file not updated; the file stays as it was, retrying");
                                last_problem = why;
                            }
                            due = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(RETRY_MAX);
                        }
                    }
                }
            }
        }
    }

    /// Reads, renders and (if the bytes changed) writes one rule's file,
    /// then runs its hook. `revision`: what the watch had seen; the reads
    /// are at least that new, and may be newer (a change read before its
    /// event arrived), so the hook is told the newer of the two.
    async fn render(&self, rule: &ConfigFileRule, revision: u64) -> Result<(), Skip> {
        let (bytes, newest) = self.content(rule).await?;
        let revision = revision.max(newest);
        let path = rule.path.to_str().ok_or_else(|| Skip::Failed("path: not UTF-8".into()))?;
        // Checked again at every write: a symlink may have appeared since start.
        let resolved = self.roots.check_write(path).map_err(Skip::Failed)?;
        let roots = self.roots.clone();
        let outcome = tokio::task::spawn_blocking(move || atomic_file::replace_if_changed(&roots, &resolved, &bytes))
            .await
            .map_err(|e| Skip::Failed(format!("write task: {e}")))?
            .map_err(|e| Skip::Failed(format!("writing {path}: {e}")))?;
        if revision as i64 > self.metrics.config_revision.get() {
            self.metrics.config_revision.set(revision as i64);
        }
        if outcome == Outcome::Unchanged {
            return Ok(());
        }
        self.metrics.config_files_written.inc();
        tracing::info!(rule = %rule.describe(), %path, revision, "config file written");
        if let Some(name) = &rule.hook {
            self.run_hook(rule, name, path, revision).await;
        }
        Ok(())
    }

    /// A failing hook is logged and counted; the file stays (it is what the
    /// cluster says), and the hook is not retried until the next change.
    async fn run_hook(&self, rule: &ConfigFileRule, name: &str, path: &str, revision: u64) {
        // Validated at start: every rule's hook is one of this worker's.
        let Some(command) = self.hooks.get(name) else { return };
        let mut env = vec![("FERRY_CONFIG_PATH", path.to_string()), ("FERRY_CONFIG_REVISION", revision.to_string())];
        match (&rule.key, &rule.prefix) {
            (Some(k), _) => env.push(("FERRY_CONFIG_KEY", k.clone())),
            (None, Some(p)) => env.push(("FERRY_CONFIG_PREFIX", p.clone())),
            (None, None) => {}
        }
        match crate::hooks::run_with_env(command, &env).await {
            Ok(0) => tracing::info!(hook = %name, %path, "config hook ran"),
            Ok(code) => {
                self.metrics.config_hook_failures.inc();
                tracing::warn!(hook = %name, %path, code, "config hook exited non-zero");
            }
            Err(e) => {
                self.metrics.config_hook_failures.inc();
                tracing::warn!(hook = %name, %path, error = %e, "config hook failed");
            }
        }
    }

    /// The file's bytes as the cluster says they should be now, and the
    /// newest modify revision among the keys read.
    async fn content(&self, rule: &ConfigFileRule) -> Result<(Vec<u8>, u64), Skip> {
        let failed = |e: ferry_sdk::Error| Skip::Failed(e.to_string());
        let format = rule.format();
        let mut newest = 0;
        let entries = match (&rule.key, &rule.prefix) {
            (Some(key), _) => {
                let (kv, _variant) =
                    self.client.get_with_labels(key, &self.labels).await.map_err(failed)?.ok_or(Skip::Missing)?;
                newest = kv.mod_revision;
                if format == FileFormat::Raw {
                    return Ok((kv.value, newest));
                }
                BTreeMap::from([(key.clone(), kv.value)])
            }
            (None, Some(prefix)) => {
                let strip = rule.strip_prefix.unwrap_or(true);
                let mut entries = BTreeMap::new();
                for kv in self.client.list(prefix, false).await.map_err(failed)? {
                    let Some(name) = render::name_of(&kv.key, prefix, strip) else { continue };
                    newest = newest.max(kv.mod_revision);
                    // A listing carries main values only; gray variants are
                    // per key, so with labels each key is read on its own.
                    let value = if self.labels.is_empty() {
                        Some(kv.value)
                    } else {
                        self.client
                            .get_with_labels(&kv.key, &self.labels)
                            .await
                            .map_err(failed)?
                            .map(|(kv, _)| kv.value)
                    };
                    // None: deleted since the listing (a later event renders again).
                    if let Some(v) = value {
                        entries.insert(name, v);
                    }
                }
                if entries.is_empty() {
                    return Err(Skip::Missing);
                }
                entries
            }
            (None, None) => return Err(Skip::Failed("the rule has no key or prefix".into())),
        };
        Ok((render::render(format, &entries).map_err(Skip::Failed)?, newest))
    }
}

/// Whether a watch message means the rule's file may have to change: a
/// change to its key (or under its prefix), or the last part of a snapshot.
fn touches(rule: &ConfigFileRule, resp: &pb::WatchResponse) -> bool {
    if resp.snapshot {
        return !resp.more;
    }
    match &rule.key {
        // The watch is on the key as a prefix: `app/a` also sees `app/ab`.
        Some(key) => resp.events.iter().any(|e| e.kv.as_ref().is_some_and(|kv| kv.key == *key)),
        None => !resp.events.is_empty(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(key: &str) -> pb::Event {
        pb::Event { r#type: 0, kv: Some(pb::KeyValue { key: key.into(), ..Default::default() }) }
    }

    #[test]
    fn only_changes_to_the_rule_trigger_a_render() {
        let key_rule = ConfigFileRule::from_spec("app/a=/r/a").unwrap();
        let prefix_rule = ConfigFileRule::from_spec("app/=/r/p:json").unwrap();
        let events =
            |keys: &[&str]| pb::WatchResponse { events: keys.iter().map(|k| event(k)).collect(), ..Default::default() };
        assert!(touches(&key_rule, &events(&["app/a"])));
        assert!(!touches(&key_rule, &events(&["app/ab"])), "a longer key sharing the prefix");
        assert!(touches(&prefix_rule, &events(&["app/ab"])));
        let progress = pb::WatchResponse { progress: true, ..Default::default() };
        assert!(!touches(&key_rule, &progress) && !touches(&prefix_rule, &progress));
        let part = pb::WatchResponse { snapshot: true, more: true, ..events(&["app/a"]) };
        assert!(!touches(&key_rule, &part), "not before the snapshot's last part");
        let last = pb::WatchResponse { snapshot: true, ..Default::default() };
        assert!(touches(&key_rule, &last));
    }

    #[test]
    fn paths_are_checked_on_disk_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = Roots::new(&[tmp.path().join("root")]).unwrap();
        let root = roots.list()[0].clone();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::fs::create_dir_all(root.join("adir")).unwrap();
        let rule = |p: &std::path::Path| ConfigFileRule::from_spec(&format!("k={}", p.display())).unwrap();

        assert!(check_paths(&[rule(&root.join("etc/app.conf"))], &roots).is_ok());
        let err = check_paths(&[rule(&root.join("escape/app.conf"))], &roots).unwrap_err();
        assert_eq!(err.field, CONFIG_FILE_FIELD);
        assert!(err.reason.contains("path:") && err.reason.contains("outside the allowed roots"), "{err}");
        let err = check_paths(&[rule(&root.join("adir"))], &roots).unwrap_err();
        assert!(err.reason.contains("not a regular file"), "{err}");
    }
}
