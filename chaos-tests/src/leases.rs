//! Leases beside the config workload, and their checker.
//!
//! Each lease client loops: grant a lease of `ttl`, put a key bound to it
//! (under `lease/`, apart from the config keys), keep it alive through the
//! SDK for a random while (timing every renewal it hears back), then stop
//! renewing and read the key until it is gone. It reads the key all along.
//! The checker, from those times alone:
//! - **early**: no read may find the key gone before `ttl` has passed
//!   since the last renewal (or the grant) heard back before the read
//!   began, less a clock margin;
//! - **late**: a read that began later than `ttl` after the last renewal
//!   could have been sent, and after the election of the last fault before
//!   it, plus a margin, must find the key gone (a new leader gives every
//!   lease its full TTL again, so a failover, also one after the expiry
//!   but before its revoke was committed, may keep a lease that long).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::history::History;

/// Clock margin of the early check (renewals are timed when heard back).
const EARLY_MARGIN: Duration = Duration::from_millis(500);
/// Margin of the late check: expiries are revoked in batches every 100 ms,
/// through the log.
const LATE_MARGIN: Duration = Duration::from_secs(1);
/// How long an election may take after a fault.
const ELECTION: Duration = Duration::from_secs(3);

/// One read of a leased key.
#[derive(Debug, Clone, Serialize)]
pub struct Read {
    pub invoke: u64,
    pub complete: u64,
    pub present: bool,
}

/// One lease's life, as its client saw it (nanoseconds since the start).
#[derive(Debug, Clone, Serialize)]
pub struct LeaseRun {
    pub key: String,
    pub ttl: Duration,
    /// When the grant was asked for.
    pub granted: u64,
    /// When each renewal was heard back.
    pub renewals: Vec<u64>,
    /// When the client stopped renewing (`None`: it never did, the run ended).
    pub abandoned: Option<u64>,
    pub reads: Vec<Read>,
}

async fn read(client: &ferry_sdk::Client, history: &History, key: &str) -> Option<Read> {
    let invoke = history.now();
    let got = client.get(key).await.ok()?;
    Some(Read { invoke, complete: history.now(), present: got.is_some() })
}

async fn one_lease(
    client: &ferry_sdk::Client,
    history: &History,
    key: String,
    ttl: Duration,
    keep: Duration,
    stop: &AtomicBool,
) -> Option<LeaseRun> {
    let granted = history.now();
    let lease = client.grant(ttl).await.ok()?;
    if client.put_with_lease(&key, b"v".to_vec(), lease).await.is_err() {
        let _ = client.revoke(lease).await;
        return None;
    }
    let mut run = LeaseRun { key, ttl, granted, renewals: Vec::new(), abandoned: None, reads: Vec::new() };
    let mut keep_alive = client.keep_alive(lease);
    let until = history.now() + keep.as_nanos() as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while history.now() < until && !stop.load(Ordering::Relaxed) {
        tokio::select! {
            renewal = keep_alive.next() => match renewal {
                Some(Ok(resp)) if resp.ttl_ms > 0 => run.renewals.push(history.now()),
                Some(_) => {}
                None => break,
            },
            _ = tick.tick() => run.reads.extend(read(client, history, &run.key).await),
        }
    }
    if stop.load(Ordering::Relaxed) {
        return Some(run);
    }
    drop(keep_alive);
    run.abandoned = Some(history.now());
    // Until it is gone (or well past when it should be).
    let give_up = history.now() + (ttl + ELECTION + LATE_MARGIN * 5).as_nanos() as u64;
    while history.now() < give_up {
        if let Some(r) = read(client, history, &run.key).await {
            let gone = !r.present;
            run.reads.push(r);
            if gone {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(run)
}

/// Starts `clients` lease clients with leases of `ttl`; they stop at `stop`.
pub fn start(
    endpoints: &[String],
    history: &History,
    clients: usize,
    ttl: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Vec<LeaseRun>>>> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = crate::workload::client(endpoints)?;
        let (history, stop) = (history.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ (0x1ea5e + i as u64));
        tasks.push(tokio::spawn(async move {
            let mut runs = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let keep = Duration::from_millis(rng.gen_range(500..4000));
                let key = format!("lease/{i}-{n}");
                match one_lease(&client, &history, key, ttl, keep, &stop).await {
                    Some(run) => runs.push(run),
                    None => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            runs
        }));
    }
    Ok(tasks)
}

/// What is wrong with the leases' lives; `faults` are the times (ns since
/// the start) faults struck.
pub fn check(runs: &[LeaseRun], faults: &[u64]) -> Vec<String> {
    let ns = |d: Duration| d.as_nanos() as u64;
    let mut problems = Vec::new();
    for run in runs {
        for r in run.reads.iter().filter(|r| !r.present) {
            // Renewed no earlier than heard back, or granted no earlier than asked.
            let floor = run.renewals.iter().copied().filter(|t| *t <= r.invoke).max().unwrap_or(run.granted);
            if r.complete + ns(EARLY_MARGIN) < floor + ns(run.ttl) {
                problems.push(problem(run, "gone", r.complete, floor, "its last renewal", "expired early"));
                break;
            }
        }
        let Some(abandoned) = run.abandoned else { continue };
        // Gone within a TTL of the renewals' end or of the last election
        // before the read, whichever is later (a failover before the
        // expiry's revoke is committed starts the TTL again).
        let due = |read: &Read| {
            let last_fault = faults.iter().copied().filter(|f| *f <= read.invoke).max();
            let from = last_fault.map_or(abandoned, |fault| abandoned.max(fault + ns(ELECTION)));
            from + ns(run.ttl) + ns(LATE_MARGIN)
        };
        if let Some(r) = run.reads.iter().find(|r| r.present && r.invoke > due(r)) {
            problems.push(problem(run, "still there", r.invoke, abandoned, "its renewals stopped", "kept too long"));
        }
    }
    problems
}

/// One line of the report: what a read found `at`, `since` what.
fn problem(run: &LeaseRun, found: &str, at: u64, since: u64, what: &str, verdict: &str) -> String {
    let (at_s, after_s) = (at as f64 / 1e9, at.saturating_sub(since) as f64 / 1e9);
    format!("{}: {found} at {at_s:.3} s, {after_s:.3} s after {what} (TTL {:?}): {verdict}", run.key, run.ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn run(renewals: &[u64], abandoned: Option<u64>, reads: &[(u64, bool)]) -> LeaseRun {
        LeaseRun {
            key: "lease/0-1".into(),
            ttl: Duration::from_secs(2),
            granted: 0,
            renewals: renewals.to_vec(),
            abandoned,
            reads: reads
                .iter()
                .map(|(t, present)| Read { invoke: *t, complete: *t + 1_000_000, present: *present })
                .collect(),
        }
    }

    #[test]
    fn a_lease_kept_then_let_go_passes() {
        let r = run(&[S / 2, S, 3 * S / 2], Some(2 * S), &[(S, true), (3 * S, true), (4 * S, false)]);
        assert_eq!(check(&[r], &[]), Vec::<String>::new());
    }

    #[test]
    fn a_key_gone_while_renewed_is_early() {
        let r = run(&[S / 2, S, 3 * S / 2], Some(2 * S), &[(2 * S, false)]);
        let problems = check(&[r], &[]);
        assert!(problems[0].contains("expired early"), "{problems:?}");
    }

    #[test]
    fn a_key_left_long_after_its_ttl_is_late_unless_a_fault_explains_it() {
        let r = run(&[S], Some(S), &[(5 * S, true), (6 * S, false)]);
        let problems = check(std::slice::from_ref(&r), &[]);
        assert!(problems[0].contains("kept too long"), "{problems:?}");
        // A failover at 2 s gives the lease its TTL again from the election,
        assert_eq!(check(std::slice::from_ref(&r), &[2 * S]), Vec::<String>::new());
        // and so does one just after the TTL, before the revoke committed.
        let r2 = run(&[S], Some(S), &[(7 * S, true), (8 * S, false)]);
        assert_eq!(check(std::slice::from_ref(&r2), &[3 * S + S / 10]), Vec::<String>::new());
        // But not one long after the key should have gone.
        let r3 = run(&[S], Some(S), &[(5 * S, true), (9 * S, true), (10 * S, false)]);
        assert!(!check(&[r3], &[8 * S]).is_empty());
    }
}
