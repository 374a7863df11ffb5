//! When a node builds its snapshot: about every `snapshot_every` log
//! entries, the three nodes of a group a third of that apart.
//!
//! openraft's own policy (`LogsSinceLast`) builds when the committed index
//! passes the last snapshot by `snapshot_every`. The committed index moves
//! on every node together, so all of them built at the same entry, at the
//! same moment: the group's log writes and applies slowed down on every node
//! at once, and with the nodes on one disk (the kv bench) their syncs queued
//! behind three snapshot files. Here openraft's policy is `Never` and
//! [`run`] asks for a build when the applied index reaches the node's next
//! point on a grid of its own: `phase + k * snapshot_every` (k ≥ 1), with a
//! phase of `(id mod 3) * snapshot_every / 3`. Two of three nodes, a quorum,
//! are never building at the same point; a node that installs a snapshot
//! from the leader goes back to its own grid at its next build.

use std::time::Duration;

use ferry_storage::{NodeId, TypeConfig};
use openraft::Raft;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

/// How often the applied index is looked at. A build starts at most this
/// late (about 1,000 entries at 10,000 puts/s, a tenth of the default).
const POLL: Duration = Duration::from_millis(100);
/// A build asked for that has not shown up in the metrics (openraft ignores
/// a request while it builds or installs one) is asked for again after this.
const ASK_AGAIN: Duration = Duration::from_secs(30);

/// The applied index at which a node whose last snapshot ends at `last`
/// builds its next one.
pub fn next_snapshot_at(last: Option<u64>, every: u64, id: NodeId) -> u64 {
    let every = every.max(1);
    let phase = (id % 3) * every / 3;
    // The first grid point after `last`, and never the phase itself.
    let k = match last {
        Some(last) if last >= phase => (last - phase) / every + 1,
        _ => 1,
    };
    phase + k * every
}

/// Asks `raft` for a snapshot at each of node `id`'s grid points, until
/// `shutdown` changes (the node stops) or openraft stops.
pub async fn run(raft: Raft<TypeConfig>, every: u64, id: NodeId, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut asked: Option<(u64, Instant)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (applied, last) = {
            let m = raft.metrics();
            let m = m.borrow();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index))
        };
        let Some(applied) = applied else { continue };
        let due = next_snapshot_at(last, every, id);
        let pending = asked.is_some_and(|(at, when)| at == due && when.elapsed() < ASK_AGAIN);
        if applied < due || pending {
            continue;
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        tracing::debug!(applied, due, "snapshot asked for");
        asked = Some((due, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_builds_every_n_entries_a_third_of_n_apart_from_the_others() {
        let every = 9_000;
        // Node 3 on multiples of n, node 1 a third later, node 2 two thirds.
        let points = |id| {
            let mut at = Vec::new();
            let mut last = None;
            for _ in 0..4 {
                let next = next_snapshot_at(last, every, id);
                at.push(next);
                last = Some(next + 7); // a build lands a little after its point
            }
            at
        };
        assert_eq!(points(3), [9_000, 18_000, 27_000, 36_000]);
        assert_eq!(points(1), [12_000, 21_000, 30_000, 39_000]);
        assert_eq!(points(2), [15_000, 24_000, 33_000, 42_000]);
    }

    #[test]
    fn after_an_installed_snapshot_a_node_keeps_to_its_own_grid() {
        // A leader's snapshot at 20,500 installed on node 1 (grid 12,000 +
        // 9,000 k): its next build is at 21,000, not 29,500.
        assert_eq!(next_snapshot_at(Some(20_500), 9_000, 1), 21_000);
        // A snapshot exactly on a grid point: the next one.
        assert_eq!(next_snapshot_at(Some(21_000), 9_000, 1), 30_000);
        // Below the phase (a snapshot from before): the first point.
        assert_eq!(next_snapshot_at(Some(1_000), 9_000, 1), 12_000);
    }

    #[test]
    fn tiny_intervals_still_move_forward() {
        for id in 1..=5 {
            for every in [1, 2, 3] {
                let mut last = None;
                for _ in 0..10 {
                    let next = next_snapshot_at(last, every, id);
                    assert!(last.is_none_or(|l| next > l), "id {id} every {every}: {next} after {last:?}");
                    last = Some(next);
                }
            }
        }
    }
}
