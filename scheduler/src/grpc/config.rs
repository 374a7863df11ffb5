//! `ferry.v1.ConfigService`: configuration keys. Writes go through the Raft
//! log (a follower forwards them to the leader); reads pass a read-index
//! barrier unless the caller asks for a serializable read.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, config_service_server::ConfigService};
use ferry_storage::kv::{Compare, Event, EventKind, Txn, TxnOp};
use ferry_storage::{kv, Command, CommandResult, KeyValue, Op, PageError, PageLimits};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::grpc::{header, header_at};
use crate::raft::node::{new_request_id, Node};
use crate::stream::inline_stream;

/// What one page of a listing holds at most, in bytes of keys and values
/// (plus one key): well inside the 4 MiB a gRPC client takes by default.
pub const PAGE_BYTES: usize = 2 * 1024 * 1024;

/// What a listing without `limit` may hold, in bytes of keys and values:
/// under the 64 MiB the SDK takes in one response.
pub const UNPAGED_MAX_BYTES: usize = 60 * 1024 * 1024;

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

fn batch_to_pb(node: &Node, b: crate::watch::Batch) -> pb::WatchResponse {
    pb::WatchResponse {
        header: Some(header_at(node, b.revision)),
        events: b.events.into_iter().map(event_to_pb).collect(),
        snapshot: b.snapshot,
        more: b.more,
        progress: b.progress,
        compact_revision: b.compact_revision,
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
            other => Err(Error::unexpected("put", &other).into()),
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
                return Err(Error::OutOfRange(format!(
                    "revision: {} is in the future (current revision {current})",
                    req.revision
                ))
                .into());
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
                Err(compacted) => Err(Error::OutOfRange(format!(
                    "revision: {} is compacted (the oldest readable revision is {compacted})",
                    req.revision
                ))
                .into()),
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
            other => Err(Error::unexpected("delete", &other).into()),
        }
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let req = request.into_inner();
        if req.prefix.len() > kv::MAX_KEY_BYTES {
            return Err(invalid(format!("prefix: must be at most {} bytes", kv::MAX_KEY_BYTES)));
        }
        if req.start_after.len() > kv::MAX_KEY_BYTES {
            return Err(invalid(format!("start_after: must be at most {} bytes", kv::MAX_KEY_BYTES)));
        }
        self.node.read_barrier(req.serializable).await?;
        let paged = req.limit != 0;
        let limits =
            PageLimits { keys: req.limit as usize, bytes: if paged { PAGE_BYTES } else { UNPAGED_MAX_BYTES + 1 } };
        let read = || self.node.reader.list_page(&req.prefix, &req.start_after, req.revision, limits);
        let mut page = read().map_err(Error::from)?;
        if matches!(page, Err(PageError::Future(_))) && req.serializable {
            // A replica behind the revision a previous page was read at.
            self.node.read_barrier(false).await?;
            page = read().map_err(Error::from)?;
        }
        let page = page.map_err(|e| match e {
            PageError::Compacted(c) => Error::OutOfRange(format!(
                "revision: {} is compacted (changes at or before {c} are gone); list again from the start",
                req.revision
            )),
            PageError::Future(now) => {
                Error::OutOfRange(format!("revision: {} is after the newest revision {now}", req.revision))
            }
        })?;
        if !paged && page.more {
            return Err(invalid(format!(
                "limit: the listing under {:?} holds more than {} MiB, more than one response carries; \
                 ask for pages (limit, start_after, revision)",
                req.prefix,
                UNPAGED_MAX_BYTES >> 20
            )));
        }
        Ok(Response::new(pb::ListResponse {
            header: Some(header_at(&self.node, page.revision)),
            kvs: page.kvs.into_iter().map(to_pb).collect(),
            more: page.more,
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
            other => Err(Error::unexpected("txn", &other).into()),
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
        let every = Duration::from_millis(match req.progress_interval_ms {
            0 => 5000,
            ms => ms.max(100) as u64,
        });
        // Run by the response stream itself: a change wakes the task that
        // writes to the connection directly.
        let batches = inline_stream(16, |tx| {
            let node = node.clone();
            async move {
                if let Err(e) = crate::watch::run(node, req.prefix, req.start_revision, every, &tx).await {
                    let _ = tx.send(Err(e)).await;
                }
            }
        });
        let events = batches.map(move |b| b.map(|b| batch_to_pb(&node, b)).map_err(Status::from));
        Ok(Response::new(Box::pin(events)))
    }
}
