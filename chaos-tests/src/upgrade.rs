//! Rolling upgrades under load: every process moved, one at a time, from an
//! older `ferry` ([`crate::cluster::Spec::base`]) to the binary under test,
//! the way `docs/operations/upgrades.md` tells an operator to, while the
//! workloads run on; and what the clients felt.
//!
//! The order: the followers, then the leader (leadership moved away first
//! with `ferry cluster transfer-leader` when the leader's release has it;
//! an older one is stopped, and the others elect), then the workers. Each
//! process is stopped cleanly (`SIGTERM`; a worker of a release that drains
//! finishes its transfers first), started on the new binary with the same
//! data directory and flags, and is ready before the next one goes.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::cluster::{Cluster, Who};
use crate::history::{Op, Outcome};
use crate::nemesis::Fault;

/// How long a process has to stop cleanly before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(30);
/// How long a restarted process has to be ready.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// A pause between two steps, as an operator checks the cluster.
const BETWEEN: Duration = Duration::from_secs(2);

/// What the report calls the first and the last step.
pub const START: &str = "upgrade: start";
pub const DONE: &str = "upgrade: done";

/// Waits `warmup` (the clients' latency before), then upgrades every
/// process. Returns each step; a step that failed says so (and the report
/// counts it as a problem).
pub async fn rolling(cluster: Arc<Mutex<Cluster>>, warmup: Duration, started: Instant) -> Vec<Fault> {
    tokio::time::sleep(warmup).await;
    let at = || started.elapsed().as_secs_f64();
    let mut faults = vec![Fault { at: at(), what: START.into(), lost: 0 }];
    let mut step = |what: String| faults.push(Fault { at: at(), what, lost: 0 });
    loop {
        let mut c = cluster.lock().await;
        let Ok(leader) = c.wait_for_leader(READY_WITHIN).await else {
            step("upgrade failed: no leader".into());
            return faults;
        };
        let pending: Vec<u64> = c.node_ids().into_iter().filter(|id| !c.upgraded(Who::Node(*id))).collect();
        let Some(next) = pending.iter().copied().find(|id| *id != leader).or(pending.first().copied()) else {
            break;
        };
        let who = Who::Node(next);
        // The checkers excuse what a fault explains (a lease kept while
        // the leader changes): each part of a step is one.
        step(format!("upgrade {who}: stopping"));
        if next == leader {
            // Leadership moves first; a leader whose release has no
            // transfer-leader is stopped, and the others elect.
            let addr = c.endpoints()[c.node_ids().iter().position(|i| *i == leader).unwrap_or(0)].clone();
            let t = Instant::now();
            step(match transfer_leader(c.ferry(), &addr) {
                Ok(_) => format!("upgrade {who}: leadership moved away in {:.2} s", t.elapsed().as_secs_f64()),
                Err(e) => format!("upgrade {who}: the leader, stopped without moving leadership first: {e}"),
            });
        }
        let moved = move_over(&mut c, who, &mut step).await;
        drop(c);
        if !moved {
            return faults;
        }
        tokio::time::sleep(BETWEEN).await;
    }
    let workers = cluster.lock().await.workers.len();
    for n in 1..=workers {
        let mut c = cluster.lock().await;
        let who = Who::Worker(n);
        step(format!("upgrade {who}: stopping"));
        let moved = move_over(&mut c, who, &mut step).await;
        drop(c);
        if !moved {
            return faults;
        }
        tokio::time::sleep(BETWEEN).await;
    }
    step(DONE.into());
    faults
}

/// Stops `who` and starts it on the new binary, each part a step; false if
/// it did not come back ready.
async fn move_over(c: &mut Cluster, who: Who, step: &mut impl FnMut(String)) -> bool {
    step(stop_one(c, who).await);
    let what = start_one(c, who).await;
    let ready = !what.contains("failed");
    step(what);
    ready
}

/// Stops `who` cleanly (`SIGTERM`; `kill -9` after [`STOP_WITHIN`]). Says
/// how it went.
async fn stop_one(c: &mut Cluster, who: Who) -> String {
    let t = Instant::now();
    let clean = c.stop(who, STOP_WITHIN).await;
    let took = t.elapsed().as_secs_f64();
    if clean {
        format!("upgrade {who}: stopped in {took:.1} s")
    } else {
        format!("upgrade {who}: killed after {took:.0} s without stopping")
    }
}

/// Starts `who` on the binary under test and waits until it is ready: a
/// scheduler knows the leader and has applied what the leader had
/// committed; a worker is connected. Says how it went.
async fn start_one(c: &mut Cluster, who: Who) -> String {
    if let Err(e) = c.upgrade(who) {
        return format!("upgrade {who}: restart failed: {e}");
    }
    let t = Instant::now();
    let ready = match who {
        Who::Node(id) => scheduler_ready(c, id).await,
        Who::Worker(_) => c.wait_for_workers(READY_WITHIN).await,
    };
    match ready {
        Ok(()) => format!("upgrade {who}: ready on the new binary in {:.1} s", t.elapsed().as_secs_f64()),
        Err(e) => format!("upgrade {who}: failed to be ready: {e}"),
    }
}

async fn scheduler_ready(c: &Cluster, id: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    let addr = c.endpoints()[c.node_ids().iter().position(|i| *i == id).unwrap_or(0)].clone();
    let client = crate::workload::connect(c.endpoints())?;
    loop {
        let own = tokio::time::timeout(Duration::from_secs(1), client.status_of(&addr)).await;
        let leader = tokio::time::timeout(Duration::from_secs(1), client.status()).await;
        if let (Ok(Ok(own)), Ok(Ok(leader))) = (own, leader) {
            if own.leader_id != 0 && own.applied_index >= leader.commit_index.min(leader.applied_index) {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "node {id} not caught up within {READY_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Moves leadership away from the leader at `endpoint` with the CLI of the
/// binary under test.
pub fn transfer_leader(ferry: &std::path::Path, endpoint: &str) -> anyhow::Result<String> {
    let out = Command::new(ferry)
        .args(["--endpoints", endpoint, "cluster", "transfer-leader"])
        .envs(crate::workload::cli_env())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string() + &String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "ferry cluster transfer-leader: {}", text.trim());
    Ok(text)
}

/// Latency of the operations that completed in `[from, to)` seconds of the
/// run: (count, p99, max) in milliseconds.
pub fn latency(ops: &[Op], from: f64, to: f64) -> (usize, f64, f64) {
    let (from, to) = ((from * 1e9) as u64, (to * 1e9) as u64);
    let mut took: Vec<u64> =
        ops.iter().filter(|op| op.complete >= from && op.complete < to).map(|op| op.complete - op.invoke).collect();
    if took.is_empty() {
        return (0, 0.0, 0.0);
    }
    took.sort_unstable();
    let p99 = took[(took.len() * 99 / 100).min(took.len() - 1)];
    (took.len(), p99 as f64 / 1e6, took[took.len() - 1] as f64 / 1e6)
}

/// What a rolling upgrade or a mixed-version run found: problems (a step
/// that failed or a process killed after not stopping; under
/// `strict`, any operation that did not succeed) and figures (the
/// clients' latency before and during the upgrade; which release led when
/// the leader was struck).
/// `rolling`: the run was a rolling upgrade; `base`: the slots that
/// started on the older release (a mixed-version run, when not rolling).
pub fn findings(
    faults: &[Fault],
    ops: &[Op],
    rolling: bool,
    strict: bool,
    base: &[usize],
) -> (Vec<String>, Vec<String>) {
    let (mut problems, mut notes) = (Vec::new(), Vec::new());
    if rolling {
        for f in faults.iter().filter(|f| f.what.contains("failed") || f.what.contains("killed after")) {
            problems.push(format!("at {:.1} s: {}", f.at, f.what));
        }
        let at = |what: &str| faults.iter().find(|f| f.what == what).map(|f| f.at);
        match (at(START), at(DONE)) {
            (Some(start), Some(done)) => {
                let ms = |(n, p99, max): (usize, f64, f64)| format!("{n} ops, p99 {p99:.0} ms, max {max:.0} ms");
                notes.push(format!(
                    "client latency before the upgrade: {}; during it ({:.0} s): {}",
                    ms(latency(ops, 0.0, start)),
                    done - start,
                    ms(latency(ops, start, done))
                ));
            }
            _ => problems.push("the upgrade did not finish within the run (see the steps above)".into()),
        }
        for f in faults.iter().filter(|f| f.what.starts_with("upgrade")) {
            notes.push(format!("  at {:.1} s: {}", f.at, f.what));
        }
    }
    if strict {
        let bad: Vec<&Op> =
            ops.iter().filter(|op| matches!(op.outcome, Outcome::Fail { .. } | Outcome::Unknown { .. })).collect();
        if !bad.is_empty() {
            problems.push(format!("{} client operations did not succeed; the first: {:?}", bad.len(), bad[0]));
        }
    }
    if !base.is_empty() && !rolling {
        // "strike node N (leader N)": node N sits in slot N-1.
        let leaders: Vec<usize> = faults
            .iter()
            .filter_map(|f| f.what.split_once("(leader ")?.1.split(')').next()?.parse::<usize>().ok())
            .collect();
        let older = leaders.iter().filter(|id| base.contains(&(**id - 1))).count();
        notes.push(format!(
            "the struck leader ran the older release {older} times and this one {} times",
            leaders.len() - older
        ));
    }
    (problems, notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, Outcome};

    fn op(invoke_ms: u64, took_ms: u64) -> Op {
        Op {
            process: 0,
            key: "k".into(),
            call: Call::Read,
            outcome: Outcome::Read { value: None },
            invoke: invoke_ms * 1_000_000,
            complete: (invoke_ms + took_ms) * 1_000_000,
        }
    }

    #[test]
    fn latency_counts_the_operations_that_completed_in_the_window() {
        let mut ops: Vec<Op> = (0..100).map(|i| op(i * 10, 2)).collect();
        ops.push(op(500, 300));
        ops.push(op(2_000, 5));
        let (n, p99, max) = latency(&ops, 0.0, 1.5);
        assert_eq!((n, max), (101, 300.0));
        assert_eq!(p99, 2.0, "one slow op in 101 is past the 99th percentile");
        assert_eq!(latency(&ops, 1.5, 3.0), (1, 5.0, 5.0));
        assert_eq!(latency(&ops, 5.0, 6.0), (0, 0.0, 0.0));
    }
}
