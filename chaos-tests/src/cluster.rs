//! The cluster under test: real `ferry scheduler` processes on loopback,
//! each with its own data directory and log, that a nemesis can kill and
//! restart on the same directory.
//!
//! (Network namespaces per node, for partitions, come with the network
//! nemeses; until then every run is on loopback with process faults only,
//! and the report says so.)

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One scheduler.
pub struct Node {
    pub id: u64,
    pub addr: String,
    pub data: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// Starts so far (its log keeps every one).
    pub starts: usize,
}

/// Three (or more) schedulers; killed on drop.
pub struct Cluster {
    ferry: PathBuf,
    pub nodes: Vec<Node>,
    members: String,
}

/// Ports that were free a moment ago, below the kernel's ephemeral range.
fn free_ports(n: usize, seed: u64) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::new();
    let start = (std::process::id() as u64).wrapping_mul(7919).wrapping_add(seed) % 10_000;
    for i in 0..10_000u64 {
        if held.len() == n {
            break;
        }
        let port = 20_000 + ((start + i) % 10_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    anyhow::ensure!(held.len() == n, "found only {} free ports", held.len());
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

impl Cluster {
    /// Starts `n` schedulers of `ferry` under `dir` and waits for a leader.
    pub async fn start(ferry: &Path, dir: &Path, n: usize, seed: u64) -> anyhow::Result<Self> {
        let ports = free_ports(n, seed)?;
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let members = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let nodes = addrs
            .into_iter()
            .enumerate()
            .map(|(i, addr)| Node {
                id: i as u64 + 1,
                addr,
                data: dir.join(format!("s{}", i + 1)),
                log: dir.join(format!("s{}.log", i + 1)),
                child: None,
                starts: 0,
            })
            .collect();
        let mut cluster = Self { ferry: ferry.into(), nodes, members };
        for id in 1..=n as u64 {
            cluster.spawn(id)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn node(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[id as usize - 1]
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let (ferry, members) = (self.ferry.clone(), self.members.clone());
        let node = self.node(id);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut cmd = Command::new(&ferry);
        cmd.args(["scheduler", "--id", &id.to_string(), "--listen", &node.addr])
            .arg("--data")
            .arg(&node.data)
            .args(["--initial-cluster", &members])
            .env("RUST_LOG", std::env::var("FERRY_CHAOS_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the child dies with the harness.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        node.child = Some(cmd.spawn().with_context(|| format!("starting {}", ferry.display()))?);
        node.starts += 1;
        Ok(())
    }

    /// The schedulers' addresses.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    /// `kill -9`.
    pub fn kill9(&mut self, id: u64) {
        if let Some(mut child) = self.node(id).child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// `SIGSTOP` (`stop`) or `SIGCONT`: the process freezes, or goes on,
    /// with its sockets open.
    pub fn freeze(&mut self, id: u64, stop: bool) {
        if let Some(child) = &self.node(id).child {
            let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: a plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Starts a killed node again on the same data directory.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        self.kill9(id);
        self.spawn(id)
    }

    /// Whether node `id`'s process runs (as far as the harness knows).
    pub fn running(&mut self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    /// Nodes whose process exited on its own (a crash, or a refusal).
    pub fn exited(&mut self) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for node in &mut self.nodes {
            if let Some(Ok(Some(status))) = node.child.as_mut().map(|c| c.try_wait()) {
                out.push((node.id, status.to_string()));
                node.child = None;
            }
        }
        out
    }

    /// The leader's id as the running nodes report it.
    pub async fn leader(&self) -> Option<u64> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let client = ferry_sdk::Client::connect([node.addr.clone()]).ok()?;
            let status = tokio::time::timeout(Duration::from_millis(500), client.status_of(&node.addr)).await;
            if let Ok(Ok(status)) = status {
                if status.leader_id != 0 {
                    return Some(status.leader_id);
                }
            }
        }
        None
    }

    /// Waits until a leader is known.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader().await {
                return Ok(leader);
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's (applied index, digest), once all have applied the
    /// same index (or `timeout` passed: then what they have).
    pub async fn digests(&self, timeout: Duration) -> Vec<(u64, Result<(u64, String), String>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            for node in &self.nodes {
                let got = match ferry_sdk::Client::connect([node.addr.clone()]) {
                    Ok(client) => client
                        .state_digest_of(&node.addr)
                        .await
                        .map(|d| (d.applied_index, d.digest))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                out.push((node.id, got));
            }
            let applied: Vec<u64> = out.iter().filter_map(|(_, d)| d.as_ref().ok().map(|d| d.0)).collect();
            let settled = applied.len() == out.len() && applied.windows(2).all(|w| w[0] == w[1]);
            if settled || Instant::now() > deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Lines of the nodes' logs that show a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            out.extend(text.lines().filter(|l| l.contains("panicked")).map(|l| format!("node {}: {l}", node.id)));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                child.kill().ok();
                child.wait().ok();
            }
        }
    }
}
