//! Faults, on a schedule drawn from the run's seed.
//!
//! Today: `kill -9` of the leader (or a follower) and a restart on the same
//! data directory after a pause. Every fault is logged with its time, so
//! the report can line it up with the history.

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

/// One fault as it happened.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Seconds since the run started.
    pub at: f64,
    pub what: String,
}

/// Kills `target` every `every` (±50 %, from the seed), leaves it down for
/// `down`, restarts it; until `stop`. Returns what it did.
pub async fn kill_loop(
    cluster: Arc<Mutex<Cluster>>,
    target: Target,
    every: Duration,
    down: Duration,
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
        c.kill9(victim);
        faults.push(Fault {
            at: started.elapsed().as_secs_f64(),
            what: format!("kill -9 node {victim} (leader {leader})"),
        });
        drop(c);
        tokio::time::sleep(down).await;
        let mut c = cluster.lock().await;
        match c.restart(victim) {
            Ok(()) => {
                faults.push(Fault { at: started.elapsed().as_secs_f64(), what: format!("restart node {victim}") })
            }
            Err(e) => faults.push(Fault {
                at: started.elapsed().as_secs_f64(),
                what: format!("restart node {victim} failed: {e}"),
            }),
        }
    }
    faults
}
