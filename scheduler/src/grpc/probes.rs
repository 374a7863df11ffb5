//! `ferry.v1.ProbeService`: probe definitions and results in the replicated
//! state, rankings, staleness, and the leader's alert loop.
//!
//! Workers run the probes (see `ferry-worker`'s probe runner) and report
//! each round; the cluster keeps the latest result per worker and target.
//! A probe is stale when no worker's result is younger than its
//! `stale_after`, when a worker that reported before has been silent that
//! long, or when a worker's output file has not changed for
//! `output_stale_after`. The leader POSTs an alert to the probe's
//! `alert_url` when a probe turns stale (once per turn).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, probe_service_server::ProbeService};
use ferry_storage::probes::{self, ProbeDef, ProbeOutput, ProbeResult, ProbeTarget, WorkerProbe};
use ferry_storage::{kv, Command, CommandResult, Op};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::clock::now_ms;
use crate::error::Error;
use crate::grpc::stream::inline_stream;
use crate::raft::node::{new_request_id, Node};

/// Stale after this many intervals without a result, unless set.
pub const DEFAULT_STALE_INTERVALS: u64 = 3;

fn invalid(reason: String) -> Status {
    Error::InvalidArgument(reason).into()
}

/// Checks a target URL: `http(s)://host[:port]/...`. The error names the field.
fn check_url(url: &str, field: &str) -> Result<hyper::Uri, Status> {
    crate::webhook::check_url(url, field).map_err(invalid)
}

fn valid_hook_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The domain form of a definition, checked; the error names the field.
pub fn to_def(spec: pb::ProbeSpec) -> Result<ProbeDef, Status> {
    probes::validate_name(&spec.name).map_err(invalid)?;
    let mut targets = Vec::with_capacity(spec.targets.len());
    for (i, t) in spec.targets.into_iter().enumerate() {
        check_url(&t.url, &format!("targets[{i}].url"))?;
        if t.host.len() > 253 || t.host.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/') {
            return Err(invalid(format!("targets[{i}].host: '{}' is not a host name", t.host)));
        }
        targets.push(ProbeTarget { url: t.url, host: t.host });
    }
    let selector = kv::parse_selector(&spec.selector).map_err(invalid)?;
    let output = match spec.output {
        None => None,
        Some(o) => {
            let path = Path::new(&o.path);
            if !path.is_absolute() || path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(invalid(format!("output.path: '{}' must be absolute, without '..'", o.path)));
            }
            if !o.hook.is_empty() && !valid_hook_name(&o.hook) {
                return Err(invalid(format!("output.hook: '{}' is not a hook name", o.hook)));
            }
            if o.template.len() > 4096 {
                return Err(invalid("output.template: at most 4096 bytes".into()));
            }
            Some(ProbeOutput { path: o.path, template: o.template, top: o.top, hook: o.hook })
        }
    };
    if !spec.alert_url.is_empty() {
        check_url(&spec.alert_url, "alert_url")?;
    }
    // Default: the interval shared by the targets, downloaded one by one.
    let timeout_ms =
        if spec.timeout_ms == 0 { spec.interval_ms / (targets.len() as u64).max(1) } else { spec.timeout_ms };
    let stale_after_ms = if spec.stale_after_ms == 0 {
        spec.interval_ms.saturating_mul(DEFAULT_STALE_INTERVALS)
    } else {
        spec.stale_after_ms
    };
    let def = ProbeDef {
        name: spec.name,
        targets,
        interval_ms: spec.interval_ms,
        timeout_ms,
        selector,
        output,
        stale_after_ms,
        output_stale_after_ms: spec.output_stale_after_ms,
        alert_url: spec.alert_url,
        defined_unix_ms: now_ms(),
    };
    probes::validate_def(&def).map_err(invalid)?;
    if def.stale_after_ms < def.interval_ms {
        return Err(invalid("stale_after: must be at least the interval".into()));
    }
    Ok(def)
}

/// The wire form of a definition.
pub fn to_spec(def: &ProbeDef) -> pb::ProbeSpec {
    pb::ProbeSpec {
        name: def.name.clone(),
        targets: def.targets.iter().map(|t| pb::ProbeTarget { url: t.url.clone(), host: t.host.clone() }).collect(),
        interval_ms: def.interval_ms,
        timeout_ms: def.timeout_ms,
        selector: kv::selector_text(&def.selector),
        output: def.output.as_ref().map(|o| pb::ProbeOutput {
            path: o.path.clone(),
            template: o.template.clone(),
            top: o.top,
            hook: o.hook.clone(),
        }),
        stale_after_ms: def.stale_after_ms,
        output_stale_after_ms: def.output_stale_after_ms,
        alert_url: def.alert_url.clone(),
    }
}

fn selects(selector: &kv::Selector, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The targets ranked by total time (one worker's, or the median over the
/// workers whose latest download succeeded), targets with no success last.
pub fn rank(def: &ProbeDef, reports: &[WorkerProbe], worker: Option<&str>) -> Vec<pb::RankedTarget> {
    let mut rows: Vec<pb::RankedTarget> = Vec::with_capacity(def.targets.len());
    for (i, t) in def.targets.iter().enumerate() {
        let latest: Vec<&ProbeResult> = reports
            .iter()
            .filter(|r| worker.is_none_or(|w| r.worker == w))
            .flat_map(|r| r.results.iter().filter(|x| x.target as usize == i))
            .collect();
        let ok: Vec<&&ProbeResult> = latest.iter().filter(|r| r.error.is_empty()).collect();
        let failed: Vec<&&ProbeResult> = latest.iter().filter(|r| !r.error.is_empty()).collect();
        rows.push(pb::RankedTarget {
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
pub fn freshness(def: &ProbeDef, reports: &[WorkerProbe], now: u64) -> pb::ProbeState {
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
    pb::ProbeState {
        name: def.name.clone(),
        workers: reports.len() as u32,
        last_result_unix_ms: last,
        stale: !reasons.is_empty(),
        reasons,
    }
}

fn from_result(worker: &str, def: Option<&ProbeDef>, r: &ProbeResult) -> pb::ProbeResult {
    let target = def.and_then(|d| d.targets.get(r.target as usize));
    pb::ProbeResult {
        worker: worker.to_string(),
        target: r.target,
        url: target.map(|t| t.url.clone()).unwrap_or_default(),
        host: target.map(|t| t.host.clone()).unwrap_or_default(),
        ttfb_us: r.ttfb_us,
        total_us: r.total_us,
        bytes: r.bytes,
        error: r.error.clone(),
        measured_unix_ms: r.measured_unix_ms,
    }
}

/// The ProbeService implementation.
pub struct ProbeServiceImpl {
    pub(crate) node: Arc<Node>,
}

impl ProbeServiceImpl {
    fn def(&self, name: &str) -> Result<ProbeDef, Status> {
        probes::validate_name(name).map_err(|e| invalid(e.replacen("name", "probe", 1)))?;
        self.node
            .reader
            .probe(name)
            .map_err(Error::from)?
            .ok_or_else(|| Status::not_found(format!("probe: no probe named {name}")))
    }

    /// Output rules the known workers that would run `def` cannot follow.
    fn check_output_on_workers(&self, def: &ProbeDef) -> Result<(), Status> {
        let Some(out) = &def.output else { return Ok(()) };
        for w in self.node.reader.workers().map_err(Error::from)? {
            if !selects(&def.selector, &w.labels) {
                continue;
            }
            let path = Path::new(&out.path);
            if !w.roots.iter().any(|r| path.starts_with(r)) {
                return Err(invalid(format!(
                    "output.path: {} is outside the allowed roots of worker {} ({})",
                    out.path,
                    w.name,
                    w.roots.join(", ")
                )));
            }
            if !out.hook.is_empty() && !w.hooks.contains(&out.hook) {
                return Err(invalid(format!("output.hook: worker {} has no hook named {}", w.name, out.hook)));
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl ProbeService for ProbeServiceImpl {
    async fn define_probe(
        &self,
        request: Request<pb::DefineProbeRequest>,
    ) -> Result<Response<pb::DefineProbeResponse>, Status> {
        let mut req = request.into_inner();
        let spec = req.spec.clone().ok_or_else(|| invalid("spec: missing".into()))?;
        let def = to_def(spec)?;
        self.check_output_on_workers(&def)?;
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let cmd = Command { request_id: req.request_id.clone(), op: Op::ProbeDefine(Box::new(def)) };
        match self.node.propose(cmd).await? {
            CommandResult::Done => Ok(Response::new(pb::DefineProbeResponse { header: Some(self.node.header()) })),
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for define: {other:?}"))),
        }
    }

    async fn delete_probe(
        &self,
        request: Request<pb::DeleteProbeRequest>,
    ) -> Result<Response<pb::DeleteProbeResponse>, Status> {
        let mut req = request.into_inner();
        probes::validate_name(&req.name).map_err(invalid)?;
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let cmd = Command { request_id: req.request_id.clone(), op: Op::ProbeDelete { name: req.name.clone() } };
        match self.node.propose(cmd).await? {
            CommandResult::Done => {
                Ok(Response::new(pb::DeleteProbeResponse { header: Some(self.node.header()), deleted: true }))
            }
            CommandResult::Rejected { .. } => {
                Ok(Response::new(pb::DeleteProbeResponse { header: Some(self.node.header()), deleted: false }))
            }
            other => Err(Status::internal(format!("unexpected result for delete: {other:?}"))),
        }
    }

    async fn list_probes(
        &self,
        request: Request<pb::ListProbesRequest>,
    ) -> Result<Response<pb::ListProbesResponse>, Status> {
        let req = request.into_inner();
        // Workers poll this every few seconds: a serializable read for them
        // (a definition reaches them a moment later), linearizable for users.
        self.node.read_barrier(!req.worker.is_empty()).await?;
        let mut defs = self.node.reader.probes().map_err(Error::from)?;
        if !req.worker.is_empty() {
            let labels = self
                .node
                .reader
                .workers()
                .map_err(Error::from)?
                .into_iter()
                .find(|w| w.name == req.worker)
                .map(|w| w.labels)
                .ok_or_else(|| Status::not_found(format!("worker: no worker named {}", req.worker)))?;
            defs.retain(|d| selects(&d.selector, &labels));
        }
        Ok(Response::new(pb::ListProbesResponse {
            header: Some(self.node.header()),
            probes: defs.iter().map(to_spec).collect(),
        }))
    }

    async fn report(&self, request: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let mut req = request.into_inner();
        probes::validate_name(&req.probe).map_err(|e| invalid(e.replacen("name", "probe", 1)))?;
        if !self.node.reader.workers().map_err(Error::from)?.iter().any(|w| w.name == req.worker) {
            return Err(invalid(format!("worker: no registered worker named {:?}", req.worker)));
        }
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        let state = WorkerProbe {
            worker: req.worker.clone(),
            results: req
                .results
                .iter()
                .map(|r| ProbeResult {
                    target: r.target,
                    ttfb_us: r.ttfb_us,
                    total_us: r.total_us,
                    bytes: r.bytes,
                    error: r.error.chars().take(512).collect(),
                    measured_unix_ms: r.measured_unix_ms,
                })
                .collect(),
            output_digest: req.output_digest.clone(),
            output_changed_unix_ms: req.output_changed_unix_ms,
            output_error: req.output_error.chars().take(512).collect(),
        };
        let cmd =
            Command { request_id: req.request_id.clone(), op: Op::ProbeReport { probe: req.probe.clone(), state } };
        cmd.validate().map_err(invalid)?;
        match self.node.propose(cmd).await? {
            CommandResult::Done => Ok(Response::new(pb::ReportResponse { header: Some(self.node.header()) })),
            CommandResult::Rejected { reason } => Err(Status::not_found(reason)),
            other => Err(Status::internal(format!("unexpected result for report: {other:?}"))),
        }
    }

    async fn get_results(
        &self,
        request: Request<pb::GetResultsRequest>,
    ) -> Result<Response<pb::GetResultsResponse>, Status> {
        let req = request.into_inner();
        self.node.read_barrier(false).await?;
        let def = self.def(&req.probe)?;
        let reports = self.node.reader.probe_results(&req.probe).map_err(Error::from)?;
        let results = reports
            .iter()
            .filter(|r| req.worker.is_empty() || r.worker == req.worker)
            .flat_map(|r| r.results.iter().map(|x| from_result(&r.worker, Some(&def), x)))
            .collect();
        Ok(Response::new(pb::GetResultsResponse { header: Some(self.node.header()), results }))
    }

    async fn best(&self, request: Request<pb::BestRequest>) -> Result<Response<pb::BestResponse>, Status> {
        let req = request.into_inner();
        self.node.read_barrier(false).await?;
        let def = self.def(&req.probe)?;
        let reports = self.node.reader.probe_results(&req.probe).map_err(Error::from)?;
        let worker = (!req.worker.is_empty()).then_some(req.worker.as_str());
        Ok(Response::new(pb::BestResponse { header: Some(self.node.header()), ranking: rank(&def, &reports, worker) }))
    }

    type WatchBestStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BestResponse, Status>> + Send>>;

    async fn watch_best(&self, request: Request<pb::BestRequest>) -> Result<Response<Self::WatchBestStream>, Status> {
        let req = request.into_inner();
        self.def(&req.probe)?;
        let node = self.node.clone();
        let lists = inline_stream(16, |tx| async move {
            let mut changed = node.reader.subscribe();
            let mut last: Option<Vec<(u32, bool)>> = None;
            loop {
                let def = match node.reader.probe(&req.probe) {
                    Ok(Some(d)) => d,
                    Ok(None) => {
                        let _ = tx.send(Err(Status::not_found(format!("probe: {} was deleted", req.probe)))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let reports = match node.reader.probe_results(&req.probe) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(Error::from(e).into())).await;
                        return;
                    }
                };
                let worker = (!req.worker.is_empty()).then_some(req.worker.as_str());
                let ranking = rank(&def, &reports, worker);
                // "Changed" means a different order (or a target failing or
                // recovering), not new timings of the same order.
                let order: Vec<(u32, bool)> = ranking.iter().map(|r| (r.target, r.ok > 0)).collect();
                if last.as_ref() != Some(&order) {
                    last = Some(order);
                    let msg = pb::BestResponse { header: Some(node.header()), ranking };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(lists)))
    }

    async fn status(
        &self,
        _request: Request<pb::ProbeStatusRequest>,
    ) -> Result<Response<pb::ProbeStatusResponse>, Status> {
        self.node.read_barrier(false).await?;
        let probes = statuses(&self.node).map_err(Status::from)?.into_iter().map(|(_, s)| s).collect();
        Ok(Response::new(pb::ProbeStatusResponse { header: Some(self.node.header()), probes }))
    }
}

/// Every probe with its freshness now, from one read of the definitions.
pub fn statuses(node: &Node) -> Result<Vec<(ProbeDef, pb::ProbeState)>, Error> {
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
        if node.leader().map(|l| l.0) != Some(node.id) {
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
            tokio::spawn(crate::webhook::post_with_retries(def.alert_url.clone(), body.to_string()));
        }
    }
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
        let spec = |url: &str| pb::ProbeSpec {
            name: "p".into(),
            targets: vec![pb::ProbeTarget { url: url.into(), host: String::new() }],
            interval_ms: 60_000,
            ..Default::default()
        };
        let err = |s: pb::ProbeSpec| to_def(s).unwrap_err().message().to_string();
        assert!(err(spec("ftp://x/y")).starts_with("targets[0].url: 'ftp://x/y' must start with http://"));
        assert!(to_def(spec("https://relay.example/2M")).is_ok());
        assert!(err(pb::ProbeSpec { interval_ms: 10, ..spec("http://a/") }).starts_with("interval:"));
        assert!(err(pb::ProbeSpec { selector: "zone".into(), ..spec("http://a/") }).starts_with("selector:"));
        assert!(err(pb::ProbeSpec { alert_url: "ftp://a/".into(), ..spec("http://a/") }).starts_with("alert_url:"));
        assert!(to_def(pb::ProbeSpec { alert_url: "https://ops.example/alert".into(), ..spec("http://a/") }).is_ok());
        let relative = pb::ProbeOutput { path: "out.txt".into(), ..Default::default() };
        assert!(err(pb::ProbeSpec { output: Some(relative), ..spec("http://a/") }).starts_with("output.path:"));
        let d = to_def(spec("http://a/")).unwrap();
        assert_eq!((d.timeout_ms, d.stale_after_ms), (60_000, 180_000), "defaults");
    }
}
