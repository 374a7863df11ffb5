//! The lease API: granting, revoking and inspecting leases, and keeping one
//! alive from a background task ([`Client::keep_alive`], the [`KeepAlive`]
//! handle that owns the task). Keys and registry instances bound to a lease
//! go when it ends.

use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::lease_service_client::LeaseServiceClient;

use super::{request_id, Client, Retry};
use crate::error::Error;

/// Unread answers a [`KeepAlive`] keeps (see [`Client::keep_alive`]).
pub const KEEP_ALIVE_BUFFER: usize = 16;

impl Client {
    /// A new lease with `ttl` (1 s to 1 day); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<u64, Error> {
        let msg = pb::LeaseGrantRequest { ttl_ms: ttl.as_millis() as u64, request_id: request_id() };
        self.call("lease grant", msg, LeaseServiceClient::grant).await.map(|r| r.id)
    }

    /// Ends a lease now; its keys are deleted.
    pub async fn revoke(&self, id: u64) -> Result<(), Error> {
        let msg = pb::LeaseRevokeRequest { id, request_id: request_id() };
        self.call("lease revoke", msg, LeaseServiceClient::revoke).await.map(|_| ())
    }

    /// A lease's TTL, time left on the leader's clock, and keys.
    pub async fn time_to_live(&self, id: u64) -> Result<pb::LeaseTimeToLiveResponse, Error> {
        self.call("lease ttl", pb::LeaseTimeToLiveRequest { id }, LeaseServiceClient::time_to_live).await
    }

    /// Keeps lease `id` alive from a background task until the returned
    /// handle is dropped: a keep-alive every third of the TTL, on a stream
    /// to the leader that follows leader changes. Each answer is passed on
    /// (`ttl_ms == 0`: the lease is gone, and the task stops).
    ///
    /// Reading the answers ([`KeepAlive::next`]) is optional: the renewals
    /// never wait for the reader. At most [`KEEP_ALIVE_BUFFER`] unread
    /// answers are kept; newer ones are dropped until the reader catches up,
    /// except the last (the lease is gone), which waits for room.
    pub fn keep_alive(&self, id: u64) -> KeepAlive {
        let (out, rx) = tokio::sync::mpsc::channel(KEEP_ALIVE_BUFFER);
        // Passes an answer on unless the reader is behind; false when the
        // handle is gone (its drop aborts this task, so that is brief).
        let report = |out: &tokio::sync::mpsc::Sender<_>, answer| {
            !matches!(out.try_send(answer), Err(tokio::sync::mpsc::error::TrySendError::Closed(_)))
        };
        let client = self.clone();
        let task = tokio::spawn(async move {
            let mut every = Duration::from_millis(300);
            loop {
                // Both ways a stream: no one message to clone per attempt,
                // so it opens through the retry policy directly.
                let opened = client
                    .call_with("lease keep-alive", Retry::Idempotent, |ch, _| async move {
                        let (tx, requests) = tokio::sync::mpsc::channel(4);
                        let _ = tx.send(pb::LeaseKeepAliveRequest { id }).await;
                        let stream = LeaseServiceClient::new(ch)
                            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(requests))
                            .await?
                            .into_inner();
                        Ok((tx, stream))
                    })
                    .await;
                let (tx, mut stream) = match opened {
                    Ok(s) => s,
                    Err(e) => {
                        if !report(&out, Err(e)) {
                            return;
                        }
                        tokio::time::sleep(every).await;
                        continue;
                    }
                };
                // A leader that vanished without a reset must not hold the
                // renewals up past the TTL: wait at most a third of it.
                while let Ok(Ok(Some(resp))) =
                    tokio::time::timeout(every.max(Duration::from_millis(500)), stream.message()).await
                {
                    if resp.ttl_ms == 0 {
                        // Nothing is left to renew, so waiting for room
                        // costs nothing, and the reader learns the end.
                        let _ = out.send(Ok(resp)).await;
                        return;
                    }
                    every = Duration::from_millis((resp.ttl_ms / 3).max(100));
                    if !report(&out, Ok(resp)) {
                        return;
                    }
                    tokio::time::sleep(every).await;
                    if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                        break;
                    }
                }
                tracing::debug!(id, "keep-alive stream ended; reconnecting");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        KeepAlive { rx, task }
    }
}

/// Keeps a lease alive while it lives (see [`Client::keep_alive`]).
///
/// Dropping it stops the renewals; it does not revoke the lease, which then
/// ends one TTL after the last renewal, taking its keys and registry
/// instances with it (a new leader first gives every lease its full TTL
/// again). To remove them at once, call [`Client::revoke`] (or
/// [`Client::deregister`] for an instance) before dropping it.
pub struct KeepAlive {
    rx: tokio::sync::mpsc::Receiver<Result<pb::LeaseKeepAliveResponse, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAlive {
    /// The next answer (or a failed reconnect; the task keeps trying).
    /// Answers that arrived while [`KEEP_ALIVE_BUFFER`] were waiting unread
    /// were dropped; `None` once the task ended (after the lease was gone).
    pub async fn next(&mut self) -> Option<Result<pb::LeaseKeepAliveResponse, Error>> {
        self.rx.recv().await
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
