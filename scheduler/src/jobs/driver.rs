//! The planner's driver, on the leader: it runs a round of the
//! [`Planner`] on each applied change, session change and worker report
//! (and every 100 ms), and carries out the actions: commands go to the
//! workers' sessions, failures into the log, callbacks out over HTTP.
//! A node that stops leading drops its planner and sessions; one that
//! starts leading begins with an empty planner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_storage::{Job, JobEvent};
use tokio::sync::{mpsc, watch};

use crate::clock::now_ms;
use crate::jobs::batcher::event;
use crate::jobs::planner::{Action, Peer, Planner, Report, View};
use crate::jobs::report::Report as JobReport;
use crate::jobs::sessions::Sessions;
use crate::jobs::worker::ToWorker;
use crate::raft::node::Node;

/// Runs rounds until `shutdown` turns true.
pub async fn run(
    node: Arc<Node>,
    sessions: Arc<Sessions>,
    mut reports: mpsc::Receiver<Report>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changed = node.reader.subscribe();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut planner: Option<Planner> = None;
    // Once every sender is gone, `recv` answers at once: stop asking, or
    // the loop would spin.
    let mut reports_open = true;
    loop {
        let mut heard = Vec::new();
        tokio::select! {
            // The state's notifier goes away only with the node.
            r = changed.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
            _ = sessions.changed.notified() => {}
            report = reports.recv(), if reports_open => {
                match report {
                    Some(r) => heard.push(r),
                    None => reports_open = false,
                }
                // Acks come in bursts: take all that are queued, plan once.
                while let Ok(r) = reports.try_recv() {
                    heard.push(r);
                }
            }
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if !node.is_leader() {
            if planner.take().is_some() {
                sessions.clear();
            }
            continue;
        }
        let planner = planner.get_or_insert_with(|| Planner::new(now_ms()));
        let now = Instant::now();
        for r in heard {
            planner.report(r, now);
        }
        let jobs = match node.reader.jobs() {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, "planner cannot read jobs");
                continue;
            }
        };
        let workers: HashMap<String, Peer> = node
            .reader
            .workers()
            .unwrap_or_default()
            .into_iter()
            .map(|w| {
                let zone = w.labels.get("zone").cloned().unwrap_or_default();
                let draining = sessions.is_draining(&w.name);
                (w.name, Peer { addr: w.addr, zone, draining })
            })
            .collect();
        let live = sessions.live();
        let view = View { jobs: &jobs, live: &live, workers: &workers, now, now_ms: now_ms() };
        for action in planner.round(&view) {
            if !carry_out(&node, &sessions, &jobs, &action) {
                planner.unsent(&action);
            }
        }
    }
}

fn job<'a>(jobs: &'a [Job], id: &str) -> Option<&'a Job> {
    jobs.iter().find(|j| j.id == id)
}

/// Does `action`; false if its command could not be queued for the worker.
fn carry_out(node: &Arc<Node>, sessions: &Sessions, jobs: &[Job], action: &Action) -> bool {
    let (target, command) = match action {
        Action::Prepare { job: id, target } => {
            let Some(job) = job(jobs, id) else { return false };
            let Some(t) = job.targets.iter().find(|t| t.worker == *target) else { return false };
            let files = job.files.iter().cloned().zip(t.destinations.iter().cloned()).collect();
            tracing::debug!(job = %id, %target, "prepare");
            (target, ToWorker::Prepare { job: id.clone(), files })
        }
        Action::Pull { job, target, file, chunk, from, from_addr } => {
            let pull = ToWorker::Pull {
                job: job.clone(),
                file: *file,
                chunk: *chunk,
                from_worker: from.clone(),
                from_addr: from_addr.clone(),
            };
            (target, pull)
        }
        Action::Pack { job: id, target } => {
            let Some(job) = job(jobs, id) else { return false };
            tracing::debug!(job = %id, %target, "pack");
            (target, ToWorker::Pack { job: id.clone(), hook: job.hook.clone() })
        }
        Action::Cancel { job, target } => (target, ToWorker::Cancel { job: job.clone() }),
        Action::Fail { job, target, reason } => {
            tracing::warn!(%job, %target, %reason, "target failed");
            let e = JobEvent::FailTarget {
                job: job.clone(),
                target: target.clone(),
                reason: reason.clone(),
                at_ms: now_ms(),
            };
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(err) = node.propose(event(e)).await {
                    tracing::warn!(error = %err, "planner could not record a job event; it will try again");
                }
            });
            return true;
        }
        Action::Callback { job: id } => {
            if let Some(job) = job(jobs, id) {
                let body = JobReport::of(job).to_json().to_string();
                let hosts = node.config.callback_hosts();
                tokio::spawn(crate::webhook::post_with_retries(job.callback_url.clone(), body, hosts));
            }
            return true;
        }
    };
    sessions.send(target, command)
}
