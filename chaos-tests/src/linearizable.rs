//! Linearizability of each config key, checked from the history alone.
//!
//! Each key is a register with reads, writes and compare-and-set on its
//! modify revision; keys are checked one at a time (linearizability is
//! compositional). The search is Wing and Gong's, with Lowe's memoisation
//! as Porcupine does it: walk the calls and returns in time order, try to
//! linearize each call whose effect the model allows, remember every
//! (linearized set, state) pair already tried, and backtrack at a return
//! whose call could not be placed (the sets are kept as hashes, see
//! below). An operation of unknown outcome may
//! take effect at any point after its call, or never.
//!
//! Every value the workload writes is unique, so the revision a value was
//! written at is one fact: learned from the write's answer or from any read
//! that saw it, and two answers that disagree on it are a violation in
//! themselves. The model's state is the current value (or absent); a CAS
//! holds when the current value's revision is the one it expected (an
//! unknown revision, of a value written by an operation of unknown outcome
//! and never read, is taken to match either way).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::history::{Call, Op, Outcome};

/// Why a key's history is not linearizable.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub key: String,
    pub reason: String,
    /// A small part of the history that fails at the same operation, in
    /// time order ([`shrink`]): what shows the problem.
    pub excerpt: Vec<Op>,
}

/// Checks every key of `ops`; the first violation per key.
pub fn check(ops: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in ops.iter().filter(|op| !op.surely_not_done()) {
        by_key.entry(op.key.as_str()).or_default().push(op.clone());
    }
    by_key.into_iter().filter_map(|(key, ops)| check_key(key, ops).err()).collect()
}

/// One entry of the time-ordered list: a call or a return of `op`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    time: u64,
}

const NIL: usize = usize::MAX;

/// The list of entries not linearized yet, as links over `entries`.
struct Links {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// The head sentinel's next.
    head: usize,
}

impl Links {
    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p] = n;
        }
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        if p == NIL {
            self.head = e;
        } else {
            self.next[p] = e;
        }
        if n != NIL {
            self.prev[n] = e;
        }
    }
}

/// Why a search failed.
enum Found {
    /// Two answers disagree on a value's revision (needs no search).
    Conflict(Violation),
    /// The operation at this index fits no order of those before and
    /// beside it.
    Stuck(usize),
}

fn check_key(key: &str, ops: Vec<Op>) -> Result<(), Violation> {
    match search(key, &ops) {
        Ok(()) => Ok(()),
        Err(Found::Conflict(v)) => Err(v),
        Err(Found::Stuck(i)) => {
            let stuck = &ops[i];
            Err(Violation {
                key: key.into(),
                reason: format!(
                    "process {}'s {:?} -> {:?} fits no order of the operations before and beside it",
                    stuck.process, stuck.call, stuck.outcome
                ),
                excerpt: shrink(key, &ops, i),
            })
        }
    }
}

/// Most searches one shrink may run.
const SHRINK_CHECKS: usize = 400;

/// A small part of a key's history that still fails at the same operation
/// (the one at `stuck`): the operations invoked before it returned (later
/// ones cannot help place it), then as many removed as can be, in chunks
/// that halve (delta debugging), while the rest still fails there. A
/// removal is kept only if every read left still has the write of the
/// value it saw, so the excerpt never "fails" for want of a write that the
/// real history had.
fn shrink(key: &str, ops: &[Op], stuck: usize) -> Vec<Op> {
    let target = (ops[stuck].process, ops[stuck].invoke);
    let is_target = |o: &Op| (o.process, o.invoke) == target;
    let fails_there = |candidate: &[Op]| {
        let closed = candidate.iter().all(|o| match &o.outcome {
            Outcome::Read { value: Some((v, _)) } => candidate.iter().any(|w| writes(w, v)),
            _ => true,
        });
        closed && matches!(search(key, candidate), Err(Found::Stuck(i)) if is_target(&candidate[i]))
    };
    let mut kept: Vec<Op> = ops.iter().filter(|o| o.invoke <= ops[stuck].complete).cloned().collect();
    if !fails_there(&kept) {
        kept = ops.to_vec();
    }
    let (mut checks, mut chunk) = (0, kept.len().div_ceil(2));
    while chunk > 0 && checks < SHRINK_CHECKS {
        let mut removed = false;
        let mut i = 0;
        while i < kept.len() && checks < SHRINK_CHECKS {
            let end = (i + chunk).min(kept.len());
            if kept[i..end].iter().any(is_target) {
                i = end;
                continue;
            }
            let candidate: Vec<Op> = kept[..i].iter().chain(&kept[end..]).cloned().collect();
            checks += 1;
            if fails_there(&candidate) {
                kept = candidate;
                removed = true;
            } else {
                i = end;
            }
        }
        if !removed {
            chunk /= 2;
        }
    }
    kept.sort_by_key(|o| o.invoke);
    kept
}

fn writes(op: &Op, value: &str) -> bool {
    matches!(&op.call, Call::Write { value: v } | Call::Cas { value: v, .. } if v == value)
}

fn search(key: &str, ops: &[Op]) -> Result<(), Found> {
    let violation = |reason: String, excerpt: Vec<Op>| Violation { key: key.into(), reason, excerpt };
    // The revision each value was written at, as the answers say.
    let mut revision: HashMap<&str, u64> = HashMap::new();
    for op in ops {
        let seen = match (&op.call, &op.outcome) {
            (Call::Write { value } | Call::Cas { value, .. }, Outcome::Written { revision }) => {
                Some((value, *revision))
            }
            (Call::Read, Outcome::Read { value: Some((value, revision)) }) => Some((value, *revision)),
            _ => None,
        };
        if let Some((value, rev)) = seen {
            if let Some(known) = revision.insert(value, rev).filter(|known| *known != rev) {
                let excerpt = ops.iter().filter(|o| mentions(o, value)).cloned().collect();
                let reason = format!("value {value:?} answered at revisions {known} and {rev}");
                return Err(Found::Conflict(violation(reason, excerpt)));
            }
        }
    }
    let rev_of = |state: Option<&str>| -> Option<u64> {
        match state {
            None => Some(0),
            Some(value) => revision.get(value).copied(),
        }
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(ops.len() * 2);
    for (i, op) in ops.iter().enumerate() {
        let complete = match op.outcome {
            Outcome::Unknown { .. } => u64::MAX,
            _ => op.complete,
        };
        entries.push(Entry { op: i, call: true, time: op.invoke });
        entries.push(Entry { op: i, call: false, time: complete });
    }
    // Calls before returns at the same instant: those overlap.
    entries.sort_by_key(|e| (e.time, !e.call));
    let mut return_of = vec![0; ops.len()];
    for (i, e) in entries.iter().enumerate() {
        if !e.call {
            return_of[e.op] = i;
        }
    }
    let n = entries.len();
    let mut links = Links {
        next: (1..=n).map(|i| if i == n { NIL } else { i }).collect(),
        prev: (0..n).map(|i| if i == 0 { NIL } else { i - 1 }).collect(),
        head: if n == 0 { NIL } else { 0 },
    };

    // The set of linearized operations, as a 128-bit Zobrist hash (the XOR
    // of a random word per member): a long history's sets would take
    // gigabytes as bitsets. Two different sets share a hash with odds
    // around 2^-100 over a run, far below anything else here.
    let zobrist: Vec<u128> = {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..ops.len()).map(|_| (u128::from(next()) << 64) | u128::from(next())).collect()
    };
    let mut linearized = 0u128;
    let mut state: Option<&str> = None;
    let mut stack: Vec<(usize, Option<&str>)> = Vec::new();
    let mut tried: HashSet<(u128, Option<&str>)> = HashSet::new();
    // The deepest point reached, and the return that stopped it.
    let mut deepest = (0, NIL);
    let mut cur = links.head;
    while links.head != NIL {
        // A call's own return comes after it in the list, so walking on
        // from a call always reaches a return.
        let e = entries[cur];
        if e.call {
            let op = &ops[e.op];
            if let Some(next) = step(state, op, &rev_of) {
                linearized ^= zobrist[e.op];
                if tried.insert((linearized, next)) {
                    stack.push((cur, state));
                    state = next;
                    links.unlink(return_of[e.op]);
                    links.unlink(cur);
                    cur = links.head;
                    continue;
                }
                linearized ^= zobrist[e.op];
            }
            cur = links.next[cur];
            continue;
        }
        if e.time == u64::MAX {
            // Only operations of unknown outcome remain: they never happened.
            return Ok(());
        }
        if stack.len() >= deepest.0 {
            deepest = (stack.len(), cur);
        }
        let Some((call, before)) = stack.pop() else {
            return Err(Found::Stuck(entries[deepest.1].op));
        };
        let op = entries[call].op;
        linearized ^= zobrist[op];
        state = before;
        links.relink(call);
        links.relink(return_of[op]);
        cur = links.next[call];
    }
    Ok(())
}

/// The state after `op` from `state`, if the model allows `op` there.
fn step<'a>(
    state: Option<&'a str>,
    op: &'a Op,
    rev_of: &impl Fn(Option<&str>) -> Option<u64>,
) -> Option<Option<&'a str>> {
    let holds = |expect: u64| rev_of(state).is_none_or(|rev| rev == expect);
    match (&op.call, &op.outcome) {
        (Call::Read, Outcome::Read { value }) => (value.as_ref().map(|(v, _)| v.as_str()) == state).then_some(state),
        (Call::Write { value }, _) => Some(Some(value.as_str())),
        (Call::Cas { expect, value }, Outcome::Written { .. } | Outcome::Unknown { .. }) => {
            holds(*expect).then_some(Some(value.as_str()))
        }
        (Call::Cas { expect, .. }, Outcome::Mismatch) => (rev_of(state) != Some(*expect)).then_some(state),
        _ => None,
    }
}

fn mentions(op: &Op, value: &str) -> bool {
    match (&op.call, &op.outcome) {
        (Call::Write { value: v } | Call::Cas { value: v, .. }, _) if v == value => true,
        (_, Outcome::Read { value: Some((v, _)) }) => v == value,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: usize, call: Call, outcome: Outcome, invoke: u64, complete: u64) -> Op {
        Op { process, key: "k".into(), call, outcome, invoke, complete }
    }
    fn write(v: &str) -> Call {
        Call::Write { value: v.into() }
    }
    fn cas(expect: u64, v: &str) -> Call {
        Call::Cas { expect, value: v.into() }
    }
    fn wrote(revision: u64) -> Outcome {
        Outcome::Written { revision }
    }
    fn read(v: Option<(&str, u64)>) -> Outcome {
        Outcome::Read { value: v.map(|(v, r)| (v.to_string(), r)) }
    }
    fn unknown() -> Outcome {
        Outcome::Unknown { reason: "timeout".into() }
    }

    #[test]
    fn sequential_and_overlapping_histories_that_fit_pass() {
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(1, Call::Read, read(Some(("a", 5))), 20, 30),
            op(0, cas(5, "b"), wrote(6), 40, 50),
            op(1, cas(5, "c"), Outcome::Mismatch, 45, 60),
            op(2, Call::Read, read(Some(("b", 6))), 55, 70),
        ];
        assert_eq!(check(&h), []);
        // A read overlapping a write may see either side.
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(0, write("b"), wrote(6), 20, 40),
            op(1, Call::Read, read(Some(("a", 5))), 25, 30),
            op(2, Call::Read, read(Some(("b", 6))), 26, 31),
        ];
        assert_eq!(check(&h), []);
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(0, write("b"), wrote(6), 20, 30),
            op(1, Call::Read, read(Some(("a", 5))), 40, 50),
        ];
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].reason.contains("fits no order"), "{}", v[0].reason);
        assert!(v[0].excerpt.iter().any(|o| o.process == 1));
    }

    #[test]
    fn a_violation_deep_in_a_long_history_is_shown_by_the_few_operations_it_needs() {
        let mut h = Vec::new();
        let mut t = 0;
        for i in 0..200u64 {
            let v = format!("v{i}");
            h.push(op(0, write(&v), wrote(i + 1), t, t + 5));
            h.push(op(1, Call::Read, read(Some((&v, i + 1))), t + 6, t + 9));
            t += 10;
        }
        // A read of v50 long after v199 was acknowledged, then more writes.
        h.push(op(2, Call::Read, read(Some(("v50", 51))), t, t + 5));
        for i in 200..300u64 {
            h.push(op(0, write(&format!("v{i}")), wrote(i + 1), t + 10 + i, t + 11 + i));
        }
        let v = check(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        let excerpt = &v[0].excerpt;
        // The stale read, the write it saw, one write acknowledged after it.
        assert_eq!(excerpt.len(), 3, "{excerpt:#?}");
        assert_eq!(excerpt[2].process, 2);
        assert!(matches!(&excerpt[0].call, Call::Write { value } if value == "v50"), "{excerpt:#?}");
        assert!(matches!(&excerpt[1].call, Call::Write { .. }), "{excerpt:#?}");
        // The excerpt fails on its own.
        assert_eq!(check(excerpt).len(), 1);
    }

    #[test]
    fn a_lost_acknowledged_write_is_a_violation() {
        let h = [op(0, write("a"), wrote(5), 0, 10), op(1, Call::Read, read(None), 20, 30)];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn two_cas_from_the_same_revision_cannot_both_succeed() {
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(1, cas(5, "b"), wrote(6), 20, 30),
            op(2, cas(5, "c"), wrote(7), 21, 31),
        ];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn a_refused_cas_must_have_seen_another_revision() {
        let h = [op(0, write("a"), wrote(5), 0, 10), op(1, cas(5, "b"), Outcome::Mismatch, 20, 30)];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn an_unknown_write_may_take_effect_late_or_never() {
        // Never: nobody saw it.
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(1, write("x"), unknown(), 20, 30),
            op(2, Call::Read, read(Some(("a", 5))), 40, 50),
        ];
        assert_eq!(check(&h), []);
        // Late: after the client gave up, a read sees it.
        let h = [
            op(0, write("a"), wrote(5), 0, 10),
            op(1, write("x"), unknown(), 20, 30),
            op(2, Call::Read, read(Some(("a", 5))), 40, 50),
            op(2, Call::Read, read(Some(("x", 9))), 60, 70),
        ];
        assert_eq!(check(&h), []);
        // But not before it was called.
        let h = [op(2, Call::Read, read(Some(("x", 9))), 0, 10), op(1, write("x"), unknown(), 20, 30)];
        assert_eq!(check(&h).len(), 1);
    }

    #[test]
    fn two_revisions_for_one_value_is_a_violation() {
        let h = [op(0, write("a"), wrote(5), 0, 10), op(1, Call::Read, read(Some(("a", 6))), 20, 30)];
        let v = check(&h);
        assert!(v[0].reason.contains("revisions 5 and 6"), "{v:?}");
    }

    #[test]
    fn keys_are_checked_apart_and_failed_operations_dropped() {
        let mut other = op(0, write("z"), wrote(3), 0, 10);
        other.key = "other".into();
        let h = [
            other,
            op(1, Call::Read, read(None), 20, 30),
            op(1, write("q"), Outcome::Fail { reason: "refused".into() }, 40, 50),
            op(1, Call::Read, read(None), 60, 70),
        ];
        assert_eq!(check(&h), []);
    }

    #[test]
    fn a_long_history_is_checked_quickly() {
        // 2,000 operations of 4 clients, each overlapping the others'.
        let mut h = Vec::new();
        let mut rev = 0;
        let mut last = None::<(String, u64)>;
        for i in 0..500u64 {
            for p in 0..4u64 {
                let t = i * 100 + p;
                if p == 0 {
                    rev += 1;
                    let v = format!("v{i}");
                    h.push(op(0, write(&v), wrote(rev), t, t + 50));
                    last = Some((v, rev));
                } else {
                    let seen = if p == 1 { last.clone() } else { None };
                    let outcome = match seen {
                        Some((v, r)) => read(Some((&v, r))),
                        None => continue,
                    };
                    h.push(op(p as usize, Call::Read, outcome, t + 60, t + 90));
                }
            }
        }
        assert_eq!(check(&h), []);
    }
}
