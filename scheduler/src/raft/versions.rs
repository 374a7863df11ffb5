//! The cluster version: which ferry every member runs, and what that lets the
//! leader propose.
//!
//! A command kind that an older node cannot decode stops that node when it
//! meets it in the log (Consul once crashed old followers that way). So the
//! leader asks every member (voters and learners) for its version, keeps the
//! lowest as the cluster version, and proposes a kind added by release `R`
//! only once the cluster version is at least `R` ([`Feature`]). A member
//! that does not answer keeps the version it last reported; one never heard
//! from holds every gate shut. Nothing is persisted: a new leader asks again
//! before it opens a gate, and a member started again on an older binary
//! shuts the gates at the next poll (as etcd's cluster version does, minus
//! its ratchet: see `docs/operations/upgrades.md` for downgrades).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use ferry_storage::NodeId;

/// A release number, `MAJOR.MINOR.PATCH` (a pre-release or build suffix is
/// ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch.
    pub patch: u32,
}

impl Version {
    /// `MAJOR.MINOR.PATCH`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Version {
        Version { major, minor, patch }
    }

    /// The version of this binary.
    pub fn this() -> Version {
        env!("CARGO_PKG_VERSION").parse().unwrap_or(Version::new(0, 0, 0))
    }
}

impl FromStr for Version {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let core = s.split(['-', '+']).next().unwrap_or_default();
        let mut parts = core.split('.').map(|p| p.parse::<u32>());
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch)), None) => Ok(Version::new(major, minor, patch)),
            _ => Err(format!("{s:?} is not MAJOR.MINOR.PATCH")),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Something a release added that older members cannot take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `Op::ForgetJobs`: the leader drops the oldest finished jobs.
    ForgetJobs,
    /// `RaftService/TimeoutNow`: a member asked to take over leadership.
    TransferLeader,
}

/// The first release whose workers drain on request (`DrainCommand`): the
/// leader sends it to no older worker.
pub const WORKER_DRAIN: Version = Version::new(0, 2, 0);

impl Feature {
    /// The release that added it.
    pub fn since(self) -> Version {
        match self {
            Feature::ForgetJobs | Feature::TransferLeader => Version::new(0, 2, 0),
        }
    }

    /// Its name in `cluster status` and in errors.
    pub fn name(self) -> &'static str {
        match self {
            Feature::ForgetJobs => "forget-jobs",
            Feature::TransferLeader => "transfer-leader",
        }
    }
}

/// What the leader knows of its members' versions.
#[derive(Debug, Default)]
pub struct Versions {
    /// Member id to the version it last reported (`None`: never heard).
    known: Mutex<BTreeMap<NodeId, Option<Version>>>,
}

impl Versions {
    /// Each member's version as last reported (`None`: not heard yet).
    pub fn members(&self) -> BTreeMap<NodeId, Option<Version>> {
        self.known.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// The lowest version among the members, or `None` while one of them
    /// has not reported (or this node does not lead).
    pub fn cluster(&self) -> Option<Version> {
        lowest(&self.members())
    }

    /// True if every member runs a release that knows `feature`.
    pub fn allows(&self, feature: Feature) -> bool {
        self.cluster().is_some_and(|v| v >= feature.since())
    }

    /// Refusal naming the members too old for `feature`.
    pub fn refusal(&self, feature: Feature) -> String {
        let old: Vec<String> = self
            .members()
            .into_iter()
            .filter(|(_, v)| v.is_none_or(|v| v < feature.since()))
            .map(|(id, v)| match v {
                Some(v) => format!("node {id} runs {v}"),
                None => format!("node {id} has not reported its version"),
            })
            .collect();
        format!("{} needs every scheduler at {} or later; {}", feature.name(), feature.since(), old.join(", "))
    }

    /// Replaces what is known: `members` are the current members, `heard`
    /// what answered this round; a member that did not answer keeps its
    /// last version.
    pub(crate) fn update(&self, members: &[NodeId], heard: BTreeMap<NodeId, Version>) {
        if let Ok(mut known) = self.known.lock() {
            let mut next = BTreeMap::new();
            for id in members {
                let last = known.get(id).copied().flatten();
                next.insert(*id, heard.get(id).copied().or(last));
            }
            *known = next;
        }
    }

    pub(crate) fn clear(&self) {
        if let Ok(mut known) = self.known.lock() {
            known.clear();
        }
    }
}

fn lowest(known: &BTreeMap<NodeId, Option<Version>>) -> Option<Version> {
    if known.is_empty() {
        return None;
    }
    known.values().try_fold(None::<Version>, |low, v| v.map(|v| Some(low.map_or(v, |l| l.min(v)))))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect("a version")
    }

    #[test]
    fn versions_parse_and_order_by_number_not_text() {
        assert_eq!(v("0.10.0").to_string(), "0.10.0");
        assert!(v("0.10.0") > v("0.9.3"));
        assert_eq!(v("1.2.3-rc.1+abc"), v("1.2.3"));
        for bad in ["", "1.2", "1.2.3.4", "a.b.c", "1..3"] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_gate_opens_only_when_every_member_reported_a_version_that_knows_the_feature() {
        let versions = Versions::default();
        assert!(!versions.allows(Feature::ForgetJobs), "nothing heard yet");
        versions.update(&[1, 2, 3], BTreeMap::from([(1, v("0.2.0")), (2, v("0.2.0"))]));
        assert!(!versions.allows(Feature::ForgetJobs), "node 3 not heard");
        assert!(versions.refusal(Feature::ForgetJobs).contains("node 3 has not reported"));
        versions.update(&[1, 2, 3], BTreeMap::from([(3, v("0.1.0"))]));
        assert_eq!(versions.cluster(), Some(v("0.1.0")), "1 and 2 keep what they said");
        assert!(!versions.allows(Feature::ForgetJobs));
        assert!(versions.refusal(Feature::ForgetJobs).contains("node 3 runs 0.1.0"));
        versions.update(&[1, 2, 3], BTreeMap::from([(3, v("0.2.1"))]));
        assert!(versions.allows(Feature::ForgetJobs));
        // A member added later holds the gate until it answers.
        versions.update(&[1, 2, 3, 4], BTreeMap::new());
        assert!(!versions.allows(Feature::ForgetJobs));
        // A removed member no longer counts.
        versions.update(&[1, 2, 3], BTreeMap::new());
        assert!(versions.allows(Feature::ForgetJobs));
        versions.clear();
        assert!(!versions.allows(Feature::ForgetJobs));
    }
}
