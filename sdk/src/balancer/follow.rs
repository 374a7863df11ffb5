//! Feeding a balancer from the registry, and handing its instances to tower.
//!
//! [`Balancer::follow`] applies the registry watch of a service (a full list
//! after every change), reconnecting with backoff. [`Balancer::discover`]
//! turns the balancer's list into a `tower::discover::Discover` stream, and
//! [`Balancer::channel`] into a tonic `Channel` that balances over it.
//! Both offer what a plain request may use: normal (not gray) instances,
//! suspect ones only when no healthy one is left. Ejection and strategies
//! are the balancer's own and do not apply there (tower balances with its
//! own power of two choices).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::channel::Change;
use tonic::transport::Channel;

use super::{Balancer, Instance};
use crate::client::{load_instances, store_instances};
use crate::Client;

/// First wait before re-opening a failed watch (doubles up to [`MAX_BACKOFF`]).
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between watch attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Buffer of the change streams (bounded: a stalled consumer stalls its feeder).
const CHANGE_BUFFER: usize = 64;

impl Balancer {
    /// Follows the registry's instance list of `service` from a background
    /// task: every list the watch sends goes through
    /// [`Balancer::update_from_registry`] (so an empty list wipes the
    /// instances only when they were deregistered explicitly; instances
    /// whose leases ended are kept). A broken watch is
    /// re-opened with backoff; the re-opened watch starts with the full list,
    /// so nothing is missed. The task stops when the balancer is dropped.
    /// Needs a tokio runtime.
    ///
    /// With the client's cache ([`crate::ClientOptions::cache_dir`]) every
    /// non-empty list the watch sends is stored (an empty one only when it
    /// emptied the balancer), and when the first attempt
    /// to open the watch finds the cluster unreachable the balancer is seeded
    /// from the stored list (stale) until the watch is back and replaces it.
    pub fn follow(&self, client: Client, service: impl Into<String>) {
        let service = service.into();
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            // Whether a list was applied (live or cached): the cached list
            // stands in once, before the first live one, never over it.
            let mut applied = false;
            loop {
                match client.watch_instances(&service).await {
                    Ok(mut stream) => loop {
                        match stream.message().await {
                            Ok(Some(list)) => {
                                // A non-empty list is stored before it is applied, so
                                // whoever sees the balancer change finds the cache
                                // current. An empty one is stored only once it emptied
                                // the balancer (every instance deregistered): a restart
                                // must not start from expiry or a glitch.
                                let cache = client.cache().cloned();
                                if let (false, Some(cache)) = (list.instances.is_empty(), cache.clone()) {
                                    store_instances(cache, service.clone(), list.clone()).await;
                                }
                                let Some(inner) = weak.upgrade() else { return };
                                let balancer = Balancer { inner };
                                let emptied = balancer.update_from_registry(&list)
                                    && !list.deregistered.is_empty()
                                    && balancer.instances().is_empty();
                                drop(balancer);
                                if let (true, Some(cache)) = (emptied, cache) {
                                    store_instances(cache, service.clone(), list).await;
                                }
                                applied = true;
                                backoff = FIRST_BACKOFF;
                            }
                            Ok(None) => {
                                tracing::debug!(%service, "instance watch ended; re-opening");
                                break;
                            }
                            Err(status) => {
                                tracing::debug!(%service, error = %status.message(), "instance watch failed; re-opening");
                                break;
                            }
                        }
                    },
                    Err(e) => {
                        tracing::debug!(%service, error = %e, "cannot open the instance watch; retrying");
                        let unreachable = matches!(e, crate::Error::Unavailable { .. });
                        if let (false, true, Some(cache)) = (applied, unreachable, client.cache()) {
                            applied = true;
                            if let Some((revision, list)) = load_instances(cache.clone(), service.clone()).await {
                                let Some(inner) = weak.upgrade() else { return };
                                tracing::debug!(%service, revision, "seeding from the cached instance list (stale)");
                                Balancer { inner }.update_from_registry(&list);
                            }
                        }
                    }
                }
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        });
        self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task.abort_handle());
    }

    /// The instances a plain request may use, as a `tower::discover::Discover`
    /// stream: `Change::Insert` (new or changed, keyed by instance id) and
    /// `Change::Remove`, starting with the current list. Fed by a task that
    /// ends when the balancer is dropped or the stream is. Needs a tokio
    /// runtime.
    pub fn discover(&self) -> impl Stream<Item = Result<Change<String, Instance>, Infallible>> + Send + 'static {
        let (tx, rx) = mpsc::channel(CHANGE_BUFFER);
        self.feed(tx, |i| Some(i.clone()));
        ReceiverStream::new(rx).map(Ok)
    }

    /// A tonic channel that balances over the instances a plain request may
    /// use (`http://address:port`, HTTP/2 keepalive), following the balancer's
    /// list. The endpoints stay as they were last when the balancer is dropped.
    /// Needs a tokio runtime.
    pub fn channel(&self) -> Channel {
        let (channel, tx) = Channel::balance_channel::<String>(CHANGE_BUFFER);
        self.feed(tx, |i| {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", i.authority()));
            match endpoint {
                Ok(e) => Some(
                    e.connect_timeout(Duration::from_millis(800))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5)),
                ),
                Err(err) => {
                    tracing::warn!(instance = %i.id, error = %err, "instance address is not a valid URI; skipped");
                    None
                }
            }
        });
        channel
    }

    /// Sends the changes of the plain-request set to `tx` from a task, mapping
    /// each instance through `to` (`None` skips it).
    fn feed<V, F>(&self, tx: mpsc::Sender<Change<String, V>>, to: F)
    where
        V: Send + 'static,
        F: Fn(&Instance) -> Option<V> + Send + 'static,
    {
        let mut rx = self.inner.snapshot.subscribe();
        tokio::spawn(async move {
            let mut known: BTreeMap<String, Arc<Instance>> = BTreeMap::new();
            loop {
                let list = rx.borrow_and_update().clone();
                let next: BTreeMap<String, Arc<Instance>> =
                    plain_set(&list).into_iter().map(|i| (i.id.clone(), i)).collect();
                for (id, inst) in &next {
                    if known.get(id) == Some(inst) {
                        continue;
                    }
                    // A changed instance is inserted again under its id: tower replaces it.
                    if let Some(v) = to(inst) {
                        if tx.send(Change::Insert(id.clone(), v)).await.is_err() {
                            return;
                        }
                    }
                }
                for id in known.keys().filter(|id| !next.contains_key(*id)) {
                    if tx.send(Change::Remove(id.clone())).await.is_err() {
                        return;
                    }
                }
                known = next;
                // Ends when the balancer (the sender) is gone.
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Normal instances, healthy ones if any, else the suspect ones.
fn plain_set(list: &[Arc<Instance>]) -> Vec<Arc<Instance>> {
    let normal: Vec<Arc<Instance>> = list.iter().filter(|i| !i.gray).cloned().collect();
    let healthy: Vec<Arc<Instance>> = normal.iter().filter(|i| !i.suspect).cloned().collect();
    if healthy.is_empty() {
        normal
    } else {
        healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::BalancerOptions;

    fn describe(c: &Change<String, Instance>) -> String {
        match c {
            Change::Insert(id, i) => format!("+{id}:{}", i.port),
            Change::Remove(id) => format!("-{id}"),
        }
    }

    async fn next(s: &mut (impl Stream<Item = Result<Change<String, Instance>, Infallible>> + Unpin)) -> String {
        match s.next().await {
            Some(Ok(c)) => describe(&c),
            None => "end".into(),
        }
    }

    #[tokio::test]
    async fn discover_streams_inserts_and_removes_by_id() {
        let b = Balancer::new(BalancerOptions::default());
        b.update([Instance::new("a", "h", 1), Instance::new("g", "h", 9).with_gray(true)]);
        let mut s = Box::pin(b.discover());
        assert_eq!(next(&mut s).await, "+a:1");
        b.update([Instance::new("a", "h", 2), Instance::new("b", "h", 3)]);
        assert_eq!(next(&mut s).await, "+a:2");
        assert_eq!(next(&mut s).await, "+b:3");
        b.update([Instance::new("b", "h", 3)]);
        assert_eq!(next(&mut s).await, "-a");
        // Only suspects left: they are offered rather than nothing.
        b.update([Instance::new("s", "h", 4).with_suspect(true)]);
        assert_eq!(next(&mut s).await, "+s:4");
        assert_eq!(next(&mut s).await, "-b");
        drop(b);
        assert_eq!(next(&mut s).await, "end");
    }
}
