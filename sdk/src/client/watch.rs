//! Watching config keys: [`Client::watch`] starts a background task that
//! keeps a watch on a prefix open across reconnects and leader changes,
//! resuming after the last revision it delivered; [`Watch`] is the handle
//! that reads from it.

use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::config_service_client::ConfigServiceClient;

use super::{Call, Client};
use crate::error::Error;

impl Client {
    /// Watches keys under `prefix` from `start_revision` (0: from now). The
    /// returned [`Watch`] reconnects on its own (to any scheduler) and
    /// resumes after the last revision it delivered, so it sees every
    /// change once and in order across leader changes.
    pub fn watch(&self, prefix: &str, start_revision: u64) -> Watch {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let client = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut next = start_revision;
            loop {
                let msg = pb::WatchRequest { prefix: prefix.clone(), start_revision: next, progress_interval_ms: 0 };
                let mut stream = match client.call(Call::stream("watch"), msg, ConfigServiceClient::watch).await {
                    Ok(s) => s,
                    Err(e) => {
                        // The cluster refused the request itself (a bad
                        // prefix, say): asking again would be refused again.
                        let refused = matches!(e, Error::Rejected(_) | Error::InvalidEndpoint(_));
                        if tx.send(Err(e)).await.is_err() || refused {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                while let Ok(Some(resp)) = stream.message().await {
                    let revision = resp.header.as_ref().map(|h| h.revision).unwrap_or(0);
                    // Past a snapshot only after its last part.
                    if revision + 1 > next && !(resp.snapshot && resp.more) {
                        next = revision + 1;
                    }
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
                tracing::debug!(next, "watch stream ended; resuming");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Watch { rx }
    }
}

/// A watch on keys under a prefix (see [`Client::watch`]). Dropping it stops
/// the watch.
pub struct Watch {
    rx: tokio::sync::mpsc::Receiver<Result<pb::WatchResponse, Error>>,
}

impl Watch {
    /// The next message: changes (in revision order), a snapshot of the
    /// current values (when the start revision was compacted), or progress.
    /// An `Err` reports a failed reconnect; the watch keeps trying, so
    /// `None` does not come while the `Watch` lives, unless the cluster
    /// refused the request ([`Error::Rejected`], say an over-long prefix):
    /// then that error comes, and `None` after it.
    pub async fn next(&mut self) -> Option<Result<pb::WatchResponse, Error>> {
        self.rx.recv().await
    }
}
