//! What a data directory must agree with before its node starts.
//!
//! The state file ([`crate::state_file`]) says what was durable; sled and
//! the journals say what is there now. A node whose log is behind what was
//! durable, whose log has a hole, or whose vote is older than its log has
//! lost something it promised the other nodes: started anyway, it could
//! vote twice in one term or count towards a majority for entries it no
//! longer has. Such a node is refused at every start, so it never votes
//! again under its id; the recovery is to remove it from the cluster and
//! add an empty directory as a new member (`docs/operations/safety.md`).

use openraft::LogId;

use crate::state_file::NodeState;
use crate::NodeId;

/// What the log in sled holds, after the journals were replayed into it.
/// Entries the snapshot holds are left out of `first` and `gap`: a purge
/// deletes them in the background, and a follower that installed a
/// snapshot may hold older ones before it.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct LogFacts {
    /// The first index present after the snapshot.
    pub first: Option<u64>,
    /// The last entry's id.
    pub last: Option<LogId<NodeId>>,
    /// The first hole after the snapshot: the index before it and the
    /// next one present.
    pub gap: Option<(u64, u64)>,
    /// The id of the entry at the state file's `durable_through` index.
    pub at_durable: Option<LogId<NodeId>>,
}

/// Why the log in sled and the state file disagree, if they do.
pub(crate) fn check(state: &NodeState, log: &LogFacts) -> Result<(), String> {
    let snapshot = state.snapshot.as_ref().and_then(|(meta, _)| meta.last_log_id);
    if state.last_purged.map(|p| p.index) > snapshot.map(|s| s.index) {
        return Err(format!(
            "the log is purged through {} but the current snapshot only covers {}",
            show(state.last_purged),
            show(snapshot)
        ));
    }
    if let Some((before, after)) = log.gap {
        return Err(format!("the log has a hole: entries {} to {} are missing", before + 1, after - 1));
    }
    // The entries after the snapshot start right after it.
    let next = snapshot.map_or(0, |s| s.index + 1);
    if let Some(first) = log.first.filter(|first| *first > next) {
        if log.last.is_some_and(|last| last.index >= next) {
            return Err(format!(
                "the log starts at {first} but the current snapshot covers only {}: entries {next} to {} are missing",
                show(snapshot),
                first - 1
            ));
        }
    }
    if let Some(durable) = state.durable_through.filter(|d| Some(d.index) > snapshot.map(|s| s.index)) {
        if log.last.is_none_or(|last| last.index < durable.index) {
            return Err(format!(
                "sled holds the log through {} but it was durable through {}",
                show(log.last),
                show(Some(durable))
            ));
        }
        if log.at_durable != Some(durable) {
            return Err(format!("the entry durable at {} now reads {}", show(Some(durable)), show(log.at_durable)));
        }
    }
    let newest = log.last.max(snapshot).max(state.last_purged);
    let vote_term = state.vote.map(|v| v.leader_id().term);
    if let Some(newest) = newest.filter(|n| n.leader_id.term > vote_term.unwrap_or(0)) {
        return Err(match vote_term {
            Some(term) => format!("the log holds term {} but the vote is for term {term}", newest.leader_id.term),
            None => format!("the log holds term {} but no vote is saved", newest.leader_id.term),
        });
    }
    Ok(())
}

fn show(id: Option<LogId<NodeId>>) -> String {
    id.map_or_else(|| "nothing".into(), |id| format!("index {} (term {})", id.index, id.leader_id.term))
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, SnapshotMeta, Vote};

    use super::*;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn log(first: u64, last: LogId<NodeId>, at_durable: Option<LogId<NodeId>>) -> LogFacts {
        LogFacts { first: Some(first), last: Some(last), gap: None, at_durable }
    }

    fn state(vote_term: u64, durable: Option<LogId<NodeId>>) -> NodeState {
        NodeState { vote: Some(Vote::new_committed(vote_term, 1)), durable_through: durable, ..NodeState::default() }
    }

    fn with_snapshot(mut s: NodeState, last: LogId<NodeId>, purged: Option<LogId<NodeId>>) -> NodeState {
        let meta =
            SnapshotMeta { last_log_id: Some(last), last_membership: Default::default(), snapshot_id: "s".into() };
        s.snapshot = Some((meta, "snap-s.bin".into()));
        s.last_purged = purged;
        s
    }

    #[test]
    fn a_whole_log_passes() {
        assert_eq!(check(&NodeState::default(), &LogFacts::default()), Ok(()));
        assert_eq!(check(&state(3, Some(id(3, 9))), &log(0, id(3, 12), Some(id(3, 9)))), Ok(()));
        // Purged through the snapshot; entries before it not deleted yet.
        let s = with_snapshot(state(3, Some(id(3, 9))), id(2, 5), Some(id(2, 4)));
        assert_eq!(check(&s, &log(3, id(3, 9), Some(id(3, 9)))), Ok(()));
        // Durable through entries the snapshot holds, log all purged.
        let s = with_snapshot(state(3, Some(id(2, 5))), id(3, 8), Some(id(3, 8)));
        assert_eq!(check(&s, &LogFacts::default()), Ok(()));
    }

    #[test]
    fn a_log_behind_what_was_durable_is_refused() {
        let err = check(&state(3, Some(id(3, 9))), &log(0, id(3, 4), None)).unwrap_err();
        assert!(err.contains("through index 4 (term 3) but it was durable through index 9"), "{err}");
        let err = check(&state(3, Some(id(3, 9))), &LogFacts::default()).unwrap_err();
        assert!(err.contains("sled holds the log through nothing"), "{err}");
        let err = check(&state(3, Some(id(3, 9))), &log(0, id(3, 12), Some(id(2, 9)))).unwrap_err();
        assert!(err.contains("now reads index 9 (term 2)"), "{err}");
    }

    #[test]
    fn holes_are_refused() {
        let mut facts = log(0, id(1, 9), None);
        facts.gap = Some((4, 7));
        let err = check(&state(1, None), &facts).unwrap_err();
        assert!(err.contains("entries 5 to 6 are missing"), "{err}");
        // Between the snapshot and the log.
        let s = with_snapshot(state(1, None), id(1, 5), Some(id(1, 5)));
        let err = check(&s, &log(8, id(1, 9), None)).unwrap_err();
        assert!(err.contains("entries 6 to 7 are missing"), "{err}");
        // Purged past the snapshot.
        let s = with_snapshot(state(1, None), id(1, 5), Some(id(1, 7)));
        let err = check(&s, &log(8, id(1, 9), None)).unwrap_err();
        assert!(err.contains("purged through index 7"), "{err}");
    }

    #[test]
    fn a_vote_older_than_the_log_is_refused() {
        let err = check(&state(2, None), &log(0, id(3, 4), None)).unwrap_err();
        assert!(err.contains("the log holds term 3 but the vote is for term 2"), "{err}");
        let err = check(&NodeState::default(), &log(0, id(1, 4), None)).unwrap_err();
        assert!(err.contains("no vote is saved"), "{err}");
        // Term 0 is the cluster's first entry, before any vote.
        assert_eq!(check(&NodeState::default(), &log(0, id(0, 0), None)), Ok(()));
    }
}
