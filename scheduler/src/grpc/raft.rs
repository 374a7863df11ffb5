//! Inbound Raft RPCs (`ferry.v1.RaftService`): decode, hand to openraft,
//! encode the result (including openraft's own errors) for the sender.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};

use ferry_proto::pb::{self, raft_service_server::RaftService};
use ferry_storage::{codec, NodeId};
use openraft::error::Fatal;
use openraft::raft::{AppendEntriesRequest, SnapshotResponse, VoteRequest};
use openraft::{BasicNode, Snapshot, SnapshotMeta, Vote};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::Error;
use crate::raft::node::Node;

/// The RaftService implementation.
pub struct RaftServiceImpl {
    pub(crate) node: Arc<Node>,
    /// Set when the node stops: open AppendEntries streams end then, so a
    /// graceful stop does not wait for the leader to close them.
    pub(crate) shutdown: tokio::sync::watch::Receiver<bool>,
}

fn decode<T: serde::de::DeserializeOwned>(what: &'static str, data: &[u8]) -> Result<T, Status> {
    codec::decode(what, data).map_err(|e| Error::InvalidArgument(format!("data: {e}")).into())
}

fn payload<T: serde::Serialize>(what: &'static str, value: &T) -> Result<pb::RaftPayload, Status> {
    let data = codec::encode(what, value).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(pb::RaftPayload { data })
}

fn reply<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Response<pb::RaftPayload>, Status> {
    payload(what, value).map(Response::new)
}

/// Hands one AppendEntries to openraft and encodes its result. Entries
/// from a leader of an older format are converted as they are decoded.
async fn append(node: &Node, request: pb::RaftPayload) -> Result<pb::RaftPayload, Status> {
    let req: AppendEntriesRequest<ferry_storage::TypeConfig> = codec::decode_upgraded("append entries", &request.data)
        .map_err(|e| Error::InvalidArgument(format!("data: {e}")))?;
    let result = node.raft.append_entries(req).await;
    payload("append entries", &result)
}

#[tonic::async_trait]
impl RaftService for RaftServiceImpl {
    async fn append_entries(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        append(&self.node, request.into_inner()).await.map(Response::new)
    }

    type AppendEntriesStreamStream = Pin<Box<dyn Stream<Item = Result<pb::RaftPayload, Status>> + Send>>;

    async fn append_entries_stream(
        &self,
        request: Request<Streaming<pb::RaftPayload>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        // Each request is handled as the reply stream is polled, one at a
        // time and in order, on the task that writes the replies: no task
        // or channel between openraft's answer and the connection.
        let node = self.node.clone();
        let mut shutdown = self.shutdown.clone();
        let replies = request
            .into_inner()
            .then(move |request| {
                let node = node.clone();
                async move { append(&node, request?).await }
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn vote(&self, request: Request<pb::RaftPayload>) -> Result<Response<pb::RaftPayload>, Status> {
        let req: VoteRequest<NodeId> = decode("vote", &request.into_inner().data)?;
        let result = self.node.raft.vote(req).await;
        reply("vote", &result)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let mut stream = request.into_inner();
        let first =
            stream.message().await?.ok_or_else(|| Error::InvalidArgument("stream: empty snapshot stream".into()))?;
        let (vote, meta): (Vote<NodeId>, SnapshotMeta<NodeId, BasicNode>) = decode("snapshot header", &first.header)?;
        let mut file = self.node.raft.begin_receiving_snapshot().await.map_err(|e| Error::Stopped(e.to_string()))?;
        let io = |e: std::io::Error| Error::Internal(format!("writing received snapshot: {e}"));
        file.write_all(&first.data).await.map_err(io)?;
        let mut bytes = first.data.len() as u64;
        while let Some(chunk) = stream.message().await? {
            file.write_all(&chunk.data).await.map_err(io)?;
            bytes += chunk.data.len() as u64;
        }
        file.flush().await.map_err(io)?;
        // openraft stops the node if an install fails, so a snapshot cut short
        // (sender died, network error, bad peer) is refused here instead.
        let mut std_file = file.into_std().await;
        let checked = tokio::task::spawn_blocking(move || {
            ferry_storage::snapshot::verify(&mut std_file).map(|records| (records, std_file))
        })
        .await
        .map_err(|e| Error::Internal(format!("verifying snapshot: {e}")))?;
        let (records, std_file) =
            checked.map_err(|e| Error::DataLoss(format!("snapshot {}: {e}", meta.snapshot_id)))?;
        let file = Box::new(tokio::fs::File::from_std(std_file));
        tracing::info!(snapshot = %meta.snapshot_id, bytes, records, "received snapshot; installing");
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            self.node.raft.install_full_snapshot(vote, Snapshot { meta, snapshot: file }).await;
        reply("snapshot reply", &result)
    }

    async fn read_index(
        &self,
        _request: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        let read_index = self.node.read_index().await?;
        Ok(Response::new(pb::ReadIndexResponse { read_index }))
    }

    async fn timeout_now(
        &self,
        request: Request<pb::TimeoutNowRequest>,
    ) -> Result<Response<pb::TimeoutNowResponse>, Status> {
        crate::raft::transfer::timeout_now(&self.node, request.into_inner()).await?;
        Ok(Response::new(pb::TimeoutNowResponse {}))
    }
}
