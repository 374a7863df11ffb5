//! Probes: definitions and results in the replicated state, rankings,
//! staleness, and the leader's alert loop.
//!
//! Workers run the probes (see `ferry-worker`'s probe runner) and report
//! each round; the cluster keeps the latest result per worker and target.
//! A probe is stale when no worker's result is younger than its
//! `stale_after`, when a worker that reported before has been silent that
//! long, or when a worker's output file has not changed for
//! `output_stale_after`. The leader POSTs an alert to the probe's
//! `alert_url` when a probe turns stale (once per turn).

use std::collections::HashSet;
use std::path::{Component, Path};
use std::sync::Arc;
use std::time::Duration;

use ferry_storage::probes::{self, ProbeDef, ProbeOutput, ProbeResult, ProbeTarget, WorkerProbe};
use ferry_storage::{kv, Command, CommandResult, Op};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::error::Error;
use crate::raft::node::{new_request_id, Node};

/// Stale after this many intervals without a result, unless set.
pub const DEFAULT_STALE_INTERVALS: u64 = 3;

/// A definition as a client asks for it: 0 and empty mean "the default",
/// the selector is text. [`check`] makes a [`ProbeDef`] of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definition {
    /// The probe's name.
    pub name: String,
    /// What to download.
    pub targets: Vec<ProbeTarget>,
    /// Time between rounds.
    pub interval_ms: u64,
    /// Time limit of one download (0: the interval shared by the targets).
    pub timeout_ms: u64,
    /// Which workers run it: `k=v,k2=v2` (empty: every worker).
    pub selector: String,
    /// Where the best targets are rendered, if anywhere.
    pub output: Option<ProbeOutput>,
    /// Stale after this long without results (0: three intervals).
    pub stale_after_ms: u64,
    /// Stale when an output file is unchanged this long (0: never).
    pub output_stale_after_ms: u64,
    /// Where a stale alert is POSTed (empty: nowhere).
    pub alert_url: String,
}

/// One target's place in a ranking.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranked {
    /// 1 for the best.
    pub rank: u32,
    /// The target's index in the definition.
    pub target: u32,
    /// Its URL.
    pub url: String,
    /// Its Host header, if any.
    pub host: String,
    /// Median (or the one worker's) total time of the successful downloads.
    pub total_us: u64,
    /// The same for the time to the first byte.
    pub ttfb_us: u64,
    /// The same for the bytes downloaded.
    pub bytes: u64,
    /// Workers whose latest download succeeded.
    pub ok: u32,
    /// Workers whose latest download failed.
    pub errors: u32,
    /// The latest error, when no download succeeded.
    pub error: String,
}

/// Whether a probe's results (and outputs) are current.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Freshness {
    /// The probe.
    pub name: String,
    /// Workers that reported.
    pub workers: u32,
    /// When the latest result was measured (0: never).
    pub last_result_unix_ms: u64,
    /// True when any reason below holds.
    pub stale: bool,
    /// Why it is stale, in words.
    pub reasons: Vec<String>,
}

fn valid_hook_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks `d` and fills in its defaults; the error names the field. `now`
/// is the time the definition is made (wall-clock ms).
pub fn check(d: Definition, now: u64) -> Result<ProbeDef, Error> {
    let invalid = |m: String| Error::InvalidArgument(m);
    probes::validate_name(&d.name).map_err(invalid)?;
    for (i, t) in d.targets.iter().enumerate() {
        crate::webhook::check_url(&t.url, &format!("targets[{i}].url")).map_err(invalid)?;
        if t.host.len() > 253 || t.host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(invalid(format!("targets[{i}].host: '{}' is not a host name", t.host)));
        }
    }
    let selector = kv::parse_selector(&d.selector).map_err(invalid)?;
    if let Some(o) = &d.output {
        let path = Path::new(&o.path);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(invalid(format!("output.path: '{}' must be absolute, without '..'", o.path)));
        }
        if !o.hook.is_empty() && !valid_hook_name(&o.hook) {
            return Err(invalid(format!("output.hook: '{}' is not a hook name", o.hook)));
        }
        if o.template.len() > 4096 {
            return Err(invalid("output.template: at most 4096 bytes".into()));
        }
    }
    if !d.alert_url.is_empty() {
        crate::webhook::check_url(&d.alert_url, "alert_url").map_err(invalid)?;
    }
    // Default: the interval shared by the targets, downloaded one by one.
    let timeout_ms = if d.timeout_ms == 0 { d.interval_ms / (d.targets.len() as u64).max(1) } else { d.timeout_ms };
    let stale_after_ms =
        if d.stale_after_ms == 0 { d.interval_ms.saturating_mul(DEFAULT_STALE_INTERVALS) } else { d.stale_after_ms };
    let def = ProbeDef {
        name: d.name,
        targets: d.targets,
        interval_ms: d.interval_ms,
        timeout_ms,
        selector,
        output: d.output,
        stale_after_ms,
        output_stale_after_ms: d.output_stale_after_ms,
        alert_url: d.alert_url,
        defined_unix_ms: now,
    };
    probes::validate_def(&def).map_err(invalid)?;
    if def.stale_after_ms < def.interval_ms {
        return Err(invalid("stale_after: must be at least the interval".into()));
    }
    Ok(def)
}

/// Output rules the known workers that would run `def` cannot follow.
fn check_output_on_workers(node: &Node, def: &ProbeDef) -> Result<(), Error> {
    let Some(out) = &def.output else { return Ok(()) };
    for w in node.reader.workers()? {
        if !kv::selects(&def.selector, &w.labels) {
            continue;
        }
        let path = Path::new(&out.path);
        if !w.roots.iter().any(|r| path.starts_with(r)) {
            return Err(Error::InvalidArgument(format!(
                "output.path: {} is outside the allowed roots of worker {} ({})",
                out.path,
                w.name,
                w.roots.join(", ")
            )));
        }
        if !out.hook.is_empty() && !w.hooks.contains(&out.hook) {
            return Err(Error::InvalidArgument(format!(
                "output.hook: worker {} has no hook named {}",
                w.name, out.hook
            )));
        }
    }
    Ok(())
}

/// Adds or replaces a probe.
pub async fn define(node: &Node, d: Definition, request_id: String) -> Result<(), Error> {
    let def = check(d, now_ms())?;
    if !def.alert_url.is_empty() {
        let hosts = node.config.callback_hosts();
        hosts.check_url(&def.alert_url, "alert_url", "callback_hosts").map_err(Error::InvalidArgument)?;
    }
    check_output_on_workers(node, &def)?;
    let request_id = if request_id.is_empty() { new_request_id() } else { request_id };
    match node.propose(Command { request_id, op: Op::ProbeDefine(Box::new(def)) }).await? {
        CommandResult::Done => Ok(()),
        CommandResult::Rejected { reason } => Err(Error::InvalidArgument(reason)),
        other => Err(Error::unexpected("define probe", &other)),
    }
}

/// Removes a probe and its results; false if there was none.
pub async fn delete(node: &Node, name: &str, request_id: String) -> Result<bool, Error> {
    probes::validate_name(name).map_err(Error::InvalidArgument)?;
    let request_id = if request_id.is_empty() { new_request_id() } else { request_id };
    match node.propose(Command { request_id, op: Op::ProbeDelete { name: name.to_string() } }).await? {
        CommandResult::Done => Ok(true),
        CommandResult::Rejected { .. } => Ok(false),
        other => Err(Error::unexpected("delete probe", &other)),
    }
}

/// The definition of probe `name` (the error names the field `probe`).
pub fn def(node: &Node, name: &str) -> Result<ProbeDef, Error> {
    probes::validate_name(name).map_err(|e| Error::InvalidArgument(e.replacen("name", "probe", 1)))?;
    node.reader.probe(name)?.ok_or_else(|| Error::NotFound(format!("probe: no probe named {name}")))
}

/// Every definition, or those `worker` runs (by its labels).
pub fn list(node: &Node, worker: Option<&str>) -> Result<Vec<ProbeDef>, Error> {
    let mut defs = node.reader.probes()?;
    if let Some(worker) = worker {
        let labels = node
            .reader
            .workers()?
            .into_iter()
            .find(|w| w.name == worker)
            .map(|w| w.labels)
            .ok_or_else(|| Error::NotFound(format!("worker: no worker named {worker}")))?;
        defs.retain(|d| kv::selects(&d.selector, &labels));
    }
    Ok(defs)
}

/// Records one round of a worker's results (replacing its earlier ones).
pub async fn report(node: &Node, probe: &str, mut state: WorkerProbe, request_id: String) -> Result<(), Error> {
    probes::validate_name(probe).map_err(|e| Error::InvalidArgument(e.replacen("name", "probe", 1)))?;
    if !node.reader.workers()?.iter().any(|w| w.name == state.worker) {
        return Err(Error::InvalidArgument(format!("worker: no registered worker named {:?}", state.worker)));
    }
    for r in &mut state.results {
        r.error = r.error.chars().take(512).collect();
    }
    state.output_error = state.output_error.chars().take(512).collect();
    let request_id = if request_id.is_empty() { new_request_id() } else { request_id };
    let cmd = Command { request_id, op: Op::ProbeReport { probe: probe.to_string(), state } };
    cmd.validate().map_err(Error::InvalidArgument)?;
    match node.propose(cmd).await? {
        CommandResult::Done => Ok(()),
        CommandResult::Rejected { reason } => Err(Error::NotFound(reason)),
        other => Err(Error::unexpected("report", &other)),
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The targets ranked by total time (one worker's, or the median over the
/// workers whose latest download succeeded), targets with no success last.
pub fn rank(def: &ProbeDef, reports: &[WorkerProbe], worker: Option<&str>) -> Vec<Ranked> {
    let mut rows: Vec<Ranked> = Vec::with_capacity(def.targets.len());
    for (i, t) in def.targets.iter().enumerate() {
        let latest: Vec<&ProbeResult> = reports
            .iter()
            .filter(|r| worker.is_none_or(|w| r.worker == w))
            .flat_map(|r| r.results.iter().filter(|x| x.target as usize == i))
            .collect();
        let ok: Vec<&&ProbeResult> = latest.iter().filter(|r| r.error.is_empty()).collect();
        let failed: Vec<&&ProbeResult> = latest.iter().filter(|r| !r.error.is_empty()).collect();
        rows.push(Ranked {
            rank: 0,
            target: i as u32,
            url: t.url.clone(),
            host: t.host.clone(),
            total_us: median(ok.iter().map(|r| r.total_us).collect()),
            ttfb_us: median(ok.iter().map(|r| r.ttfb_us).collect()),
            bytes: median(ok.iter().map(|r| r.bytes).collect()),
            ok: ok.len() as u32,
            errors: failed.len() as u32,
            error: if ok.is_empty() {
                failed.iter().max_by_key(|r| r.measured_unix_ms).map(|r| r.error.clone()).unwrap_or_default()
            } else {
                String::new()
            },
        });
    }
    // Measured successes first by time; then failures; then unmeasured.
    rows.sort_by_key(|r| (r.ok == 0, r.ok == 0 && r.errors == 0, r.total_us, r.target));
    for (n, r) in rows.iter_mut().enumerate() {
        r.rank = n as u32 + 1;
    }
    rows
}

/// Freshness of one probe at `now`: stale, and why.
pub fn freshness(def: &ProbeDef, reports: &[WorkerProbe], now: u64) -> Freshness {
    let last_of = |r: &WorkerProbe| r.results.iter().map(|x| x.measured_unix_ms).max().unwrap_or(0);
    let last = reports.iter().map(last_of).max().unwrap_or(0);
    let mut reasons = Vec::new();
    let age = |t: u64| humantime::format_duration(Duration::from_secs(now.saturating_sub(t) / 1000)).to_string();
    if last == 0 {
        if now.saturating_sub(def.defined_unix_ms) > def.stale_after_ms {
            reasons.push(format!("no results since it was defined {} ago", age(def.defined_unix_ms)));
        }
    } else if now.saturating_sub(last) > def.stale_after_ms {
        reasons.push(format!("no results for {}", age(last)));
    } else {
        for r in reports {
            let at = last_of(r);
            if now.saturating_sub(at) > def.stale_after_ms {
                reasons.push(format!("worker {}: no results for {}", r.worker, age(at)));
            }
        }
    }
    for r in reports {
        if !r.output_error.is_empty() {
            reasons.push(format!("worker {}: {}", r.worker, r.output_error));
        } else if def.output.is_some()
            && def.output_stale_after_ms > 0
            && r.output_changed_unix_ms > 0
            && now.saturating_sub(r.output_changed_unix_ms) > def.output_stale_after_ms
        {
            reasons.push(format!("worker {}: output unchanged for {}", r.worker, age(r.output_changed_unix_ms)));
        }
    }
    Freshness {
        name: def.name.clone(),
        workers: reports.len() as u32,
        last_result_unix_ms: last,
        stale: !reasons.is_empty(),
        reasons,
    }
}

/// Every probe with its freshness now, from one read of the definitions.
pub fn statuses(node: &Node) -> Result<Vec<(ProbeDef, Freshness)>, Error> {
    let now = now_ms();
    let mut out = Vec::new();
    for def in node.reader.probes()? {
        let reports = node.reader.probe_results(&def.name)?;
        let state = freshness(&def, &reports, now);
        out.push((def, state));
    }
    Ok(out)
}

/// On the leader: checks every probe each second and POSTs an alert to its
/// `alert_url` when it turns stale. A new leader alerts again for probes
/// that are stale when it takes over (at least once, never lost).
pub async fn run_alerts(node: Arc<Node>, mut shutdown: watch::Receiver<bool>) {
    let mut alerted: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if !node.is_leader() {
            alerted.clear();
            continue;
        }
        let Ok(probes) = statuses(&node) else { continue };
        // Forget probes deleted meanwhile, so one redefined alerts again.
        alerted.retain(|name| probes.iter().any(|(d, _)| &d.name == name));
        for (def, state) in probes {
            if !state.stale {
                alerted.remove(&def.name);
                continue;
            }
            if def.alert_url.is_empty() || !alerted.insert(def.name.clone()) {
                continue;
            }
            let body = serde_json::json!({
                "probe": def.name,
                "stale": true,
                "reasons": state.reasons,
                "last_result_unix_ms": state.last_result_unix_ms,
                "workers": state.workers,
            });
            tracing::warn!(probe = %def.name, reasons = ?state.reasons, "probe is stale; alerting");
            let hosts = node.config.callback_hosts();
            tokio::spawn(crate::webhook::post_with_retries(def.alert_url.clone(), body.to_string(), hosts));
        }
    }
}

/// The ranking of probe `name` as it stands: (definition, ranking).
pub fn ranking(node: &Node, name: &str, worker: Option<&str>) -> Result<Vec<Ranked>, Error> {
    let def = node.reader.probe(name)?.ok_or_else(|| Error::NotFound(format!("probe: {name} was deleted")))?;
    Ok(rank(&def, &node.reader.probe_results(name)?, worker))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(targets: usize) -> ProbeDef {
        ProbeDef {
            name: "p".into(),
            targets: (0..targets)
                .map(|i| ProbeTarget { url: format!("http://10.0.0.{i}/2M"), host: String::new() })
                .collect(),
            interval_ms: 60_000,
            timeout_ms: 10_000,
            selector: Default::default(),
            output: None,
            stale_after_ms: 180_000,
            output_stale_after_ms: 0,
            alert_url: String::new(),
            defined_unix_ms: 0,
        }
    }

    fn result(target: u32, total_us: u64, error: &str) -> ProbeResult {
        ProbeResult { target, ttfb_us: 1, total_us, bytes: 10, error: error.into(), measured_unix_ms: 1_000 }
    }

    fn report(worker: &str, results: Vec<ProbeResult>) -> WorkerProbe {
        WorkerProbe {
            worker: worker.into(),
            results,
            output_digest: String::new(),
            output_changed_unix_ms: 0,
            output_error: String::new(),
        }
    }

    #[test]
    fn ranking_is_by_median_total_time_with_failures_last() {
        let d = def(3);
        let reports = vec![
            report("w1", vec![result(0, 900, ""), result(1, 100, ""), result(2, 0, "timed out")]),
            report("w2", vec![result(0, 800, ""), result(1, 5_000, ""), result(2, 0, "refused")]),
            report("w3", vec![result(0, 700, ""), result(1, 200, ""), result(2, 0, "refused")]),
        ];
        let order = |w: Option<&str>| rank(&d, &reports, w).iter().map(|r| r.target).collect::<Vec<_>>();
        assert_eq!(order(None), vec![1, 0, 2], "medians 200 and 800; the failing target last");
        assert_eq!(order(Some("w2")), vec![0, 1, 2], "w2's own view");
        let best = rank(&d, &reports, None);
        assert_eq!((best[0].rank, best[0].total_us, best[0].ok), (1, 200, 3));
        assert_eq!((best[2].ok, best[2].errors, best[2].error.is_empty()), (0, 3, false));
    }

    #[test]
    fn staleness_names_silent_workers_and_unchanged_outputs() {
        let mut d = def(1);
        d.output = Some(ProbeOutput { path: "/srv/x".into(), template: String::new(), top: 0, hook: String::new() });
        d.output_stale_after_ms = 86_400_000;
        let now = 10_000_000_000;
        let fresh = ProbeResult { measured_unix_ms: now - 1_000, ..result(0, 1, "") };
        let old = ProbeResult { measured_unix_ms: now - 600_000, ..result(0, 1, "") };
        let mut w1 = report("w1", vec![fresh.clone()]);
        w1.output_changed_unix_ms = now - 1_000;
        let state = freshness(&d, std::slice::from_ref(&w1), now);
        assert!(!state.stale, "{:?}", state.reasons);

        let w2 = report("w2", vec![old.clone()]);
        let state = freshness(&d, &[w1.clone(), w2], now);
        assert!(state.stale);
        assert!(state.reasons[0].starts_with("worker w2: no results for 10m"), "{:?}", state.reasons);

        w1.output_changed_unix_ms = now - 2 * 86_400_000;
        let state = freshness(&d, &[w1], now);
        assert_eq!(state.reasons, vec!["worker w1: output unchanged for 2days".to_string()]);

        let state = freshness(&d, &[report("w3", vec![old])], now);
        assert_eq!(state.reasons, vec!["no results for 10m".to_string()]);
        d.defined_unix_ms = now - 60_000;
        assert!(!freshness(&d, &[], now).stale, "a probe nobody ran yet is not stale at first");
        d.defined_unix_ms = now - 600_000;
        let state = freshness(&d, &[], now);
        assert_eq!(state.reasons, vec!["no results since it was defined 10m ago".to_string()]);
    }

    #[test]
    fn definitions_are_checked_field_by_field() {
        let spec = |url: &str| Definition {
            name: "p".into(),
            targets: vec![ProbeTarget { url: url.into(), host: String::new() }],
            interval_ms: 60_000,
            ..Default::default()
        };
        let err = |d: Definition| check(d, 0).unwrap_err().to_string();
        assert!(err(spec("ftp://x/y")).starts_with("targets[0].url: 'ftp://x/y' must start with http://"));
        assert!(check(spec("https://relay.example/2M"), 0).is_ok());
        assert!(err(Definition { interval_ms: 10, ..spec("http://a/") }).starts_with("interval:"));
        assert!(err(Definition { selector: "zone".into(), ..spec("http://a/") }).starts_with("selector:"));
        assert!(err(Definition { alert_url: "ftp://a/".into(), ..spec("http://a/") }).starts_with("alert_url:"));
        assert!(check(Definition { alert_url: "https://ops.example/alert".into(), ..spec("http://a/") }, 0).is_ok());
        let relative = ProbeOutput { path: "out.txt".into(), template: String::new(), top: 0, hook: String::new() };
        assert!(err(Definition { output: Some(relative), ..spec("http://a/") }).starts_with("output.path:"));
        let two = Definition { targets: [spec("http://a/").targets, spec("http://b/").targets].concat(), ..spec("") };
        let d = check(two, 7).unwrap();
        assert_eq!((d.timeout_ms, d.stale_after_ms, d.defined_unix_ms), (30_000, 180_000, 7), "defaults");
    }
}
