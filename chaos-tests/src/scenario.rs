//! The named scenarios: each starts a cluster, runs a workload beside a
//! nemesis for a while, then asks the checkers, and reports.
//!
//! A run is reproducible from its seed: the fault schedule (when, and
//! which node) and every client's choices are drawn from it. (The cluster's
//! own timing is not: a replay injects the same faults into a cluster that
//! may be at another point of its work.)

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_lab::netns::Lab;
use tokio::sync::Mutex;

use crate::cluster::{Cluster, Cut, Spec};
use crate::history::{self, History, Outcome};
use crate::jobs::{self, Jobs};
use crate::linearizable::{self, Violation};
use crate::nemesis::{self, Fault, Kind, Target};
use crate::soak;
use crate::upgrade;
use crate::watches::{self, Watched};
use crate::workload;
use crate::{leases, registry};

/// The scenarios `list` shows: name and what it does.
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "leader-kill-cas",
        "kill -9 the leader every few seconds (restart after 1 s) under config reads, writes and CAS on 3 hot keys",
    ),
    ("follower-kill-cas", "kill -9 a follower every few seconds (restart after 1 s) under the same config workload"),
    (
        "leader-freeze-cas",
        "SIGSTOP the leader for 3 s (past the election timeout), then SIGCONT, under the same config workload",
    ),
    (
        "leader-isolate-cas",
        "cut the leader off from its peers for 5 s (clients still reach every node), then heal [root]",
    ),
    (
        "leader-oneway-cas",
        "drop what reaches the leader from its peers for 5 s (its own messages still go out), then heal [root]",
    ),
    ("leader-flap-cas", "cut and heal the leader's links every 500 ms for 6 s [root]"),
    (
        "power-cut",
        "kill -9 the leader and one follower at once and drop every write their disks had not synced \
         (data directories on a LazyFS-like FUSE layer), restart after 1 s [root]",
    ),
    (
        "target-power-cut",
        "kill -9 a job's target worker and drop every write its disk had not synced (its root and data on \
         the FUSE layer), restart after 1 s: every file it installed must still be whole [root]",
    ),
    (
        "snapshot-install-crash",
        "kill -9 a follower for 3 s with snapshots every 300 entries: it comes back behind the purge, gets a \
         snapshot, and dies installing every other one (the snapshot-install crash point) [failpoints build]",
    ),
    (
        "crash-points",
        "processes die at armed crash points (log append before sync, snapshot build and install, mid-batch apply, \
         install before rename, hook running) and restart after 1 s [a `--features failpoints` build]",
    ),
    ("source-kill", "kill -9 the jobs' source worker (restart after 1 s) while it serves a job"),
    ("target-kill", "kill -9 one of a job's target workers (restart after 1 s) mid-job"),
    (
        "target-freeze",
        "SIGSTOP a target worker for 18 s (5 s silent counts as down, then the job's 10 s grace), then SIGCONT",
    ),
    (
        "follower-disk-full",
        "fill a follower's disk (a 256 MiB tmpfs) for 5 s, then empty it (and restart the node if it stopped) [root]",
    ),
    ("target-disk-full", "fill a job target's disk (a 256 MiB tmpfs holding its root) for 5 s, then empty it [root]"),
    (
        "soak",
        "the workload Ferry exists for, compressed: 20 workers get 5 files of 10 MB, edited and pushed again every \
         30 s, beside config writes at ~50/s, while the leader is killed every 2 min; every job must succeed and \
         memory and disk must stop growing (run it for 30m; not in --all)",
    ),
    (
        "membership-kill",
        "replace a follower as an operator does (remove it, start a fresh node under a new id at its address, add \
         it) and kill -9 the leader while the add runs; the new node must end a voter",
    ),
    (
        "leader-minority-split",
        "cut the leader, the jobs' source and one target off from the two followers and the other targets for 6 s \
         (clients reach both sides), then heal [root]",
    ),
    ("target-starved", "cap a job target's link at 256 KiB/s both ways for 10 s (tc tbf), then free it [root]"),
    (
        "follower-slow-rpc",
        "hold every gRPC call that reaches a follower (Raft heartbeats included) 400 ms for 8 s [failpoints build]",
    ),
    ("leader-drop-rpc", "answer 30 % of the gRPC calls that reach the leader Unavailable for 6 s [failpoints build]"),
    (
        "rolling-upgrade",
        "start every process on an older ferry (--from), then upgrade them one at a time as docs/operations/upgrades.md \
         says (followers, the leader, the workers; each stopped cleanly) under the workloads: no operation may fail, \
         every job must succeed [needs --from]",
    ),
    (
        "mixed-old-majority",
        "two schedulers and two workers on an older ferry (--from), the rest on this one; kill -9 the leader every \
         20 s so it leads from either release [needs --from]",
    ),
    (
        "mixed-new-majority",
        "one scheduler and one worker on an older ferry (--from), the rest on this one; kill -9 the leader every \
         20 s [needs --from]",
    ),
    (
        "corrupt-chunks",
        "the jobs' source corrupts half the chunks it serves for 10 s: targets must catch them by their BLAKE3 \
         and fetch again [failpoints build]",
    ),
];

/// Workers beside the schedulers: the jobs' source and three targets.
const WORKERS: usize = 4;

/// `--job-history` of the new release in the upgrade scenarios.
const SHORT_HISTORY: &[&str] = &["--job-history", "5"];
/// Finished jobs that [`SHORT_HISTORY`] keeps.
const SHORT_HISTORY_KEEP: usize = 5;

/// What a scenario does.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Which process the nemesis strikes, and how.
    pub target: Target,
    pub kind: Kind,
    /// `FAILPOINTS` of every process: crash points, whose deaths the
    /// harness revives.
    pub failpoints: Option<&'static str>,
    /// Flags added to every `ferry scheduler`.
    pub scheduler_args: &'static [&'static str],
    /// Workers beside the schedulers.
    pub workers: usize,
    /// What the jobs carry, how often.
    pub shape: jobs::Shape,
    /// The config clients' pace (see [`workload::Config::pace`]).
    pub pace: Duration,
    /// Mean time between two faults unless `--every` says otherwise.
    pub every: Duration,
    /// A soak ([`crate::soak`]): every job must succeed, and memory and
    /// disk are sampled and must stop growing.
    pub soak: bool,
    /// The processes (slots: schedulers from 0, then workers) that start on
    /// the older ferry of [`Options::base`]; none: no older ferry needed.
    pub base: &'static [usize],
    /// Nothing may fail: no client operation, no job (a rolling upgrade).
    pub strict: bool,
    /// Flags of schedulers on the binary under test only ([`Spec::new_args`]).
    pub new_args: &'static [&'static str],
}

/// What scenario `name` does.
pub fn plan_of(name: &str) -> anyhow::Result<Plan> {
    let secs = Duration::from_secs;
    let (target, kind) = match name {
        "leader-kill-cas" => (Target::Leader, Kind::Kill(secs(1))),
        "follower-kill-cas" => (Target::Follower, Kind::Kill(secs(1))),
        "leader-freeze-cas" => (Target::Leader, Kind::Freeze(secs(3))),
        "leader-isolate-cas" => (Target::Leader, Kind::Isolate(Cut::Both, secs(5))),
        "leader-oneway-cas" => (Target::Leader, Kind::Isolate(Cut::Inbound, secs(5))),
        "leader-flap-cas" => (Target::Leader, Kind::Flap(secs(6))),
        "crash-points" => (Target::Leader, Kind::CrashPoints),
        "snapshot-install-crash" => (Target::Follower, Kind::Kill(secs(3))),
        "power-cut" => (Target::Leader, Kind::PowerCut(secs(1))),
        "target-power-cut" => (Target::JobTarget, Kind::PowerCut(secs(1))),
        "source-kill" => (Target::Source, Kind::Kill(secs(1))),
        "target-kill" => (Target::JobTarget, Kind::Kill(secs(1))),
        "target-freeze" => (Target::JobTarget, Kind::Freeze(secs(18))),
        "follower-disk-full" => (Target::Follower, Kind::DiskFull(secs(5))),
        "target-disk-full" => (Target::JobTarget, Kind::DiskFull(secs(5))),
        "leader-minority-split" => (Target::Leader, Kind::Split(secs(6))),
        "membership-kill" => (Target::Follower, Kind::Replace(secs(1))),
        "target-starved" => (Target::JobTarget, Kind::Squeeze(secs(10))),
        "follower-slow-rpc" => {
            (Target::Follower, Kind::FailPoint { point: "rpc-delay", actions: "return(400)", down: secs(8) })
        }
        "leader-drop-rpc" => {
            (Target::Leader, Kind::FailPoint { point: "rpc-drop", actions: "30%return", down: secs(6) })
        }
        "corrupt-chunks" => {
            (Target::Source, Kind::FailPoint { point: "chunk-server-corrupt", actions: "50%return", down: secs(10) })
        }
        "soak" => (Target::Leader, Kind::Kill(secs(1))),
        "rolling-upgrade" => (Target::Leader, Kind::Upgrade),
        "mixed-old-majority" | "mixed-new-majority" => (Target::Leader, Kind::Kill(secs(1))),
        other => bail!("no scenario {other:?}; `ferry-chaos list` shows them"),
    };
    let (failpoints, scheduler_args): (_, &[&str]) = match name {
        "crash-points" => (Some(nemesis::CRASH_POINTS), &[]),
        // Snapshots every 300 entries, 30 kept behind: a follower down for
        // 3 s comes back behind the purge and gets a snapshot, and dies
        // installing every other one.
        "snapshot-install-crash" => {
            (Some("snapshot-install=50%return"), &["--snapshot-every", "300", "--logs-to-keep", "30"])
        }
        // Snapshots often, so that a node of one release installs one that
        // a leader of the other built.
        "mixed-old-majority" | "mixed-new-majority" => (None, &["--snapshot-every", "300", "--logs-to-keep", "30"]),
        // The newest 20 finished jobs kept (10 minutes of them): the job
        // history, which grows by design up to `job_history`, is at its
        // bound for most of the run, so what grows after is a leak.
        "soak" => (None, soak::SCHEDULER_ARGS),
        _ => (None, &[]),
    };
    let plan = Plan {
        target,
        kind,
        failpoints,
        scheduler_args,
        workers: WORKERS,
        shape: jobs::Shape::CHAOS,
        pace: Duration::ZERO,
        every: secs(5),
        soak: false,
        base: &[],
        strict: false,
        new_args: &[],
    };
    // Slots: schedulers 0-2, then workers w1 (the jobs' source) to w4.
    Ok(match name {
        // A short job history on the new release: its leader forgets the
        // oldest jobs once the cluster version allows the op that forgets
        // them (from a release before it: only once all are upgraded), and
        // never a job still running.
        "rolling-upgrade" => Plan { base: &[0, 1, 2, 3, 4, 5, 6], strict: true, new_args: SHORT_HISTORY, ..plan },
        "mixed-old-majority" => Plan { base: &[0, 1, 3, 5], every: secs(20), new_args: SHORT_HISTORY, ..plan },
        "mixed-new-majority" => Plan { base: &[0, 4], every: secs(20), new_args: SHORT_HISTORY, ..plan },
        "soak" => {
            Plan { workers: soak::WORKERS, shape: soak::SHAPE, pace: soak::PACE, every: secs(120), soak: true, ..plan }
        }
        _ => plan,
    })
}

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `ferry` binary under test.
    pub ferry: PathBuf,
    /// How long the workload and the nemesis run.
    pub duration: Duration,
    pub seed: u64,
    /// Mean time between two faults (default: the scenario's own).
    pub every: Option<Duration>,
    /// Where the data, logs and history go (default: a temporary
    /// directory, kept only if the run fails or `keep`).
    pub dir: Option<PathBuf>,
    pub keep: bool,
    /// Serializable reads (see [`workload::Config::serializable`]).
    pub serializable: bool,
    /// An older `ferry`, for the scenarios that start on one
    /// ([`Plan::base`]).
    pub base: Option<PathBuf>,
}

/// What a run found.
#[derive(Debug)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    /// How faults reach the nodes (loopback: process faults only).
    pub mode: &'static str,
    /// What each strike does.
    pub fault: &'static str,
    pub faults: Vec<Fault>,
    /// Operations: ok, failed (surely not done), unknown.
    pub ops: (usize, usize, usize),
    /// The longest time between two acknowledged writes while the
    /// workload ran (seconds): how long the cluster could not take one.
    pub write_gap: f64,
    pub violations: Vec<Violation>,
    /// What the watchers saw wrong (gaps, duplicates, strangers, lag).
    pub watch_problems: Vec<String>,
    /// Watchers, and the snapshot messages they got.
    pub watchers: (usize, usize),
    /// What the lease checker found (early or late expiries).
    pub lease_problems: Vec<String>,
    /// Leases granted, kept and let go.
    pub leases: usize,
    /// What the registry checker found (instances missing, resurrected,
    /// kept too long), and how many instances the clients registered.
    pub registry_problems: Vec<String>,
    pub instances: usize,
    /// The job workload's runs and what its checker found.
    pub jobs: Jobs,
    /// Members whose digest differs, or that did not answer.
    pub digests: Vec<String>,
    pub panics: Vec<String>,
    /// Processes whose memory or data directory went on growing (a soak).
    pub growth: Vec<String>,
    /// A soak's table of memory and disk over the run (empty otherwise).
    pub resources: String,
    /// What a rolling upgrade or a mixed-version run broke: a step that
    /// failed, an operation that failed, a process that did not stop.
    pub upgrade_problems: Vec<String>,
    /// Figures of the run (clients' latency before and during an upgrade,
    /// which release led).
    pub notes: Vec<String>,
    /// Where the data, logs and `history.jsonl` are (if kept).
    pub kept: Option<PathBuf>,
}

impl Report {
    /// How many faults struck (kills, freezes), not counting their undoing.
    pub fn strikes(&self) -> usize {
        self.faults.iter().filter(|f| f.what.starts_with("strike") && !f.what.contains(" failed: ")).count()
    }

    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.watch_problems.is_empty()
            && self.lease_problems.is_empty()
            && self.registry_problems.is_empty()
            && self.jobs.problems.is_empty()
            && self.digests.is_empty()
            && self.panics.is_empty()
            && self.growth.is_empty()
            && self.upgrade_problems.is_empty()
    }

    /// The report as printed.
    pub fn text(&self) -> String {
        let mut out = String::new();
        out += &format!("scenario {}  seed {}  ({})\n", self.scenario, self.seed, self.mode);
        out += &format!("faults: {} ({})\n", self.strikes(), self.fault);
        let mut points = std::collections::BTreeMap::<&str, usize>::new();
        for f in &self.faults {
            if let Some((_, point)) = f.what.split_once("crash point ") {
                *points.entry(point).or_default() += 1;
            }
        }
        let mut lost: Vec<u64> = self.faults.iter().filter(|f| f.what.contains("power cut")).map(|f| f.lost).collect();
        if !lost.is_empty() {
            lost.sort_unstable();
            out += &format!(
                "  unsynced bytes thrown away: {} in all, median {} per cut\n",
                lost.iter().sum::<u64>(),
                lost[lost.len() / 2]
            );
        }
        if !points.is_empty() {
            let each: Vec<String> = points.iter().map(|(p, n)| format!("{p} {n}")).collect();
            out += &format!("  at: {}\n", each.join(", "));
        }
        for f in self.faults.iter().filter(|f| f.what.contains(" failed: ") || f.what.contains("had stopped")).take(5) {
            out += &format!("  at {:.1} s: {}\n", f.at, f.what);
        }
        let (ok, failed, unknown) = self.ops;
        out += &format!("operations: {ok} ok, {failed} failed, {unknown} unknown\n");
        out += &format!("longest time without an acknowledged write: {:.1} s\n", self.write_gap);
        out += &format!("linearizability: {} violations\n", self.violations.len());
        for v in &self.violations {
            out += &format!("  key {}: {}\n", v.key, v.reason);
            for op in v.excerpt.iter().take(20) {
                out += &format!("    {}\n", serde_json::to_string(op).unwrap_or_default());
            }
        }
        let (watchers, snapshots) = self.watchers;
        out += &format!(
            "watches: {} problems ({watchers} watchers, {snapshots} snapshot messages)\n",
            self.watch_problems.len()
        );
        for p in self.watch_problems.iter().take(10) {
            out += &format!("  {p}\n");
        }
        out += &format!("leases: {} problems ({} leases)\n", self.lease_problems.len(), self.leases);
        for p in self.lease_problems.iter().take(10) {
            out += &format!("  {p}\n");
        }
        out += &format!("registry: {} problems ({} instances)\n", self.registry_problems.len(), self.instances);
        for p in self.registry_problems.iter().take(10) {
            out += &format!("  {p}\n");
        }
        let (acked, succeeded, installed, failed) = self.jobs.counts();
        let (reused, moved) = self.jobs.runs.iter().fold((0, 0), |(r, m), run| (r + run.reused, m + run.moved));
        out += &format!(
            "jobs: {} problems ({acked} acknowledged, {succeeded} succeeded; targets: {installed} installed \
             byte-identical, {failed} failed with a reason; {} % of bytes reused)\n",
            self.jobs.problems.len(),
            (reused * 100).checked_div(reused + moved).unwrap_or(0)
        );
        for note in &self.jobs.notes {
            out += &format!("  {note}\n");
        }
        for p in self.jobs.problems.iter().take(10) {
            out += &format!("  {p}\n");
        }
        out += &format!("state digests: {}\n", if self.digests.is_empty() { "all equal" } else { "DIFFER" });
        for d in &self.digests {
            out += &format!("  {d}\n");
        }
        out += &format!("panics and unexpected exits: {}\n", self.panics.len());
        for p in self.panics.iter().take(5) {
            out += &format!("  {p}\n");
        }
        if !self.resources.is_empty() {
            out += &format!("memory and disk: {} still growing\n", self.growth.len());
            out += &self.resources;
            for g in &self.growth {
                out += &format!("  {g}\n");
            }
        }
        for note in &self.notes {
            out += &format!("{note}\n");
        }
        if !self.upgrade_problems.is_empty() {
            out += &format!("upgrade: {} problems\n", self.upgrade_problems.len());
        }
        for p in self.upgrade_problems.iter().take(10) {
            out += &format!("  {p}\n");
        }
        if let Some(dir) = &self.kept {
            out += &format!("files kept in {}\n", dir.display());
        }
        out += if self.passed() { "verdict: PASS\n" } else { "verdict: FAIL\n" };
        out
    }
}

/// Runs `name`.
pub async fn run(name: &str, options: &Options) -> anyhow::Result<Report> {
    let plan = plan_of(name)?;
    let Plan { target, kind, failpoints, scheduler_args, .. } = plan;
    let network = match Lab::unavailable() {
        None => true,
        Some(why) if kind.network() || kind.small_disks() => {
            bail!("scenario {name} needs network namespaces or mounts, which need root: {why}")
        }
        Some(_) => false,
    };
    if let (true, Some(why)) = (kind.power_loss(), crate::lazyfs::LazyFs::unsupported()) {
        bail!("scenario {name} needs a FUSE mount: {why}");
    }
    let tmp = tempfile::Builder::new().prefix("ferry-chaos-").tempdir()?;
    let dir = options.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let started = Instant::now();
    let base = match (plan.base, &options.base) {
        ([], _) => None,
        (slots, Some(older)) => Some((older.clone(), slots.to_vec())),
        (_, None) => bail!("scenario {name} starts on an older ferry: pass --from PATH (docs/operations/upgrades.md)"),
    };
    let spec = Spec {
        nodes: 3,
        workers: plan.workers,
        network,
        failpoints: failpoints.map(str::to_string),
        power_loss: kind.power_loss(),
        scheduler_args: scheduler_args.iter().map(|a| a.to_string()).collect(),
        small_disks: kind.small_disks().then_some(256 << 20),
        base,
        new_args: plan.new_args.iter().map(|a| a.to_string()).collect(),
    };
    let cluster = Cluster::start(&options.ferry, &dir, spec).await?;
    if kind.fail_point() || failpoints.is_some() {
        // A build without the feature would run the scenario with no fault.
        let probe = cluster.set_fault(crate::cluster::Who::Node(1), "ferry-chaos-probe", Some("off")).await;
        probe.with_context(|| {
            format!("scenario {name} needs fail points: build ferry with `cargo build --release -p ferry --features failpoints`")
        })?;
    }
    let mode = cluster.mode();
    let endpoints = cluster.endpoints();
    let cluster = Arc::new(Mutex::new(cluster));
    let history = History::new(started);
    let config = workload::Config {
        clients: 4,
        keys: 3,
        serializable: options.serializable,
        pace: plan.pace,
        sdk_deadlines: plan.strict,
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Two watchers, each preferring another member.
    let watch_stop = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();
    for i in 0..2 {
        let mut order = endpoints.clone();
        order.rotate_left(i + 1);
        let current = Arc::new(AtomicU64::new(0));
        watchers.push((watches::start(order, "chaos/", watch_stop.clone(), current.clone())?, current));
    }
    let clients = workload::start(&endpoints, &history, config, options.seed, stop.clone())?;
    let job_loop =
        jobs::start(endpoints.clone(), &cluster.lock().await.workers, plan.shape, options.seed, started, stop.clone());
    let lease_clients = leases::start(&endpoints, &history, 2, Duration::from_secs(2), options.seed, stop.clone())?;
    let registry_clients =
        registry::start(&endpoints, &history, 2, Duration::from_secs(2), options.seed, stop.clone())?;
    let nemesis = if kind == Kind::Upgrade {
        // A quarter of the run first: the clients' latency before.
        tokio::spawn(upgrade::rolling(cluster.clone(), options.duration / 4, started))
    } else {
        tokio::spawn(nemesis::fault_loop(
            cluster.clone(),
            target,
            kind,
            options.every.unwrap_or(plan.every),
            options.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            stop.clone(),
            started,
        ))
    };
    let reviver = failpoints
        .map(|_| tokio::spawn(nemesis::revive(cluster.clone(), Duration::from_secs(1), stop.clone(), started)));
    let sampler = plan.soak.then(|| tokio::spawn(soak::sample(cluster.clone(), options.duration, started)));
    tokio::time::sleep(options.duration).await;
    stop.store(true, Ordering::Relaxed);
    let workload_end = history.now();
    let mut faults = nemesis.await.context("the nemesis task")?;
    let samples = match sampler {
        Some(task) => task.await.context("the soak's sampler")?,
        None => Vec::new(),
    };
    if let Some(reviver) = reviver {
        faults.extend(reviver.await.context("the reviver task")?);
        faults.sort_by(|a, b| a.at.total_cmp(&b.at));
    }
    // Every process up again, crash points disarmed, before the clients
    // finish what they were doing (the job in flight is followed to its end).
    let mut panics: Vec<String> =
        faults.iter().filter(|f| f.what.contains("exited on its own")).map(|f| f.what.clone()).collect();
    faults.retain(|f| !f.what.contains("exited on its own"));
    if failpoints.is_some() && !faults.iter().any(|f| f.what.contains("crash point")) {
        panics.push("no crash point fired: is `ferry` built with `--features failpoints`?".into());
    }
    {
        let mut c = cluster.lock().await;
        for (who, status) in c.exited() {
            if !(failpoints.is_some() && status.code() == Some(nemesis::CRASH_EXIT)) {
                panics.push(format!("{who} exited on its own: {status}"));
            }
        }
        c.restart_stopped()?;
        if c.disarm()? {
            // A new leader gives every lease its full TTL again.
            let at = started.elapsed().as_secs_f64();
            faults.push(Fault { at, what: "restart every process without crash points".into(), lost: 0 });
        }
    }
    for client in clients {
        client.await.context("a client task")?;
    }
    let mut lease_runs = Vec::new();
    for client in lease_clients {
        lease_runs.extend(client.await.context("a lease client task")?);
    }
    let mut instance_runs = Vec::new();
    for client in registry_clients {
        instance_runs.extend(client.await.context("a registry client task")?);
    }
    let mut jobs = job_loop.await.context("the job task")?;

    // The last reads and the comparisons.
    let mut c = cluster.lock().await;
    for (who, status) in c.exited() {
        panics.push(format!("{who} exited on its own: {status}"));
    }
    c.wait_for_leader(Duration::from_secs(30)).await?;
    if let Err(e) = c.wait_for_workers(Duration::from_secs(30)).await {
        jobs.problems.push(e.to_string());
    }
    // Once every scheduler runs the new release, its short history applies;
    // in a mixed cluster it does while a new-release node leads.
    let kept = match kind {
        Kind::Upgrade => jobs::Kept::Newest(SHORT_HISTORY_KEEP),
        _ if !plan.base.is_empty() => jobs::Kept::AtLeast(SHORT_HISTORY_KEEP),
        _ if plan.soak => jobs::Kept::Newest(soak::JOB_HISTORY),
        _ => jobs::Kept::All,
    };
    jobs.problems.extend(jobs::final_check(&endpoints, &jobs, &c.workers, kept).await);
    if plan.soak || plan.strict {
        for run in jobs.runs.iter().filter(|r| r.state != "succeeded") {
            let why = match &run.submit_error {
                Some(e) => format!("was not taken: {e}"),
                None => format!("ended {:?}", run.state),
            };
            jobs.problems.push(format!("job {} {why}: every job of this scenario must succeed", run.k));
        }
    }
    if name == "corrupt-chunks" {
        // The fault must have done something: the targets caught corrupt
        // chunks (and fetched them again, or the job checks above fail).
        let mut caught = 0.0;
        for n in 2..=plan.workers {
            caught += c.metric(crate::cluster::Who::Worker(n), "ferry_worker_bad_chunks_total").await?;
        }
        jobs.notes.push(format!("{caught} corrupt chunks caught by their BLAKE3 check"));
        if caught == 0.0 {
            jobs.problems.push("no target caught a corrupt chunk: the fault did nothing".into());
        }
    }
    let mut snapshot_notes = Vec::new();
    if !plan.base.is_empty() {
        let mut installed = Vec::new();
        for id in c.node_ids() {
            let n = c.metric(crate::cluster::Who::Node(id), "ferry_raft_snapshots_installed_total").await;
            installed.push(format!("node {id} {}", n.map_or_else(|e| format!("? ({e})"), |n| n.to_string())));
        }
        snapshot_notes.push(format!("snapshots installed from a leader: {}", installed.join(", ")));
    }
    workload::final_reads(&endpoints, &history, config).await?;
    // The watchers catch up with the last acknowledged write, then stop.
    let newest = history
        .ops()
        .iter()
        .filter_map(|op| match op.outcome {
            Outcome::Written { revision } => Some(revision),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while watchers.iter().any(|(_, current)| current.load(Ordering::Relaxed) < newest) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch_stop.store(true, Ordering::Relaxed);
    let mut watched: Vec<Watched> = Vec::new();
    for (task, _) in watchers {
        watched.push(task.await.context("a watcher task")?);
    }
    let digests = c.digests(Duration::from_secs(30)).await;
    let first = digests.first().and_then(|(_, d)| d.as_ref().ok()).cloned();
    let digests: Vec<String> = digests
        .into_iter()
        .filter(|(_, d)| d.as_ref().ok() != first.as_ref())
        .map(|(id, d)| format!("node {id}: {d:?} (node 1: {first:?})"))
        .collect();
    panics.extend(c.panics());
    drop(c);

    let ops = history.ops();
    let violations = linearizable::check(&ops);
    let watch_problems: Vec<String> =
        watched.iter().enumerate().flat_map(|(i, w)| watches::check(&ops, w, &format!("watcher {i}"))).collect();
    let watcher_counts = (watched.len(), watched.iter().map(|w| w.snapshots.len()).sum());
    let fault_times: Vec<u64> = faults.iter().map(|f| (f.at * 1e9) as u64).collect();
    let lease_problems = leases::check(&lease_runs, &fault_times);
    let registry_problems = registry::check(&instance_runs, &fault_times);
    let counts = ops.iter().fold((0, 0, 0), |(ok, failed, unknown), op| match op.outcome {
        Outcome::Unknown { .. } => (ok, failed, unknown + 1),
        Outcome::Fail { .. } => (ok, failed + 1, unknown),
        _ => (ok + 1, failed, unknown),
    });
    let mut written: Vec<u64> = ops
        .iter()
        .filter(|op| matches!(op.outcome, Outcome::Written { .. }) && op.complete <= workload_end)
        .map(|op| op.complete)
        .collect();
    written.sort_unstable();
    let (upgrade_problems, mut notes) = upgrade::findings(&faults, &ops, kind == Kind::Upgrade, plan.strict, plan.base);
    notes.extend(snapshot_notes);
    let write_gap = written.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as f64 / 1e9;
    std::fs::write(dir.join("history.jsonl"), history::to_jsonl(&ops))?;
    write_jsonl(&dir.join("jobs.jsonl"), &jobs.runs)?;
    write_jsonl(&dir.join("faults.jsonl"), &faults)?;
    write_jsonl(&dir.join("leases.jsonl"), &lease_runs)?;
    write_jsonl(&dir.join("registry.jsonl"), &instance_runs)?;
    let mut report = Report {
        scenario: name.into(),
        seed: options.seed,
        mode,
        fault: kind.label(),
        faults,
        ops: counts,
        write_gap,
        violations,
        watch_problems,
        watchers: watcher_counts,
        lease_problems,
        leases: lease_runs.len(),
        registry_problems,
        instances: instance_runs.len(),
        jobs,
        digests,
        panics,
        growth: soak::growth(&samples),
        resources: soak::table(&samples),
        upgrade_problems,
        notes,
        kept: None,
    };
    if options.dir.is_some() {
        report.kept = Some(dir);
    } else if options.keep || !report.passed() {
        report.kept = Some(tmp.keep());
    }
    Ok(report)
}

/// `items` as JSON lines (the run's records, kept beside `history.jsonl`).
fn write_jsonl<T: serde::Serialize>(path: &std::path::Path, items: &[T]) -> anyhow::Result<()> {
    let lines: Vec<String> = items.iter().map(serde_json::to_string).collect::<Result<_, _>>()?;
    std::fs::write(path, lines.join("\n") + "\n").with_context(|| format!("writing {}", path.display()))
}
