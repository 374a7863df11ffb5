//! Faults, on a schedule drawn from the run's seed.
//!
//! Today: `kill -9` of the leader (or a follower) and a restart on the same
//! data directory after a pause, or `SIGSTOP` and, a while later,
//! `SIGCONT`. Every fault is logged with its time, so the report can line
//! it up with the history.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::cluster::Cluster;

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Leader,
    Follower,
}

/// What a fault does to its node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `kill -9`, and a restart on the same data directory after this long.
    Kill(Duration),
    /// `SIGSTOP`, and `SIGCONT` after this long.
    Freeze(Duration),
}

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Seconds since the run started.
    pub at: f64,
    pub what: String,
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
            Target::Leader => leader,
            Target::Follower => {
                let others: Vec<u64> = c.nodes.iter().map(|n| n.id).filter(|id| *id != leader).collect();
                others[rng.gen_range(0..others.len())]
            }
        };
        let at = || started.elapsed().as_secs_f64();
        let down = match kind {
            Kind::Kill(down) => {
                c.kill9(victim);
                faults.push(Fault { at: at(), what: format!("kill -9 node {victim} (leader {leader})") });
                down
            }
            Kind::Freeze(down) => {
                c.freeze(victim, true);
                faults.push(Fault { at: at(), what: format!("freeze node {victim} (leader {leader})") });
                down
            }
        };
        drop(c);
        tokio::time::sleep(down).await;
        let mut c = cluster.lock().await;
        let undone = match kind {
            Kind::Kill(_) => c.restart(victim).map(|()| format!("restart node {victim}")),
            Kind::Freeze(_) => {
                c.freeze(victim, false);
                Ok(format!("thaw node {victim}"))
            }
        };
        let what = undone.unwrap_or_else(|e| format!("restart node {victim} failed: {e}"));
        faults.push(Fault { at: at(), what });
    }
    faults
}
