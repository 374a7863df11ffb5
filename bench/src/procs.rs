//! Clusters as child processes: [`FerryProcs`], three `ferry scheduler`
//! processes, so a store runs on its own threads rather than sharing the
//! bench's runtime with the load generator. (The helpers for children,
//! ports and logs are `ferry_lab::procs`, shared with the chaos harness.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_sdk::tls::Identity;
use ferry_sdk::Security;

use crate::tls::BenchCa;
pub use ferry_lab::procs::{free_ports, log_tail, spawn_logged};

/// The `ferry` binary beside this bench's own (`cargo build --release -p
/// ferry` puts both in `target/release`), if it is there.
pub fn ferry_beside_bench() -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.parent()?.join("ferry");
    path.is_file().then_some(path)
}

/// Three `ferry scheduler` processes on loopback; killed on drop.
pub struct FerryProcs {
    children: Vec<(Child, PathBuf)>,
    endpoints: Vec<String>,
    security: Security,
}

impl FerryProcs {
    /// Starts three nodes of `bin` with data and logs under `dir` and waits
    /// until they agree on a leader; under mutual TLS (a CA of their own in
    /// `dir/tls`) unless `insecure`.
    pub async fn start(bin: &Path, dir: &Path, insecure: bool) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(3)?;
        let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let members = endpoints.iter().enumerate().map(|(i, e)| format!("{}={e}", i + 1)).collect::<Vec<_>>();
        let ca = if insecure { None } else { Some(BenchCa::new(&dir.join("tls"))?) };
        let security = match &ca {
            Some(ca) => ca.client()?,
            None => Security::Insecure,
        };
        let mut procs = FerryProcs { children: Vec::new(), endpoints, security };
        for (i, listen) in procs.endpoints.clone().iter().enumerate() {
            let mut cmd = Command::new(bin);
            cmd.arg("scheduler")
                .args(["--id", &(i + 1).to_string(), "--listen", listen])
                .arg("--data")
                .arg(dir.join(format!("s{}", i + 1)))
                .args(["--initial-cluster", &members.join(",")])
                .env("RUST_LOG", std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()));
            match &ca {
                Some(ca) => cmd.args(ca.flags(&Identity::Scheduler(i as u64 + 1))?),
                None => cmd.arg("--insecure"),
            };
            let log = dir.join(format!("s{}.log", i + 1));
            let child = spawn_logged(cmd, &log).with_context(|| format!("starting {}", bin.display()))?;
            procs.children.push((child, log));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, (child, log)) in procs.children.iter_mut().enumerate() {
                if let Some(status) = child.try_wait()? {
                    bail!("ferry scheduler {} exited ({status}) while starting:\n{}", i + 1, log_tail(log));
                }
            }
            let client = ferry_sdk::Client::connect(&procs.endpoints, procs.security.clone())?;
            if client.status().await.is_ok_and(|s| !s.leader_addr.is_empty()) {
                return Ok(procs);
            }
            if Instant::now() > deadline {
                bail!("the ferry schedulers elected no leader within 20 s; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The nodes' gRPC addresses.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    /// How clients reach the nodes.
    pub fn security(&self) -> Security {
        self.security.clone()
    }
}

impl Drop for FerryProcs {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
    }
}
