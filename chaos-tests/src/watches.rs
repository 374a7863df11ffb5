//! Watchers beside the workload, and the checker of what they saw.
//!
//! Each watcher follows the workload's prefix from revision 1 through the
//! SDK (which reconnects to any member and resumes after the last revision
//! it delivered). What it saw must be every change once, in order, with no
//! gap: its revisions strictly increase; every write the history says was
//! acknowledged is there, at its revision, with its value; every event is
//! a write of the history (values are unique) at the revision that write
//! answered, if it answered; and it reaches the last acknowledged revision.
//! A snapshot message (the watcher fell behind the kept history) restarts
//! the comparison after its revision; the report counts them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::history::{Call, Op, Outcome};

/// One change as a watcher saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub revision: u64,
    pub key: String,
    /// `None`: a delete.
    pub value: Option<String>,
}

/// What one watcher saw.
#[derive(Debug, Clone, Default)]
pub struct Watched {
    /// Changes, in the order they came.
    pub events: Vec<Seen>,
    /// Revisions of snapshot messages (after which changes restart).
    pub snapshots: Vec<u64>,
    /// The newest revision it knows it is current to.
    pub current: u64,
}

/// Starts a watcher on `prefix` through `endpoints` (in this order of
/// preference); it stops at `stop`, and keeps `current` at the newest
/// revision it is current to.
pub fn start(
    endpoints: Vec<String>,
    prefix: &str,
    stop: Arc<AtomicBool>,
    current: Arc<AtomicU64>,
) -> anyhow::Result<tokio::task::JoinHandle<Watched>> {
    let client = crate::workload::client(&endpoints)?;
    let mut watch = client.watch(prefix, 1);
    Ok(tokio::spawn(async move {
        let mut watched = Watched::default();
        while !stop.load(Ordering::Relaxed) {
            let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await else {
                continue;
            };
            let Ok(resp) = message else { continue };
            let revision = resp.header.as_ref().map_or(0, |h| h.revision);
            if resp.snapshot {
                watched.snapshots.push(revision);
            }
            for event in resp.events {
                let Some(kv) = event.kv else { continue };
                let delete = event.r#type == ferry_sdk::pb::event::Type::Delete as i32;
                watched.events.push(Seen {
                    revision: kv.mod_revision,
                    key: kv.key,
                    value: (!delete).then(|| String::from_utf8_lossy(&kv.value).into_owned()),
                });
            }
            watched.current = watched.current.max(revision);
            current.store(watched.current, Ordering::Relaxed);
        }
        watched
    }))
}

/// What is wrong with what `watched` saw, given the history `ops`.
pub fn check(ops: &[Op], watched: &Watched, name: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // Every write of the history by value: its key and answered revision.
    let mut writes: HashMap<&str, (&str, Option<u64>)> = HashMap::new();
    for op in ops {
        if let Call::Write { value } | Call::Cas { value, .. } = &op.call {
            let answered = match op.outcome {
                Outcome::Written { revision } => Some(revision),
                _ => None,
            };
            writes.insert(value.as_str(), (op.key.as_str(), answered));
        }
    }
    let after_snapshot = watched.snapshots.last().copied().unwrap_or(0);
    let mut last = 0;
    for seen in &watched.events {
        if seen.revision <= last && seen.revision > after_snapshot {
            problems.push(format!("{name}: revision {} came after {last} (out of order or twice)", seen.revision));
        }
        last = last.max(seen.revision);
        let Some(value) = &seen.value else {
            problems.push(format!("{name}: a delete of {} at {} that no one made", seen.key, seen.revision));
            continue;
        };
        match writes.get(value.as_str()) {
            None => problems.push(format!("{name}: {}={value} at {} was never written", seen.key, seen.revision)),
            Some((key, _)) if *key != seen.key => {
                problems.push(format!("{name}: {value} was written to {key} but seen on {}", seen.key))
            }
            Some((_, Some(rev))) if *rev != seen.revision => problems
                .push(format!("{name}: {}={value} seen at revision {} but written at {rev}", seen.key, seen.revision)),
            _ => {}
        }
    }
    let seen: HashMap<u64, &Seen> = watched.events.iter().map(|s| (s.revision, s)).collect();
    let mut acknowledged: Vec<(u64, &Op)> = ops
        .iter()
        .filter_map(|op| match op.outcome {
            Outcome::Written { revision } => Some((revision, op)),
            _ => None,
        })
        .collect();
    acknowledged.sort_by_key(|(rev, _)| *rev);
    let newest = acknowledged.last().map_or(0, |(rev, _)| *rev);
    if watched.current < newest {
        problems
            .push(format!("{name}: reached revision {} but writes were acknowledged up to {newest}", watched.current));
    }
    let missing: Vec<u64> = acknowledged
        .iter()
        .map(|(rev, _)| *rev)
        .filter(|rev| *rev > after_snapshot && *rev <= watched.current && !seen.contains_key(rev))
        .collect();
    if let Some(first) = missing.first() {
        problems.push(format!(
            "{name}: {} acknowledged writes never came (a gap), the first at revision {first}",
            missing.len()
        ));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(key: &str, value: &str, revision: u64) -> Op {
        Op {
            process: 0,
            key: key.into(),
            call: Call::Write { value: value.into() },
            outcome: Outcome::Written { revision },
            invoke: revision * 10,
            complete: revision * 10 + 5,
        }
    }

    fn seen(key: &str, value: &str, revision: u64) -> Seen {
        Seen { revision, key: key.into(), value: Some(value.into()) }
    }

    fn watched(events: Vec<Seen>, current: u64) -> Watched {
        Watched { events, snapshots: Vec::new(), current }
    }

    #[test]
    fn every_change_once_in_order_passes() {
        let ops = [write("a", "1", 2), write("b", "2", 3), write("a", "3", 4)];
        let w = watched(vec![seen("a", "1", 2), seen("b", "2", 3), seen("a", "3", 4)], 4);
        assert_eq!(check(&ops, &w, "w"), Vec::<String>::new());
    }

    #[test]
    fn gaps_duplicates_strangers_and_lag_are_reported() {
        let ops = [write("a", "1", 2), write("b", "2", 3), write("a", "3", 4)];
        let gap = watched(vec![seen("a", "1", 2), seen("a", "3", 4)], 4);
        assert!(check(&ops, &gap, "w")[0].contains("(a gap), the first at revision 3"));
        let twice = watched(vec![seen("a", "1", 2), seen("b", "2", 3), seen("b", "2", 3), seen("a", "3", 4)], 4);
        assert!(check(&ops, &twice, "w")[0].contains("twice"));
        let stranger = watched(vec![seen("a", "1", 2), seen("b", "2", 3), seen("a", "9", 4)], 4);
        assert!(check(&ops, &stranger, "w")[0].contains("never written"));
        let moved = watched(vec![seen("a", "1", 2), seen("b", "2", 5), seen("a", "3", 4)], 5);
        assert!(check(&ops, &moved, "w").iter().any(|p| p.contains("written at 3")));
        let behind = watched(vec![seen("a", "1", 2)], 2);
        assert!(check(&ops, &behind, "w")[0].contains("reached revision 2"));
    }

    #[test]
    fn a_snapshot_restarts_the_comparison() {
        let ops = [write("a", "1", 2), write("b", "2", 3), write("a", "3", 4)];
        let w = Watched { events: vec![seen("a", "3", 4)], snapshots: vec![3], current: 4 };
        assert_eq!(check(&ops, &w, "w"), Vec::<String>::new());
    }
}
