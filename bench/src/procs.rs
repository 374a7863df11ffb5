//! Clusters as child processes: the helpers both the etcd members and
//! Ferry's scheduler processes use (free ports, children that die with the
//! bench, log tails), and [`FerryProcs`], three `ferry scheduler` processes,
//! so a store runs on its own threads rather than sharing the bench's
//! runtime with the load generator.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// `n` distinct ports that were free a moment ago, taken from below the
/// kernel's ephemeral range: a port the kernel hands out (to a client's
/// outgoing connection, or to a bind to port 0) could be taken by someone
/// else between this check and the child's bind.
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    const SPAN: u32 = 12_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_low.saturating_sub(SPAN).max(1_024);
    let span = ephemeral_low.saturating_sub(low).max(1);
    let start = std::process::id().wrapping_mul(7_919) % span;
    // Held until all are found, so they differ.
    let mut held = Vec::with_capacity(n);
    for i in 0..span {
        if held.len() == n {
            break;
        }
        let Ok(port) = u16::try_from(low + (start + i) % span) else { continue };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        bail!("found only {} free ports of {n} in {low}-{}", held.len(), low + span - 1);
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The last lines of a child's log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Starts `cmd` with stdout and stderr in `log`, killed by the kernel if the
/// bench dies without unwinding.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    // PR_SET_PDEATHSIG fires when the thread that forked dies; we fork from
    // a runtime worker (or the main) thread, which lives as long as the bench.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("starting a child process")
}

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
}

impl FerryProcs {
    /// Starts three nodes of `bin` with data and logs under `dir` and waits
    /// until they agree on a leader.
    pub async fn start(bin: &Path, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ports = free_ports(3)?;
        let endpoints: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let members = endpoints.iter().enumerate().map(|(i, e)| format!("{}={e}", i + 1)).collect::<Vec<_>>();
        let mut procs = FerryProcs { children: Vec::new(), endpoints };
        for (i, listen) in procs.endpoints.clone().iter().enumerate() {
            let mut cmd = Command::new(bin);
            cmd.arg("scheduler")
                .args(["--id", &(i + 1).to_string(), "--listen", listen])
                .arg("--data")
                .arg(dir.join(format!("s{}", i + 1)))
                .args(["--initial-cluster", &members.join(",")])
                .env("RUST_LOG", std::env::var("FERRY_BENCH_LOG").unwrap_or_else(|_| "warn".into()));
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
            let client = ferry_sdk::Client::connect(&procs.endpoints)?;
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
}

impl Drop for FerryProcs {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            child.kill().ok();
            child.wait().ok();
        }
    }
}
