//! Faults, on a schedule drawn from the run's seed.
//!
//! `kill -9` of the leader (or a follower) and a restart on the same data
//! directory after a pause; `SIGSTOP` and, a while later, `SIGCONT`; and,
//! with network namespaces, a node's links to its peers cut (both ways, or
//! only inbound), or flapping, and healed a while later. Every fault is
//! logged with its time, so the report can line it up with the history.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::cluster::{Cluster, Cut, Who};

/// Which process a fault hits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Leader,
    Follower,
    /// The jobs' source worker (`w1`).
    Source,
    /// One of the jobs' target workers (`w2` on).
    JobTarget,
}

/// What a fault does to its node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `kill -9`, and a restart on the same data directory after this long.
    Kill(Duration),
    /// `SIGSTOP`, and `SIGCONT` after this long.
    Freeze(Duration),
    /// The node's links to its peers cut, and healed after this long.
    Isolate(Cut, Duration),
    /// The node's links to its peers cut and healed in turn every 500 ms,
    /// for this long.
    Flap(Duration),
    /// `kill -9` of the victim (and, if it is a scheduler, of one more: a
    /// majority with the leader), each losing what its disk had not made
    /// durable (a power cut on [`crate::lazyfs`]), restarted after this long.
    PowerCut(Duration),
    /// The victim's disk filled with a ballast file (a small tmpfs), and
    /// emptied after this long; a process that stopped meanwhile is
    /// restarted then.
    DiskFull(Duration),
    /// Fail point `point` of the victim set to `actions` at run time (the
    /// `--features failpoints` build: `ferry_lab::faults`), and removed
    /// after this long: its gRPC calls delayed or dropped, its chunks
    /// served corrupt.
    FailPoint { point: &'static str, actions: &'static str, down: Duration },
    /// The victim's link capped at [`SQUEEZE`] bytes/s both ways (`tc
    /// tbf`), and freed after this long.
    Squeeze(Duration),
    /// The leader, the jobs' source and one target (`w2`) cut off from
    /// everyone else (a minority; the harness's clients reach both sides),
    /// and healed after this long.
    Split(Duration),
    /// The victim (a follower) replaced as an operator replaces a member:
    /// removed, its process stopped, a fresh node under a new id started at
    /// its address and added; the leader killed while the add is under
    /// way, and restarted after this long. The new node must end a voter.
    Replace(Duration),
    /// No strike from outside: the processes die at their armed crash
    /// points ([`CRASH_POINTS`]) and [`revive`] restarts them.
    CrashPoints,
    /// No strike: every process is moved to the binary under test, one at
    /// a time ([`crate::upgrade::rolling`]).
    Upgrade,
}

/// `FAILPOINTS` of the crash-point scenario: where, and how often, a
/// process dies (points of `ferry_storage::crash` and the worker's).
///
/// A node that dies applying a batch applies it again when it replays its
/// log at restart, so the apply point is rare: at 2 % a node would seldom
/// get past its own replay.
pub const CRASH_POINTS: &str = "log-before-sync=0.02%return;snapshot-build=30%return;\
     snapshot-install=30%return;apply-batch=0.1%return;install-before-rename=2%return;hook-running=2%return";

/// The rate of a squeezed link, bytes per second.
pub const SQUEEZE: u64 = 256 * 1024;

/// The exit status of a process that died at a crash point.
pub const CRASH_EXIT: i32 = 70;

impl Kind {
    /// Whether the fault needs power-loss filesystems.
    pub fn power_loss(self) -> bool {
        matches!(self, Kind::PowerCut(_))
    }

    /// Whether the fault needs small disks of their own (tmpfs, as root).
    pub fn small_disks(self) -> bool {
        matches!(self, Kind::DiskFull(_))
    }

    /// Whether the fault needs network namespaces.
    pub fn network(self) -> bool {
        matches!(self, Kind::Isolate(..) | Kind::Flap(_) | Kind::Squeeze(_) | Kind::Split(_))
    }

    /// Whether the fault sets fail points at run time (which needs a
    /// `--features failpoints` build of `ferry`).
    pub fn fail_point(self) -> bool {
        matches!(self, Kind::FailPoint { .. })
    }

    /// What the report calls a strike of this kind.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Kill(_) => "kill -9",
            Kind::Freeze(_) => "SIGSTOP",
            Kind::Isolate(Cut::Both, _) => "isolated from its peers",
            Kind::Isolate(Cut::Inbound, _) => "inbound links cut",
            Kind::Flap(_) => "flapping links",
            Kind::CrashPoints => "crash points",
            Kind::PowerCut(_) => "power cut",
            Kind::DiskFull(_) => "disk full",
            Kind::FailPoint { point: "rpc-delay", .. } => "gRPC calls held",
            Kind::FailPoint { point: "rpc-drop", .. } => "gRPC calls dropped",
            Kind::FailPoint { point: "chunk-server-corrupt", .. } => "chunks served corrupt",
            Kind::FailPoint { .. } => "fail point set",
            Kind::Squeeze(_) => "link squeezed to 256 KiB/s",
            Kind::Split(_) => "cut off with the jobs' source and one target (a minority)",
            Kind::Replace(_) => "replaced by a fresh node, the leader killed mid-add",
            Kind::Upgrade => "stopped and started on the new binary",
        }
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fault {
    /// Seconds since the run started.
    pub at: f64,
    pub what: String,
    /// Bytes a power cut threw away (written, not yet synced).
    pub lost: u64,
}

/// Strikes `target` with `kind` every `every` (±50 %, from the seed) until
/// `stop`, and undoes each strike (restart, `SIGCONT`) before the next.
/// Returns what it did.
pub async fn fault_loop(
    cluster: Arc<Mutex<Cluster>>,
    target: Target,
    kind: Kind,
    every: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
    started: std::time::Instant,
) -> Vec<Fault> {
    if matches!(kind, Kind::CrashPoints | Kind::Upgrade) {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let pause = every.mul_f64(rng.gen_range(0.5..1.5));
        tokio::time::sleep(pause).await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut c = cluster.lock().await;
        let Some(leader) = c.leader().await else { continue };
        let victim = match target {
            Target::Leader => Who::Node(leader),
            Target::Follower => {
                let others: Vec<u64> = c.node_ids().into_iter().filter(|id| *id != leader).collect();
                Who::Node(others[rng.gen_range(0..others.len())])
            }
            Target::Source => Who::Worker(1),
            Target::JobTarget => Who::Worker(rng.gen_range(2..=c.workers.len())),
        };
        let at = || started.elapsed().as_secs_f64();
        if let (Kind::Replace(down), Who::Node(old)) = (kind, victim) {
            drop(c);
            faults.extend(replace_under_kill(&cluster, old, leader, down, &mut rng, started).await);
            continue;
        }
        // A power cut takes one more scheduler down with the victim.
        let second = match (kind, victim) {
            (Kind::PowerCut(_), Who::Node(id)) => {
                let others: Vec<u64> = c.node_ids().into_iter().filter(|other| *other != id).collect();
                Some(Who::Node(others[rng.gen_range(0..others.len())]))
            }
            _ => None,
        };
        let mut lost = 0;
        let mut filled = 0;
        let side = [victim, Who::Worker(1), Who::Worker(2)];
        let struck = match kind {
            Kind::FailPoint { point, actions, .. } => c.set_fault(victim, point, Some(actions)).await,
            Kind::Squeeze(_) => c.squeeze(victim, Some(SQUEEZE)),
            Kind::Split(_) => c.split(&side),
            Kind::DiskFull(_) => c.fill(victim).map(|bytes| filled = bytes),
            Kind::PowerCut(_) => [Some(victim), second].into_iter().flatten().try_for_each(|who| {
                lost += c.power_cut(who)?;
                Ok(())
            }),
            // (A replace strikes schedulers only, above.)
            Kind::Kill(_) | Kind::CrashPoints | Kind::Replace(_) | Kind::Upgrade => {
                c.kill9(victim);
                Ok(())
            }
            Kind::Freeze(_) => {
                c.freeze(victim, true);
                Ok(())
            }
            Kind::Isolate(cut, _) => node(victim).and_then(|id| c.cut(id, cut)),
            Kind::Flap(_) => node(victim).and_then(|id| c.cut(id, Cut::Both)),
        };
        let mut what = format!("strike {victim} (leader {leader}): {}", kind.label());
        if filled > 0 {
            what += &format!(" ({filled} bytes of ballast)");
        }
        if let Some(second) = second {
            what =
                format!("strike {victim} and {second} (leader {leader}): {}, {lost} unsynced bytes lost", kind.label());
        }
        if let Err(e) = struck {
            what += &format!(" failed: {e}");
        }
        faults.push(Fault { at: at(), what, lost });
        drop(c);
        let down = match kind {
            Kind::Kill(down)
            | Kind::Replace(down)
            | Kind::Freeze(down)
            | Kind::Isolate(_, down)
            | Kind::PowerCut(down)
            | Kind::DiskFull(down)
            | Kind::FailPoint { down, .. }
            | Kind::Squeeze(down)
            | Kind::Split(down) => {
                tokio::time::sleep(down).await;
                Ok(())
            }
            Kind::CrashPoints | Kind::Upgrade => Ok(()),
            Kind::Flap(down) => match node(victim) {
                Ok(id) => flap(&cluster, id, down).await,
                Err(e) => Err(e),
            },
        };
        let mut c = cluster.lock().await;
        let removed = match kind {
            Kind::FailPoint { point, .. } => c.set_fault(victim, point, None).await,
            _ => Ok(()),
        };
        let undone = down.and(removed).and_then(|()| match kind {
            Kind::FailPoint { point, .. } => Ok(format!("remove {point} from {victim}")),
            Kind::Squeeze(_) => c.squeeze(victim, None).map(|()| format!("free the link of {victim}")),
            Kind::Split(_) => side.iter().try_for_each(|who| c.heal(*who)).map(|()| "heal the split".to_string()),
            Kind::Kill(_) | Kind::CrashPoints | Kind::Replace(_) | Kind::Upgrade => {
                c.restart(victim).map(|()| format!("restart {victim}"))
            }
            Kind::PowerCut(_) => [Some(victim), second]
                .into_iter()
                .flatten()
                .try_for_each(|who| c.restart(who))
                .map(|()| format!("restart {victim} and {}", second.map_or(String::new(), |s| s.to_string()))),
            Kind::Freeze(_) => {
                c.freeze(victim, false);
                Ok(format!("thaw {victim}"))
            }
            Kind::DiskFull(_) => c.unfill(victim).and_then(|()| match c.exited_one(victim) {
                None => Ok(format!("empty the disk of {victim}")),
                Some((status, error)) => c
                    .restart(victim)
                    .map(|()| format!("empty the disk of {victim}, which had stopped ({status}: {error}); restart it")),
            }),
            Kind::Isolate(..) | Kind::Flap(_) => c.heal(victim).map(|()| format!("heal {victim}")),
        });
        let what = undone.unwrap_or_else(|e| format!("undoing the fault on {victim} failed: {e}"));
        faults.push(Fault { at: at(), what, lost: 0 });
    }
    faults
}

/// The scheduler `who` is, for the network faults (which cut schedulers
/// only).
fn node(who: Who) -> anyhow::Result<u64> {
    match who {
        Who::Node(id) => Ok(id),
        Who::Worker(_) => anyhow::bail!("network faults cut schedulers only"),
    }
}

/// Cuts and heals `victim`'s links in turn every 500 ms for `down`,
/// leaving them cut.
async fn flap(cluster: &Mutex<Cluster>, victim: u64, down: Duration) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + down;
    let mut cut = true;
    while std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = cluster.lock().await;
        if cut {
            c.heal(Who::Node(victim))?;
        } else {
            c.cut(victim, Cut::Both)?;
        }
        cut = !cut;
    }
    if !cut {
        cluster.lock().await.cut(victim, Cut::Both)?;
    }
    Ok(())
}

/// Restarts, after `down`, every process that died at a crash point, until
/// `stop` (beside the nemesis, in scenarios with crash points armed). A process that exited otherwise is left down (the report counts
/// it as an unexpected exit).
pub async fn revive(
    cluster: Arc<Mutex<Cluster>>,
    down: Duration,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> Vec<Fault> {
    let mut faults = Vec::new();
    let mut unexpected = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exited = cluster.lock().await.exited();
        for (who, status) in exited {
            let at = started.elapsed().as_secs_f64();
            if status.code() != Some(CRASH_EXIT) {
                unexpected.push(Fault { at, what: format!("{who} exited on its own: {status}"), lost: 0 });
                continue;
            }
            let point = cluster.lock().await.last_crash_point(who).unwrap_or_else(|| "?".into());
            faults.push(Fault { at, what: format!("strike {who}: died at crash point {point}"), lost: 0 });
            let cluster = cluster.clone();
            // Each restart waits on its own, so crashes close together
            // are not serialised.
            tokio::spawn(async move {
                tokio::time::sleep(down).await;
                if let Err(e) = cluster.lock().await.restart(who) {
                    eprintln!("restarting {who}: {e}");
                }
            });
        }
    }
    faults.extend(unexpected);
    faults
}

/// [`Kind::Replace`]: replaces follower `old` and kills `leader` mid-add.
async fn replace_under_kill(
    cluster: &Mutex<Cluster>,
    old: u64,
    leader: u64,
    down: Duration,
    rng: &mut StdRng,
    started: Instant,
) -> Vec<Fault> {
    let at = || started.elapsed().as_secs_f64();
    let fault = |what: String| Fault { at: at(), what, lost: 0 };
    let mut out = Vec::new();
    let client = match crate::workload::connect(cluster.lock().await.endpoints()) {
        Ok(client) => client,
        Err(e) => return vec![fault(format!("strike node {old}: replace failed: {e}"))],
    };
    if let Err(e) = client.remove_node(old).await {
        // Sent and lost, or refused: what the membership says decides.
        let members = client.status().await.map(|s| s.members).unwrap_or_default();
        if members.iter().any(|m| m.id == old) {
            return vec![fault(format!("strike node {old} (leader {leader}): remove failed: {e}"))];
        }
    }
    let (new, addr) = match cluster.lock().await.replace(old) {
        Ok(started) => started,
        Err(e) => return vec![fault(format!("strike node {old}: removed; starting its replacement failed: {e}"))],
    };
    let what = format!("strike node {old} (leader {leader}): removed; node {new} started at {addr} and being added");
    out.push(fault(what));
    let adding = {
        let (client, addr) = (client.clone(), addr.clone());
        tokio::spawn(async move { client.add_node(new, &addr, false).await })
    };
    tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
    cluster.lock().await.kill9(Who::Node(leader));
    out.push(fault(format!("strike node {leader}: kill -9 of the leader while node {new} is being added")));
    tokio::time::sleep(down).await;
    if let Err(e) = cluster.lock().await.restart(Who::Node(leader)) {
        out.push(fault(format!("undoing the fault on node {leader} failed: {e}")));
    }
    let first = adding.await.map_err(anyhow::Error::from).and_then(|r| r.map_err(anyhow::Error::from));
    // An add lost with the leader is asked again: a learner at the same
    // address is promoted, a node not yet added is added.
    let mut tries = 1;
    let mut last = first.err().map(|e| e.to_string());
    loop {
        let members = client.status().await.map(|s| s.members).unwrap_or_default();
        if members.iter().any(|m| m.id == new && m.kind == "voter") {
            out.push(fault(format!("restart node {leader}; node {new} is a voter (added in {tries} tries)")));
            break;
        }
        if tries == 5 {
            let why = last.unwrap_or_default();
            out.push(fault(format!(
                "undoing the fault on node {old} failed: node {new} not a voter after 5 adds: {why}"
            )));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        tries += 1;
        last = client.add_node(new, &addr, false).await.err().map(|e| e.to_string());
    }
    out
}
