//! Service instances beside the config workload, and their checker.
//!
//! Each registry client loops: register a new instance of [`SERVICE`]
//! (a unique id, `c<client>-<n>`) bound to a lease of `ttl` and kept alive
//! by the SDK's [`ferry_sdk::Registration`], for a random while (timing
//! every keep-alive it hears back), then end it one of two ways: deregister
//! it, or abandon it (drop the handle: the renewals stop, nothing is
//! deregistered) and wait until it is gone from the listing. Beside it, a
//! reader lists the service every [`READ_EVERY`], each time through
//! another member first, and records which of its client's own instances
//! each listing named. A failed read is not recorded.
//!
//! The checker, from those times alone (a read may take effect anywhere
//! between its invoke and its completion):
//! - **missing**: a read that began after the registration was acknowledged
//!   and completed before the instance could have expired (the last
//!   keep-alive heard back before the read began, or the acknowledgement,
//!   plus the TTL, less [`EARLY_MARGIN`]) and before any deregister of it
//!   was invoked must list it;
//! - **resurrected**: a read that began after a deregister was acknowledged
//!   must not list it;
//! - **kept too long**: once its renewals stopped without an acknowledged
//!   deregister (abandoned, a failed deregister, a lease said gone, the run
//!   ending), a read that began later than the TTL after the renewals
//!   stopped, and after the election of the last fault before it
//!   ([`ELECTION`]: a new leader gives every lease its full TTL again), plus
//!   [`LATE_MARGIN`], must not list it, unless the listing flags it
//!   `suspect`: a mass expiry past the cluster's protect threshold keeps the
//!   instance, flagged, for [`protect_hold`] more.
//!
//! A registration that failed is kept in the record but not judged: it may
//! have committed any time later, unrenewed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_sdk::{pb, Client};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::history::History;

/// The service every registry client registers its instances in.
pub const SERVICE: &str = "chaos-svc";
/// Clock margin of the missing check (keep-alives are timed when heard
/// back, after the leader renewed).
const EARLY_MARGIN: Duration = Duration::from_millis(500);
/// Margin of the kept-too-long check: expiries are revoked in batches every
/// 100 ms, through the log.
const LATE_MARGIN: Duration = Duration::from_secs(1);
/// How long an election may take after a fault.
const ELECTION: Duration = Duration::from_secs(3);
/// The scheduler's `PROTECT_MAX_TTLS` and `PROTECT_MIN_HOLD`: a lease kept
/// by the protect threshold goes anyway once it lapsed this long ago.
const PROTECT_MAX_TTLS: u32 = 10;
const PROTECT_MIN_HOLD: Duration = Duration::from_secs(60);
/// How often each client lists the service.
const READ_EVERY: Duration = Duration::from_millis(100);
/// How long past the TTL an abandoning client waits for its instance to go.
const GONE_WAIT: Duration = Duration::from_secs(10);

/// How long past its due time the protect threshold may keep an expired
/// instance, flagged `suspect`.
pub fn protect_hold(ttl: Duration) -> Duration {
    (ttl * PROTECT_MAX_TTLS).max(PROTECT_MIN_HOLD)
}

/// One listing of [`SERVICE`] by one client.
#[derive(Debug, Clone, Serialize)]
pub struct Read {
    pub invoke: u64,
    pub complete: u64,
    /// The client's own instance ids the listing named.
    pub present: Vec<String>,
    /// Those of them flagged `suspect` (kept by the protect threshold).
    pub suspect: Vec<String>,
}

impl Read {
    fn lists(&self, id: &str) -> bool {
        self.present.iter().any(|p| p == id)
    }

    fn suspects(&self, id: &str) -> bool {
        self.suspect.iter().any(|p| p == id)
    }
}

/// How an instance's life ended, as its client saw it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum End {
    /// The registration failed: the instance may exist, never renewed.
    NotRegistered { complete: u64, reason: String },
    /// Still kept when the run stopped; the handle was dropped `at`.
    Kept { at: u64 },
    /// A keep-alive said the lease was gone, `at`.
    Lost { at: u64 },
    /// Deregistered: invoked, acknowledged, and whether it was still there.
    Deregistered { invoke: u64, ack: u64, removed: bool },
    /// The deregister failed: it may or may not have applied; the renewals
    /// stopped at `complete` all the same.
    DeregisterUnknown { invoke: u64, complete: u64, reason: String },
    /// The handle was dropped `at` without deregistering; `gone` is the
    /// completion of the first later read that did not list it (`None`:
    /// none within the TTL and [`GONE_WAIT`]).
    Abandoned { at: u64, gone: Option<u64> },
}

/// One instance's life, as its client saw it (nanoseconds since the start).
#[derive(Debug, Clone, Serialize)]
pub struct InstanceRun {
    pub client: usize,
    pub id: String,
    pub ttl: Duration,
    /// When the registration was asked for.
    pub invoke: u64,
    /// When it was acknowledged.
    pub registered: Option<u64>,
    /// When each keep-alive was heard back.
    pub renewals: Vec<u64>,
    pub end: End,
    /// The client's reads from this registration's invoke until the next
    /// one's: the checker judges every instance against all of its client's
    /// reads from its invoke on (a later run's reads may list it too).
    pub reads: Vec<Read>,
}

impl InstanceRun {
    /// When the renewals surely stopped, without an acknowledged deregister
    /// (no renewal can have been sent later).
    fn renewals_stopped(&self) -> Option<u64> {
        match self.end {
            End::Kept { at } | End::Lost { at } | End::Abandoned { at, .. } => Some(at),
            End::DeregisterUnknown { complete, .. } => Some(complete),
            End::NotRegistered { .. } | End::Deregistered { .. } => None,
        }
    }
}

type Reads = Arc<Mutex<Vec<Read>>>;

fn lock(reads: &Reads) -> std::sync::MutexGuard<'_, Vec<Read>> {
    reads.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lists the service every [`READ_EVERY`] through `readers` in turn (each
/// prefers another member) until `done`, recording the ids under `prefix`.
async fn read_loop(readers: Vec<Client>, history: History, prefix: String, reads: Reads, done: Arc<AtomicBool>) {
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for reader in readers.iter().cycle() {
        tick.tick().await;
        if done.load(Ordering::Relaxed) {
            return;
        }
        let invoke = history.now();
        let Ok(list) = reader.instances(SERVICE).await else { continue };
        let own: Vec<&pb::Instance> = list.instances.iter().filter(|i| i.id.starts_with(&prefix)).collect();
        lock(&reads).push(Read {
            invoke,
            complete: history.now(),
            present: own.iter().map(|i| i.id.clone()).collect(),
            suspect: own.iter().filter(|i| i.suspect).map(|i| i.id.clone()).collect(),
        });
    }
}

/// A client's next instance, drawn before it registers (the seed decides).
struct Plan {
    id: String,
    keep: Duration,
    abandon: bool,
}

/// One instance: registered, kept for a while, then deregistered or abandoned.
async fn one_instance(
    client: &Client,
    history: &History,
    i: usize,
    Plan { id, keep, abandon }: Plan,
    ttl: Duration,
    stop: &AtomicBool,
    client_reads: &Reads,
) -> InstanceRun {
    let ns = |d: Duration| d.as_nanos() as u64;
    let instance = pb::Instance {
        service: SERVICE.into(),
        id: id.clone(),
        address: "127.0.0.1".into(),
        port: 9000,
        version: "chaos".into(),
        ..Default::default()
    };
    let invoke = history.now();
    let registered = client.register_kept(instance, ttl).await;
    let (at, renewals, reads) = (history.now(), Vec::new(), Vec::new());
    let end = End::Kept { at }; // until it ends otherwise
    let mut run = InstanceRun { client: i, id, ttl, invoke, registered: Some(at), renewals, end, reads };
    let mut registration = match registered {
        Ok(r) => r,
        Err(e) => {
            run.registered = None;
            run.end = End::NotRegistered { complete: at, reason: e.to_string() };
            return run;
        }
    };
    let until = history.now() + ns(keep);
    let mut tick = tokio::time::interval(READ_EVERY);
    while history.now() < until && !stop.load(Ordering::Relaxed) {
        tokio::select! {
            answer = registration.next() => match answer {
                Some(Ok(resp)) if resp.ttl_ms > 0 => run.renewals.push(history.now()),
                Some(Err(_)) => {}
                Some(Ok(_)) | None => {
                    run.end = End::Lost { at: history.now() };
                    return run;
                }
            },
            _ = tick.tick() => {}
        }
    }
    if stop.load(Ordering::Relaxed) {
        drop(registration);
        run.end = End::Kept { at: history.now() };
        return run;
    }
    if !abandon {
        let invoke = history.now();
        run.end = match registration.deregister().await {
            Ok(removed) => End::Deregistered { invoke, ack: history.now(), removed },
            Err(e) => End::DeregisterUnknown { invoke, complete: history.now(), reason: e.to_string() },
        };
        return run;
    }
    // Dropping the handle aborts the renewals and deregisters nothing.
    drop(registration);
    let at = history.now();
    let give_up = at + ns(ttl + GONE_WAIT);
    let gone = loop {
        let gone = lock(client_reads)
            .iter()
            .rev()
            .take_while(|r| r.invoke > at)
            .filter(|r| !r.lists(&run.id))
            .map(|r| r.complete)
            .last();
        if gone.is_some() || history.now() > give_up {
            break gone;
        }
        tokio::time::sleep(READ_EVERY).await;
    };
    run.end = End::Abandoned { at, gone };
    run
}

/// Starts `clients` registry clients with instances of `ttl`; they stop at
/// `stop` (an abandoned instance is still waited for, at most the TTL and
/// [`GONE_WAIT`]).
pub fn start(
    endpoints: &[String],
    history: &History,
    clients: usize,
    ttl: Duration,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Vec<InstanceRun>>>> {
    anyhow::ensure!(!endpoints.is_empty(), "the registry clients need at least one endpoint");
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = crate::workload::client(endpoints)?;
        // One reader per member, each trying another member first.
        let mut readers = Vec::new();
        for k in 0..endpoints.len() {
            let mut order = endpoints.to_vec();
            order.rotate_left((i + k) % endpoints.len());
            readers.push(crate::workload::client(&order)?);
        }
        let (history, stop) = (history.clone(), stop.clone());
        let mut rng = StdRng::seed_from_u64(seed ^ (0x5e41_0000 + i as u64));
        tasks.push(tokio::spawn(async move {
            let reads: Reads = Arc::default();
            let done = Arc::new(AtomicBool::new(false));
            let reader =
                tokio::spawn(read_loop(readers, history.clone(), format!("c{i}-"), reads.clone(), done.clone()));
            let mut runs: Vec<InstanceRun> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let plan = Plan {
                    id: format!("c{i}-{n}"),
                    keep: Duration::from_millis(rng.gen_range(500..4000)),
                    abandon: rng.gen_bool(0.5),
                };
                let run = one_instance(&client, &history, i, plan, ttl, &stop, &reads).await;
                let failed = run.registered.is_none();
                runs.push(run);
                if failed {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            done.store(true, Ordering::Relaxed);
            let _ = reader.await;
            // Each read to the last run registered before it began.
            for read in std::mem::take(&mut *lock(&reads)) {
                let at = runs.partition_point(|r| r.invoke <= read.invoke);
                if let Some(run) = at.checked_sub(1).and_then(|at| runs.get_mut(at)) {
                    run.reads.push(read);
                }
            }
            runs
        }));
    }
    Ok(tasks)
}

/// What is wrong with the instances' lives; `faults` are the times (ns
/// since the start) faults struck.
pub fn check(runs: &[InstanceRun], faults: &[u64]) -> Vec<String> {
    let ns = |d: Duration| d.as_nanos() as u64;
    // Each client's reads, in the order it made them.
    let mut by_client: HashMap<usize, Vec<&Read>> = HashMap::new();
    for run in runs {
        by_client.entry(run.client).or_default().extend(&run.reads);
    }
    by_client.values_mut().for_each(|reads| reads.sort_by_key(|r| r.invoke));
    let mut problems = Vec::new();
    for run in runs {
        let all = &by_client[&run.client];
        let reads = &all[all.partition_point(|r| r.invoke < run.invoke)..];
        if let Some(ack) = run.registered {
            let deregister = match run.end {
                End::Deregistered { invoke, .. } | End::DeregisterUnknown { invoke, .. } => invoke,
                _ => u64::MAX,
            };
            // Renewed no later than heard back: the margin covers the trip.
            let floor = |t: u64| run.renewals.iter().copied().filter(|h| *h <= t).max().unwrap_or(ack).max(ack);
            let latest = floor(u64::MAX) + ns(run.ttl);
            let unlisted =
                reads.iter().take_while(|r| r.invoke < latest).filter(|r| r.invoke >= ack && !r.lists(&run.id));
            for r in unlisted {
                let floor = floor(r.invoke);
                if r.complete + ns(EARLY_MARGIN) < floor + ns(run.ttl) && r.complete < deregister {
                    let what = if floor > ack { "its last keep-alive heard back" } else { "its registration" };
                    problems.push(problem(run, r, "not listed", floor, what, "missing"));
                    break;
                }
            }
        }
        if let End::Deregistered { ack, .. } = run.end {
            if let Some(r) = reads.iter().find(|r| r.invoke > ack && r.lists(&run.id)) {
                problems.push(problem(run, r, "listed", ack, "its deregister was acknowledged", "resurrected"));
            }
        }
        let Some(stopped) = run.renewals_stopped() else { continue };
        // Gone within a TTL of the renewals' end or of the last election
        // before the read, whichever is later; a suspect, within the hold.
        let kept = |r: &Read| {
            let last_fault = faults.iter().copied().filter(|f| *f <= r.invoke).max();
            let from = last_fault.map_or(stopped, |fault| stopped.max(fault + ns(ELECTION)));
            let due = from + ns(run.ttl) + ns(LATE_MARGIN);
            r.invoke > due && !(r.suspects(&run.id) && r.invoke <= due + ns(protect_hold(run.ttl)))
        };
        if let Some(r) = reads.iter().find(|r| r.lists(&run.id) && kept(r)) {
            let verdict =
                if r.suspects(&run.id) { "kept too long (suspect, past the protect hold)" } else { "kept too long" };
            problems.push(problem(run, r, "listed", stopped, "its renewals stopped", verdict));
        }
    }
    problems
}

/// One line of the report: what read `r` found, `since` what.
fn problem(run: &InstanceRun, r: &Read, found: &str, since: u64, what: &str, verdict: &str) -> String {
    let (id, client, ttl) = (&run.id, run.client, run.ttl);
    let (from, to, after) =
        (r.invoke as f64 / 1e9, r.complete as f64 / 1e9, r.invoke.saturating_sub(since) as f64 / 1e9);
    format!("{id} (client {client}): {found} by the read of {from:.3}-{to:.3} s, {after:.3} s after {what} (TTL {ttl:?}): {verdict}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;
    const A: &str = "c0-1";

    /// A read of 1 ms from `t`, listing `ids`.
    fn read(t: u64, ids: &[&str]) -> Read {
        let present = ids.iter().map(|s| s.to_string()).collect();
        Read { invoke: t, complete: t + MS, present, suspect: Vec::new() }
    }

    /// Instance `id` of client 0 with a TTL of 2 s, asked for at `invoke`
    /// and acknowledged 10 ms later.
    fn run(id: &str, invoke: u64, renewals: &[u64], end: End, reads: Vec<Read>) -> InstanceRun {
        let (ttl, registered, renewals) = (Duration::from_secs(2), Some(invoke + 10 * MS), renewals.to_vec());
        InstanceRun { client: 0, id: id.into(), ttl, invoke, registered, renewals, end, reads }
    }

    /// Instance `A`, renewed at 0.5 s and abandoned at 1 s.
    fn abandoned(reads: Vec<Read>) -> InstanceRun {
        run(A, 0, &[S / 2], End::Abandoned { at: S, gone: None }, reads)
    }

    fn deregistered(invoke: u64, ack: u64) -> End {
        End::Deregistered { invoke, ack, removed: true }
    }

    fn passes(runs: &[InstanceRun], faults: &[u64]) {
        assert_eq!(check(runs, faults), Vec::<String>::new());
    }

    fn fails(runs: &[InstanceRun], faults: &[u64], verdict: &str) {
        let problems = check(runs, faults);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with(A) && problems[0].contains(verdict), "{problems:?}");
    }

    #[test]
    fn a_clean_history_passes() {
        // A: deregistered at 2 s. c0-2: abandoned at 4 s, gone by 6.5 s;
        // its reads show A gone too.
        let reads = vec![read(S / 2, &[A]), read(S, &[A]), read(2 * S + 60 * MS, &[])];
        let first = run(A, 0, &[S / 2, S, 3 * S / 2], deregistered(2 * S, 2 * S + 50 * MS), reads);
        let reads = vec![read(3 * S + S / 2, &["c0-2"]), read(5 * S, &["c0-2"]), read(6 * S + S / 2, &[])];
        let second = run("c0-2", 3 * S, &[3 * S + S / 2], End::Abandoned { at: 4 * S, gone: None }, reads);
        passes(&[first, second], &[]);
    }

    #[test]
    fn an_instance_unlisted_while_kept_is_missing() {
        // Renewed last at 1.5 s: listed surely until 3 s.
        let end = End::Abandoned { at: 4 * S, gone: None };
        fails(&[run(A, 0, &[S / 2, S, 3 * S / 2], end.clone(), vec![read(2 * S, &[])])], &[], "missing");
        // Not before the registration was acknowledged, nor by a read that
        // may have taken effect after the expiry.
        let mut across = read(2 * S + 800 * MS, &[]);
        across.complete = 3 * S + 100 * MS;
        passes(&[run(A, 0, &[S / 2, S, 3 * S / 2], end, vec![read(5 * MS, &[]), across])], &[]);
    }

    #[test]
    fn an_instance_listed_after_its_deregister_ack_is_resurrected() {
        let end = deregistered(S, S + 100 * MS);
        fails(&[run(A, 0, &[S / 2], end.clone(), vec![read(3 * S / 2, &[A])])], &[], "resurrected");
        // Also when the listing is one of a later instance's reads.
        let later = run("c0-2", 2 * S, &[], End::Lost { at: 3 * S }, vec![read(2 * S + 20 * MS, &[A, "c0-2"])]);
        fails(&[run(A, 0, &[S / 2], end, Vec::new()), later], &[], "resurrected");
    }

    #[test]
    fn a_read_overlapping_the_deregister_passes_either_way() {
        // Deregister invoked at 1 s, acknowledged at 1.2 s.
        for listed in [&[A][..], &[]] {
            let mut across = read(950 * MS, listed);
            across.complete = 1250 * MS;
            let within = read(S + 100 * MS, listed);
            passes(&[run(A, 0, &[S / 2], deregistered(S, S + 200 * MS), vec![across, within])], &[]);
        }
    }

    #[test]
    fn an_abandoned_instance_listed_past_its_ttl_is_kept_too_long() {
        fails(&[abandoned(vec![read(5 * S, &[A]), read(6 * S, &[])])], &[], "kept too long");
        // A failed deregister stops the renewals too (here at 4 s).
        let end = End::DeregisterUnknown { invoke: S, complete: 4 * S, reason: "timeout".into() };
        fails(&[run(A, 0, &[S / 2], end, vec![read(6 * S, &[A]), read(8 * S, &[A])])], &[], "kept too long");
    }

    #[test]
    fn a_read_soon_after_a_fault_passes_within_the_election_allowance() {
        // A failover at 2 s gives the lease its TTL again from 5 s on,
        passes(&[abandoned(vec![read(7 * S, &[A]), read(8 * S + S / 2, &[])])], &[2 * S]);
        // but not past it.
        fails(&[abandoned(vec![read(10 * S, &[A])])], &[2 * S], "kept too long");
    }

    #[test]
    fn a_suspect_instance_is_kept_for_the_protect_hold_only() {
        let suspect = |t| {
            let mut r = read(t, &[A]);
            r.suspect = r.present.clone();
            abandoned(vec![r])
        };
        passes(&[suspect(30 * S)], &[]);
        fails(&[suspect(70 * S)], &[], "past the protect hold");
    }
}
