//! Config watches: the changes to the keys under a prefix from a revision
//! on, in order, each once, with progress messages while nothing changes.
//! A watcher behind the history (its start revision compacted away, or too
//! slow to keep up) gets the current values at some revision R, marked as a
//! snapshot, then the changes after R: it never fails for being late.

use std::sync::Arc;
use std::time::Duration;

use ferry_storage::kv::{Event, EventKind};
use tokio::sync::mpsc;

use crate::error::Error;
use crate::raft::node::Node;

/// Events sent in one message at most.
pub const BATCH: usize = 1000;

/// Bytes of keys and values in one message at most, past its first event
/// (a value is at most 1 MiB): well inside the 4 MiB a gRPC client takes by
/// default, so a watch over large values never sends what its reader
/// refuses.
pub const BATCH_BYTES: usize = 2 * 1024 * 1024;

/// One message of a watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// The revision the message brings the watcher to.
    pub revision: u64,
    /// The changes (or, in a snapshot, the current values as puts).
    pub events: Vec<Event>,
    /// The current values at `revision`, not changes.
    pub snapshot: bool,
    /// More parts of this snapshot follow.
    pub more: bool,
    /// Nothing changed: the watcher is at `revision`.
    pub progress: bool,
    /// The oldest revision still in the history, minus one.
    pub compact_revision: u64,
}

/// Feeds one watch to `tx` until its reader goes away: keys under `prefix`
/// from `start_revision` (0: from now), a progress message after `every`
/// without changes.
pub async fn run(
    node: Arc<Node>,
    prefix: String,
    start_revision: u64,
    every: Duration,
    tx: &mpsc::Sender<Result<Batch, Error>>,
) -> Result<(), Error> {
    let reader = node.reader.clone();
    let mut changed = reader.subscribe();
    let mut next = if start_revision == 0 { reader.revision() + 1 } else { start_revision };
    let mut idle_since = tokio::time::Instant::now();
    if start_revision == 0 {
        // Tell a watcher "from now" where now is, so a reconnect before the
        // first change resumes from there instead of from a later "now".
        let msg = Batch { revision: next - 1, progress: true, ..Default::default() };
        if tx.send(Ok(msg)).await.is_err() {
            return Ok(());
        }
    }
    loop {
        let compacted = reader.compacted()?;
        if next <= compacted {
            // Behind the history (at the start, or a watcher too slow to
            // keep up): the current values at R, then changes after R.
            let (kvs, revision) = reader.list_at_revision(&prefix)?;
            let mut events: Vec<Event> = kvs.into_iter().map(|kv| Event { kind: EventKind::Put, kv }).collect();
            loop {
                let rest = events.split_off(fitting(&events));
                let more = !rest.is_empty();
                let msg =
                    Batch { revision, events, snapshot: true, more, compact_revision: compacted, progress: false };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
                if rest.is_empty() {
                    break;
                }
                events = rest;
            }
            next = revision + 1;
            idle_since = tokio::time::Instant::now();
        }
        let (events, upto) = reader.events(next, &prefix, BATCH, BATCH_BYTES)?;
        // Compaction only moves forward: if it has not reached `next` now,
        // it had not while the events were read, so none is missing.
        if reader.compacted()? >= next {
            continue;
        }
        if !events.is_empty() {
            let events = events.into_iter().map(|(_, e)| e).collect();
            let msg = Batch { revision: upto, events, compact_revision: compacted, ..Default::default() };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(());
            }
            idle_since = tokio::time::Instant::now();
        }
        if upto >= next {
            next = upto + 1;
            continue;
        }
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return Err(Error::Stopped("watch again from the last revision + 1".into()));
                }
            }
            _ = tokio::time::sleep_until(idle_since + every) => {
                let msg = Batch { revision: next - 1, compact_revision: compacted, progress: true, ..Default::default() };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(());
                }
                idle_since = tokio::time::Instant::now();
            }
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// How many of `events`, from the first, go in one message: at most
/// [`BATCH`], and up to the event that reaches [`BATCH_BYTES`].
fn fitting(events: &[Event]) -> usize {
    let mut bytes = 0;
    for (i, e) in events.iter().enumerate().take(BATCH) {
        if bytes >= BATCH_BYTES {
            return i;
        }
        bytes += e.kv.bytes();
    }
    events.len().min(BATCH)
}

#[cfg(test)]
mod tests {
    use ferry_storage::kv::{Event, EventKind};
    use ferry_storage::KeyValue;

    use super::{fitting, BATCH};

    fn events(n: usize, value_bytes: usize) -> Vec<Event> {
        let kv = |i: usize| KeyValue {
            key: format!("k{i}"),
            value: vec![0; value_bytes],
            create_revision: 1,
            mod_revision: 1,
            version: 1,
        };
        (0..n).map(|i| Event { kind: EventKind::Put, kv: kv(i) }).collect()
    }

    #[test]
    fn a_message_holds_a_thousand_small_events_or_about_two_mib_of_large_ones() {
        assert_eq!(fitting(&events(3, 10)), 3);
        assert_eq!(fitting(&events(5000, 10)), BATCH);
        // 1 MiB values: the one that reaches 2 MiB is the last.
        assert_eq!(fitting(&events(10, 1024 * 1024)), 2);
        assert_eq!(fitting(&events(1, 1024 * 1024)), 1);
        assert_eq!(fitting(&[]), 0);
    }
}
