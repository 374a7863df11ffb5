//! The transfer planner: leader-only soft state, rebuilt from the log.
//!
//! Every round (on each applied change, session change, pull failure, or
//! every 100 ms) it walks the running jobs and, per target:
//! - asks it to **prepare** (report what it already holds) once per session;
//! - when it holds every chunk, tells it to **pack**;
//! - otherwise sends **pull** commands, one per target per pass so early
//!   holders serve many targets: rarest chunk first (ties rotated per target,
//!   so targets fetch different chunks and trade them), from the holder with
//!   the fewest uploads in flight (the source and every target that has
//!   acknowledged the chunk), preferring the target's own `zone` and peers
//!   over the source, avoiding for a while a holder that failed a pull or
//!   sent a chunk with a bad hash.
//!
//! Nothing here is logged. A new leader starts with an empty plan, re-sends
//! prepare (idempotent on the worker) and plans from what the log says each
//! target holds. It also fails targets that stay disconnected past the job's
//! grace period and whole jobs past their timeout, and POSTs callbacks.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::pb::{self, control_message::Msg as Ctl};
use ferry_storage::{Job, JobEvent, JobPhase, TargetPhase};
use tokio::sync::{mpsc, watch};

use crate::clock::now_ms;
use crate::jobs::batcher::event;
use crate::jobs::sessions::{PlannerEvent, Sessions};
use crate::raft::node::Node;

/// Pulls in flight per target.
pub const PULLS_PER_TARGET: usize = 4;
/// Uploads the planner assigns to one holder at once.
pub const UPLOADS_PER_HOLDER: usize = 4;
/// A pull with no answer for this long is planned again.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a target avoids a holder that failed a pull or sent a bad chunk.
pub const AVOID_FOR: Duration = Duration::from_secs(10);
/// How long a target avoids a holder that refused a pull for being busy
/// (its upload cap), so the next round tries another instead of asking the
/// same one again at once.
pub const BUSY_AVOID_FOR: Duration = Duration::from_millis(250);

/// A pack with no fin in the log is sent again after this long.
pub const PACK_RESEND: Duration = Duration::from_secs(10);
/// A failure proposal not yet applied is proposed again after this long.
pub const RETRY_PROPOSAL: Duration = Duration::from_secs(3);
/// Ended jobs younger than this still get cleanup (cancel) messages.
pub const CLEANUP_WINDOW_MS: u64 = 10 * 60 * 1000;

struct Inflight {
    from: String,
    since: Instant,
    epoch: u64,
}

#[derive(Default)]
struct JobPlan {
    prepare_sent: HashMap<String, u64>,
    /// Session epoch in which each target answered prepare, and when.
    prepared_in: HashMap<String, (u64, Instant)>,
    /// Session epoch in which pack was sent, and when.
    pack_sent: HashMap<String, (u64, Instant)>,
    inflight: HashMap<(String, u32, u32), Inflight>,
    /// (target, holder) pairs to skip, until when.
    avoid: HashMap<(String, String), Instant>,
    /// Chunks a target reported holding whose ack is not applied yet: the
    /// slot is free and the target already serves them.
    acked: HashSet<(String, u32, u32)>,
    down_since: HashMap<String, Instant>,
    /// When a failure was last proposed, per target ("" for the whole job).
    proposed: HashMap<String, Instant>,
}

impl JobPlan {
    /// True if a failure for `key` may be proposed (again) now.
    fn may_propose(&mut self, key: &str) -> bool {
        match self.proposed.get(key) {
            Some(at) if at.elapsed() < RETRY_PROPOSAL => false,
            _ => {
                self.proposed.insert(key.to_string(), Instant::now());
                true
            }
        }
    }
}

#[derive(Default)]
struct Plan {
    jobs: HashMap<String, JobPlan>,
    /// Jobs whose callback this leader sent.
    called_back: HashSet<String>,
    /// (job, target) -> session epoch in which cleanup was sent.
    cleanup_sent: HashMap<(String, String), u64>,
}

/// Runs the planner until `shutdown` turns true.
pub async fn run(
    node: Arc<Node>,
    sessions: Arc<Sessions>,
    mut events: mpsc::Receiver<PlannerEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = node.reader.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut plan = Plan::default();
    let mut leading_since: Option<u64> = None;
    // Once every sender is gone, `recv` answers at once: stop asking, or
    // the loop would spin.
    let mut events_open = true;
    loop {
        tokio::select! {
            // The state's notifier goes away only with the node.
            r = changed.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = sessions.changed.notified() => {}
            ev = events.recv(), if events_open => {
                match ev {
                    Some(ev) => on_event(&mut plan, ev),
                    None => events_open = false,
                }
                // Acks come in bursts: take all that are queued, plan once.
                while let Ok(ev) = events.try_recv() {
                    on_event(&mut plan, ev);
                }
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if node.leader().map(|l| l.0) != Some(node.id) {
            if leading_since.take().is_some() {
                plan = Plan::default();
                sessions.clear();
            }
            continue;
        }
        let since = *leading_since.get_or_insert_with(now_ms);
        let jobs = match node.reader.jobs() {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "planner cannot read jobs");
                continue;
            }
        };
        round(&node, &sessions, &mut plan, &jobs, since);
    }
}

/// Folds a worker's report into the plan.
fn on_event(plan: &mut Plan, ev: PlannerEvent) {
    match ev {
        PlannerEvent::PullFailed { job, target, file, chunk, from, error } => {
            tracing::debug!(%job, %target, file, chunk, %from, %error, "pull failed; planning it elsewhere");
            if let Some(p) = plan.jobs.get_mut(&job) {
                if error.contains("already pulling") {
                    // The target is still pulling it (planned before its
                    // session changed, or by an earlier leader): that pull's
                    // ack or failure will come. Planning it again now would
                    // only be refused again, as fast as messages go round.
                    return;
                }
                p.inflight.remove(&(target.clone(), file, chunk));
                // A busy holder is skipped briefly; not-yet-known says nothing
                // bad about the holder.
                if error.contains("upload limit") {
                    p.avoid.insert((target.clone(), from), Instant::now() + BUSY_AVOID_FOR);
                } else if !["not prepared", "already installed"].iter().any(|t| error.contains(t)) {
                    p.avoid.insert((target.clone(), from), Instant::now() + AVOID_FOR);
                }
                if error.contains("not prepared") {
                    p.prepare_sent.remove(&target);
                    p.prepared_in.remove(&target);
                }
            }
        }
        PlannerEvent::Acked { job, target, file, chunk } => {
            if let Some(p) = plan.jobs.get_mut(&job) {
                p.inflight.remove(&(target.clone(), file, chunk));
                p.acked.insert((target, file, chunk));
            }
        }
        PlannerEvent::Prepared { job, target, epoch } => {
            tracing::debug!(%job, %target, epoch, "target prepared");
            plan.jobs.entry(job).or_default().prepared_in.insert(target, (epoch, Instant::now()));
        }
    }
}

fn round(node: &Arc<Node>, sessions: &Sessions, plan: &mut Plan, jobs: &[Job], leading_since: u64) {
    let now = now_ms();
    let running: HashMap<&str, &Job> =
        jobs.iter().filter(|j| j.phase == JobPhase::Running).map(|j| (j.id.as_str(), j)).collect();
    // Forget pulls that finished, timed out, belong to an old session, or
    // whose target is done; then count what each holder is serving.
    plan.jobs.retain(|id, _| running.contains_key(id.as_str()));
    for (id, p) in plan.jobs.iter_mut() {
        let job = running[id.as_str()];
        p.inflight.retain(|(w, f, c), fl| {
            let Some(t) = job.targets.iter().find(|t| t.worker == *w) else { return false };
            !t.phase.is_terminal()
                && !t.held.get(*f as usize).and_then(|h| h.get(*c as usize)).copied().unwrap_or(true)
                && fl.since.elapsed() < PULL_TIMEOUT
                && sessions.epoch(w) == Some(fl.epoch)
        });
        let now = Instant::now();
        p.avoid.retain(|_, until| *until > now);
        p.acked.retain(|(w, f, c)| {
            job.targets
                .iter()
                .find(|t| t.worker == *w)
                .is_some_and(|t| !t.held.get(*f as usize).and_then(|h| h.get(*c as usize)).copied().unwrap_or(true))
        });
    }
    let mut uploads: HashMap<String, usize> = HashMap::new();
    for p in plan.jobs.values() {
        for f in p.inflight.values() {
            *uploads.entry(f.from.clone()).or_default() += 1;
        }
    }
    // name -> (chunk service address, zone label)
    let workers: HashMap<String, (String, String)> = node
        .reader
        .workers()
        .unwrap_or_default()
        .into_iter()
        .map(|w| {
            let zone = w.labels.get("zone").cloned().unwrap_or_default();
            (w.name, (w.addr, zone))
        })
        .collect();
    for job in jobs {
        if job.phase != JobPhase::Running {
            if now.saturating_sub(job.finished_ms) < CLEANUP_WINDOW_MS {
                finish(sessions, plan, job, leading_since);
            }
            continue;
        }
        let p = plan.jobs.entry(job.id.clone()).or_default();
        if now > job.created_ms.saturating_add(job.timeout_ms) {
            if p.may_propose("") {
                time_out(node, job);
            }
            continue;
        }
        let mut eligible: Vec<(usize, u64)> = Vec::new();
        for (ti, t) in job.targets.iter().enumerate() {
            if t.phase.is_terminal() {
                continue;
            }
            let Some(epoch) = sessions.epoch(&t.worker) else {
                let since = *p.down_since.entry(t.worker.clone()).or_insert_with(Instant::now);
                let grace = Duration::from_millis(job.grace_ms);
                if since.elapsed() > grace && p.may_propose(&t.worker) {
                    fail(node, job, &t.worker, format!("worker {} was disconnected for more than {grace:?}", t.worker));
                }
                continue;
            };
            p.down_since.remove(&t.worker);
            // Prepare once per session: a restarted worker learns the job
            // again (its answer is idempotent).
            if p.prepare_sent.get(&t.worker) != Some(&epoch) {
                if sessions.send(&t.worker, Ctl::Prepare(prepare(job, ti))) {
                    tracing::debug!(job = %job.id, target = %t.worker, epoch, "prepare sent");
                    p.acked.retain(|(w, _, _)| *w != t.worker);
                    p.prepare_sent.insert(t.worker.clone(), epoch);
                }
                continue;
            }
            match p.prepared_in.get(&t.worker) {
                Some((e, _)) if *e == epoch && t.prepared => {}
                // Answered, but the report has not reached the log (a lost
                // proposal): ask again; the answer is idempotent.
                Some((e, at)) if *e == epoch && at.elapsed() > RETRY_PROPOSAL => {
                    p.prepare_sent.remove(&t.worker);
                    p.prepared_in.remove(&t.worker);
                    continue;
                }
                _ => continue,
            }
            if t.complete() {
                let pack = Ctl::Pack(pb::PackCommand { job_id: job.id.clone(), hook: job.hook.clone() });
                // Sent once per session, and again while no fin reached the
                // log (the worker replays the fin of a pack it already did).
                let due = match p.pack_sent.get(&t.worker) {
                    Some((e, at)) => *e != epoch || at.elapsed() > PACK_RESEND,
                    None => true,
                };
                if due && sessions.send(&t.worker, pack) {
                    tracing::debug!(job = %job.id, target = %t.worker, epoch, "pack sent");
                    p.pack_sent.insert(t.worker.clone(), (epoch, Instant::now()));
                }
                continue;
            }
            eligible.push((ti, epoch));
        }
        plan_pulls(sessions, p, job, &eligible, &workers, &mut uploads);
    }
}

/// Hands out pulls to `eligible` targets (index, session epoch) of `job`:
/// one per target per pass, furthest-behind first, so the first holders'
/// upload slots spread over many targets (the swarm grows as a tree, not a
/// chain) and no target starves.
///
/// The source's upload is the scarce link: every byte must leave it once,
/// so it only sends chunks no target holds or is fetching yet ("fresh"
/// chunks), and serves copies only when nothing fresh is left (the end
/// game). Each target takes the rarest chunk it misses (fewest copies held
/// or in flight), ties broken by a rotation particular to the target, so
/// targets fetch different chunks and trade them.
fn plan_pulls(
    sessions: &Sessions,
    p: &mut JobPlan,
    job: &Job,
    eligible: &[(usize, u64)],
    workers: &HashMap<String, (String, String)>,
    uploads: &mut HashMap<String, usize>,
) {
    // Chunks are numbered flat across the job's files. One matrix of who
    // holds what (in the log or acked since), built once per round, keeps
    // the search below to array reads: it runs on every applied change, and
    // a 200 MB job at 20 targets is 8,000 (target, chunk) cells.
    let spans: Vec<(u32, u32)> = job
        .files
        .iter()
        .enumerate()
        .flat_map(|(f, file)| (0..file.chunks.len()).map(move |c| (f as u32, c as u32)))
        .collect();
    let total = spans.len();
    if total == 0 {
        return;
    }
    let index: HashMap<&str, usize> = job.targets.iter().enumerate().map(|(ti, t)| (t.worker.as_str(), ti)).collect();
    let mut has: Vec<Vec<bool>> = job
        .targets
        .iter()
        .map(|t| {
            spans.iter().map(|&(f, c)| t.held.get(f as usize).and_then(|h| h.get(c as usize)) == Some(&true)).collect()
        })
        .collect();
    let start: Vec<usize> = job
        .files
        .iter()
        .scan(0, |at, f| {
            let here = *at;
            *at += f.chunks.len();
            Some(here)
        })
        .collect();
    let flat = |f: u32, c: u32| start.get(f as usize).map(|s| s + c as usize).filter(|k| *k < total);
    let mut acked_count = vec![0u64; job.targets.len()];
    for (w, f, c) in &p.acked {
        if let (Some(&ti), Some(k)) = (index.get(w.as_str()), flat(*f, *c)) {
            has[ti][k] = true;
            acked_count[ti] += 1;
        }
    }
    let mut busy: Vec<Vec<bool>> = vec![vec![false; total]; job.targets.len()];
    let mut pulling = vec![0usize; job.targets.len()];
    // Copies of each chunk held by or in flight to a target.
    let mut copies = vec![0usize; total];
    for (w, f, c) in p.inflight.keys() {
        if let (Some(&ti), Some(k)) = (index.get(w.as_str()), flat(*f, *c)) {
            busy[ti][k] = true;
            pulling[ti] += 1;
            copies[k] += 1;
        }
    }
    let failed = |t: &ferry_storage::Target| matches!(t.phase, TargetPhase::Failed | TargetPhase::Cancelled);
    for (t, held) in job.targets.iter().zip(&has) {
        if !failed(t) {
            for (n, h) in copies.iter_mut().zip(held) {
                *n += *h as usize;
            }
        }
    }
    // Targets that can serve: not failed, connected.
    let live: Vec<bool> = job.targets.iter().map(|t| !failed(t) && sessions.epoch(&t.worker).is_some()).collect();
    let source_up = sessions.epoch(&job.source).is_some();
    // Targets furthest behind pick first, so scarce upload slots go to
    // laggards and targets finish close together.
    let mut eligible = eligible.to_vec();
    eligible.sort_by_key(|&(ti, _)| job.targets[ti].chunks_done + acked_count[ti]);
    for _pass in 0..PULLS_PER_TARGET {
        let mut planned = false;
        // Once every chunk has left the source, it helps with copies.
        let fresh_left = copies.contains(&0);
        for &(ti, epoch) in &eligible {
            let t = &job.targets[ti];
            if pulling[ti] >= PULLS_PER_TARGET {
                continue;
            }
            let avoided: HashSet<&str> =
                p.avoid.keys().filter(|(w, _)| *w == t.worker).map(|(_, h)| h.as_str()).collect();
            let free = |h: &str| !avoided.contains(h) && uploads.get(h).copied().unwrap_or(0) < UPLOADS_PER_HOLDER;
            // Walk the chunks in this target's rotated order: the first
            // chunk with the fewest copies and a free holder wins.
            let rotation = ti * total / job.targets.len().max(1);
            let mut best: Option<(usize, usize, Vec<&str>)> = None;
            for i in 0..total {
                let k = (rotation + i) % total;
                let n = copies[k];
                if best.as_ref().is_some_and(|b| b.0 <= n) || has[ti][k] || busy[ti][k] {
                    continue;
                }
                let mut holders: Vec<&str> = Vec::new();
                if source_up && (n == 0 || !fresh_left) && free(&job.source) {
                    holders.push(&job.source);
                }
                for (oi, other) in job.targets.iter().enumerate() {
                    if oi != ti && has[oi][k] && live[oi] && free(&other.worker) {
                        holders.push(&other.worker);
                    }
                }
                if !holders.is_empty() {
                    best = Some((n, k, holders));
                    if n == 0 {
                        break;
                    }
                }
            }
            let Some((_, k, holders)) = best else { continue };
            let (f, c) = spans[k];
            let zone = workers.get(&t.worker).map(|w| w.1.clone()).unwrap_or_default();
            let from = holders.into_iter().min_by_key(|h| {
                let same_zone = !zone.is_empty() && workers.get(*h).map(|w| &w.1) == Some(&zone);
                (*h == job.source, uploads.get(*h).copied().unwrap_or(0), !same_zone, h.to_string())
            });
            let Some(from) = from else { continue };
            let Some(from_addr) = workers.get(from).map(|w| w.0.clone()) else { continue };
            let pull =
                pb::PullCommand { job_id: job.id.clone(), file: f, chunk: c, from_worker: from.to_string(), from_addr };
            if !sessions.send(&t.worker, Ctl::Pull(pull)) {
                continue;
            }
            p.inflight
                .insert((t.worker.clone(), f, c), Inflight { from: from.to_string(), since: Instant::now(), epoch });
            busy[ti][k] = true;
            pulling[ti] += 1;
            copies[k] += 1;
            *uploads.entry(from.to_string()).or_default() += 1;
            planned = true;
        }
        if !planned {
            break;
        }
    }
}

fn prepare(job: &Job, target: usize) -> pb::PrepareCommand {
    let t = &job.targets[target];
    pb::PrepareCommand {
        job_id: job.id.clone(),
        files: job
            .files
            .iter()
            .zip(&t.destinations)
            .map(|(f, dest)| pb::TargetFile {
                manifest: Some(crate::jobs::report::manifest(f)),
                destination: dest.clone(),
            })
            .collect(),
    }
}

fn propose(node: &Arc<Node>, e: JobEvent) {
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(err) = node.propose(event(e)).await {
            tracing::warn!(error = %err, "planner could not record a job event; it will try again");
        }
    });
}

fn fail(node: &Arc<Node>, job: &Job, target: &str, reason: String) {
    tracing::warn!(job = %job.id, %target, %reason, "target failed");
    propose(node, JobEvent::FailTarget { job: job.id.clone(), target: target.into(), reason, at_ms: now_ms() });
}

/// Fails every unfinished target of a job past its deadline, naming the
/// files it did not get.
fn time_out(node: &Arc<Node>, job: &Job) {
    for t in job.targets.iter().filter(|t| !t.phase.is_terminal()) {
        let missing: Vec<&str> = job
            .files
            .iter()
            .zip(&t.held)
            .filter(|(_, held)| held.iter().any(|h| !h))
            .map(|(f, _)| f.path.as_str())
            .collect();
        let reason = if missing.is_empty() {
            format!("job timed out after {} ms while installing", job.timeout_ms)
        } else {
            format!("job timed out after {} ms; not delivered: {}", job.timeout_ms, missing.join(", "))
        };
        fail(node, job, &t.worker, reason);
    }
}

/// After a job ends: tell every target that did not install (failed,
/// cancelled) to drop its staged data, again after each reconnect; and POST
/// the callback (at least once: a new leader re-sends callbacks of jobs that
/// ended shortly before it took over).
fn finish(sessions: &Sessions, plan: &mut Plan, job: &Job, leading_since: u64) {
    for t in job.targets.iter().filter(|t| matches!(t.phase, TargetPhase::Failed | TargetPhase::Cancelled)) {
        let Some(epoch) = sessions.epoch(&t.worker) else { continue };
        let key = (job.id.clone(), t.worker.clone());
        if plan.cleanup_sent.get(&key) != Some(&epoch)
            && sessions.send(&t.worker, Ctl::Cancel(pb::CancelCommand { job_id: job.id.clone() }))
        {
            plan.cleanup_sent.insert(key, epoch);
        }
    }
    if job.callback_url.is_empty()
        || job.finished_ms + 60_000 < leading_since
        || !plan.called_back.insert(job.id.clone())
    {
        return;
    }
    let body = crate::jobs::report::report_json(job);
    tokio::spawn(crate::webhook::post_with_retries(job.callback_url.clone(), body));
}
