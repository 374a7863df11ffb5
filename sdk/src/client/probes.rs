//! The probe API: defining and deleting probes, the reports workers send,
//! and reading what they measured (latest results, rankings of the targets,
//! a watch on the ranking, every probe's freshness).

use ferry_proto::pb;
use ferry_proto::pb::probe_service_client::ProbeServiceClient;

use super::{request_id, Call, Client};
use crate::error::Error;

impl Client {
    /// Adds or replaces a probe definition.
    pub async fn define_probe(&self, spec: pb::ProbeSpec) -> Result<pb::DefineProbeResponse, Error> {
        let msg = pb::DefineProbeRequest { spec: Some(spec), request_id: request_id() };
        self.call("define probe", msg, ProbeServiceClient::define_probe).await
    }

    /// Removes a probe and its results; `false` if there was none.
    pub async fn delete_probe(&self, name: &str) -> Result<bool, Error> {
        let msg = pb::DeleteProbeRequest { name: name.into(), request_id: request_id() };
        self.call("delete probe", msg, ProbeServiceClient::delete_probe).await.map(|r| r.deleted)
    }

    /// Every probe definition, or (with `worker`) those that worker runs.
    pub async fn probes(&self, worker: Option<&str>) -> Result<Vec<pb::ProbeSpec>, Error> {
        let msg = pb::ListProbesRequest { worker: worker.unwrap_or_default().into() };
        self.call("list probes", msg, ProbeServiceClient::list_probes).await.map(|r| r.probes)
    }

    /// Reports one round of a probe (what workers call). Retried safely.
    pub async fn report_probe(&self, mut report: pb::ReportRequest) -> Result<(), Error> {
        report.request_id = request_id();
        self.call("report probe", report, ProbeServiceClient::report).await.map(|_| ())
    }

    /// The latest result per worker and target (`worker`: only its).
    pub async fn probe_results(&self, probe: &str, worker: Option<&str>) -> Result<Vec<pb::ProbeResult>, Error> {
        let msg = pb::GetResultsRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call("probe results", msg, ProbeServiceClient::get_results).await.map(|r| r.results)
    }

    /// The probe's targets ranked by total time, errors last: as `worker`
    /// measured them, or by the median over every worker.
    pub async fn probe_best(&self, probe: &str, worker: Option<&str>) -> Result<Vec<pb::RankedTarget>, Error> {
        let msg = pb::BestRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call("best", msg, ProbeServiceClient::best).await.map(|r| r.ranking)
    }

    /// The ranking, again whenever it changes order.
    pub async fn watch_probe_best(
        &self,
        probe: &str,
        worker: Option<&str>,
    ) -> Result<tonic::Streaming<pb::BestResponse>, Error> {
        let msg = pb::BestRequest { probe: probe.into(), worker: worker.unwrap_or_default().into() };
        self.call(Call::stream("watch best"), msg, ProbeServiceClient::watch_best).await
    }

    /// Every probe's freshness.
    pub async fn probe_status(&self) -> Result<Vec<pb::ProbeState>, Error> {
        self.call("probe status", pb::ProbeStatusRequest {}, ProbeServiceClient::status).await.map(|r| r.probes)
    }
}
