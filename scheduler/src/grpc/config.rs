//! `ferry.v1.ConfigService`: configuration keys. Writes go through the Raft
//! log (a follower forwards them to the leader); reads pass a read-index
//! barrier unless the caller asks for a serializable read.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, config_service_server::ConfigService};
use ferry_storage::kv::{Compare, Event, EventKind, Txn, TxnOp};
use ferry_storage::{kv, Command, CommandResult, KeyValue, Op};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::{header, header_at};
use crate::raft::node::{new_request_id, Node};
use crate::stream::inline_stream;

/// The ConfigService implementation.
pub struct ConfigServiceImpl {
    pub(crate) node: Arc<Node>,
}

fn to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

fn invalid(reason: String) -> Status {
    Error::InvalidArgument(reason).into()
}

fn event_to_pb(event: Event) -> pb::Event {
    let kind = match event.kind {
        EventKind::Put => pb::event::Type::Put,
        EventKind::Delete => pb::event::Type::Delete,
    };
    pb::Event { r#type: kind as i32, kv: Some(to_pb(event.kv)) }
}

/// The compare a put or delete with `if_mod_revision` stands for.
fn compare_for(key: &str, if_mod_revision: u64) -> Compare {
    match if_mod_revision {
        0 => Compare::Absent { key: key.to_string() },
        revision => Compare::ModRevision { key: key.to_string(), revision },
    }
}

fn txn_from_pb(req: &pb::TxnRequest) -> Result<Txn, Status> {
    let compares = req
        .compares
        .iter()
        .map(|c| match c.target {
            Some(pb::compare::Target::ModRevision(revision)) => {
                Ok(Compare::ModRevision { key: c.key.clone(), revision })
            }
            Some(pb::compare::Target::Absent(true)) => Ok(Compare::Absent { key: c.key.clone() }),
            _ => Err(invalid(format!("compares: the compare on {} needs mod_revision or absent = true", c.key))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ops = |ops: &[pb::TxnOp], field: &str| {
        ops.iter()
            .map(|o| match &o.op {
                Some(pb::txn_op::Op::Put(p)) => Ok(TxnOp::Put { key: p.key.clone(), value: p.value.clone() }),
                Some(pb::txn_op::Op::Delete(d)) => Ok(TxnOp::Delete { key: d.key.clone() }),
                None => Err(invalid(format!("{field}: an op without put or delete"))),
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Txn { compares, success: ops(&req.success, "success")?, failure: ops(&req.failure, "failure")? })
}

/// Events sent in one watch message at most.
const WATCH_BATCH: usize = 1000;

/// Feeds one watch stream until the client goes away.
async fn run_watch(
    node: Arc<Node>,
    req: pb::WatchRequest,
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
) -> Result<(), Status> {
    let reader = node.reader.clone();
    let mut changed = reader.subscribe();
    let every = Duration::from_millis(match req.progress_interval_ms {
        0 => 5000,
        ms => ms.max(100) as u64,
    });
    let header = |revision: u64| header_at(&node, revision);
    let mut next = if req.start_revision == 0 { reader.revision() + 1 } else { req.start_revision };
    let mut idle_since = tokio::time::Instant::now();
    if req.start_revision == 0 {
        // Tell a watcher "from now" where now is, so a reconnect before the
        // first change resumes from there instead of from a later "now".
        let msg = pb::WatchResponse { header: Some(header(next - 1)), progress: true, ..Default::default() };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(());
        }
    }
    loop {
        let compacted = reader.compacted().map_err(Error::from)?;
        if next <= compacted {
            // Behind the history (at the start, or a watcher too slow to
            // keep up): the current values at R, then changes after R.
            let (kvs, revision) = reader.list_at_revision(&req.prefix).map_err(Error::from)?;
            let mut events: Vec<pb::Event> =
                kvs.into_iter().map(|kv| event_to_pb(Event { kind: EventKind::Put, kv })).collect();
            loop {
                let rest = events.split_off(events.len().min(WATCH_BATCH));
                let msg = pb::WatchResponse {
                    header: Some(header(revision)),
                    events,
                    snapshot: true,
                    compact_revision: compacted,
                    progress: false,
                    more: !rest.is_empty(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
                if rest.is_empty() {
                    break;
                }
                events = rest;
            }
            next = revision + 1;
            idle_since = tokio::time::Instant::now();
        }
        let (events, upto) = reader.events(next, &req.prefix, WATCH_BATCH).map_err(Error::from)?;
        // Compaction only moves forward: if it has not reached `next` now,
        // it had not while the events were read, so none is missing.
        if reader.compacted().map_err(Error::from)? >= next {
            continue;
        }
        if !events.is_empty() {
            let msg = pb::WatchResponse {
                header: Some(header(upto)),
                events: events.into_iter().map(|(_, e)| event_to_pb(e)).collect(),
                compact_revision: compacted,
                ..Default::default()
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
            idle_since = tokio::time::Instant::now();
        }
        if upto >= next {
            next = upto + 1;
            continue;
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return Err(Status::unavailable("this scheduler is stopping; watch again from the last revision + 1"));
                }
            }
            _ = tokio::time::sleep_until(idle_since + every) => {
                let msg = pb::WatchResponse {
                    header: Some(header(next - 1)),
                    compact_revision: compacted,
                    progress: true,
                    ..Default::default()
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
                idle_since = tokio::time::Instant::now();
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

impl ConfigServiceImpl {
    fn command(request_id: &str, op: Op) -> Result<Command, Status> {
        let request_id = if request_id.is_empty() { new_request_id() } else { request_id.to_string() };
        let cmd = Command { request_id, op };
        cmd.validate().map_err(invalid)?;
        Ok(cmd)
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigServiceImpl {
    async fn put(&self, request: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let req = request.into_inner();
        let op = match req.if_mod_revision {
            None if req.lease != 0 => {
                Op::PutLeased { key: req.key.clone(), value: req.value.clone(), lease: req.lease }
            }
            None => Op::Put { key: req.key.clone(), value: req.value.clone() },
            Some(_) if req.lease != 0 => {
                return Err(invalid("lease: a compare-and-set put cannot bind a lease (put first, then bind)".into()))
            }
            Some(rev) => Op::Txn(Box::new(Txn {
                compares: vec![compare_for(&req.key, rev)],
                success: vec![TxnOp::Put { key: req.key.clone(), value: req.value.clone() }],
                failure: vec![],
            })),
        };
        let cmd = Self::command(&req.request_id, op)?;
        match self.node.propose(cmd).await? {
            CommandResult::Put { revision, create_revision, version } => {
                let header = header_at(&self.node, revision);
                Ok(Response::new(pb::PutResponse { header: Some(header), create_revision, version }))
            }
            CommandResult::Txn { succeeded: true, revision, .. } => {
                // The put's own revision: read its create revision and
                // version back from the history.
                let kv = self.node.reader.get_at(&req.key, revision).map_err(Error::from)?.ok().flatten();
                let header = header_at(&self.node, revision);
                Ok(Response::new(pb::PutResponse {
                    header: Some(header),
                    create_revision: kv.as_ref().map(|k| k.create_revision).unwrap_or(revision),
                    version: kv.map(|k| k.version).unwrap_or(1),
                }))
            }
            CommandResult::Txn { failed, .. } => {
                Err(Error::FailedPrecondition(format!("not applied: {failed}")).into())
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for put: {other:?}"))),
        }
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        kv::validate_key(&req.key).map_err(invalid)?;
        self.node.read_barrier(req.serializable).await?;
        if !req.labels.is_empty() {
            if req.revision != 0 {
                return Err(invalid("labels: gray variants are read at the current revision only".into()));
            }
            let labels: kv::Selector = req.labels.into_iter().collect();
            let found = self.node.reader.get_for(&req.key, &labels).map_err(Error::from)?;
            let (kv, variant) = match found {
                Some((kv, v)) => (Some(to_pb(kv)), v.map(|s| kv::selector_text(&s)).unwrap_or_default()),
                None => (None, String::new()),
            };
            return Ok(Response::new(pb::GetResponse { header: Some(header(&self.node)), kv, variant }));
        }
        if req.revision != 0 {
            let current = self.node.reader.revision();
            if req.revision > current {
                return Err(Status::out_of_range(format!(
                    "revision: {} is in the future (current revision {current})",
                    req.revision
                )));
            }
            return match self.node.reader.get_at(&req.key, req.revision).map_err(Error::from)? {
                Ok(kv) => {
                    let header = header_at(&self.node, req.revision);
                    Ok(Response::new(pb::GetResponse {
                        header: Some(header),
                        kv: kv.map(to_pb),
                        variant: String::new(),
                    }))
                }
                Err(compacted) => Err(Status::out_of_range(format!(
                    "revision: {} is compacted (the oldest readable revision is {compacted})",
                    req.revision
                ))),
            };
        }
        let kv = self.node.reader.get(&req.key).map_err(Error::from)?;
        Ok(Response::new(pb::GetResponse {
            header: Some(header(&self.node)),
            kv: kv.map(to_pb),
            variant: String::new(),
        }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let req = request.into_inner();
        let op = match req.if_mod_revision {
            None => Op::Delete { key: req.key.clone() },
            Some(0) => {
                return Err(invalid("if_mod_revision: a compare-and-delete needs the key's mod revision, not 0".into()))
            }
            Some(rev) => Op::Txn(Box::new(Txn {
                compares: vec![compare_for(&req.key, rev)],
                success: vec![TxnOp::Delete { key: req.key.clone() }],
                failure: vec![],
            })),
        };
        let cmd = Self::command(&req.request_id, op)?;
        match self.node.propose(cmd).await? {
            CommandResult::Delete { revision, deleted } => {
                let header = header_at(&self.node, revision);
                Ok(Response::new(pb::DeleteResponse { header: Some(header), deleted }))
            }
            CommandResult::Txn { succeeded: true, revision, .. } => {
                let header = header_at(&self.node, revision);
                Ok(Response::new(pb::DeleteResponse { header: Some(header), deleted: true }))
            }
            CommandResult::Txn { failed, .. } => {
                Err(Error::FailedPrecondition(format!("not applied: {failed}")).into())
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for delete: {other:?}"))),
        }
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let req = request.into_inner();
        if req.prefix.len() > kv::MAX_KEY_BYTES {
            return Err(invalid(format!("prefix: must be at most {} bytes", kv::MAX_KEY_BYTES)));
        }
        self.node.read_barrier(req.serializable).await?;
        let (kvs, more) = self.node.reader.list(&req.prefix, req.limit as usize).map_err(Error::from)?;
        Ok(Response::new(pb::ListResponse {
            header: Some(header(&self.node)),
            kvs: kvs.into_iter().map(to_pb).collect(),
            more,
        }))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = request.into_inner();
        kv::validate_key(&req.key).map_err(invalid)?;
        self.node.read_barrier(req.serializable).await?;
        let events = self.node.reader.history(&req.key, req.limit as usize).map_err(Error::from)?;
        let compact_revision = self.node.reader.compacted().map_err(Error::from)?;
        Ok(Response::new(pb::HistoryResponse {
            header: Some(header(&self.node)),
            events: events.into_iter().map(|(_, e)| event_to_pb(e)).collect(),
            compact_revision,
        }))
    }

    async fn txn(&self, request: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let req = request.into_inner();
        let txn = txn_from_pb(&req)?;
        let cmd = Self::command(&req.request_id, Op::Txn(Box::new(txn)))?;
        match self.node.propose(cmd).await? {
            CommandResult::Txn { succeeded, revision, failed } => {
                let header = header_at(&self.node, revision);
                Ok(Response::new(pb::TxnResponse { header: Some(header), succeeded, failed }))
            }
            CommandResult::Rejected { reason } => Err(invalid(reason)),
            other => Err(Status::internal(format!("unexpected result for txn: {other:?}"))),
        }
    }

    async fn gray(&self, request: Request<pb::GrayRequest>) -> Result<Response<pb::GrayResponse>, Status> {
        use pb::gray_request::Action;
        let req = request.into_inner();
        kv::validate_key(&req.key).map_err(invalid)?;
        let selector = kv::parse_selector(&req.selector).map_err(invalid)?;
        let action =
            Action::try_from(req.action).map_err(|_| invalid(format!("action: unknown action {}", req.action)))?;
        let op = match action {
            Action::List => None,
            Action::Set => Some(Op::GraySet { key: req.key.clone(), selector, value: req.value.clone() }),
            Action::Promote => Some(Op::GrayPromote { key: req.key.clone(), selector }),
            Action::Drop => Some(Op::GrayDrop { key: req.key.clone(), selector }),
        };
        let mut header = header(&self.node);
        if let Some(op) = op {
            let cmd = Self::command(&req.request_id, op)?;
            match self.node.propose(cmd).await? {
                CommandResult::Rejected { reason } => return Err(invalid(reason)),
                CommandResult::Put { revision, .. } => header.revision = revision,
                _ => {}
            }
        } else {
            self.node.read_barrier(false).await?;
        }
        let variants = self.node.reader.variants(&req.key).map_err(Error::from)?;
        Ok(Response::new(pb::GrayResponse {
            header: Some(header),
            variants: variants
                .into_iter()
                .map(|v| pb::Variant { selector: kv::selector_text(&v.selector), value: v.value, revision: v.revision })
                .collect(),
        }))
    }

    type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(&self, request: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        if req.prefix.len() > kv::MAX_KEY_BYTES {
            return Err(invalid(format!("prefix: must be at most {} bytes", kv::MAX_KEY_BYTES)));
        }
        let node = self.node.clone();
        // Run by the response stream itself: a change wakes the task that
        // writes to the connection directly.
        let events = inline_stream(16, |tx| async move {
            if let Err(status) = run_watch(node, req, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(events)))
    }
}
