//! Several schedulers in one process on loopback: `ferry dev`, benchmarks and
//! tests. Each node is a full [`Scheduler`] on real sockets with its own data
//! directory; only the process is shared. Connections are mutual TLS under a
//! throwaway CA kept in `ROOT/tls` ([`LocalCluster::credentials`] issues
//! more certificates from it), unless the tweak asks for `insecure`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ferry_tls::{Authority, Credentials, Identity, Security};
use tokio::net::TcpListener;

use crate::config::SchedulerConfig;
use crate::error::Error;
use crate::server::Scheduler;

/// A cluster of in-process schedulers.
pub struct LocalCluster {
    /// The nodes, ids 1..=n in order.
    pub nodes: Vec<Scheduler>,
    /// Where the CA and the certificates are.
    tls_dir: PathBuf,
    /// The hosts certificates name (the listening address and `localhost`).
    hosts: Vec<String>,
}

/// The files of `identity`'s certificate in `dir`, issued by the CA there
/// unless they are there already.
fn issue(dir: &Path, identity: &Identity, hosts: &[String]) -> Result<ferry_tls::Files, Error> {
    let stem = ferry_tls::authority::file_stem(identity);
    let files = ferry_tls::Files {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    authority(dir)?
        .write_holder(dir, identity, hosts)
        .map_err(|e| Error::Config(crate::config::ConfigError { field: "tls", reason: e.to_string() }))
}

/// The CA kept in `dir` (made on first use).
fn authority(dir: &Path) -> Result<Authority, Error> {
    let tls = |e: ferry_tls::Error| Error::Config(crate::config::ConfigError { field: "tls", reason: e.to_string() });
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() && key.exists() {
        return Authority::load(&cert, &key).map_err(tls);
    }
    std::fs::create_dir_all(dir).map_err(|e| tls(ferry_tls::Error::Issue(format!("{}: {e}", dir.display()))))?;
    let ca = Authority::new("local").map_err(tls)?;
    ca.write(dir).map_err(tls)?;
    Ok(ca)
}

async fn bind(ip: IpAddr, base: u16, offset: u16) -> Result<TcpListener, Error> {
    let port = if base == 0 { 0 } else { base + offset };
    let addr = SocketAddr::new(ip, port);
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr: addr.to_string(), source })
}

impl LocalCluster {
    /// Starts `n` nodes with data under `root`. gRPC ports are `grpc_base`,
    /// `grpc_base + 1`, ... (0: ephemeral); admin ports likewise when
    /// `admin_base` is set. `tweak` adjusts each node's config.
    pub async fn start(
        root: &Path,
        n: u16,
        grpc_base: u16,
        admin_base: Option<u16>,
        tweak: impl Fn(&mut SchedulerConfig),
    ) -> Result<Self, Error> {
        Self::start_on(IpAddr::V4(Ipv4Addr::LOCALHOST), root, n, grpc_base, admin_base, tweak).await
    }

    /// Like [`LocalCluster::start`], listening on `ip` instead of loopback.
    pub async fn start_on(
        ip: IpAddr,
        root: &Path,
        n: u16,
        grpc_base: u16,
        admin_base: Option<u16>,
        tweak: impl Fn(&mut SchedulerConfig),
    ) -> Result<Self, Error> {
        let mut grpc = Vec::new();
        let mut admin = Vec::new();
        for i in 0..n {
            grpc.push(bind(ip, grpc_base, i).await?);
            admin.push(match admin_base {
                Some(base) => Some(bind(ip, base, i).await?),
                None => None,
            });
        }
        let mut addrs = Vec::new();
        for l in &grpc {
            addrs.push(l.local_addr().map_err(|source| Error::Bind { addr: ip.to_string(), source })?.to_string());
        }
        let members = addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let tls_dir = root.join("tls");
        let hosts = vec![ip.to_string(), "localhost".to_string()];
        let mut nodes = Vec::new();
        for (i, (g, a)) in grpc.into_iter().zip(admin).enumerate() {
            let id = i as u64 + 1;
            let mut config = SchedulerConfig {
                id,
                data: root.join(format!("s{id}")),
                initial_cluster: members.clone(),
                shares_runtime: true,
                ..SchedulerConfig::default()
            };
            tweak(&mut config);
            if !config.insecure && config.tls == ferry_tls::TlsConfig::default() {
                config.tls = issue(&tls_dir, &Identity::Scheduler(id), &hosts)?.into();
            }
            nodes.push(Scheduler::start_with(config, g, a).await?);
        }
        Ok(Self { nodes, tls_dir, hosts })
    }

    /// Where the CA (`ca.pem`, `ca-key.pem`) and the certificates are.
    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// The files of `identity`'s certificate from this cluster's CA, issued
    /// on first use.
    pub fn files(&self, identity: &Identity) -> Result<ferry_tls::Files, Error> {
        issue(&self.tls_dir, identity, &self.hosts)
    }

    /// Credentials for `identity` from this cluster's CA (issued and
    /// written into [`LocalCluster::tls_dir`] on first use), or plaintext
    /// when the cluster runs insecure.
    pub fn credentials(&self, identity: &Identity) -> Result<Security, Error> {
        if self.nodes.first().is_some_and(|n| n.node().peers.security().is_insecure()) {
            return Ok(Security::Insecure);
        }
        Credentials::load(self.files(identity)?)
            .map(Security::Tls)
            .map_err(|e| Error::Config(crate::config::ConfigError { field: "tls", reason: e.to_string() }))
    }

    /// The gRPC addresses, node 1 first.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr().to_string()).collect()
    }

    /// Waits (up to `timeout`) until every node knows the same leader.
    pub async fn wait_leader(&self, timeout: std::time::Duration) -> Option<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leaders: Vec<_> = self.nodes.iter().map(|n| n.node().leader().map(|l| l.0)).collect();
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*first)) {
                    return Some(*first);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}
