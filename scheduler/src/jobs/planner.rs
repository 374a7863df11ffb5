//! The transfer planner: which target pulls which chunk from whom, and when
//! to prepare, pack, clean up, fail and call back. A pure function of what
//! it is shown and told: the jobs as the log has them, who is connected in
//! which session, the workers' addresses and zones, the reports it heard
//! from targets, and the time ([`View`], [`Report`]) give [`Action`]s. It
//! does no I/O; the driver ([`crate::jobs::driver`]) feeds it and carries the
//! actions out.
//!
//! Every round (on each applied change, session change, worker report, or
//! every 100 ms) it walks the running jobs and, per target:
//! - asks it to **prepare** (report what it already holds) once per session;
//! - when it holds every chunk, tells it to **pack**;
//! - otherwise has it **pull**, one chunk per target per pass so early
//!   holders serve many targets: rarest chunk first (ties rotated per target,
//!   so targets fetch different chunks and trade them), from the holder with
//!   the fewest uploads in flight (the source and every target that has
//!   acknowledged the chunk), preferring the target's own `zone` and peers
//!   over the source, avoiding for a while a holder that failed a pull or
//!   sent a chunk with a bad hash.
//!
//! It also **fails** targets that stay disconnected past the job's grace
//! period and every unfinished target of a job past its timeout, tells
//! targets of ended jobs to drop their staged data (**cancel**), and asks
//! for the **callback** of a job that ended.
//!
//! Nothing here is logged. A new leader starts with an empty planner,
//! re-sends prepare (idempotent on the worker) and plans from what the log
//! says each target holds.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ferry_storage::{Job, JobPhase, TargetPhase};

use crate::jobs::worker::PullFailure;

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
/// A new leader still calls back jobs that ended this long before it took
/// over (the old leader may have died before its POST).
pub const CALLBACK_CATCH_UP_MS: u64 = 60 * 1000;

/// A registered worker as the planner needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// Its chunk service, `host:port`.
    pub addr: String,
    /// Its `zone` label (empty: none).
    pub zone: String,
    /// It drains: it gets no new pulls, and serves chunks only when no
    /// other holder has them.
    pub draining: bool,
}

/// What a round looks at.
pub struct View<'a> {
    /// Every job, as the log has it.
    pub jobs: &'a [Job],
    /// Connected workers and the epoch of their session.
    pub live: &'a HashMap<String, u64>,
    /// Registered workers by name.
    pub workers: &'a HashMap<String, Peer>,
    /// The leader's monotonic time.
    pub now: Instant,
    /// The leader's wall-clock time, ms since the Unix epoch (the log's times).
    pub now_ms: u64,
}

/// What the driver is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the target the job's manifest and its destinations.
    Prepare {
        /// The job.
        job: String,
        /// The target.
        target: String,
    },
    /// Have the target fetch a chunk from a holder.
    Pull {
        /// The job.
        job: String,
        /// The target.
        target: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
        /// The holder.
        from: String,
        /// The holder's chunk service.
        from_addr: String,
    },
    /// Have the target install its files and run the job's hook.
    Pack {
        /// The job.
        job: String,
        /// The target.
        target: String,
    },
    /// Have the target drop its staged data of an ended job.
    Cancel {
        /// The job.
        job: String,
        /// The target.
        target: String,
    },
    /// Record in the log that the target failed.
    Fail {
        /// The job.
        job: String,
        /// The target.
        target: String,
        /// Why, for the report.
        reason: String,
    },
    /// POST the ended job's report to its callback URL.
    Callback {
        /// The job.
        job: String,
    },
}

/// What a target told the leader that the log does not say (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// It holds a chunk (its ack is on its way into the log).
    Pulled {
        /// The job.
        job: String,
        /// The target.
        target: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
    },
    /// A pull failed.
    PullFailed {
        /// The job.
        job: String,
        /// The target.
        target: String,
        /// The file's index.
        file: u32,
        /// The chunk's index.
        chunk: u32,
        /// The holder it asked.
        from: String,
        /// Why.
        failure: PullFailure,
    },
    /// It answered prepare in its session `epoch`.
    Prepared {
        /// The job.
        job: String,
        /// The target.
        target: String,
        /// Its session.
        epoch: u64,
    },
}

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
    /// Files whose chunks a holder no longer had ([`PullFailure::Gone`]),
    /// with that holder: from the job's source, the file changed there.
    gone: Vec<(u32, String)>,
}

impl JobPlan {
    /// True if a failure for `key` may be proposed (again) now.
    fn may_propose(&mut self, key: &str, now: Instant) -> bool {
        match self.proposed.get(key) {
            Some(at) if now.saturating_duration_since(*at) < RETRY_PROPOSAL => false,
            _ => {
                self.proposed.insert(key.to_string(), now);
                true
            }
        }
    }
}

/// The planner's soft state: what it asked for and heard, per job.
pub struct Planner {
    jobs: HashMap<String, JobPlan>,
    /// Jobs whose callback this leader asked for.
    called_back: HashSet<String>,
    /// (job, target) -> session epoch in which cleanup was sent.
    cleanup_sent: HashMap<(String, String), u64>,
    /// When this node started leading (ms since the epoch).
    leading_since_ms: u64,
}

fn holds(job: &Job, target: &str, file: u32, chunk: u32) -> bool {
    job.targets
        .iter()
        .find(|t| t.worker == target)
        .is_none_or(|t| t.held.get(file as usize).and_then(|h| h.get(chunk as usize)).copied().unwrap_or(true))
}

impl Planner {
    /// An empty plan for a leader that took over at `leading_since_ms`.
    pub fn new(leading_since_ms: u64) -> Self {
        Self { jobs: HashMap::new(), called_back: HashSet::new(), cleanup_sent: HashMap::new(), leading_since_ms }
    }

    /// Folds a target's report into the plan.
    pub fn report(&mut self, report: Report, now: Instant) {
        match report {
            Report::PullFailed { job, target, file, chunk, from, failure } => {
                let Some(p) = self.jobs.get_mut(&job) else { return };
                if failure == PullFailure::AlreadyPulling {
                    // The target is still pulling it (planned before its
                    // session changed, or by an earlier leader): that pull's
                    // ack or failure will come. Planning it again now would
                    // only be refused again, as fast as messages go round.
                    return;
                }
                p.inflight.remove(&(target.clone(), file, chunk));
                match failure {
                    // A busy holder is skipped briefly.
                    PullFailure::HolderBusy => {
                        p.avoid.insert((target, from), now + BUSY_AVOID_FOR);
                    }
                    // The target lost the job (it restarted): prepare again;
                    // that says nothing bad about the holder.
                    PullFailure::NotPrepared => {
                        p.prepare_sent.remove(&target);
                        p.prepared_in.remove(&target);
                    }
                    PullFailure::AlreadyInstalled | PullFailure::AlreadyPulling => {}
                    PullFailure::BadChunk | PullFailure::Stalled | PullFailure::Holder | PullFailure::Local => {
                        p.avoid.insert((target, from), now + AVOID_FOR);
                    }
                    // A holder's copy went away: other holders may still
                    // have theirs; if the holder was the source, see
                    // `source_changed`.
                    PullFailure::Gone => {
                        if !p.gone.contains(&(file, from.clone())) {
                            p.gone.push((file, from.clone()));
                        }
                        p.avoid.insert((target, from), now + AVOID_FOR);
                    }
                }
            }
            Report::Pulled { job, target, file, chunk } => {
                if let Some(p) = self.jobs.get_mut(&job) {
                    p.inflight.remove(&(target.clone(), file, chunk));
                    p.acked.insert((target, file, chunk));
                }
            }
            Report::Prepared { job, target, epoch } => {
                self.jobs.entry(job).or_default().prepared_in.insert(target, (epoch, now));
            }
        }
    }

    /// The driver could not send `action` (the target's session went away
    /// or its queue is full): forget that it was sent, so a later round
    /// plans it again.
    pub fn unsent(&mut self, action: &Action) {
        match action {
            Action::Prepare { job, target } => {
                if let Some(p) = self.jobs.get_mut(job) {
                    p.prepare_sent.remove(target);
                }
            }
            Action::Pull { job, target, file, chunk, .. } => {
                if let Some(p) = self.jobs.get_mut(job) {
                    p.inflight.remove(&(target.clone(), *file, *chunk));
                }
            }
            Action::Pack { job, target } => {
                if let Some(p) = self.jobs.get_mut(job) {
                    p.pack_sent.remove(target);
                }
            }
            Action::Cancel { job, target } => {
                self.cleanup_sent.remove(&(job.clone(), target.clone()));
            }
            Action::Fail { .. } | Action::Callback { .. } => {}
        }
    }

    /// One round: what to do now.
    pub fn round(&mut self, v: &View) -> Vec<Action> {
        let mut out = Vec::new();
        let running: HashMap<&str, &Job> =
            v.jobs.iter().filter(|j| j.phase == JobPhase::Running).map(|j| (j.id.as_str(), j)).collect();
        // Forget pulls that finished, timed out, belong to an old session, or
        // whose target is done; then count what each holder is serving.
        self.jobs.retain(|id, _| running.contains_key(id.as_str()));
        for (id, p) in self.jobs.iter_mut() {
            let job = running[id.as_str()];
            p.inflight.retain(|(w, f, c), fl| {
                let Some(t) = job.targets.iter().find(|t| t.worker == *w) else { return false };
                !t.phase.is_terminal()
                    && !holds(job, w, *f, *c)
                    && v.now.saturating_duration_since(fl.since) < PULL_TIMEOUT
                    && v.live.get(w) == Some(&fl.epoch)
            });
            p.avoid.retain(|_, until| *until > v.now);
            p.acked.retain(|(w, f, c)| !holds(job, w, *f, *c));
        }
        let mut uploads: HashMap<String, usize> = HashMap::new();
        for p in self.jobs.values() {
            for f in p.inflight.values() {
                *uploads.entry(f.from.clone()).or_default() += 1;
            }
        }
        for job in v.jobs {
            if job.phase != JobPhase::Running {
                if v.now_ms.saturating_sub(job.finished_ms) < CLEANUP_WINDOW_MS {
                    self.finish(v, job, &mut out);
                }
                continue;
            }
            let p = self.jobs.entry(job.id.clone()).or_default();
            if v.now_ms > job.created_ms.saturating_add(job.timeout_ms) {
                if p.may_propose("", v.now) {
                    time_out(job, &mut out);
                }
                continue;
            }
            source_changed(p, job, v.now, &mut out);
            let mut eligible: Vec<(usize, u64)> = Vec::new();
            for (ti, t) in job.targets.iter().enumerate() {
                if t.phase.is_terminal() {
                    continue;
                }
                let Some(&epoch) = v.live.get(&t.worker) else {
                    let since = *p.down_since.entry(t.worker.clone()).or_insert(v.now);
                    let grace = Duration::from_millis(job.grace_ms);
                    if v.now.saturating_duration_since(since) > grace && p.may_propose(&t.worker, v.now) {
                        let reason = format!("worker {} was disconnected for more than {grace:?}", t.worker);
                        out.push(Action::Fail { job: job.id.clone(), target: t.worker.clone(), reason });
                    }
                    continue;
                };
                p.down_since.remove(&t.worker);
                // Prepare once per session: a restarted worker learns the job
                // again (its answer is idempotent).
                if p.prepare_sent.get(&t.worker) != Some(&epoch) {
                    p.acked.retain(|(w, _, _)| *w != t.worker);
                    p.prepare_sent.insert(t.worker.clone(), epoch);
                    out.push(Action::Prepare { job: job.id.clone(), target: t.worker.clone() });
                    continue;
                }
                match p.prepared_in.get(&t.worker) {
                    Some((e, _)) if *e == epoch && t.prepared => {}
                    // Answered, but the report has not reached the log (a lost
                    // proposal): ask again; the answer is idempotent.
                    Some((e, at)) if *e == epoch && v.now.saturating_duration_since(*at) > RETRY_PROPOSAL => {
                        p.prepare_sent.remove(&t.worker);
                        p.prepared_in.remove(&t.worker);
                        continue;
                    }
                    _ => continue,
                }
                if t.complete() {
                    // Sent once per session, and again while no fin reached
                    // the log (the worker replays the fin of a pack it did).
                    let due = match p.pack_sent.get(&t.worker) {
                        Some((e, at)) => *e != epoch || v.now.saturating_duration_since(*at) > PACK_RESEND,
                        None => true,
                    };
                    if due {
                        p.pack_sent.insert(t.worker.clone(), (epoch, v.now));
                        out.push(Action::Pack { job: job.id.clone(), target: t.worker.clone() });
                    }
                    continue;
                }
                // A draining target takes no new pulls; it resumes after
                // its restart (within the job's grace).
                if v.workers.get(&t.worker).is_some_and(|w| w.draining) {
                    continue;
                }
                eligible.push((ti, epoch));
            }
            plan_pulls(v, p, job, &eligible, &mut uploads, &mut out);
        }
        out
    }

    /// After a job ends: tell every target that did not install (failed,
    /// cancelled) to drop its staged data, again after each reconnect; and
    /// call back (at least once: a new leader calls back jobs that ended
    /// shortly before it took over).
    fn finish(&mut self, v: &View, job: &Job, out: &mut Vec<Action>) {
        for t in job.targets.iter().filter(|t| matches!(t.phase, TargetPhase::Failed | TargetPhase::Cancelled)) {
            let Some(&epoch) = v.live.get(&t.worker) else { continue };
            let key = (job.id.clone(), t.worker.clone());
            if self.cleanup_sent.get(&key) != Some(&epoch) {
                self.cleanup_sent.insert(key, epoch);
                out.push(Action::Cancel { job: job.id.clone(), target: t.worker.clone() });
            }
        }
        if job.callback_url.is_empty()
            || job.finished_ms.saturating_add(CALLBACK_CATCH_UP_MS) < self.leading_since_ms
            || !self.called_back.insert(job.id.clone())
        {
            return;
        }
        out.push(Action::Callback { job: job.id.clone() });
    }
}

/// A file the job's source no longer has as it was indexed (rewritten or
/// deleted during the transfer) cannot be completed from there: every
/// unfinished target that misses part of it fails at once, naming it,
/// instead of waiting out the job's deadline. Targets that hold the whole
/// file already go on.
fn source_changed(p: &mut JobPlan, job: &Job, now: Instant, out: &mut Vec<Action>) {
    let files: Vec<u32> = p.gone.iter().filter(|(_, holder)| *holder == job.source).map(|(f, _)| *f).collect();
    for file in files {
        let path = job.files.get(file as usize).map(|f| f.path.as_str()).unwrap_or("?");
        for t in job.targets.iter().filter(|t| !t.phase.is_terminal()) {
            let missing = t.held.get(file as usize).is_some_and(|h| h.iter().any(|held| !held));
            if missing && p.may_propose(&t.worker, now) {
                let reason = format!(
                    "source changed: {path} changed or was deleted on the source {} during the transfer; submit the job again",
                    job.source
                );
                out.push(Action::Fail { job: job.id.clone(), target: t.worker.clone(), reason });
            }
        }
    }
}

/// Fails every unfinished target of a job past its deadline, naming the
/// files it did not get.
fn time_out(job: &Job, out: &mut Vec<Action>) {
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
        out.push(Action::Fail { job: job.id.clone(), target: t.worker.clone(), reason });
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
    v: &View,
    p: &mut JobPlan,
    job: &Job,
    eligible: &[(usize, u64)],
    uploads: &mut HashMap<String, usize>,
    out: &mut Vec<Action>,
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
    let live: Vec<bool> = job.targets.iter().map(|t| !failed(t) && v.live.contains_key(&t.worker)).collect();
    let source_up = v.live.contains_key(&job.source);
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
                let draining = |h: &&str| v.workers.get(*h).is_some_and(|w| w.draining);
                if holders.iter().any(|h| !draining(h)) {
                    holders.retain(|h| !draining(h));
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
            let zone = v.workers.get(&t.worker).map(|w| w.zone.as_str()).unwrap_or_default();
            let from = holders.into_iter().min_by_key(|h| {
                let same_zone = !zone.is_empty() && v.workers.get(*h).map(|w| w.zone.as_str()) == Some(zone);
                (*h == job.source, uploads.get(*h).copied().unwrap_or(0), !same_zone, h.to_string())
            });
            let Some(from) = from else { continue };
            let Some(from_addr) = v.workers.get(from).map(|w| w.addr.clone()) else { continue };
            p.inflight.insert((t.worker.clone(), f, c), Inflight { from: from.to_string(), since: v.now, epoch });
            busy[ti][k] = true;
            pulling[ti] += 1;
            copies[k] += 1;
            *uploads.entry(from.to_string()).or_default() += 1;
            planned = true;
            out.push(Action::Pull {
                job: job.id.clone(),
                target: t.worker.clone(),
                file: f,
                chunk: c,
                from: from.to_string(),
                from_addr,
            });
        }
        if !planned {
            break;
        }
    }
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
