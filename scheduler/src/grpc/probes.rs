//! `ferry.v1.ProbeService`: decode, call [`crate::probes`], encode.

use std::pin::Pin;
use std::sync::Arc;

use ferry_proto::pb::{self, probe_service_server::ProbeService};
use ferry_storage::kv;
use ferry_storage::probes::{ProbeDef, ProbeOutput, ProbeResult, ProbeTarget, WorkerProbe};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::header;
use crate::probes::{self, Definition, Freshness, Ranked};
use crate::raft::node::Node;
use crate::stream::inline_stream;

/// The ProbeService implementation.
pub struct ProbeServiceImpl {
    pub(crate) node: Arc<Node>,
}

fn from_spec(spec: pb::ProbeSpec) -> Definition {
    Definition {
        name: spec.name,
        targets: spec.targets.into_iter().map(|t| ProbeTarget { url: t.url, host: t.host }).collect(),
        interval_ms: spec.interval_ms,
        timeout_ms: spec.timeout_ms,
        selector: spec.selector,
        output: spec.output.map(|o| ProbeOutput { path: o.path, template: o.template, top: o.top, hook: o.hook }),
        stale_after_ms: spec.stale_after_ms,
        output_stale_after_ms: spec.output_stale_after_ms,
        alert_url: spec.alert_url,
    }
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

fn to_ranked(r: Ranked) -> pb::RankedTarget {
    pb::RankedTarget {
        rank: r.rank,
        target: r.target,
        url: r.url,
        host: r.host,
        total_us: r.total_us,
        ttfb_us: r.ttfb_us,
        bytes: r.bytes,
        ok: r.ok,
        errors: r.errors,
        error: r.error,
    }
}

fn to_state(f: Freshness) -> pb::ProbeState {
    pb::ProbeState {
        name: f.name,
        workers: f.workers,
        last_result_unix_ms: f.last_result_unix_ms,
        stale: f.stale,
        reasons: f.reasons,
    }
}

fn to_result(worker: &str, def: &ProbeDef, r: &ProbeResult) -> pb::ProbeResult {
    let target = def.targets.get(r.target as usize);
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

fn worker_filter(worker: &str) -> Option<&str> {
    (!worker.is_empty()).then_some(worker)
}

#[tonic::async_trait]
impl ProbeService for ProbeServiceImpl {
    async fn define_probe(
        &self,
        request: Request<pb::DefineProbeRequest>,
    ) -> Result<Response<pb::DefineProbeResponse>, Status> {
        let req = request.into_inner();
        let spec = req.spec.ok_or_else(|| Error::InvalidArgument("spec: missing".into()))?;
        probes::define(&self.node, from_spec(spec), req.request_id).await?;
        Ok(Response::new(pb::DefineProbeResponse { header: Some(header(&self.node)) }))
    }

    async fn delete_probe(
        &self,
        request: Request<pb::DeleteProbeRequest>,
    ) -> Result<Response<pb::DeleteProbeResponse>, Status> {
        let req = request.into_inner();
        let deleted = probes::delete(&self.node, &req.name, req.request_id).await?;
        Ok(Response::new(pb::DeleteProbeResponse { header: Some(header(&self.node)), deleted }))
    }

    async fn list_probes(
        &self,
        request: Request<pb::ListProbesRequest>,
    ) -> Result<Response<pb::ListProbesResponse>, Status> {
        let req = request.into_inner();
        // Workers poll this every few seconds: a serializable read for them
        // (a definition reaches them a moment later), linearizable for users.
        self.node.read_barrier(!req.worker.is_empty()).await?;
        let defs = probes::list(&self.node, worker_filter(&req.worker))?;
        Ok(Response::new(pb::ListProbesResponse {
            header: Some(header(&self.node)),
            probes: defs.iter().map(to_spec).collect(),
        }))
    }

    async fn report(&self, request: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let req = request.into_inner();
        let state = WorkerProbe {
            worker: req.worker,
            results: req
                .results
                .into_iter()
                .map(|r| ProbeResult {
                    target: r.target,
                    ttfb_us: r.ttfb_us,
                    total_us: r.total_us,
                    bytes: r.bytes,
                    error: r.error,
                    measured_unix_ms: r.measured_unix_ms,
                })
                .collect(),
            output_digest: req.output_digest,
            output_changed_unix_ms: req.output_changed_unix_ms,
            output_error: req.output_error,
        };
        probes::report(&self.node, &req.probe, state, req.request_id).await?;
        Ok(Response::new(pb::ReportResponse { header: Some(header(&self.node)) }))
    }

    async fn get_results(
        &self,
        request: Request<pb::GetResultsRequest>,
    ) -> Result<Response<pb::GetResultsResponse>, Status> {
        let req = request.into_inner();
        self.node.read_barrier(false).await?;
        let def = probes::def(&self.node, &req.probe)?;
        let reports = self.node.reader.probe_results(&req.probe).map_err(crate::error::Error::from)?;
        let results = reports
            .iter()
            .filter(|r| req.worker.is_empty() || r.worker == req.worker)
            .flat_map(|r| r.results.iter().map(|x| to_result(&r.worker, &def, x)))
            .collect();
        Ok(Response::new(pb::GetResultsResponse { header: Some(header(&self.node)), results }))
    }

    async fn best(&self, request: Request<pb::BestRequest>) -> Result<Response<pb::BestResponse>, Status> {
        let req = request.into_inner();
        self.node.read_barrier(false).await?;
        probes::def(&self.node, &req.probe)?;
        let ranking = probes::ranking(&self.node, &req.probe, worker_filter(&req.worker))?;
        Ok(Response::new(pb::BestResponse {
            header: Some(header(&self.node)),
            ranking: ranking.into_iter().map(to_ranked).collect(),
        }))
    }

    type WatchBestStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::BestResponse, Status>> + Send>>;

    async fn watch_best(&self, request: Request<pb::BestRequest>) -> Result<Response<Self::WatchBestStream>, Status> {
        let req = request.into_inner();
        probes::def(&self.node, &req.probe)?;
        let node = self.node.clone();
        let lists = inline_stream(16, |tx| async move {
            let mut changed = node.reader.subscribe();
            let mut last: Option<Vec<(u32, bool)>> = None;
            loop {
                let ranking = match probes::ranking(&node, &req.probe, worker_filter(&req.worker)) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // "Changed" means a different order (or a target failing or
                // recovering), not new timings of the same order.
                let order: Vec<(u32, bool)> = ranking.iter().map(|r| (r.target, r.ok > 0)).collect();
                if last.as_ref() != Some(&order) {
                    last = Some(order);
                    let ranking = ranking.into_iter().map(to_ranked).collect();
                    if tx.send(Ok(pb::BestResponse { header: Some(header(&node)), ranking })).await.is_err() {
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
        let probes = probes::statuses(&self.node)?.into_iter().map(|(_, s)| to_state(s)).collect();
        Ok(Response::new(pb::ProbeStatusResponse { header: Some(header(&self.node)), probes }))
    }
}
