//! Outbound Raft RPCs over tonic (`RaftNetworkFactory`).
//!
//! Payloads are openraft messages in Ferry's versioned encoding. Every call
//! has a deadline (openraft's TTL for append/vote, `snapshot_timeout` for a
//! snapshot). AppendEntries, heartbeats included, go over one long-lived
//! stream per follower (`AppendEntriesStream`): a request and its reply are
//! one HTTP/2 DATA frame each, where a unary call opens a stream with
//! headers, a body and trailers, and the reply's headers reach the leader in
//! a write (and a wake-up) of their own. A peer that does not serve the
//! stream (a version before it, during a rolling upgrade) gets unary calls.
//! Snapshots go as one client stream of chunks read from the snapshot file,
//! so memory stays flat whatever the snapshot size.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::raft_service_client::RaftServiceClient;
use ferry_storage::{codec, LogSync, NodeId, TypeConfig};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot, Vote};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::raft::identity::{ClusterId, Stamp};
use crate::raft::peers::{Peers, MAX_MESSAGE_BYTES};

/// Bytes of snapshot data per stream message.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// Payload bytes in one AppendEntries beyond its first entry. openraft 0.9
/// gives an AppendEntries one heartbeat interval; a byte-bounded message
/// keeps big values from timing out (and being resent) forever.
const APPEND_BUDGET: usize = 1024 * 1024;
/// How long a commit-only AppendEntries waits for the leader's own sync in
/// progress to reach the commit (it takes 0.2-1 ms on the bench's VM).
const COMMIT_PATIENCE: Duration = Duration::from_millis(5);

fn entry_bytes(e: &openraft::Entry<TypeConfig>) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(cmd) => cmd.size_hint() + 64,
        _ => 256,
    }
}

type RpcErr<E = RaftError<NodeId>> = RPCError<NodeId, BasicNode, E>;

/// Builds a [`PeerNetwork`] per target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) peers: Peers,
    pub(crate) snapshot_timeout: Duration,
    /// How far this node's log is durable (`ferry_storage::log_sync`).
    pub(crate) log_sync: LogSync,
    /// This node's cluster id, carried by every message.
    pub(crate) cluster: Arc<ClusterId>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        PeerNetwork {
            target,
            addr: node.addr.clone(),
            channel: self.peers.channel(&node.addr).ok(),
            snapshot_timeout: self.snapshot_timeout,
            appends: None,
            unary_appends: false,
            log_sync: Some(self.log_sync.clone()),
            cluster: self.cluster.clone(),
        }
    }
}

/// An open `AppendEntriesStream`: the follower answers each request in
/// order, and only one is out at a time (openraft awaits each call), so the
/// next reply is the answer to the request just sent. A call that fails or
/// runs out of time drops the stream, so a late reply is never taken for
/// the next request's.
struct AppendStream {
    requests: mpsc::Sender<pb::RaftPayload>,
    replies: tonic::Streaming<pb::RaftPayload>,
}

/// The connection to one peer.
pub struct PeerNetwork {
    target: NodeId,
    addr: String,
    /// `None` when the address could not even be parsed.
    channel: Option<Channel>,
    snapshot_timeout: Duration,
    /// The AppendEntries stream, once opened and while it works.
    appends: Option<AppendStream>,
    /// The peer does not serve `AppendEntriesStream`: unary calls.
    unary_appends: bool,
    /// The local log's durable end: no commit beyond it goes to the peer.
    log_sync: Option<LogSync>,
    /// Stamped on every call.
    cluster: Arc<ClusterId>,
}

/// A Raft client whose calls carry this node's cluster id.
pub(crate) type Client = RaftServiceClient<InterceptedService<Channel, Stamp>>;

pub(crate) fn client(channel: Channel, cluster: &Arc<ClusterId>) -> Client {
    RaftServiceClient::with_interceptor(channel, Stamp(cluster.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A peer that cannot be reached (no connection) is `Unreachable`: openraft
/// then backs off for 500 ms before it sends to that peer again. A call
/// that ran out of time is not: the peer answers, only later than openraft's
/// AppendEntries deadline (one heartbeat interval), for example while its
/// disk syncs a checkpoint. Backing off from it would stop replication to
/// that peer for half a second; when both followers are slow at the same
/// moment, nothing commits for that long. So a timeout is retried at the
/// next heartbeat or entry.
fn status_to_rpc<E: std::error::Error>(status: tonic::Status) -> RpcErr<E> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => RPCError::Unreachable(Unreachable::new(&status)),
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl PeerNetwork {
    // The error type is openraft's `RPCError`, which its network trait returns.
    #[allow(clippy::result_large_err)]
    fn client<E: std::error::Error>(&self) -> Result<Client, RpcErr<E>> {
        let ch = self.channel.clone().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!("bad peer address {}", self.addr))))
        })?;
        Ok(client(ch, &self.cluster))
    }

    /// Sends a unary call whose reply is `Result<Resp, E>` in the codec.
    async fn unary<Req, Resp, E, F, Fut>(
        &self,
        what: &'static str,
        req: &Req,
        ttl: Duration,
        call: F,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
        F: FnOnce(Client, tonic::Request<pb::RaftPayload>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::RaftPayload>, tonic::Status>>,
    {
        let data = codec::encode(what, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(pb::RaftPayload { data });
        request.set_timeout(ttl);
        let reply = call(self.client()?, request).await.map_err(status_to_rpc)?;
        self.decode_reply(what, &reply.into_inner().data)
    }

    /// A reply's payload: `Result<Resp, E>` in the codec, `E` being the
    /// peer's own error.
    // The error type is openraft's `RPCError`, which its network trait returns.
    #[allow(clippy::result_large_err)]
    fn decode_reply<Resp, E>(&self, what: &'static str, data: &[u8]) -> Result<Resp, RpcErr<E>>
    where
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let result: Result<Resp, E> =
            codec::decode(what, data).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result
            .map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, BasicNode::new(&self.addr), e)))
    }

    /// One AppendEntries on the stream (opened first if needed). The stream
    /// is taken out while the call runs and put back only after a reply, so
    /// a call dropped at its deadline leaves none behind.
    async fn streamed_append(&mut self, request: pb::RaftPayload) -> Result<pb::RaftPayload, tonic::Status> {
        // A stream whose connection closed while idle (the peer restarted)
        // is replaced now instead of failing this call.
        let open = self.appends.take().filter(|s| !s.requests.is_closed());
        let mut stream = match open {
            Some(stream) => {
                stream.requests.send(request).await.map_err(|_| tonic::Status::unavailable("append stream closed"))?;
                stream
            }
            None => {
                // The first request is queued before the call, so it goes out
                // with the stream's headers instead of a round trip later.
                let (requests, queued) = mpsc::channel(1);
                requests.try_send(request).map_err(|_| tonic::Status::internal("append stream queue"))?;
                let channel = self
                    .channel
                    .clone()
                    .ok_or_else(|| tonic::Status::unavailable(format!("bad peer address {}", self.addr)))?;
                let replies = client(channel, &self.cluster)
                    .append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(queued))
                    .await?
                    .into_inner();
                AppendStream { requests, replies }
            }
        };
        let reply = stream.replies.message().await?.ok_or_else(|| tonic::Status::unavailable("append stream ended"))?;
        self.appends = Some(stream);
        Ok(reply)
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        // Send the longest prefix within the byte budget (at least one entry)
        // and report a partial success; openraft sends the rest next.
        let mut bytes = 0;
        let cut = rpc.entries.iter().enumerate().position(|(i, e)| {
            bytes += entry_bytes(e);
            i > 0 && bytes > APPEND_BUDGET
        });
        let sent_upto = cut.map(|i| {
            rpc.entries.truncate(i);
            rpc.entries.last().map(|e| e.log_id)
        });
        // openraft may count this leader's own copy of an entry towards its
        // commit while the copy still syncs; a follower hears of the commit
        // once it has synced, and applies nothing the leader could lose. A
        // message with only the commit (openraft sends one as soon as an
        // entry commits) waits a little for a sync in progress, so followers
        // and their watchers do not learn of the commit a heartbeat late;
        // one carrying entries goes at once (the next carries the commit).
        if let Some(sync) = &self.log_sync {
            let patience =
                if rpc.entries.is_empty() { COMMIT_PATIENCE.min(option.hard_ttl() / 2) } else { Duration::ZERO };
            rpc.leader_commit = sync.announceable(rpc.leader_commit, patience).await;
        }
        let streamed = if self.unary_appends {
            None
        } else {
            let data = codec::encode("append entries", &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
            let call = self.streamed_append(pb::RaftPayload { data });
            match tokio::time::timeout(option.hard_ttl(), call).await {
                Ok(Ok(reply)) => Some(reply),
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(peer = %self.addr, "the peer serves no AppendEntries stream; using unary calls");
                    self.unary_appends = true;
                    None
                }
                Ok(Err(status)) => return Err(status_to_rpc(status)),
                Err(elapsed) => return Err(RPCError::Network(NetworkError::new(&elapsed))),
            }
        };
        let resp: AppendEntriesResponse<NodeId> = match streamed {
            Some(reply) => self.decode_reply("append entries", &reply.data)?,
            None => {
                let reply =
                    self.unary("append entries", &rpc, option.hard_ttl(), |mut c, r| async move {
                        c.append_entries(r).await
                    })
                    .await;
                if let Err(RPCError::Unreachable(_)) = &reply {
                    // Down, maybe for an upgrade: try the stream again once it is back.
                    self.unary_appends = false;
                }
                reply?
            }
        };
        Ok(match (resp, sent_upto) {
            (AppendEntriesResponse::Success, Some(upto)) => AppendEntriesResponse::PartialSuccess(upto),
            (resp, _) => resp,
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.unary("vote", &rpc, option.hard_ttl(), |mut c, r| async move { c.vote(r).await }).await
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<RaftError<NodeId, InstallSnapshotError>>> {
        // openraft 0.9 sends snapshots through `full_snapshot`, which Ferry
        // implements as one stream; this chunk-at-a-time API is never used.
        Err(RPCError::Network(NetworkError::new(&std::io::Error::other(
            "ferry sends snapshots with full_snapshot (one stream)",
        ))))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote<NodeId>,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let io = |e: std::io::Error| StreamingError::Network(NetworkError::new(&e));
        let header = codec::encode("snapshot header", &(&vote, &snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let mut file = snapshot.snapshot;
        file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
        // A reader task feeds a small bounded queue; it stops when the
        // stream is dropped (cancel, timeout) because sends then fail.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::SnapshotChunk>(4);
        tokio::spawn(async move {
            let mut header = Some(header);
            loop {
                let mut buf = vec![0u8; SNAPSHOT_CHUNK];
                let mut filled = 0;
                while filled < buf.len() {
                    match file.read(&mut buf[filled..]).await {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) => {
                            // Ends the stream early: the follower rejects a truncated snapshot.
                            tracing::warn!(error = %e, "reading snapshot file for a follower failed");
                            return;
                        }
                    }
                }
                buf.truncate(filled);
                let last = filled < SNAPSHOT_CHUNK;
                let chunk = pb::SnapshotChunk { header: header.take().unwrap_or_default(), data: buf };
                if tx.send(chunk).await.is_err() || last {
                    return;
                }
            }
        });
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut client = self.client::<Fatal<NodeId>>().map_err(|e| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        let mut request = tonic::Request::new(chunks);
        request.set_timeout(self.snapshot_timeout);
        let reply = tokio::select! {
            reply = client.install_snapshot(request) => reply,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply.map_err(|status| match status_to_rpc::<Fatal<NodeId>>(status) {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::new(&other)),
        })?;
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            codec::decode("snapshot reply", &reply.into_inner().data)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            StreamingError::RemoteError(RemoteError::new_with_node(self.target, BasicNode::new(&self.addr), e))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use futures::StreamExt;

    use super::*;

    fn peer(addr: std::net::SocketAddr) -> PeerNetwork {
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
        PeerNetwork {
            target: 2,
            addr: addr.to_string(),
            channel: Some(channel),
            snapshot_timeout: Duration::from_secs(1),
            appends: None,
            unary_appends: false,
            log_sync: None,
            cluster: ClusterId::unknown(),
        }
    }

    /// Asks the node at `addr` for a vote, giving up after `timeout`.
    async fn vote_at(addr: std::net::SocketAddr, timeout: Duration) -> Result<VoteResponse<NodeId>, RpcErr> {
        let vote = VoteRequest::new(Vote::new(1, 1), None);
        peer(addr).unary("vote", &vote, timeout, |mut c, r| async move { c.vote(r).await }).await
    }

    #[tokio::test]
    async fn a_peer_that_answers_late_is_retried_and_one_that_refuses_is_backed_off_from() {
        // Accepts connections and never answers, like a node stalled on its disk.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                open.push(socket);
            }
        });
        let late = vote_at(addr, Duration::from_millis(50)).await;
        assert!(matches!(late, Err(RPCError::Network(_))), "{late:?}");

        // Nothing listens: the connection is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let refused = vote_at(closed, Duration::from_secs(1)).await;
        assert!(matches!(refused, Err(RPCError::Unreachable(_))), "{refused:?}");
    }

    /// A follower that answers every AppendEntries with `HigherVote` of the
    /// request's own vote, so a reply shows which request it answers.
    #[derive(Clone, Default)]
    struct Echo {
        /// Serves `AppendEntriesStream` (else: unimplemented, as before it).
        streams: bool,
        /// The first request on the first stream is answered this late.
        first_late: Duration,
        opened: Arc<AtomicUsize>,
        unary: Arc<AtomicUsize>,
        /// The commit index of every request, in order.
        commits: Arc<std::sync::Mutex<Vec<Option<u64>>>>,
    }

    fn echo(data: &[u8], commits: &std::sync::Mutex<Vec<Option<u64>>>) -> Result<pb::RaftPayload, tonic::Status> {
        let req: AppendEntriesRequest<TypeConfig> = codec::decode("append entries", data).unwrap();
        commits.lock().unwrap().push(req.leader_commit.map(|c| c.index));
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::HigherVote(req.vote));
        Ok(pb::RaftPayload { data: codec::encode("append entries", &reply).unwrap() })
    }

    type Replies = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::RaftPayload, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl pb::raft_service_server::RaftService for Echo {
        async fn append_entries(
            &self,
            request: tonic::Request<pb::RaftPayload>,
        ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            echo(&request.into_inner().data, &self.commits).map(tonic::Response::new)
        }

        type AppendEntriesStreamStream = Replies;

        async fn append_entries_stream(
            &self,
            request: tonic::Request<tonic::Streaming<pb::RaftPayload>>,
        ) -> Result<tonic::Response<Replies>, tonic::Status> {
            if !self.streams {
                return Err(tonic::Status::unimplemented("not in this version"));
            }
            let late = if self.opened.fetch_add(1, Ordering::SeqCst) == 0 { self.first_late } else { Duration::ZERO };
            let commits = self.commits.clone();
            let replies = futures::StreamExt::enumerate(request.into_inner()).then(move |(i, request)| {
                let commits = commits.clone();
                async move {
                    if i == 0 {
                        tokio::time::sleep(late).await;
                    }
                    echo(&request?.data, &commits)
                }
            });
            Ok(tonic::Response::new(Box::pin(replies)))
        }

        async fn vote(
            &self,
            _: tonic::Request<pb::RaftPayload>,
        ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("vote"))
        }

        async fn install_snapshot(
            &self,
            _: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
        ) -> Result<tonic::Response<pb::RaftPayload>, tonic::Status> {
            Err(tonic::Status::unimplemented("snapshot"))
        }

        async fn read_index(
            &self,
            _: tonic::Request<pb::ReadIndexRequest>,
        ) -> Result<tonic::Response<pb::ReadIndexResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("read index"))
        }

        async fn timeout_now(
            &self,
            _: tonic::Request<pb::TimeoutNowRequest>,
        ) -> Result<tonic::Response<pb::TimeoutNowResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("timeout now"))
        }
    }

    async fn serve(peer: Echo) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_on(listener, peer, std::future::pending()));
        addr
    }

    /// Serves `peer` on `listener` until `stop` completes.
    async fn serve_on(listener: tokio::net::TcpListener, peer: Echo, stop: impl Future<Output = ()>) {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder()
            .add_service(pb::raft_service_server::RaftServiceServer::new(peer))
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .unwrap();
    }

    async fn append(net: &mut PeerNetwork, term: u64, ttl: Duration) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let rpc =
            AppendEntriesRequest { vote: Vote::new(term, 1), prev_log_id: None, entries: vec![], leader_commit: None };
        net.append_entries(rpc, RPCOption::new(ttl)).await
    }

    #[tokio::test]
    async fn followers_hear_of_no_commit_beyond_the_leaders_synced_log() {
        let follower = Echo { streams: true, ..Default::default() };
        let mut net = peer(serve(follower.clone()).await);
        let id = |index| openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), index);
        net.log_sync = Some(LogSync::new(Some(id(3))));
        for commit in [None, Some(2), Some(3), Some(5)] {
            let rpc = AppendEntriesRequest {
                vote: Vote::new_committed(1, 1),
                prev_log_id: None,
                entries: vec![],
                leader_commit: commit.map(id),
            };
            net.append_entries(rpc, RPCOption::new(Duration::from_secs(5))).await.unwrap();
        }
        assert_eq!(*follower.commits.lock().unwrap(), [None, Some(2), Some(3), Some(3)]);
    }

    #[tokio::test]
    async fn appends_share_one_stream_and_a_late_reply_is_not_taken_for_the_next_request() {
        let follower = Echo { streams: true, first_late: Duration::from_millis(300), ..Default::default() };
        let mut net = peer(serve(follower.clone()).await);
        let late = append(&mut net, 1, Duration::from_millis(100)).await;
        assert!(matches!(late, Err(RPCError::Network(_))), "{late:?}");
        for term in 2..=4 {
            let reply = append(&mut net, term, Duration::from_secs(5)).await.unwrap();
            assert_eq!(reply, AppendEntriesResponse::HigherVote(Vote::new(term, 1)));
        }
        // The stream of the late reply was dropped; the next one served all three.
        assert_eq!(follower.opened.load(Ordering::SeqCst), 2);
        assert_eq!(follower.unary.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_appends() {
        let follower = Echo::default();
        let mut net = peer(serve(follower.clone()).await);
        for term in 1..=3 {
            let reply = append(&mut net, term, Duration::from_secs(5)).await.unwrap();
            assert_eq!(reply, AppendEntriesResponse::HigherVote(Vote::new(term, 1)));
        }
        assert_eq!(follower.unary.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_peer_back_from_an_upgrade_gets_the_stream_again() {
        // The version before the stream: appends go as unary calls.
        let old = Echo::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, old.clone(), async {
            let _ = stopped.await;
        }));
        let mut net = peer(addr);
        append(&mut net, 1, Duration::from_secs(5)).await.unwrap();
        assert_eq!(old.unary.load(Ordering::SeqCst), 1);

        // Stopped for the upgrade: unreachable.
        stop.send(()).unwrap();
        server.await.unwrap();
        let down = append(&mut net, 2, Duration::from_secs(5)).await;
        assert!(matches!(down, Err(RPCError::Unreachable(_))), "{down:?}");

        // Back on the same address, upgraded: the appends take the stream.
        let new = Echo { streams: true, ..Default::default() };
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(serve_on(listener, new.clone(), std::future::pending()));
        for term in 3..=5 {
            let reply = append(&mut net, term, Duration::from_secs(5)).await.unwrap();
            assert_eq!(reply, AppendEntriesResponse::HigherVote(Vote::new(term, 1)));
        }
        assert_eq!(new.opened.load(Ordering::SeqCst), 1, "one stream for all three appends");
        assert_eq!(new.unary.load(Ordering::SeqCst), 0);
        assert_eq!(old.unary.load(Ordering::SeqCst), 1);
    }
}
