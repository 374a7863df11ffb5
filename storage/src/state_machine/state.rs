//! The replicated state in memory, and `apply`: deterministic, infallible
//! changes to it.
//!
//! Every map is ordered, so snapshots and digests list the same state the
//! same way on every replica. The maps are persistent (`imbl`): a clone
//! shares every node and costs O(1), and a change after it copies only the
//! path it touches, so a snapshot's copy of the state does not hold applies
//! for a time that grows with the state. Apply does no I/O and cannot fail
//! halfway, so a batch of entries is applied whole or (on a crash) not at
//! all: after a restart the state is the last snapshot, and openraft applies
//! the log after it again.

use std::collections::BTreeMap;
use std::sync::Arc;

use imbl::{HashMap, OrdMap, OrdSet, Vector};

use openraft::{Entry, EntryPayload, LogId, StoredMembership};

use super::{Change, Membership, DEDUP_MAX_IDS, DEDUP_WINDOW};
use crate::command::{Command, CommandResult, Op};
use crate::jobs::{Job, WorkerRecord};
use crate::kv::{self, Compare, Event, EventKind, KeyValue, StoredValue, TxnOp};
use crate::probes::{ProbeDef, WorkerProbe};
use crate::{NodeId, TypeConfig};

/// Request ids applied recently, with the answer each got: those of the last
/// [`DEDUP_WINDOW`] log entries, but at most about [`DEDUP_MAX_IDS`] ids.
///
/// Expiry runs after every entry, so what is remembered after entry N
/// depends only on the entries up to N, never on how openraft batched them
/// or on whether this replica loaded a snapshot: every replica answers a
/// retried id alike. The count bound drops whole log entries (every id of
/// the oldest index at once), so the order of ids inside one entry, which a
/// snapshot does not keep, never matters.
#[derive(Clone)]
pub(crate) struct Dedup {
    by_id: HashMap<Arc<str>, (u64, CommandResult)>,
    /// (index, id) in apply order (sorted by index after a load), so expiry
    /// pops from the front. May hold stale pairs of ids applied again.
    order: Vector<(u64, Arc<str>)>,
    max_ids: usize,
}

impl Default for Dedup {
    fn default() -> Self {
        Self { by_id: HashMap::new(), order: Vector::new(), max_ids: DEDUP_MAX_IDS }
    }
}

impl Dedup {
    /// The answer `id` got, if it was applied within the window before `index`.
    fn seen(&self, id: &str, index: u64) -> Option<&CommandResult> {
        match self.by_id.get(id) {
            Some((at, result)) if at + DEDUP_WINDOW >= index => Some(result),
            _ => None,
        }
    }

    pub(crate) fn insert(&mut self, id: &str, index: u64, result: CommandResult) {
        let id: Arc<str> = Arc::from(id);
        self.order.push_back((index, id.clone()));
        self.by_id.insert(id, (index, result));
    }

    /// Forgets ids applied more than the window before `now`, then whole
    /// oldest entries while more than [`DEDUP_MAX_IDS`] are remembered.
    pub(crate) fn expire(&mut self, now: u64) {
        while let Some(&(index, _)) = self.order.front() {
            let too_old = index + DEDUP_WINDOW < now;
            if !too_old && self.by_id.len() <= self.max_ids {
                break;
            }
            while self.order.front().is_some_and(|(i, _)| *i == index) {
                if let Some((index, id)) = self.order.pop_front() {
                    // The id may have been applied again (outside the
                    // window) since: only its own pair goes.
                    if self.by_id.get(&id).is_some_and(|(at, _)| *at == index) {
                        self.by_id.remove(&id);
                    }
                }
            }
        }
    }

    /// Puts the apply order back after loading entries in any order.
    pub(crate) fn sort(&mut self) {
        self.order.sort();
    }

    /// Every remembered id, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &(u64, CommandResult))> {
        self.by_id.iter().map(|(id, v)| (&**id, v))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// Everything the log has built, at one applied log id.
#[derive(Clone, Default)]
pub(crate) struct State {
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: Membership,
    /// The cluster revision: one more for every key change.
    pub revision: u64,
    pub kv: OrdMap<String, StoredValue>,
    pub dedup: Dedup,
    pub workers: OrdMap<String, WorkerRecord>,
    pub jobs: OrdMap<String, Job>,
    /// revision -> the change made at it and the key's state before it.
    pub events: OrdMap<u64, Change>,
    /// (key, revision) of every change in `events`: each key's history.
    pub history: OrdSet<(String, u64)>,
    /// What the changes in `events` weigh ([`change_bytes`]).
    pub history_bytes: u64,
    pub leases: OrdMap<u64, kv::Lease>,
    /// key -> the lease it is bound to.
    pub key_lease: OrdMap<String, u64>,
    /// key -> its gray variants.
    pub gray: OrdMap<String, Vec<kv::Variant>>,
    pub probe_defs: OrdMap<String, ProbeDef>,
    /// probe -> worker -> what it last reported.
    pub probe_results: OrdMap<String, BTreeMap<String, WorkerProbe>>,
}

/// What one change weighs in the history window: its key, its value and
/// the value it replaced.
fn change_bytes(change: &Change) -> u64 {
    let prev = change.prev.as_ref().map(|p| p.value.len()).unwrap_or(0);
    (change.event.kv.key.len() + change.event.kv.value.len() + prev) as u64
}

impl State {
    /// Applies entries in order and returns one result per entry.
    pub(crate) fn apply(&mut self, entries: &[Entry<TypeConfig>]) -> Vec<CommandResult> {
        let mut results = Vec::with_capacity(entries.len());
        for entry in entries {
            results.push(match &entry.payload {
                EntryPayload::Blank => CommandResult::None,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    CommandResult::None
                }
                EntryPayload::Normal(cmd) => self.apply_command(entry.log_id.index, cmd),
            });
            self.last_applied = Some(entry.log_id);
            self.dedup.expire(entry.log_id.index);
        }
        results
    }

    /// The revision before which history is compacted.
    pub(crate) fn compacted(&self) -> u64 {
        match self.events.keys().next() {
            Some(first) => first.saturating_sub(1),
            None => self.revision,
        }
    }

    /// Adds a change to the history window (and to `history`).
    pub(crate) fn keep(&mut self, revision: u64, change: Change) {
        self.history_bytes += change_bytes(&change);
        self.history.insert((change.event.kv.key.clone(), revision));
        self.events.insert(revision, change);
    }

    /// Records the change made at `revision` (and the key's state before
    /// it), and compacts the oldest changes while the window holds more
    /// than [`kv::HISTORY_REVISIONS`] changes or [`kv::HISTORY_MAX_BYTES`].
    fn record(&mut self, revision: u64, event: Event, prev: Option<StoredValue>) {
        self.keep(revision, Change { event, prev });
        while self.events.len() as u64 > kv::HISTORY_REVISIONS || self.history_bytes > kv::HISTORY_MAX_BYTES {
            let Some(&(old, _)) = self.events.get_min() else { break };
            let Some(gone) = self.events.remove(&old) else { break };
            self.history_bytes -= change_bytes(&gone);
            self.history.remove(&(gone.event.kv.key, old));
        }
    }

    /// Binds `key` to `lease` (0: to none), unbinding it from any other.
    fn bind(&mut self, key: &str, lease: u64) {
        let old = self.key_lease.get(key).copied();
        if old == Some(lease) || (old.is_none() && lease == 0) {
            return;
        }
        if let Some(old) = old {
            if let Some(l) = self.leases.get_mut(&old) {
                l.keys.retain(|k| k != key);
            }
            self.key_lease.remove(key);
        }
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.push(key.to_owned());
                self.key_lease.insert(key.to_owned(), lease);
            }
        }
    }

    /// A plain put: unbinds the key from its lease, as in etcd.
    fn put(&mut self, revision: &mut u64, key: &str, value: &[u8]) -> CommandResult {
        self.bind(key, 0);
        self.put_value(revision, key, value)
    }

    fn put_value(&mut self, revision: &mut u64, key: &str, value: &[u8]) -> CommandResult {
        *revision += 1;
        let (create_revision, version) = match self.kv.get(key) {
            Some(p) => (p.create_revision, p.version + 1),
            None => (*revision, 1),
        };
        let stored = StoredValue { value: value.to_vec(), create_revision, mod_revision: *revision, version };
        let event = Event { kind: EventKind::Put, kv: stored.clone().with_key(key.to_owned()) };
        let prev = match self.kv.get_mut(key) {
            Some(slot) => Some(std::mem::replace(slot, stored)),
            None => {
                self.kv.insert(key.to_owned(), stored);
                None
            }
        };
        self.record(*revision, event, prev);
        CommandResult::Put { revision: *revision, create_revision, version }
    }

    fn delete(&mut self, revision: &mut u64, key: &str) -> bool {
        let Some(prev) = self.kv.remove(key) else {
            return false;
        };
        self.bind(key, 0);
        // A deleted key's gray variants go with it.
        self.gray.remove(key);
        *revision += 1;
        let kv =
            KeyValue { key: key.to_owned(), value: vec![], create_revision: 0, mod_revision: *revision, version: 0 };
        self.record(*revision, Event { kind: EventKind::Delete, kv }, Some(prev));
        true
    }

    /// The first compare that does not hold, in words.
    fn failed_compare(&self, compares: &[Compare]) -> Option<String> {
        for c in compares {
            match c {
                Compare::ModRevision { key, revision } => match self.kv.get(key) {
                    None => return Some(format!("key {key} does not exist")),
                    Some(v) if v.mod_revision != *revision => {
                        return Some(format!("key {key} has mod revision {}, not {revision}", v.mod_revision))
                    }
                    Some(_) => {}
                },
                Compare::Absent { key } => {
                    if let Some(v) = self.kv.get(key) {
                        return Some(format!("key {key} exists (mod revision {})", v.mod_revision));
                    }
                }
            }
        }
        None
    }

    /// Applies one command. Deterministic: depends only on the command, the
    /// index and the state.
    fn apply_command(&mut self, index: u64, cmd: &Command) -> CommandResult {
        if !cmd.request_id.is_empty() {
            if let Some(result) = self.dedup.seen(&cmd.request_id, index) {
                return result.clone();
            }
        }
        if let Op::Batch(commands) = &cmd.op {
            // Each member is deduplicated and validated on its own, so one bad
            // command rejects only itself.
            return CommandResult::Batch(
                commands
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c.op {
                        Op::Batch(_) => {
                            CommandResult::Rejected { reason: "op: a batch must not contain a batch".into() }
                        }
                        _ => {
                            if i == commands.len() / 2 && i > 0 {
                                crate::crash_point!("apply-batch");
                            }
                            self.apply_command(index, c)
                        }
                    })
                    .collect(),
            );
        }
        let result = match cmd.validate() {
            Err(reason) => CommandResult::Rejected { reason },
            Ok(()) => self.apply_op(&cmd.op),
        };
        if !cmd.request_id.is_empty() {
            self.dedup.insert(&cmd.request_id, index, result.clone());
        }
        result
    }

    fn apply_op(&mut self, op: &Op) -> CommandResult {
        let mut revision = self.revision;
        let result = match op {
            Op::Put { key, value } => self.put(&mut revision, key, value),
            Op::Delete { key } => {
                let deleted = self.delete(&mut revision, key);
                CommandResult::Delete { revision, deleted }
            }
            Op::LeaseGrant { id, ttl_ms } => {
                if self.leases.contains_key(id) {
                    CommandResult::Rejected { reason: format!("id: lease {id} exists already") }
                } else {
                    self.leases.insert(*id, kv::Lease { id: *id, ttl_ms: *ttl_ms, keys: vec![] });
                    CommandResult::LeaseGranted { id: *id, ttl_ms: *ttl_ms }
                }
            }
            Op::LeaseRevoke { ids } => {
                let mut revoked = Vec::new();
                for id in ids {
                    let Some(lease) = self.leases.remove(id) else { continue };
                    for key in &lease.keys {
                        self.key_lease.remove(key);
                        self.delete(&mut revision, key);
                    }
                    revoked.push(*id);
                }
                CommandResult::LeasesRevoked { revision, revoked }
            }
            Op::GraySet { key, selector, value } => {
                let mut variants = self.gray.get(key).cloned().unwrap_or_default();
                let variant = kv::Variant { selector: selector.clone(), value: value.clone(), revision };
                let at = variants.iter().position(|v| v.selector == *selector);
                if at.is_none() && variants.len() >= kv::MAX_VARIANTS {
                    CommandResult::Rejected {
                        reason: format!("selector: key {key} has {} variants already", kv::MAX_VARIANTS),
                    }
                } else {
                    match at {
                        Some(i) => variants[i] = variant,
                        None => variants.push(variant),
                    }
                    self.gray.insert(key.clone(), variants);
                    CommandResult::Done
                }
            }
            Op::GrayPromote { key, selector } => {
                let mut variants = self.gray.get(key).cloned().unwrap_or_default();
                let at = if selector.is_empty() && variants.len() == 1 {
                    Some(0)
                } else {
                    variants.iter().position(|v| v.selector == *selector)
                };
                match at {
                    None => CommandResult::Rejected {
                        reason: if selector.is_empty() && variants.len() > 1 {
                            format!("selector: key {key} has {} variants; name one", variants.len())
                        } else {
                            format!("selector: key {key} has no variant for '{}'", kv::selector_text(selector))
                        },
                    },
                    Some(i) => {
                        let variant = variants.remove(i);
                        self.bind(key, 0);
                        let put = self.put_value(&mut revision, key, &variant.value);
                        if variants.is_empty() {
                            self.gray.remove(key);
                        } else {
                            self.gray.insert(key.clone(), variants);
                        }
                        put
                    }
                }
            }
            Op::GrayDrop { key, selector } => {
                let mut variants = self.gray.get(key).cloned().unwrap_or_default();
                let before = variants.len();
                variants.retain(|v| !selector.is_empty() && v.selector != *selector);
                if variants.len() == before {
                    CommandResult::Rejected {
                        reason: format!("selector: key {key} has no variant for '{}'", kv::selector_text(selector)),
                    }
                } else {
                    if variants.is_empty() {
                        self.gray.remove(key);
                    } else {
                        self.gray.insert(key.clone(), variants);
                    }
                    CommandResult::Done
                }
            }
            Op::ProbeDefine(def) => {
                // Results are per target index and selected worker: with
                // other targets or workers they would describe the wrong ones.
                let changed = self
                    .probe_defs
                    .get(&def.name)
                    .is_some_and(|old| old.targets != def.targets || old.selector != def.selector);
                if changed {
                    self.probe_results.remove(&def.name);
                }
                self.probe_defs.insert(def.name.clone(), (**def).clone());
                CommandResult::Done
            }
            Op::ProbeDelete { name } => {
                if self.probe_defs.remove(name).is_none() {
                    CommandResult::Rejected { reason: format!("name: no probe named {name}") }
                } else {
                    self.probe_results.remove(name);
                    CommandResult::Done
                }
            }
            Op::ProbeReport { probe, state } => {
                if !self.probe_defs.contains_key(probe) {
                    CommandResult::Rejected { reason: format!("probe: no probe named {probe}") }
                } else {
                    self.probe_results.entry(probe.clone()).or_default().insert(state.worker.clone(), state.clone());
                    CommandResult::Done
                }
            }
            Op::PutLeased { key, value, lease } => {
                if !self.leases.contains_key(lease) {
                    CommandResult::Rejected { reason: format!("lease: unknown lease id {lease}") }
                } else {
                    self.bind(key, *lease);
                    self.put_value(&mut revision, key, value)
                }
            }
            Op::Txn(txn) => {
                let failed = self.failed_compare(&txn.compares);
                let ops = if failed.is_none() { &txn.success } else { &txn.failure };
                for op in ops {
                    match op {
                        TxnOp::Put { key, value } => {
                            self.put(&mut revision, key, value);
                        }
                        TxnOp::Delete { key } => {
                            self.delete(&mut revision, key);
                        }
                        TxnOp::PutLeased { key, value, lease } => {
                            if self.leases.contains_key(lease) {
                                self.bind(key, *lease);
                                self.put_value(&mut revision, key, value);
                            }
                        }
                    }
                }
                CommandResult::Txn { succeeded: failed.is_none(), revision, failed: failed.unwrap_or_default() }
            }
            Op::Batch(_) => CommandResult::Rejected { reason: "op: nested batch".into() },
            Op::RegisterWorker(w) => {
                self.workers.insert(w.name.clone(), w.clone());
                CommandResult::Done
            }
            Op::CreateJob(job) => {
                if self.jobs.contains_key(&job.id) {
                    CommandResult::Rejected { reason: format!("job id: {} exists already", job.id) }
                } else {
                    self.jobs.insert(job.id.clone(), (**job).clone());
                    CommandResult::Done
                }
            }
            Op::JobEvents(events) => {
                for event in events {
                    if let Some(job) = self.jobs.get_mut(event.job()) {
                        job.apply(event);
                    }
                }
                CommandResult::Done
            }
            Op::ForgetJobs { ids } => {
                for id in ids {
                    if self.jobs.get(id).is_some_and(|j| j.phase != crate::jobs::JobPhase::Running) {
                        self.jobs.remove(id);
                    }
                }
                CommandResult::Done
            }
        };
        self.revision = revision;
        result
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

    use super::*;

    fn put(index: u64, id: &str, key: &str) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command {
                request_id: id.into(),
                op: Op::Put { key: key.into(), value: b"v".to_vec() },
            }),
        }
    }

    fn revision_of(result: &CommandResult) -> u64 {
        match result {
            CommandResult::Put { revision, .. } => *revision,
            other => panic!("not a put: {other:?}"),
        }
    }

    #[test]
    fn an_id_applied_again_after_its_window_keeps_its_new_answer_when_the_old_one_expires() {
        let mut state = State::default();
        let first = state.apply(&[put(1, "a", "k")]);
        // Inside the window: the first answer, nothing applied.
        let again = state.apply(&[put(DEDUP_WINDOW + 1, "a", "k")]);
        assert_eq!(again, first);
        assert_eq!(state.revision, 1);
        // Past it: applied again, remembered with its new index.
        let later = state.apply(&[put(DEDUP_WINDOW + 2, "a", "k")]);
        assert_eq!(revision_of(&later[0]), 2);
        // The old (index 1) entry has expired by now; the new one answers.
        let retried = state.apply(&[put(DEDUP_WINDOW + 3, "a", "k")]);
        assert_eq!(retried, later);
        assert_eq!(state.revision, 2);
        assert_eq!(state.dedup.len(), 1);
        assert_eq!(state.dedup.order.len(), 1);
    }

    fn batch(index: u64, ids: &[&str]) -> Entry<TypeConfig> {
        let commands = ids
            .iter()
            .map(|id| Command { request_id: (*id).into(), op: Op::Put { key: format!("k/{id}"), value: vec![] } })
            .collect();
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command { request_id: String::new(), op: Op::Batch(commands) }),
        }
    }

    #[test]
    fn past_the_id_bound_the_oldest_entries_ids_go_whole() {
        let mut state = State::default();
        state.dedup.max_ids = 3;
        state.apply(&[batch(1, &["a", "b"]), batch(2, &["c", "d"])]);
        // Four ids exceed three: entry 1's two go together.
        assert_eq!(state.dedup.len(), 2);
        let revision = state.revision;
        state.apply(&[batch(3, &["c", "a"])]);
        // "c" is answered from the record; "a" was forgotten and applies again.
        assert_eq!(state.revision, revision + 1);
        assert_eq!(state.kv["k/a"].version, 2);
        assert_eq!(state.kv["k/c"].version, 1);
    }

    #[test]
    fn history_keeps_the_window_one_in_one_out() {
        let mut state = State::default();
        let entries: Vec<_> = (1..=kv::HISTORY_REVISIONS + 5).map(|i| put(i, "", &format!("k{}", i % 3))).collect();
        state.apply(&entries);
        assert_eq!(state.events.len() as u64, kv::HISTORY_REVISIONS);
        assert_eq!(state.history.len() as u64, kv::HISTORY_REVISIONS);
        assert_eq!(state.compacted(), 5);
        assert!(state.history.iter().all(|(key, rev)| state.events[rev].event.kv.key == *key));
    }

    #[test]
    fn big_values_shorten_the_history_window_by_bytes() {
        let mut state = State::default();
        let big = vec![7u8; kv::MAX_VALUE_BYTES];
        let mut revision = 0;
        for _ in 0..200 {
            state.put(&mut revision, "blob", &big);
            state.revision = revision;
        }
        // Each change weighs its value and the one it replaced: 2 MiB.
        assert!(state.history_bytes <= kv::HISTORY_MAX_BYTES);
        let kept = state.events.len() as u64;
        assert_eq!(kept, kv::HISTORY_MAX_BYTES / (2 * kv::MAX_VALUE_BYTES as u64 + 4));
        assert_eq!(state.compacted(), 200 - kept);
        assert_eq!(state.history.len() as u64, kept);
    }
}
