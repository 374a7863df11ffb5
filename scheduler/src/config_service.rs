//! `ferry.v1.ConfigService`: configuration keys. Writes go through the Raft
//! log (a follower forwards them to the leader); reads pass a read-index
//! barrier unless the caller asks for a serializable read.

use std::sync::Arc;

use ferry_proto::pb::{self, config_service_client::ConfigServiceClient, config_service_server::ConfigService};
use ferry_storage::{kv, Command, CommandResult, KeyValue, Op};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::node::{forwarded, is_forwarded, new_request_id, Node, Proposal};

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

impl ConfigServiceImpl {
    fn client(&self, addr: &str) -> Result<ConfigServiceClient<tonic::transport::Channel>, Status> {
        Ok(ConfigServiceClient::new(self.node.peers.channel(addr)?)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024))
    }

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
        let was_forwarded = is_forwarded(&request);
        let mut req = request.into_inner();
        let cmd = Self::command(&req.request_id, Op::Put { key: req.key.clone(), value: req.value.clone() })?;
        req.request_id = cmd.request_id.clone();
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => self.client(&addr)?.put(forwarded(req, self.node.op_timeout())).await,
            Proposal::Applied(CommandResult::Put { revision, create_revision, version }) => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::PutResponse { header: Some(header), create_revision, version }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for put: {other:?}"))),
        }
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        kv::validate_key(&req.key).map_err(invalid)?;
        self.node.read_barrier(req.serializable).await?;
        let kv = self.node.reader.get(&req.key).map_err(Error::from)?;
        Ok(Response::new(pb::GetResponse { header: Some(self.node.header()), kv: kv.map(to_pb) }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let was_forwarded = is_forwarded(&request);
        let mut req = request.into_inner();
        let cmd = Self::command(&req.request_id, Op::Delete { key: req.key.clone() })?;
        req.request_id = cmd.request_id.clone();
        match self.node.propose(cmd, was_forwarded).await? {
            Proposal::Forward(addr) => self.client(&addr)?.delete(forwarded(req, self.node.op_timeout())).await,
            Proposal::Applied(CommandResult::Delete { revision, deleted }) => {
                let mut header = self.node.header();
                header.revision = revision;
                Ok(Response::new(pb::DeleteResponse { header: Some(header), deleted }))
            }
            Proposal::Applied(CommandResult::Rejected { reason }) => Err(invalid(reason)),
            Proposal::Applied(other) => Err(Status::internal(format!("unexpected result for delete: {other:?}"))),
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
            header: Some(self.node.header()),
            kvs: kvs.into_iter().map(to_pb).collect(),
            more,
        }))
    }
}
