//! What the `kv` workloads run against: a key-value store reached over the
//! network ([`Target`]), with one put connection per simulated client and
//! prefix watches. Ferry implements it here; etcd in [`crate::etcd`] (behind
//! the `etcd` feature), so both sides run the very same workload code.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_sdk::{Client, ClientOptions};

/// A store under test.
pub trait Target: Send + Sync {
    /// One client's connection for puts.
    type Conn: Conn;
    /// A live prefix watch.
    type Watch: Watch;

    /// Opens a client connection of its own (one per simulated client).
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;

    /// Starts a watch on keys under `prefix` for changes after now, and
    /// returns once the store has confirmed it, so no later put is missed.
    fn watch(&self, prefix: &str) -> impl Future<Output = anyhow::Result<Self::Watch>> + Send;

    /// Log fsyncs on the leader so far, where the store counts them.
    fn log_fsyncs(&self) -> impl Future<Output = anyhow::Result<Option<u64>>> + Send;
}

/// A put connection. Clones share the connection.
pub trait Conn: Clone + Send + Sync + 'static {
    /// Writes `value` under `key` and waits for the store's acknowledgement
    /// (committed by a quorum).
    fn put(&self, key: String, value: Vec<u8>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A prefix watch.
pub trait Watch: Send + 'static {
    /// The values of the put events in the next message (empty for a
    /// message without any); `None` once the stream has ended.
    fn next_values(&mut self) -> impl Future<Output = anyhow::Result<Option<Vec<Vec<u8>>>>> + Send;
}

/// A Ferry cluster, reached with the SDK.
pub struct Ferry {
    /// Leader first, so every client starts at the leader as the SDK would
    /// settle on anyway.
    endpoints: Vec<String>,
    leader: String,
    /// Answers status calls (the leader's fsync counter).
    probe: Client,
    security: ferry_sdk::Security,
}

impl Ferry {
    /// Finds the leader of the cluster at `endpoints`.
    pub async fn new(endpoints: &[String], security: ferry_sdk::Security) -> anyhow::Result<Self> {
        let probe = Client::connect(endpoints, security.clone())?;
        let status = probe.status().await.context("cluster status")?;
        if status.leader_addr.is_empty() {
            bail!("the Ferry cluster has no leader");
        }
        let leader = status.leader_addr;
        let mut ordered = vec![leader.clone()];
        ordered.extend(endpoints.iter().filter(|e| **e != leader).cloned());
        Ok(Self { endpoints: ordered, leader, probe, security })
    }

    /// The leader's address.
    pub fn leader(&self) -> &str {
        &self.leader
    }

    fn client(&self) -> anyhow::Result<Client> {
        let options = ClientOptions {
            request_timeout: Duration::from_secs(10),
            security: Some(self.security.clone()),
            ..Default::default()
        };
        Ok(Client::with_options(&self.endpoints, options)?)
    }
}

impl Target for Ferry {
    type Conn = Client;
    type Watch = ferry_sdk::Watch;

    async fn connect(&self) -> anyhow::Result<Client> {
        self.client()
    }

    async fn watch(&self, prefix: &str) -> anyhow::Result<ferry_sdk::Watch> {
        let mut watch = self.client()?.watch(prefix, 0);
        // A watch "from now" opens with a progress message saying where now
        // is: after it, every change is delivered.
        match tokio::time::timeout(Duration::from_secs(10), watch.next()).await {
            Ok(Some(Ok(first))) if first.events.is_empty() => Ok(watch),
            Ok(Some(Ok(_))) => bail!("the watch on '{prefix}' opened with changes: the prefix is not fresh"),
            Ok(Some(Err(e))) => Err(e).context("starting a watch"),
            Ok(None) => bail!("the watch ended before it started"),
            Err(_) => bail!("the watch did not start within 10 s"),
        }
    }

    async fn log_fsyncs(&self) -> anyhow::Result<Option<u64>> {
        let status = self.probe.status_of(&self.leader).await.context("leader status")?;
        Ok(Some(status.log_flushes))
    }
}

impl Conn for Client {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        Client::put(self, &key, value).await?;
        Ok(())
    }
}

impl Watch for ferry_sdk::Watch {
    async fn next_values(&mut self) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        match self.next().await {
            None => Ok(None),
            Some(Err(e)) => Err(e).context("watch"),
            // A snapshot (the watcher fell behind the history) holds current
            // values, not deliveries: left out, so it shows as undelivered.
            Some(Ok(msg)) if msg.snapshot => Ok(Some(Vec::new())),
            Some(Ok(msg)) => Ok(Some(
                msg.events
                    .into_iter()
                    .filter(|e| e.r#type == ferry_proto::pb::event::Type::Put as i32)
                    .filter_map(|e| e.kv.map(|kv| kv.value))
                    .collect(),
            )),
        }
    }
}

/// Stands in for etcd when the bench is built without the `etcd` feature:
/// no value of it exists, so the etcd side never runs.
#[cfg(not(feature = "etcd"))]
#[derive(Clone)]
pub enum Absent {}

#[cfg(not(feature = "etcd"))]
impl Target for Absent {
    type Conn = Absent;
    type Watch = Absent;

    async fn connect(&self) -> anyhow::Result<Absent> {
        match *self {}
    }

    async fn watch(&self, _prefix: &str) -> anyhow::Result<Absent> {
        match *self {}
    }

    async fn log_fsyncs(&self) -> anyhow::Result<Option<u64>> {
        match *self {}
    }
}

#[cfg(not(feature = "etcd"))]
impl Conn for Absent {
    async fn put(&self, _key: String, _value: Vec<u8>) -> anyhow::Result<()> {
        match *self {}
    }
}

#[cfg(not(feature = "etcd"))]
impl Watch for Absent {
    async fn next_values(&mut self) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        match *self {}
    }
}
