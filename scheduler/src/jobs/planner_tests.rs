//! The planner, step by step: a lab holds the jobs as the log would, who is
//! connected, and the clock; each test is a list of steps (a round, a
//! report, an applied event, time passing) and what the rounds ask for.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry_storage::{Chunk, FileEntry, Job, JobEvent, JobPhase, Target};

use super::*;

const MIB: u64 = 1024 * 1024;

/// One job `j` from worker `src` to some targets, the log, sessions, time.
struct Lab {
    planner: Planner,
    jobs: Vec<Job>,
    live: HashMap<String, u64>,
    workers: HashMap<String, Peer>,
    now: Instant,
    now_ms: u64,
}

fn file(path: &str, chunks: usize) -> FileEntry {
    FileEntry {
        path: path.into(),
        size: chunks as u64 * MIB,
        mode: 0o644,
        blake3: [9; 32],
        chunks: (0..chunks).map(|i| Chunk { offset: i as u64 * MIB, len: MIB, hash: [i as u8; 32] }).collect(),
    }
}

impl Lab {
    /// `targets` of a job with one file of `chunks` chunks; every worker
    /// connected in session 1.
    fn new(targets: &[&str], chunks: usize) -> Self {
        let files = vec![file("/srv/src/model.bin", chunks)];
        let job = Job {
            id: "j".into(),
            source: "src".into(),
            targets: targets.iter().map(|t| Target::new(t.to_string(), vec![format!("/srv/{t}/m")], &files)).collect(),
            files,
            hook: "reload".into(),
            callback_url: String::new(),
            timeout_ms: 600_000,
            grace_ms: 30_000,
            requested_targets: targets.iter().map(|t| t.to_string()).collect(),
            selector: String::new(),
            destination: String::new(),
            phase: JobPhase::Running,
            created_ms: 1_000_000,
            finished_ms: 0,
        };
        let mut lab = Lab {
            planner: Planner::new(1_000_000),
            jobs: vec![job],
            live: HashMap::new(),
            workers: HashMap::new(),
            now: Instant::now(),
            now_ms: 1_000_000,
        };
        for w in std::iter::once("src").chain(targets.iter().copied()) {
            lab.live.insert(w.into(), 1);
            lab.workers.insert(w.into(), Peer { addr: format!("{w}:7101"), zone: String::new(), draining: false });
        }
        lab
    }

    fn round(&mut self) -> Vec<Action> {
        let view =
            View { jobs: &self.jobs, live: &self.live, workers: &self.workers, now: self.now, now_ms: self.now_ms };
        self.planner.round(&view)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.now_ms += d.as_millis() as u64;
    }

    fn report(&mut self, r: Report) {
        self.planner.report(r, self.now);
    }

    /// An event reaches the log.
    fn apply(&mut self, e: JobEvent) {
        self.jobs[0].apply(&e);
    }

    /// `target` answers prepare (holding `local` chunks), and the answer
    /// reaches the log.
    fn prepared(&mut self, target: &str, local: &[u32]) {
        let epoch = self.live[target];
        self.report(Report::Prepared { job: "j".into(), target: target.into(), epoch });
        let local = local.iter().map(|c| (0, *c)).collect();
        self.apply(JobEvent::Prepared { job: "j".into(), target: target.into(), unchanged: vec![], local, at_ms: 0 });
    }

    /// The first round's prepares, each answered holding nothing.
    fn prepare_all(&mut self) {
        for a in self.round() {
            let Action::Prepare { target, .. } = a else { panic!("only prepares come first, got {a:?}") };
            self.prepared(&target, &[]);
        }
    }

    /// `target`'s ack of `chunk` from `from` reaches the log.
    fn hold(&mut self, target: &str, chunk: u32, from: &str) {
        let ack = JobEvent::Ack { job: "j".into(), target: target.into(), file: 0, chunk, from: from.into(), at_ms: 0 };
        self.apply(ack);
    }

    fn holds_all(&mut self, target: &str) {
        for c in 0..self.jobs[0].files[0].chunks.len() as u32 {
            self.hold(target, c, "src");
        }
    }
}

/// The pulls among `actions`: (target, chunk, from).
fn pulls(actions: &[Action]) -> Vec<(String, u32, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Pull { target, chunk, from, .. } => Some((target.clone(), *chunk, from.clone())),
            _ => None,
        })
        .collect()
}

fn pull_failed(target: &str, chunk: u32, from: &str, failure: PullFailure) -> Report {
    Report::PullFailed { job: "j".into(), target: target.into(), file: 0, chunk, from: from.into(), failure }
}

fn prepares(actions: &[Action]) -> Vec<&str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Prepare { target, .. } => Some(target.as_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn each_target_is_asked_to_prepare_once_per_session_and_pulls_nothing_before_it_answers() {
    let mut lab = Lab::new(&["t1", "t2"], 4);
    assert_eq!(prepares(&lab.round()), ["t1", "t2"]);
    assert!(lab.round().is_empty(), "no answer yet: nothing more to ask");
    lab.live.insert("t1".into(), 2);
    assert_eq!(prepares(&lab.round()), ["t1"], "a new session learns the job again");
}

#[test]
fn the_source_sends_each_target_a_different_fresh_chunk_first() {
    let mut lab = Lab::new(&["t1", "t2", "t3", "t4"], 8);
    lab.prepare_all();
    let first = pulls(&lab.round());
    assert_eq!(first.len(), UPLOADS_PER_HOLDER, "the source serves {UPLOADS_PER_HOLDER} at once: {first:?}");
    assert!(first.iter().all(|(_, _, from)| from == "src"));
    let mut chunks: Vec<u32> = first.iter().map(|(_, c, _)| *c).collect();
    chunks.sort_unstable();
    chunks.dedup();
    assert_eq!(chunks.len(), 4, "every target fetches a different chunk: {first:?}");
    let mut targets: Vec<&str> = first.iter().map(|(t, _, _)| t.as_str()).collect();
    targets.sort_unstable();
    assert_eq!(targets, ["t1", "t2", "t3", "t4"], "one each, not four for one target");
}

#[test]
fn a_chunk_acknowledged_by_a_target_is_served_by_it_before_the_log_has_it() {
    // Five targets, one chunk: the source's four upload slots go to t1-t4.
    let mut lab = Lab::new(&["t1", "t2", "t3", "t4", "t5"], 1);
    lab.prepare_all();
    let first = pulls(&lab.round());
    assert_eq!(first.len(), UPLOADS_PER_HOLDER, "{first:?}");
    assert!(!first.iter().any(|(t, _, _)| t == "t5"), "no free holder for t5 yet: {first:?}");
    // t1 has it (its ack is not in the log yet): it serves t5 at once.
    lab.report(Report::Pulled { job: "j".into(), target: "t1".into(), file: 0, chunk: 0 });
    assert_eq!(pulls(&lab.round()), [("t5".into(), 0, "t1".into())]);
}

#[test]
fn a_bad_chunk_from_a_holder_is_planned_again_from_the_source() {
    // Four targets, one holder (t1): the others take the chunk from it, a
    // peer being preferred to the source.
    let mut lab = Lab::new(&["t1", "t2", "t3", "t4"], 1);
    lab.prepare_all();
    lab.hold("t1", 0, "src");
    let first = pulls(&lab.round());
    assert_eq!(first.len(), 3);
    assert!(first.iter().all(|(_, _, from)| from == "t1"), "{first:?}");
    // t2 reports a bad chunk from t1: next round plans it from the source.
    lab.report(pull_failed("t2", 0, "t1", PullFailure::BadChunk));
    assert_eq!(pulls(&lab.round()), [("t2".into(), 0, "src".into())]);
}

#[test]
fn an_avoided_holder_is_used_again_after_a_while() {
    let mut lab = Lab::new(&["t1", "t2"], 1);
    lab.prepare_all();
    lab.hold("t1", 0, "src");
    let first = pulls(&lab.round());
    assert_eq!(first, [("t2".into(), 0, "t1".into())]);
    lab.report(pull_failed("t2", 0, "t1", PullFailure::Stalled));
    lab.live.remove("src");
    assert!(pulls(&lab.round()).is_empty(), "t1 avoided and the source down: nobody to pull from");
    lab.advance(AVOID_FOR + Duration::from_millis(1));
    assert_eq!(pulls(&lab.round()), [("t2".into(), 0, "t1".into())]);
}

#[test]
fn a_busy_holder_is_skipped_only_briefly() {
    let mut lab = Lab::new(&["t1", "t2"], 1);
    lab.prepare_all();
    lab.hold("t1", 0, "src");
    lab.live.remove("src");
    assert_eq!(pulls(&lab.round()), [("t2".into(), 0, "t1".into())]);
    lab.report(pull_failed("t2", 0, "t1", PullFailure::HolderBusy));
    assert!(pulls(&lab.round()).is_empty());
    lab.advance(BUSY_AVOID_FOR + Duration::from_millis(1));
    assert_eq!(pulls(&lab.round()), [("t2".into(), 0, "t1".into())], "a quarter second, not ten seconds");
}

#[test]
fn a_pull_the_target_is_still_running_is_not_planned_again() {
    let mut lab = Lab::new(&["t1"], 1);
    lab.prepare_all();
    assert_eq!(pulls(&lab.round()), [("t1".into(), 0, "src".into())]);
    lab.report(pull_failed("t1", 0, "src", PullFailure::AlreadyPulling));
    assert!(pulls(&lab.round()).is_empty(), "its answer will come");
}

#[test]
fn a_target_that_lost_the_job_is_asked_to_prepare_again_and_the_holder_is_not_blamed() {
    let mut lab = Lab::new(&["t1"], 1);
    lab.prepare_all();
    assert_eq!(pulls(&lab.round()), [("t1".into(), 0, "src".into())]);
    lab.report(pull_failed("t1", 0, "src", PullFailure::NotPrepared));
    assert_eq!(prepares(&lab.round()), ["t1"]);
    lab.prepared("t1", &[]);
    assert_eq!(pulls(&lab.round()), [("t1".into(), 0, "src".into())], "the source is not avoided");
}

#[test]
fn a_pull_with_no_answer_is_planned_again_after_its_timeout() {
    let mut lab = Lab::new(&["t1"], 1);
    lab.prepare_all();
    assert_eq!(pulls(&lab.round()).len(), 1);
    lab.advance(PULL_TIMEOUT - Duration::from_secs(1));
    assert!(pulls(&lab.round()).is_empty());
    lab.advance(Duration::from_secs(2));
    assert_eq!(pulls(&lab.round()).len(), 1);
}

#[test]
fn a_target_pulls_at_most_its_share_at_once() {
    let mut lab = Lab::new(&["t1"], 20);
    lab.prepare_all();
    let first = pulls(&lab.round());
    assert_eq!(first.len(), PULLS_PER_TARGET.min(UPLOADS_PER_HOLDER));
    assert!(pulls(&lab.round()).is_empty(), "every slot is taken");
    lab.report(Report::Pulled { job: "j".into(), target: "t1".into(), file: 0, chunk: first[0].1 });
    assert_eq!(pulls(&lab.round()).len(), 1, "one slot freed, one pull");
}

#[test]
fn once_every_chunk_left_the_source_it_serves_copies_too() {
    let mut lab = Lab::new(&["t1", "t2"], 2);
    lab.prepare_all();
    // Every chunk has a copy (t1 holds both): nothing fresh is left, so the
    // end game lets the source serve t2 beside t1.
    lab.holds_all("t1");
    let planned = pulls(&lab.round());
    assert_eq!(planned.len(), 2, "{planned:?}");
    let sources: Vec<&str> = planned.iter().map(|(_, _, f)| f.as_str()).collect();
    assert!(sources.contains(&"t1"), "{planned:?}");
}

#[test]
fn the_source_serves_only_fresh_chunks_while_some_are_left() {
    let mut lab = Lab::new(&["t1", "t2"], 8);
    lab.prepare_all();
    lab.hold("t1", 0, "src");
    lab.live.remove("t1");
    // Chunk 0 has a copy (on t1, down now); seven are fresh: the source
    // sends t2 fresh ones, never a second copy of 0, while fresh are left.
    let planned = pulls(&lab.round());
    assert_eq!(planned.len(), PULLS_PER_TARGET, "{planned:?}");
    assert!(planned.iter().all(|(_, c, from)| *c != 0 && from == "src"), "{planned:?}");
}

#[test]
fn a_target_holding_every_chunk_is_told_to_pack_once_and_again_without_a_fin() {
    let mut lab = Lab::new(&["t1"], 2);
    lab.prepare_all();
    lab.holds_all("t1");
    let packs = |a: &[Action]| a.iter().filter(|a| matches!(a, Action::Pack { .. })).count();
    assert_eq!(packs(&lab.round()), 1);
    assert_eq!(packs(&lab.round()), 0);
    lab.advance(PACK_RESEND + Duration::from_millis(1));
    assert_eq!(packs(&lab.round()), 1, "no fin in the log yet: ask again (the worker replays its fin)");
    lab.apply(JobEvent::Fin {
        job: "j".into(),
        target: "t1".into(),
        ok: true,
        reason: String::new(),
        hook_exit: Some(0),
        at_ms: 0,
    });
    assert_eq!(lab.jobs[0].phase, JobPhase::Succeeded);
    lab.advance(PACK_RESEND + Duration::from_millis(1));
    assert_eq!(packs(&lab.round()), 0);
}

#[test]
fn a_disconnected_target_fails_only_past_its_grace_and_resumes_within_it() {
    let mut lab = Lab::new(&["t1", "t2"], 4);
    lab.prepare_all();
    lab.live.remove("t1");
    lab.round();
    lab.advance(Duration::from_secs(29));
    assert!(!lab.round().iter().any(|a| matches!(a, Action::Fail { .. })), "within its 30 s grace");
    lab.live.insert("t1".into(), 2);
    assert_eq!(prepares(&lab.round()), ["t1"], "back: it prepares again and resumes");
    lab.live.remove("t1");
    lab.round();
    lab.advance(Duration::from_secs(31));
    let failed: Vec<_> = lab.round().into_iter().filter(|a| matches!(a, Action::Fail { .. })).collect();
    assert_eq!(failed.len(), 1);
    let Action::Fail { target, reason, .. } = &failed[0] else { unreachable!() };
    assert_eq!(target, "t1");
    assert!(reason.contains("disconnected for more than 30s"), "{reason}");
    assert!(!lab.round().iter().any(|a| matches!(a, Action::Fail { .. })), "proposed; not again at once");
    lab.advance(RETRY_PROPOSAL + Duration::from_millis(1));
    assert!(lab.round().iter().any(|a| matches!(a, Action::Fail { .. })), "still not in the log: again");
}

#[test]
fn a_job_past_its_deadline_fails_every_unfinished_target_naming_what_it_missed() {
    let mut lab = Lab::new(&["t1", "t2"], 2);
    lab.prepare_all();
    lab.holds_all("t2");
    lab.apply(JobEvent::Fin {
        job: "j".into(),
        target: "t2".into(),
        ok: true,
        reason: String::new(),
        hook_exit: None,
        at_ms: 0,
    });
    lab.advance(Duration::from_secs(601));
    let actions = lab.round();
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::Fail { target, reason, .. } = &actions[0] else { panic!("{actions:?}") };
    assert_eq!(target, "t1", "t2 installed already");
    assert_eq!(reason, "job timed out after 600000 ms; not delivered: /srv/src/model.bin");
}

#[test]
fn targets_of_a_cancelled_job_drop_their_staging_once_per_session() {
    let mut lab = Lab::new(&["t1", "t2"], 2);
    lab.prepare_all();
    lab.apply(JobEvent::Cancel { job: "j".into(), at_ms: lab.now_ms });
    let cancels = |a: &[Action]| {
        a.iter()
            .filter_map(|a| match a {
                Action::Cancel { target, .. } => Some(target.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(cancels(&lab.round()), ["t1", "t2"]);
    assert!(cancels(&lab.round()).is_empty());
    lab.live.insert("t2".into(), 7);
    assert_eq!(cancels(&lab.round()), ["t2"], "after a reconnect, again (idempotent on the worker)");
}

#[test]
fn an_ended_job_is_called_back_once_and_a_new_leader_catches_up_on_recent_ones() {
    let mut lab = Lab::new(&["t1"], 1);
    lab.jobs[0].callback_url = "https://ops.example/done".into();
    lab.prepare_all();
    lab.holds_all("t1");
    lab.apply(JobEvent::Fin {
        job: "j".into(),
        target: "t1".into(),
        ok: true,
        reason: String::new(),
        hook_exit: None,
        at_ms: lab.now_ms,
    });
    let callbacks = |a: &[Action]| a.iter().filter(|a| matches!(a, Action::Callback { .. })).count();
    assert_eq!(callbacks(&lab.round()), 1);
    assert_eq!(callbacks(&lab.round()), 0);
    // A leader that took over 30 s after the job ended calls back (the old
    // one may have died before its POST); one that took over later does not.
    lab.planner = Planner::new(lab.now_ms + 30_000);
    assert_eq!(callbacks(&lab.round()), 1);
    lab.planner = Planner::new(lab.now_ms + CALLBACK_CATCH_UP_MS + 1);
    assert_eq!(callbacks(&lab.round()), 0);
}

#[test]
fn a_restarted_worker_reports_what_it_kept_and_pulls_only_the_rest() {
    let mut lab = Lab::new(&["t1"], 4);
    lab.prepare_all();
    lab.round();
    // t1 restarts (new session); its prepare answer says it kept 0 and 2.
    lab.live.insert("t1".into(), 2);
    assert_eq!(prepares(&lab.round()), ["t1"]);
    lab.prepared("t1", &[0, 2]);
    let mut chunks: Vec<u32> = pulls(&lab.round()).into_iter().map(|(_, c, _)| c).collect();
    chunks.sort_unstable();
    assert_eq!(chunks, [1, 3]);
}

#[test]
fn a_holder_in_the_targets_zone_is_preferred() {
    let mut lab = Lab::new(&["a1", "b1", "b2"], 1);
    for (w, z) in [("a1", "a"), ("b1", "b"), ("b2", "b")] {
        lab.workers.get_mut(w).expect("worker").zone = z.into();
    }
    lab.prepare_all();
    lab.hold("a1", 0, "src");
    lab.hold("b1", 0, "src");
    let planned = pulls(&lab.round());
    assert_eq!(planned, [("b2".into(), 0, "b1".into())], "b2 takes it from b1 in its own zone");
}

#[test]
fn a_pull_that_could_not_be_sent_is_planned_again() {
    let mut lab = Lab::new(&["t1"], 1);
    lab.prepare_all();
    let actions = lab.round();
    assert_eq!(pulls(&actions).len(), 1);
    assert!(pulls(&lab.round()).is_empty(), "in flight");
    lab.planner.unsent(&actions[0]);
    assert_eq!(pulls(&lab.round()).len(), 1, "the send failed: plan it again");
}

#[test]
fn nothing_is_pulled_when_no_live_holder_has_the_chunk() {
    let mut lab = Lab::new(&["t1", "t2"], 1);
    lab.prepare_all();
    lab.hold("t1", 0, "src");
    lab.live.remove("src");
    lab.live.remove("t1");
    assert!(pulls(&lab.round()).is_empty());
}

#[test]
fn a_file_the_source_no_longer_has_fails_the_targets_missing_it_at_once() {
    let mut lab = Lab::new(&["t1", "t2", "t3"], 4);
    lab.prepare_all();
    lab.holds_all("t1");
    lab.hold("t2", 0, "src");
    // A peer's copy going away only moves the pull elsewhere.
    lab.report(pull_failed("t3", 0, "t2", PullFailure::Gone));
    assert!(!lab.round().iter().any(|a| matches!(a, Action::Fail { .. })));
    // The source's file changed: those still missing part of it fail now,
    // long before the deadline; t1, which has it all, goes on.
    lab.report(pull_failed("t2", 1, "src", PullFailure::Gone));
    let failed: Vec<(String, String)> = lab
        .round()
        .into_iter()
        .filter_map(|a| match a {
            Action::Fail { target, reason, .. } => Some((target, reason)),
            _ => None,
        })
        .collect();
    let targets: Vec<&str> = failed.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(targets, ["t2", "t3"]);
    assert!(failed[0].1.starts_with("source changed: /srv/src/model.bin"), "{}", failed[0].1);
}

#[test]
fn a_draining_worker_gets_no_new_pulls_and_serves_only_chunks_no_one_else_holds() {
    let mut lab = Lab::new(&["a", "b", "c"], 2);
    lab.prepare_all();
    // a holds both chunks, c holds chunk 0: every chunk has left the source.
    lab.holds_all("a");
    lab.hold("c", 0, "src");
    lab.workers.get_mut("a").expect("a").draining = true;
    lab.workers.get_mut("b").expect("b").draining = true;
    let planned = pulls(&lab.round());
    assert!(planned.iter().all(|(target, _, _)| target != "b"), "b drains: no new pulls to it: {planned:?}");
    // c needs chunk 1, which only a (draining) and the source hold: the
    // source serves it, and a serves nothing another holder could.
    assert!(planned.iter().all(|(_, _, from)| from != "a"), "a drains: {planned:?}");
    assert!(planned.contains(&("c".into(), 1, "src".into())), "{planned:?}");
    // With the source gone, a still serves what only it holds.
    let mut lab2 = Lab::new(&["a", "c"], 2);
    lab2.prepare_all();
    lab2.holds_all("a");
    lab2.hold("c", 0, "src");
    lab2.workers.get_mut("a").expect("a").draining = true;
    lab2.live.remove("src");
    assert_eq!(pulls(&lab2.round()), [("c".into(), 1, "a".into())]);
}
