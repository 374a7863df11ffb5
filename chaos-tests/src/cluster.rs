//! The cluster under test: real `ferry scheduler` and `ferry worker`
//! processes, each with its own data directory and log, that a nemesis can
//! kill and restart on the same directory, freeze, or cut off.
//!
//! As root, every process lives in its own network namespace on a bridge
//! (`ferry_lab::netns`) and listens on its own address; the harness's
//! clients, in the root namespace, reach every node through the bridge, so
//! a node cut off from its peers still has clients ("clients on both
//! sides"). Otherwise everything shares loopback and only process faults
//! apply; [`Cluster::mode`] says which.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_lab::netns::Lab;
use ferry_lab::procs::{free_ports, run, spawn_logged};
use ferry_sdk::tls::{Authority, Identity};

use crate::lazyfs::LazyFs;

/// A scheduler (by its Raft id, from 1) or a worker (by its number, from
/// 1: worker `w1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Who {
    Node(u64),
    Worker(usize),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Node(id) => write!(f, "node {id}"),
            Who::Worker(n) => write!(f, "worker w{n}"),
        }
    }
}

/// One process of the cluster, restartable with the same arguments.
pub struct Proc {
    /// Its listening address (`host:port`).
    pub addr: String,
    /// Its admin HTTP address (`host:port`): metrics and, in the
    /// `failpoints` build, `/failpoints` ([`Cluster::set_fault`]).
    pub admin: String,
    /// Stdout and stderr of every start.
    pub log: PathBuf,
    args: Vec<OsString>,
    child: Option<Child>,
}

/// A worker's files: it may write only under `root`.
pub struct WorkerDirs {
    pub name: String,
    pub root: PathBuf,
}

/// Which of a node's links to its peers a cut drops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cut {
    /// Both ways: the node neither hears nor reaches its peers.
    Both,
    /// Only what comes in: the node's messages reach its peers, their
    /// answers (and their own messages) do not reach it.
    Inbound,
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub nodes: usize,
    pub workers: usize,
    /// Each process in its own network namespace (needs root).
    pub network: bool,
    /// `FAILPOINTS` of every process (crash points; see `ferry_storage::crash`).
    pub failpoints: Option<String>,
    /// Each process's directories (a scheduler's data, a worker's data and
    /// root) on its own power-loss filesystem ([`LazyFs`]; needs root and
    /// `/dev/fuse`).
    pub power_loss: bool,
    /// Flags added to every `ferry scheduler`.
    pub scheduler_args: Vec<String>,
    /// Each process's directories on its own tmpfs of this many bytes, so
    /// [`Cluster::fill`] can fill it (needs root).
    pub small_disks: Option<u64>,
    /// An older `ferry` and the processes (by slot: schedulers from 0, then
    /// workers) that start on it; [`Cluster::upgrade`] moves one to the
    /// binary under test.
    pub base: Option<(PathBuf, Vec<usize>)>,
    /// Flags added to a `ferry scheduler` that runs the binary under test
    /// (not [`Spec::base`]'s, which may not know them).
    pub new_args: Vec<String>,
}

/// Three schedulers and some workers; killed on drop.
pub struct Cluster {
    ferry: PathBuf,
    /// The binary each process runs: `ferry`, or [`Spec::base`]'s.
    binaries: Vec<PathBuf>,
    /// [`Spec::new_args`].
    new_args: Vec<String>,
    /// Schedulers first (node `ids[i]` at `i`), then workers.
    procs: Vec<Proc>,
    nodes: usize,
    /// The Raft id of the scheduler at each slot: `1..=nodes` at first; a
    /// slot [`Cluster::replace`]d gets a new one.
    ids: Vec<u64>,
    dir: PathBuf,
    scheduler_args: Vec<String>,
    pub workers: Vec<WorkerDirs>,
    /// Process `i` lives in the lab's host `i`.
    lab: Option<Lab>,
    /// `FAILPOINTS` of every process (crash points; see `ferry_storage::crash`).
    failpoints: Option<String>,
    /// Process `i`'s power-loss filesystem, if [`Spec::power_loss`].
    disks: Vec<LazyFs>,
    /// Process `i`'s tmpfs, if [`Spec::small_disks`] (unmounted on drop).
    tmpfs: Vec<PathBuf>,
    /// The run's CA (in `DIR/tls`), which issues every process and the
    /// clients a certificate; `None` when the cluster starts on
    /// [`Spec::base`], a release without TLS, and so runs plaintext.
    ca: Option<Authority>,
}

/// The flags that give a process `identity`'s certificate from `ca`,
/// issued into `dir`.
fn tls_args(ca: &Authority, dir: &Path, identity: &Identity) -> anyhow::Result<Vec<OsString>> {
    Ok(ca.write_holder(dir, identity, &[])?.flags())
}

impl Cluster {
    /// Starts `nodes` schedulers and `workers` workers of `ferry` under
    /// `dir` and waits for a leader and for every worker to be connected.
    /// With `network`, each in its own namespace (which needs root:
    /// [`Lab::unavailable`] says why not). Every worker has a hook named
    /// `reload` (`true`).
    pub async fn start(ferry: &Path, dir: &Path, spec: Spec) -> anyhow::Result<Self> {
        let Spec { nodes, workers, network, failpoints, power_loss, scheduler_args, small_disks, base, new_args } =
            spec;
        let all = nodes + workers;
        let binaries = (0..all)
            .map(|i| match &base {
                Some((older, slots)) if slots.contains(&i) => older.clone(),
                _ => ferry.to_path_buf(),
            })
            .collect();
        let name_of = |i: usize| if i < nodes { format!("s{}", i + 1) } else { format!("w{}", i - nodes + 1) };
        let mut tmpfs = Vec::new();
        if let Some(bytes) = small_disks {
            for i in 0..all {
                let mount = dir.join(format!("{}.tmpfs", name_of(i)));
                std::fs::create_dir_all(&mount)?;
                run(&["mount", "-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", &mount.to_string_lossy()])?;
                tmpfs.push(mount);
            }
        }
        let mut disks = Vec::new();
        if power_loss {
            for i in 0..all {
                let name = name_of(i);
                let (disk, mount) = (dir.join(format!("{name}.disk")), dir.join(format!("{name}.mnt")));
                std::fs::create_dir_all(&disk)?;
                std::fs::create_dir_all(&mount)?;
                disks.push(LazyFs::mount(&disk, &mount)?);
            }
        }
        let (lab, addrs, admins) = if network {
            let lab = Lab::create(all)?;
            let at = |i: usize, port: u16| format!("{}:{}", lab.ip(i), if i < nodes { port } else { port + 100 });
            let (addrs, admins) = (0..all).map(|i| (at(i, 7001), at(i, 7002))).unzip();
            (Some(lab), addrs, admins)
        } else {
            let ports: Vec<String> = free_ports(2 * all)?.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let (addrs, admins) = ports.split_at(all);
            (None, addrs.to_vec(), admins.to_vec())
        };
        // TLS unless an older release (which has none) is part of the run.
        let ca = match base {
            Some(_) => None,
            None => Some(Authority::new("chaos")?),
        };
        let tls_dir = dir.join("tls");
        crate::workload::set_security(match &ca {
            Some(ca) => {
                let files = ca.write_holder(&tls_dir, &Identity::User("chaos".into()), &[])?;
                ferry_sdk::Security::Tls(ferry_sdk::tls::Credentials::load(files)?)
            }
            None => ferry_sdk::Security::Insecure,
        });
        let members = addrs[..nodes].iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>();
        let (members, schedulers) = (members.join(","), addrs[..nodes].join(","));
        let log = std::env::var("FERRY_CHAOS_LOG").unwrap_or_else(|_| "info".into());
        let mut procs = Vec::new();
        let mut worker_dirs = Vec::new();
        for (i, (addr, admin)) in addrs.into_iter().zip(admins).enumerate() {
            let (name, args): (String, Vec<OsString>) = if i < nodes {
                let name = format!("s{}", i + 1);
                let data = match (disks.get(i), tmpfs.get(i)) {
                    (Some(disk), _) => disk.mountpoint().join("data"),
                    (None, Some(mount)) => mount.join("data"),
                    (None, None) => dir.join(&name),
                };
                let args =
                    ["scheduler", "--id", &(i + 1).to_string(), "--listen", &addr, "--initial-cluster", &members];
                let mut args: Vec<OsString> = args.iter().map(OsString::from).collect();
                args.extend(["--data".into(), data.into()]);
                args.extend(scheduler_args.iter().map(OsString::from));
                if let Some(ca) = &ca {
                    args.extend(tls_args(ca, &tls_dir, &Identity::Scheduler(i as u64 + 1))?);
                }
                (name, args)
            } else {
                let name = format!("w{}", i - nodes + 1);
                let home = match (disks.get(i), tmpfs.get(i)) {
                    (Some(disk), _) => disk.mountpoint().to_path_buf(),
                    (None, Some(mount)) => mount.clone(),
                    (None, None) => dir.join(&name),
                };
                let (root, data) = (home.join("root"), home.join("data"));
                std::fs::create_dir_all(&root)?;
                let args = [
                    "worker",
                    "--name",
                    &name,
                    "--listen",
                    &addr,
                    "--schedulers",
                    &schedulers,
                    "--hook",
                    "reload=true",
                ];
                let mut args: Vec<OsString> = args.iter().map(OsString::from).collect();
                args.extend(["--data".into(), data.into(), "--allow-root".into(), root.clone().into()]);
                if let Some(ca) = &ca {
                    args.extend(tls_args(ca, &tls_dir, &Identity::Worker(name.clone()))?);
                }
                worker_dirs.push(WorkerDirs { name: name.clone(), root });
                (name, args)
            };
            let mut args = args;
            args.extend(["--admin-listen".into(), OsString::from(&admin)]);
            procs.push(Proc { addr, admin, log: dir.join(format!("{name}.log")), args, child: None });
        }
        let mut cluster = Self {
            ferry: ferry.into(),
            binaries,
            new_args,
            procs,
            nodes,
            ids: (1..=nodes as u64).collect(),
            dir: dir.into(),
            scheduler_args,
            workers: worker_dirs,
            lab,
            failpoints,
            disks,
            tmpfs,
            ca,
        };
        for i in 0..all {
            cluster.spawn(i, &log)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        cluster.wait_for_workers(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// How faults reach the nodes.
    pub fn mode(&self) -> &'static str {
        if self.lab.is_some() {
            "a network namespace per process on a bridge"
        } else {
            "loopback, process faults only"
        }
    }

    fn index(&self, who: Who) -> usize {
        match who {
            Who::Node(id) => self.ids.iter().position(|i| *i == id).unwrap_or_else(|| panic!("no node {id}")),
            Who::Worker(n) => self.nodes + n - 1,
        }
    }

    fn spawn(&mut self, i: usize, log: &str) -> anyhow::Result<()> {
        let binary = &self.binaries[i];
        let mut cmd = match &self.lab {
            Some(lab) => lab.command(i, binary),
            None => Command::new(binary),
        };
        let proc = &mut self.procs[i];
        cmd.args(&proc.args).env("RUST_LOG", log);
        if i < self.nodes && *binary == self.ferry {
            cmd.args(&self.new_args);
        }
        if self.ca.is_none() && *binary == self.ferry {
            // With a release without TLS in the cluster, plaintext for all.
            cmd.arg("--insecure");
        }
        if let Some(failpoints) = &self.failpoints {
            cmd.env("FAILPOINTS", failpoints);
        }
        let child = spawn_logged(cmd, &proc.log).with_context(|| format!("starting {}", binary.display()))?;
        proc.child = Some(child);
        Ok(())
    }

    /// The schedulers' addresses.
    pub fn endpoints(&self) -> Vec<String> {
        self.procs[..self.nodes].iter().map(|p| p.addr.clone()).collect()
    }

    /// The schedulers' ids.
    pub fn node_ids(&self) -> Vec<u64> {
        self.ids.clone()
    }

    /// Every process, schedulers first.
    pub fn everyone(&self) -> Vec<Who> {
        self.ids.iter().map(|id| Who::Node(*id)).chain((1..=self.workers.len()).map(Who::Worker)).collect()
    }

    /// `who`'s resident memory and the disk its data directory takes
    /// (allocated blocks), in bytes; `None` while it is down.
    pub fn usage(&self, who: Who) -> Option<(u64, u64)> {
        let proc = &self.procs[self.index(who)];
        let pid = proc.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kb: u64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        let data = proc.args.iter().skip_while(|a| *a != "--data").nth(1)?;
        Some((rss_kb * 1024, disk_usage(Path::new(data))))
    }

    /// Kills scheduler `old` (which the caller removed from the cluster)
    /// and starts, in its place and at its address, a fresh node under a
    /// new id with an empty data directory and no `--initial-cluster`, as
    /// an operator replaces a member (docs/operations/cluster.md). Returns
    /// the new id and address; the caller adds it to the cluster.
    pub fn replace(&mut self, old: u64) -> anyhow::Result<(u64, String)> {
        let slot = self.index(Who::Node(old));
        self.kill9(Who::Node(old));
        let new = self.ids.iter().max().copied().unwrap_or(0) + 1;
        let data = self.dir.join(format!("s{}-node{new}", slot + 1));
        let proc = &mut self.procs[slot];
        let mut args: Vec<OsString> =
            ["scheduler", "--id", &new.to_string(), "--listen", &proc.addr].iter().map(OsString::from).collect();
        args.extend(["--data".into(), data.into(), "--admin-listen".into(), OsString::from(&proc.admin)]);
        args.extend(self.scheduler_args.iter().map(OsString::from));
        if let Some(ca) = &self.ca {
            args.extend(tls_args(ca, &self.dir.join("tls"), &Identity::Scheduler(new))?);
        }
        proc.args = args;
        self.ids[slot] = new;
        let log = std::env::var("FERRY_CHAOS_LOG").unwrap_or_else(|_| "info".into());
        self.spawn(slot, &log)?;
        Ok((new, self.procs[slot].addr.clone()))
    }

    /// `kill -9`.
    pub fn kill9(&mut self, who: Who) {
        let i = self.index(who);
        if let Some(mut child) = self.procs[i].child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }

    /// Stops `who` as an operator does (`SIGTERM`, a clean stop), and
    /// `kill -9` if it has not exited within `within`. Whether it exited
    /// on its own in time.
    pub async fn stop(&mut self, who: Who, within: Duration) -> bool {
        let i = self.index(who);
        let Some(mut child) = self.procs[i].child.take() else { return true };
        // SAFETY: a plain kill(2) of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.kill().ok();
        child.wait().ok();
        false
    }

    /// Starts `who`, stopped, again on the binary under test (the same data
    /// directory and flags).
    pub fn upgrade(&mut self, who: Who) -> anyhow::Result<()> {
        let i = self.index(who);
        self.binaries[i] = self.ferry.clone();
        self.restart(who)
    }

    /// Whether `who` runs the binary under test (not [`Spec::base`]'s).
    pub fn upgraded(&self, who: Who) -> bool {
        self.binaries[self.index(who)] == self.ferry
    }

    /// The binary under test.
    pub fn ferry(&self) -> &Path {
        &self.ferry
    }

    /// `SIGSTOP` (`stop`) or `SIGCONT`: the process freezes, or goes on,
    /// with its sockets open.
    pub fn freeze(&mut self, who: Who, stop: bool) {
        if let Some(child) = &self.procs[self.index(who)].child {
            let signal = if stop { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: a plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Starts a killed process again on the same data directory.
    pub fn restart(&mut self, who: Who) -> anyhow::Result<()> {
        self.kill9(who);
        let log = std::env::var("FERRY_CHAOS_LOG").unwrap_or_else(|_| "info".into());
        self.spawn(self.index(who), &log)
    }

    /// Whether the process runs (as far as the harness knows).
    pub fn running(&self, who: Who) -> bool {
        self.procs[self.index(who)].child.is_some()
    }

    /// Processes that exited on their own (a crash, or a refusal).
    pub fn exited(&mut self) -> Vec<(Who, std::process::ExitStatus)> {
        let mut out = Vec::new();
        for (i, who) in self.everyone().into_iter().enumerate() {
            let proc = &mut self.procs[i];
            if let Some(Ok(Some(status))) = proc.child.as_mut().map(|c| c.try_wait()) {
                out.push((who, status));
                proc.child = None;
            }
        }
        out
    }

    /// Starts every process that is not running.
    pub fn restart_stopped(&mut self) -> anyhow::Result<()> {
        let all: Vec<Who> = self.everyone().into_iter().filter(|who| !self.running(*who)).collect();
        for who in all {
            self.restart(who)?;
        }
        Ok(())
    }

    /// Whether the schedulers' data directories are on power-loss
    /// filesystems.
    pub fn power_loss(&self) -> bool {
        !self.disks.is_empty()
    }

    /// Kills `who` and cuts its disk's power: every write it had not made
    /// durable is gone. Returns the bytes lost.
    pub fn power_cut(&mut self, who: Who) -> anyhow::Result<u64> {
        self.kill9(who);
        let disk = self.disks.get(self.index(who)).context("no power-loss filesystem under this process")?;
        Ok(disk.power_cut())
    }

    /// Fills the tmpfs of `who` ([`Spec::small_disks`]) with a ballast file
    /// until the disk is full. Returns the bytes written.
    pub fn fill(&self, who: Who) -> anyhow::Result<u64> {
        use std::io::Write;
        let mount = self.tmpfs.get(self.index(who)).context("no small disk under this process")?;
        let mut ballast = std::fs::File::create(mount.join("ballast"))?;
        let block = vec![0u8; 64 * 1024];
        let mut written = 0;
        loop {
            match ballast.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(written)
    }

    /// Takes the ballast of [`Cluster::fill`] away.
    pub fn unfill(&self, who: Who) -> anyhow::Result<()> {
        let mount = self.tmpfs.get(self.index(who)).context("no small disk under this process")?;
        Ok(std::fs::remove_file(mount.join("ballast"))?)
    }

    /// If `who` exited on its own: its status and the last error in its log.
    pub fn exited_one(&mut self, who: Who) -> Option<(std::process::ExitStatus, String)> {
        let i = self.index(who);
        let proc = &mut self.procs[i];
        let status = proc.child.as_mut()?.try_wait().ok()??;
        proc.child = None;
        let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
        let last = text.lines().rev().find(|l| l.contains("error") || l.contains("ERROR")).unwrap_or_default();
        Some((status, without_colours(last).chars().take(300).collect()))
    }

    /// Takes the crash points away: every process restarts without them
    /// (if any were armed), so the final checks run on a quiet cluster.
    /// Returns whether it restarted them (a fault the checkers must know).
    pub fn disarm(&mut self) -> anyhow::Result<bool> {
        if self.failpoints.take().is_none() {
            return Ok(false);
        }
        for who in self.everyone() {
            self.restart(who)?;
        }
        Ok(true)
    }

    /// Cuts node `id` off from the other schedulers (the harness's clients
    /// and the workers still reach it) until [`Cluster::heal`].
    pub fn cut(&self, id: u64, cut: Cut) -> anyhow::Result<()> {
        let lab = self.lab.as_ref().context("cutting links needs network namespaces")?;
        let host = self.index(Who::Node(id));
        for peer in (0..self.nodes).filter(|i| *i != host) {
            let ip = lab.ip(peer).to_string();
            lab.exec(host, &["iptables", "-A", "INPUT", "-s", &ip, "-j", "DROP"])?;
            if cut == Cut::Both {
                lab.exec(host, &["iptables", "-A", "OUTPUT", "-d", &ip, "-j", "DROP"])?;
            }
        }
        Ok(())
    }

    /// Cuts the processes of `side` off from every other process of the
    /// cluster, both ways (the harness, in the root namespace, still
    /// reaches them all).
    pub fn split(&self, side: &[Who]) -> anyhow::Result<()> {
        let lab = self.lab.as_ref().context("cutting links needs network namespaces")?;
        let inside: Vec<usize> = side.iter().map(|who| self.index(*who)).collect();
        for host in &inside {
            for other in (0..self.procs.len()).filter(|i| !inside.contains(i)) {
                let ip = lab.ip(other).to_string();
                lab.exec(*host, &["iptables", "-A", "INPUT", "-s", &ip, "-j", "DROP"])?;
                lab.exec(*host, &["iptables", "-A", "OUTPUT", "-d", &ip, "-j", "DROP"])?;
            }
        }
        Ok(())
    }

    /// Caps `who`'s link at `bytes_per_sec` both ways, or frees it with
    /// `None`.
    pub fn squeeze(&self, who: Who, bytes_per_sec: Option<u64>) -> anyhow::Result<()> {
        let lab = self.lab.as_ref().context("capping a link needs network namespaces")?;
        match bytes_per_sec {
            Some(rate) => lab.cap(self.index(who), rate, true),
            None => lab.uncap(self.index(who)),
        }
    }

    /// Takes every cut of `who` away.
    pub fn heal(&self, who: Who) -> anyhow::Result<()> {
        let lab = self.lab.as_ref().context("healing links needs network namespaces")?;
        let host = self.index(who);
        lab.exec(host, &["iptables", "-F", "INPUT"])?;
        lab.exec(host, &["iptables", "-F", "OUTPUT"])
    }

    /// Sets fail point `name` of `who` to `actions` (the `fail` crate's
    /// forms, e.g. `30%return(500)`), or removes it with `None`, at run
    /// time through its admin port (`ferry_lab::faults`; the `failpoints`
    /// build only). The point holds until removed or the process restarts.
    pub async fn set_fault(&self, who: Who, name: &str, actions: Option<&str>) -> anyhow::Result<()> {
        let (method, body) = match actions {
            Some(actions) => ("PUT", actions),
            None => ("DELETE", ""),
        };
        self.admin(who, method, &format!("/failpoints/{name}"), body).await.map(drop)
    }

    /// The sum of every sample of metric `name` (e.g.
    /// `ferry_worker_bad_chunks_total`) `who` reports now.
    pub async fn metric(&self, who: Who, name: &str) -> anyhow::Result<f64> {
        let text = self.admin(who, "GET", "/metrics", "").await?;
        let samples = text.lines().filter(|l| l.split(['{', ' ']).next() == Some(name));
        Ok(samples.filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum())
    }

    /// One HTTP/1.1 exchange with `who`'s admin port: the body of a 200.
    async fn admin(&self, who: Who, method: &str, path: &str, body: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let proc = &self.procs[self.index(who)];
        let request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            proc.admin,
            body.len()
        );
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&proc.admin).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            anyhow::Ok(answer)
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .with_context(|| format!("{who}'s admin port {} did not answer", proc.admin))??;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        if !head.starts_with("HTTP/1.1 200") {
            bail!("{who} answered {method} {path} with {}: {}", head.lines().next().unwrap_or_default(), body.trim());
        }
        Ok(body.to_string())
    }

    /// The leader's id as the running nodes report it: the one named in the
    /// highest term (a leader cut off from its peers may still believe in
    /// its own older term).
    pub async fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for proc in self.procs[..self.nodes].iter().filter(|p| p.child.is_some()) {
            let Ok(client) = crate::workload::connect([proc.addr.clone()]) else { continue };
            let status = tokio::time::timeout(Duration::from_millis(500), client.status_of(&proc.addr)).await;
            if let Ok(Ok(status)) = status {
                if status.leader_id != 0 && best.is_none_or(|(term, _)| status.term > term) {
                    best = Some((status.term, status.leader_id));
                }
            }
        }
        best.map(|(_, leader)| leader)
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

    /// Waits until the leader lists every worker as connected.
    pub async fn wait_for_workers(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let client = crate::workload::connect(self.endpoints())?;
        loop {
            let listed = client.list_workers().await.unwrap_or_default();
            let connected = self
                .workers
                .iter()
                .all(|w| listed.iter().any(|l| l.info.as_ref().is_some_and(|i| i.name == w.name) && l.state == "up"));
            if connected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not every worker connected within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every node's (applied index, digest), once all have applied the
    /// same index (or `timeout` passed: then what they have).
    pub async fn digests(&self, timeout: Duration) -> Vec<(u64, Result<(u64, String), String>)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            for (i, proc) in self.procs[..self.nodes].iter().enumerate() {
                let got = match crate::workload::connect([proc.addr.clone()]) {
                    Ok(client) => client
                        .state_digest_of(&proc.addr)
                        .await
                        .map(|d| (d.applied_index, d.digest))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                out.push((self.ids[i], got));
            }
            let applied: Vec<u64> = out.iter().filter_map(|(_, d)| d.as_ref().ok().map(|d| d.0)).collect();
            let settled = applied.len() == out.len() && applied.windows(2).all(|w| w[0] == w[1]);
            if settled || Instant::now() > deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The crash point named last in the log of `who`, if any.
    pub fn last_crash_point(&self, who: Who) -> Option<String> {
        let text = std::fs::read_to_string(&self.procs[self.index(who)].log).ok()?;
        let line = text.lines().rev().find(|l| l.starts_with("crash point "))?;
        Some(line.trim_start_matches("crash point ").split(':').next()?.to_string())
    }

    /// Lines of the processes' logs that show a panic.
    pub fn panics(&self) -> Vec<String> {
        let mut out = Vec::new();
        for proc in &self.procs {
            let text = std::fs::read_to_string(&proc.log).unwrap_or_default();
            let name = proc.log.file_stem().unwrap_or_default().to_string_lossy();
            out.extend(text.lines().filter(|l| l.contains("panicked")).map(|l| format!("{name}: {l}")));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if let Some(mut child) = proc.child.take() {
                child.kill().ok();
                child.wait().ok();
            }
        }
        for mount in &self.tmpfs {
            let _ = run(&["umount", "-l", &mount.to_string_lossy()]);
        }
    }
}

/// `line` without its terminal colour codes (`ESC [ ... m`).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes of disk the files under `dir` take (allocated blocks).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}
