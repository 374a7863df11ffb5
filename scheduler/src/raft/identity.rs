//! Which cluster a node belongs to, and refusing Raft messages from another.
//!
//! A cluster's id is made when it is bootstrapped, from its initial members
//! and an optional token (`initial_cluster_token`), as etcd makes its own:
//! every bootstrapping node computes the same id without talking to the
//! others. Each node keeps it in its data directory. A node added later
//! (an empty directory) takes it from the first Raft message it gets.
//!
//! Every outgoing Raft message carries the sender's id in the
//! [`CLUSTER_HEADER`]; a node that knows its own refuses a message from
//! another cluster (`FAILED_PRECONDITION` naming both). A data directory
//! copied from another cluster and started in a member's place can then
//! neither vote nor be voted for here, nor take or give entries.

use std::sync::{Arc, OnceLock};

use ferry_storage::DataDir;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Metadata key of the sender's cluster id on every Raft message.
pub const CLUSTER_HEADER: &str = "x-ferry-cluster";

/// This node's cluster id, once known, and where it is kept.
#[derive(Debug)]
pub struct ClusterId {
    id: OnceLock<String>,
    /// Where it is kept (`None`: in memory only, for tests).
    dir: Option<DataDir>,
}

impl ClusterId {
    /// The id kept in `dir`, if any.
    pub fn load(dir: DataDir) -> Result<Arc<Self>, ferry_storage::Error> {
        let id = OnceLock::new();
        if let Some(known) = dir.cluster_id()? {
            let _ = id.set(known);
        }
        Ok(Arc::new(Self { id, dir: Some(dir) }))
    }

    /// An id kept nowhere, not known yet (tests of the network layer).
    pub fn unknown() -> Arc<Self> {
        Arc::new(Self { id: OnceLock::new(), dir: None })
    }

    /// The id, if known.
    pub fn get(&self) -> Option<&str> {
        self.id.get().map(String::as_str)
    }

    /// Records `id` (blocking: the directory is synced). Only the first id
    /// is ever kept.
    pub fn learn(&self, id: &str) -> Result<(), ferry_storage::Error> {
        if self.id.get().is_some() {
            return Ok(());
        }
        if let Some(dir) = &self.dir {
            dir.set_cluster_id(id)?;
        }
        let _ = self.id.set(id.to_string());
        Ok(())
    }
}

/// The id of a cluster bootstrapped with `members` and `token`.
pub fn derive(members: &std::collections::BTreeMap<u64, String>, token: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry cluster id v1\0");
    h.update(token.as_bytes());
    for (id, addr) in members {
        h.update(format!("\0{id}={addr}").as_bytes());
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Stamps outgoing Raft calls with this node's cluster id.
#[derive(Clone)]
pub struct Stamp(pub Arc<ClusterId>);

impl Interceptor for Stamp {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = self.0.get().and_then(|id| MetadataValue::try_from(id).ok()) {
            request.metadata_mut().insert(CLUSTER_HEADER, value);
        }
        Ok(request)
    }
}

/// Checks incoming Raft calls: refuses any but a scheduler's (under TLS,
/// by its certificate); refuses another cluster's; a node that does not
/// know its id yet and holds no log (it is being added) takes the sender's.
#[derive(Clone)]
pub struct Check {
    pub(crate) cluster: Arc<ClusterId>,
    /// True while this node holds no log at all.
    pub(crate) empty: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Whether callers are known by certificate (TLS on).
    pub(crate) checked: bool,
}

impl Interceptor for Check {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.checked {
            match ferry_tls::Peer::of(&request).and_then(|p| p.identity.as_ref()) {
                Some(ferry_tls::Identity::Scheduler(_)) => {}
                Some(other) => {
                    tracing::warn!(caller = %other, "refused a Raft message from a non-scheduler");
                    return Err(Status::permission_denied(format!("only schedulers speak Raft; this is {other}")));
                }
                None => return Err(Status::unauthenticated("only schedulers speak Raft; the caller is not known")),
            }
        }
        let Some(theirs) = request.metadata().get(CLUSTER_HEADER).and_then(|v| v.to_str().ok()) else {
            return Ok(request);
        };
        match self.cluster.get() {
            Some(ours) if ours != theirs => {
                tracing::warn!(ours, theirs, "refused a Raft message from another cluster");
                Err(Status::failed_precondition(format!(
                    "cluster: this node belongs to cluster {ours}; the message came from cluster {theirs}"
                )))
            }
            Some(_) => Ok(request),
            None if (self.empty)() => {
                let theirs = theirs.to_string();
                match self.cluster.learn(&theirs) {
                    Ok(()) => tracing::info!(cluster = %theirs, "joined cluster"),
                    Err(e) => return Err(Status::internal(format!("cannot record the cluster id: {e}"))),
                }
                Ok(request)
            }
            None => Ok(request),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use tonic::service::Interceptor;

    use super::{Check, ClusterId, Stamp, CLUSTER_HEADER};

    fn from(cluster: Option<&str>) -> tonic::Request<()> {
        let mut r = tonic::Request::new(());
        if let Some(id) = cluster {
            r.metadata_mut().insert(CLUSTER_HEADER, id.parse().unwrap());
        }
        r
    }

    #[test]
    fn another_clusters_messages_are_refused_and_a_new_node_takes_the_first_id_it_hears() {
        let fresh = ClusterId::unknown();
        let mut check = Check { cluster: fresh.clone(), empty: Arc::new(|| true), checked: false };
        assert!(check.call(from(None)).is_ok(), "an unstamped message (an older sender) passes");
        assert_eq!(fresh.get(), None);
        assert!(check.call(from(Some("aaaa"))).is_ok());
        assert_eq!(fresh.get(), Some("aaaa"), "a node with no log takes its first leader's id");
        let refused = check.call(from(Some("bbbb"))).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().contains("cluster aaaa") && refused.message().contains("cluster bbbb"));
        // A node that holds a log but no id (a directory from before ids)
        // takes none: it cannot tell who is right.
        let old = ClusterId::unknown();
        let mut check = Check { cluster: old.clone(), empty: Arc::new(|| false), checked: false };
        assert!(check.call(from(Some("cccc"))).is_ok());
        assert_eq!(old.get(), None);
        // Outgoing calls carry the id once known.
        let stamped = Stamp(fresh).call(from(None)).unwrap();
        assert_eq!(stamped.metadata().get(CLUSTER_HEADER).unwrap(), "aaaa");
    }

    #[test]
    fn under_tls_only_a_scheduler_certificate_is_heard() {
        let mut check = Check { cluster: ClusterId::unknown(), empty: Arc::new(|| false), checked: true };
        let by = |who: Option<ferry_tls::Identity>| {
            let mut r = from(None);
            r.extensions_mut().insert(ferry_tls::Peer { remote: None, identity: who });
            r
        };
        assert!(check.call(by(Some(ferry_tls::Identity::Scheduler(2)))).is_ok());
        let refused = check.call(by(Some(ferry_tls::Identity::Worker("w1".into())))).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("only schedulers speak Raft; this is worker w1"), "{}", refused.message());
        assert_eq!(check.call(from(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn the_id_follows_the_members_and_the_token() {
        let three: BTreeMap<u64, String> = (1..=3).map(|i| (i, format!("10.0.0.{i}:7001"))).collect();
        let one: BTreeMap<u64, String> = BTreeMap::from([(1, "10.0.0.1:7001".to_string())]);
        let id = super::derive(&three, "");
        assert_eq!(id.len(), 16);
        assert_eq!(id, super::derive(&three.clone(), ""), "every bootstrapping node computes the same");
        assert_ne!(id, super::derive(&one, ""));
        assert_ne!(id, super::derive(&three, "prod-eu"));
    }
}
