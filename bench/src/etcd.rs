//! etcd as the baseline of `ferry-bench kv` (feature `etcd`): three members
//! started from the `etcd` binary on loopback, in a directory of the bench's,
//! reached with the `etcd-client` crate.
//!
//! The members are ours for the bench's lifetime only: dropping [`Etcd`]
//! kills and reaps them (also when the bench fails or is interrupted, since
//! the future that owns it is dropped), and each member asks the kernel to
//! kill it if the bench process dies without unwinding.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Client, ConnectOptions, EventType, KvClient, WatchOptions, WatchStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::kv_target::{Conn, Target, Watch};
use crate::procs::{free_ports, log_tail, spawn_logged};

/// How long three fresh members get to elect a leader.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `etcd` on `PATH`, if any.
pub fn find_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("etcd")).find(|p| p.is_file())
}

struct Member {
    child: Child,
    client_url: String,
    log: PathBuf,
}

/// A running three-member etcd cluster and its leader.
pub struct Etcd {
    members: Vec<Member>,
    leader_url: String,
    version: String,
}

fn connect_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(2)).with_timeout(Duration::from_secs(10))
}

impl Etcd {
    /// Starts three members of `bin` with their data and logs under `dir`,
    /// and waits until they agree on a leader.
    ///
    /// Durability matches Ferry's: etcd fsyncs its WAL before acknowledging
    /// (its default; `--unsafe-no-fsync` is not given), as Ferry fsyncs its
    /// log.
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(6)?;
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", ports[2 * i + 1]);
        let initial_cluster = (0..3).map(|i| format!("m{i}={}", peer_url(i))).collect::<Vec<_>>().join(",");
        let mut etcd = Etcd { members: Vec::new(), leader_url: String::new(), version: String::new() };
        for i in 0..3 {
            let client_url = format!("http://127.0.0.1:{}", ports[2 * i]);
            let log = dir.join(format!("m{i}.log"));
            let mut cmd = Command::new(bin);
            cmd.arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}")))
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url(i), "--initial-advertise-peer-urls", &peer_url(i)])
                .args(["--initial-cluster", &initial_cluster, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("ferry-bench-{}", std::process::id())])
                .args(["--logger", "zap", "--log-level", "warn"]);
            let child = spawn_logged(cmd, &log).with_context(|| format!("starting {}", bin.display()))?;
            etcd.members.push(Member { child, client_url, log });
        }
        etcd.wait_leader().await?;
        Ok(etcd)
    }

    async fn wait_leader(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(status) = m.child.try_wait()? {
                    bail!("etcd member m{i} exited ({status}) while starting:\n{}", log_tail(&m.log));
                }
            }
            if let Some((leader_url, version)) = self.leader().await {
                self.leader_url = leader_url;
                self.version = version;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd elected no leader within {START_TIMEOUT:?}; logs in {:?}", self.members[0].log.parent());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The leader's client URL and etcd's version, once every member
    /// answers and names the same leader.
    async fn leader(&self) -> Option<(String, String)> {
        let mut seen = Vec::new();
        for m in &self.members {
            let client = Client::connect([&m.client_url], Some(connect_options())).await.ok()?;
            let status = client.maintenance_client().status().await.ok()?;
            let id = status.header()?.member_id();
            seen.push((id, status.leader(), m.client_url.clone(), status.version().to_string()));
        }
        let leader = seen[0].1;
        if leader == 0 || seen.iter().any(|s| s.1 != leader) {
            return None;
        }
        seen.into_iter().find(|s| s.0 == leader).map(|s| (s.2, s.3))
    }

    /// The leader's client URL.
    pub fn leader_url(&self) -> &str {
        &self.leader_url
    }

    /// The members' version, as they report it.
    pub fn version(&self) -> &str {
        &self.version
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Blocks for the moment SIGKILL takes, so no member outlives the
        // bench or writes into a directory being removed.
        for m in &mut self.members {
            m.child.kill().ok();
            m.child.wait().ok();
        }
    }
}

impl Target for Etcd {
    type Conn = KvClient;
    type Watch = WatchStream;

    async fn connect(&self) -> anyhow::Result<KvClient> {
        // The leader only, as Ferry's clients go to the leader: a follower
        // would forward each put to it.
        let client = Client::connect([&self.leader_url], Some(connect_options()))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.leader_url))?;
        Ok(client.kv_client())
    }

    async fn watch(&self, prefix: &str) -> anyhow::Result<WatchStream> {
        let client = Client::connect([&self.leader_url], Some(connect_options())).await?;
        let mut stream = client.watch_client().watch(prefix, Some(WatchOptions::new().with_prefix())).await?;
        let started = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = stream.message().await? {
                if msg.created() {
                    return Ok(());
                }
            }
            bail!("the watch stream ended before the watch was created")
        });
        started.await.context("the etcd watch did not start within 10 s")??;
        Ok(stream)
    }

    async fn log_fsyncs(&self) -> anyhow::Result<Option<u64>> {
        let metrics = http_get(&self.leader_url, "/metrics").await?;
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix("etcd_disk_wal_fsync_duration_seconds_count "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .map(|n| n as u64))
    }
}

/// A plain HTTP/1.0 GET (etcd serves `/metrics` on its client port).
async fn http_get(url: &str, path: &str) -> anyhow::Result<String> {
    let addr = url.trim_start_matches("http://");
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .with_context(|| format!("GET {url}{path}: no answer within 5 s"))?
        .with_context(|| format!("GET {url}{path}"))
}

impl Conn for KvClient {
    async fn put(&self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        KvClient::put(&mut self.clone(), key, value, None).await?;
        Ok(())
    }
}

impl Watch for WatchStream {
    async fn next_values(&mut self) -> anyhow::Result<Option<Vec<Vec<u8>>>> {
        let Some(msg) = self.message().await? else { return Ok(None) };
        if msg.canceled() {
            bail!("etcd canceled the watch: {}", msg.cancel_reason());
        }
        Ok(Some(
            msg.events()
                .iter()
                .filter(|e| e.event_type() == EventType::Put)
                .filter_map(|e| e.kv().map(|kv| kv.value().to_vec()))
                .collect(),
        ))
    }
}
