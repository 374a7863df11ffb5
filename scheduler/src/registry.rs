//! The service registry: instances of a service in the replicated key
//! space, under `registry/<service>/<id>` (stored as
//! [`ferry_storage::registry::Instance`]), each bound to a lease. A worker
//! or client that stops renewing its lease disappears when the lease ends
//! (within its TTL plus an election, as leases do); deregistering removes
//! it at once. Built on the config keys, so instances have revisions,
//! history and watches like any key.
//!
//! Deregistering writes the instance once more, marked `deregistered`, and
//! deletes it in the same log entry; a lease that ends only deletes. An
//! empty listing names the instances that were deregistered explicitly, so
//! clients can tell a service emptied on purpose from one whose instances
//! expired (and keep the latter).
//!
//! Protect threshold: before the lease clock revokes expired leases
//! ([`crate::leases`]), it asks [`protect`] which to keep. Per service,
//! the instances whose leases have run out or are within half a TTL of it
//! (live holders renew every third of a TTL), or that are flagged `suspect`
//! already, are counted; if that is more than the threshold's share of the
//! service, those leases are kept and their instances flagged `suspect`
//! instead ([`flag`]): consumers never see a service emptied by a mass
//! expiry. A renewed lease clears the flag; once the share falls back under
//! the threshold, the remaining expired leases are revoked.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_storage::registry::{self as stored, Instance};
use ferry_storage::{kv, Command, CommandResult, Op};

use crate::error::Error;
use crate::raft::node::{new_request_id, Node};

/// TTL of the lease granted for a registration that names none.
pub const DEFAULT_TTL_MS: u64 = 10_000;
/// Weight of an instance that names none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Services with fewer instances than this are never protected: a lone
/// instance that dies must go.
pub const PROTECT_MIN_INSTANCES: usize = 3;
/// A protected lease is revoked anyway once it has lapsed this many TTLs
/// ago (at least [`PROTECT_MIN_HOLD`]): protection bridges an outage, it
/// does not keep dead instances forever.
pub const PROTECT_MAX_TTLS: u32 = 10;
/// See [`PROTECT_MAX_TTLS`].
pub const PROTECT_MIN_HOLD: Duration = Duration::from_secs(60);

/// The instances of a service at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The revision the list reflects.
    pub revision: u64,
    /// The instances, by id.
    pub instances: Vec<Instance>,
    /// Only when `instances` is empty: ids deregistered explicitly (see
    /// [`deregistered`]).
    pub deregistered: Vec<String>,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Checks a service name; the error names `field`.
pub fn check_name(s: &str, field: &str) -> Result<(), Error> {
    if valid_name(s) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!("{field}: must be 1 to 128 of letters, digits, '.', '_' or '-'")))
}

/// Checks an instance; the error names the field.
pub fn validate(i: &Instance) -> Result<(), Error> {
    let invalid = |m: String| Err(Error::InvalidArgument(m));
    check_name(&i.service, "service")?;
    check_name(&i.id, "id")?;
    if i.address.is_empty() || i.address.len() > 253 {
        return invalid("address: must be a host name or IP address".into());
    }
    if !(1..=65535).contains(&i.port) {
        return invalid(format!("port: must be 1 to 65535, got {}", i.port));
    }
    if i.weight > 10_000 {
        return invalid(format!("weight: must be at most 10000, got {}", i.weight));
    }
    if i.version.len() > 128 {
        return invalid("version: at most 128 bytes".into());
    }
    for (field, map) in [("labels", &i.labels), ("metadata", &i.metadata)] {
        if map.len() > kv::MAX_SELECTOR_PAIRS {
            return invalid(format!("{field}: at most {} entries, got {}", kv::MAX_SELECTOR_PAIRS, map.len()));
        }
        if let Some((k, _)) = map.iter().find(|(k, v)| k.len() > 128 || v.len() > 1024) {
            return invalid(format!("{field}: {k:?}: keys are at most 128 bytes, values at most 1024"));
        }
    }
    if i.methods.len() > 256 || i.methods.iter().any(|m| m.len() > 256) {
        return invalid("methods: at most 256 names of at most 256 bytes".into());
    }
    Ok(())
}

/// Checks that `lease` may register the instance at `key`: the id belongs
/// to the lease that holds it, unless the caller takes it over (`replace`).
/// `Ok(Some(other))`: a takeover from lease `other`.
pub fn may_register(node: &Node, key: &str, lease: u64, replace: bool) -> Result<Option<u64>, Error> {
    match node.reader.get_with_lease(key)? {
        Some((_, holder)) if holder != 0 && holder != lease => {
            if replace {
                return Ok(Some(holder));
            }
            Err(Error::AlreadyExists(format!(
                "id: instance {key} is held by lease {holder}, which is still alive; \
                 deregister it first, or register with replace to take it over"
            )))
        }
        _ => Ok(None),
    }
}

/// Adds or replaces `instance`, bound to `lease`: the revision of the
/// write, and the lease it took the id over from (`replace`), if any. Only
/// the cluster flags instances: `suspect` and `deregistered` are cleared,
/// and a weight of 0 means the default.
///
/// An instance id belongs to the lease that registered it ([`may_register`]);
/// the check and the write are one compare-and-set on the key, retried if
/// the key changed between them.
pub async fn register(
    node: &Node,
    mut instance: Instance,
    lease: u64,
    request_id: String,
    replace: bool,
) -> Result<(u64, Option<u64>), Error> {
    validate(&instance)?;
    if instance.weight == 0 {
        instance.weight = DEFAULT_WEIGHT;
    }
    instance.suspect = false;
    instance.deregistered = false;
    let key = instance.key();
    let value = instance.encode();
    if node.reader.lease(lease)?.is_none() {
        return Err(Error::InvalidArgument(format!("lease: unknown lease id {lease}")));
    }
    node.read_barrier(false).await?;
    for attempt in 0..5 {
        let took_from = may_register(node, &key, lease, replace)?;
        let compare = match node.reader.get(&key)? {
            None => kv::Compare::Absent { key: key.clone() },
            Some(kv) => kv::Compare::ModRevision { key: key.clone(), revision: kv.mod_revision },
        };
        let put = kv::TxnOp::PutLeased { key: key.clone(), value: value.clone(), lease };
        let txn = kv::Txn { compares: vec![compare], success: vec![put], failure: vec![] };
        // A retry after a lost compare is a new request; the first keeps
        // the caller's id, so a retried call still applies once.
        let id = if attempt == 0 { request_id.clone() } else { format!("{request_id}-{attempt}") };
        let revision = match node.propose(Command { request_id: id, op: Op::Txn(Box::new(txn)) }).await? {
            CommandResult::Txn { succeeded: false, .. } => continue,
            CommandResult::Txn { revision, .. } => revision,
            CommandResult::Rejected { reason } => return Err(Error::InvalidArgument(reason)),
            other => return Err(Error::unexpected("register", &other)),
        };
        // A transaction skips a put to a lease that ended meanwhile.
        match node.reader.get_with_lease(&key)? {
            Some((kv, holder)) if holder == lease && kv.mod_revision == revision => {}
            _ if node.reader.lease(lease)?.is_none() => {
                return Err(Error::InvalidArgument(format!("lease: unknown lease id {lease}")))
            }
            _ => {}
        }
        if let Some(old) = took_from {
            tracing::info!(%key, from = old, to = lease, "an instance id was taken over by another lease");
        }
        return Ok((revision, took_from));
    }
    Err(Error::FailedPrecondition(format!("id: instance {key} changed five times while registering it; try again")))
}

/// Removes instance `id` of `service` now: (revision, whether it was
/// registered). With `lease` other than 0, only if the instance is bound to
/// that lease: an owner whose id was taken over cannot remove the new one.
pub async fn deregister(
    node: &Node,
    service: &str,
    id: &str,
    lease: u64,
    request_id: String,
) -> Result<(u64, bool), Error> {
    if !valid_name(service) || !valid_name(id) {
        return Err(Error::InvalidArgument("service, id: must be 1 to 128 of letters, digits, '.', '_' or '-'".into()));
    }
    let key = stored::key(service, id);
    // The instance is written once more, marked `deregistered`, and
    // deleted, in one log entry: watchers see one change (the instance
    // gone) and the key's history keeps why it went, which a lease that
    // ends does not write (see `deregistered`). Read after a read barrier
    // so the marked value is the instance's latest; an instance that
    // changed meanwhile is still removed.
    node.read_barrier(false).await?;
    let op = match node.reader.get_with_lease(&key)? {
        // Another lease's instance: not the caller's to remove.
        Some((current, holder)) if lease != 0 && holder != lease => {
            tracing::info!(%key, holder, lease, "not deregistering an instance another lease holds");
            return Ok((current.mod_revision, false));
        }
        // Nothing to mark; a retried id that did apply gets its first
        // answer (the transaction's) all the same.
        None => Op::Delete { key },
        Some((current, _)) => {
            let mut marked = Instance::decode(&current.value).unwrap_or_default();
            marked.service = service.to_string();
            marked.id = id.to_string();
            marked.deregistered = true;
            // A caller naming its lease removes only what it read: the
            // instance must not have been taken over meanwhile.
            let compares = match lease {
                0 => vec![],
                _ => vec![kv::Compare::ModRevision { key: key.clone(), revision: current.mod_revision }],
            };
            Op::Txn(Box::new(kv::Txn {
                compares,
                success: vec![kv::TxnOp::Put { key: key.clone(), value: marked.encode() }, kv::TxnOp::Delete { key }],
                failure: vec![],
            }))
        }
    };
    match node.propose(Command { request_id, op }).await? {
        CommandResult::Delete { revision, deleted } => Ok((revision, deleted)),
        CommandResult::Txn { revision, succeeded, .. } => Ok((revision, succeeded)),
        CommandResult::Rejected { reason } => Err(Error::InvalidArgument(reason)),
        other => Err(Error::unexpected("deregister", &other)),
    }
}

/// Ids of the instances under `prefix` whose last change in the history is
/// an explicit deregistration: a write marked `deregistered` followed by the
/// delete (see [`deregister`]). A key deleted without that write (its lease
/// ended, or a plain delete) or written again since does not count. Reads
/// the whole history window (at most [`kv::HISTORY_REVISIONS`] changes), so
/// it runs only for empty listings.
fn deregistered(node: &Node, prefix: &str) -> Result<Vec<String>, Error> {
    let from = node.reader.compacted()? + 1;
    let (events, _) = node.reader.events(from, prefix, usize::MAX, usize::MAX)?;
    // Per id: whether its last write was the marked one.
    let mut marked: HashMap<&str, bool> = HashMap::new();
    let mut gone = BTreeSet::new();
    for (_, event) in &events {
        let Some(id) = event.kv.key.strip_prefix(prefix) else { continue };
        match event.kind {
            kv::EventKind::Put => {
                gone.remove(id);
                let explicit = Instance::decode(&event.kv.value).is_some_and(|i| i.deregistered);
                marked.insert(id, explicit);
            }
            kv::EventKind::Delete => {
                if marked.remove(id) == Some(true) {
                    gone.insert(id);
                } else {
                    gone.remove(id);
                }
            }
        }
    }
    Ok(gone.into_iter().map(str::to_string).collect())
}

/// The instances of a service now (values that are not instances, written
/// under the prefix by hand, are skipped); when there are none, with the
/// ids that were deregistered explicitly.
pub fn listing(node: &Node, service: &str) -> Result<Listing, Error> {
    let prefix = stored::prefix(service);
    let (kvs, revision) = node.reader.list_at_revision(&prefix)?;
    let instances: Vec<Instance> = kvs.iter().filter_map(|kv| Instance::decode(&kv.value)).collect();
    let deregistered = if instances.is_empty() { deregistered(node, &prefix)? } else { Vec::new() };
    Ok(Listing { revision, instances, deregistered })
}

/// True if the changes from revision `from` on touch `service`; the
/// revision read up to otherwise.
pub fn changed_since(node: &Node, service: &str, from: u64) -> Result<Result<(), u64>, Error> {
    let (events, upto) = node.reader.events(from, &stored::prefix(service), 1, usize::MAX)?;
    Ok(if events.is_empty() { Err(upto) } else { Ok(()) })
}

fn instance(node: &Node, key: &str) -> Option<Instance> {
    Instance::decode(&node.reader.get(key).ok()??.value)
}

/// True if an instance bound to `lease` is flagged `suspect` (a new leader
/// remembers such leases as protected).
pub fn has_suspect(node: &Node, lease: &kv::Lease) -> bool {
    lease.keys.iter().any(|k| stored::service_of(k).is_some() && instance(node, k).is_some_and(|i| i.suspect))
}

/// Of the expiring leases `candidates`, those to keep: leases with an
/// instance of a service where the instances whose leases are failing
/// (lapsed, or within half a TTL of it) or that are suspect already are more
/// than the threshold's share.
pub fn protect(node: &Node, leases: &[kv::Lease], candidates: &[u64], failing: &HashSet<u64>) -> HashSet<u64> {
    let threshold = node.config.registry_protect_threshold;
    let mut keep = HashSet::new();
    if threshold >= 1.0 {
        return keep;
    }
    let mut by_service: HashMap<&str, Vec<u64>> = HashMap::new();
    for lease in leases.iter().filter(|l| candidates.contains(&l.id)) {
        for key in &lease.keys {
            if let Some(service) = stored::service_of(key) {
                by_service.entry(service).or_default().push(lease.id);
            }
        }
    }
    let failing_keys: HashSet<&str> =
        leases.iter().filter(|l| failing.contains(&l.id)).flat_map(|l| l.keys.iter().map(String::as_str)).collect();
    for (service, expiring) in by_service {
        let Ok((kvs, _)) = node.reader.list_at_revision(&stored::prefix(service)) else { continue };
        let total = kvs.len();
        let gone = kvs
            .iter()
            .filter(|kv| {
                failing_keys.contains(kv.key.as_str()) || Instance::decode(&kv.value).is_some_and(|i| i.suspect)
            })
            .count();
        if total >= PROTECT_MIN_INSTANCES && gone as f64 > threshold * total as f64 {
            keep.extend(expiring);
        }
    }
    keep
}

/// Sets or clears `suspect` on the registry instances bound to `lease`
/// (only those that differ and have not changed since read).
pub fn flag(node: &Arc<Node>, lease: &kv::Lease, suspect: bool) {
    let commands: Vec<Command> = lease
        .keys
        .iter()
        .filter(|k| stored::service_of(k).is_some())
        .filter_map(|k| {
            let kv = node.reader.get(k).ok()??;
            let mut i = Instance::decode(&kv.value)?;
            if i.suspect == suspect {
                return None;
            }
            i.suspect = suspect;
            // Only if unchanged since read: an instance that re-registered
            // meanwhile (a new lease) must not be bound back to this one.
            let op = Op::Txn(Box::new(kv::Txn {
                compares: vec![kv::Compare::ModRevision { key: k.clone(), revision: kv.mod_revision }],
                success: vec![kv::TxnOp::PutLeased { key: k.clone(), value: i.encode(), lease: lease.id }],
                failure: vec![],
            }));
            Some(Command { request_id: new_request_id(), op })
        })
        .collect();
    // One proposal each: the proposer packs concurrent proposals into a
    // batch itself, and a batch must not contain a batch.
    for cmd in commands {
        let node = node.clone();
        tokio::spawn(async move {
            match node.propose(cmd).await {
                Ok(CommandResult::Txn { succeeded: true, .. }) | Err(Error::NotLeader { .. }) => {}
                Ok(other) => tracing::debug!(result = ?other, "registry instance not flagged"),
                Err(e) => tracing::warn!(error = %e, "could not flag a registry instance"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_are_checked_field_by_field() {
        let ok = Instance {
            service: "web".into(),
            id: "w1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            ..Default::default()
        };
        assert!(validate(&ok).is_ok());
        let err = |i: Instance| validate(&i).unwrap_err().to_string();
        assert!(err(Instance { service: "a b".into(), ..ok.clone() }).starts_with("service:"));
        assert!(err(Instance { id: String::new(), ..ok.clone() }).starts_with("id:"));
        assert!(err(Instance { address: String::new(), ..ok.clone() }).starts_with("address:"));
        assert!(err(Instance { port: 0, ..ok.clone() }).starts_with("port:"));
        assert!(err(Instance { port: 70_000, ..ok.clone() }).starts_with("port:"));
        assert!(err(Instance { weight: 10_001, ..ok }).starts_with("weight:"));
    }
}
