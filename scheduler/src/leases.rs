//! Leases: a TTL that keys and registry instances are bound to.
//!
//! The replicated state holds each lease's TTL and keys; when a lease runs
//! out is leader soft state on the leader's monotonic clock
//! ([`LeaseClock`]). A node that becomes leader starts every lease afresh
//! with its full TTL (a failover never ends a lease early), renews on
//! keep-alive, and revokes expired leases through the log in batches of at
//! most [`EXPIRE_BATCH`] per tick, oldest deadline first, so a mass expiry
//! is spread rather than a storm. Before revoking, it asks the registry's
//! protect threshold ([`crate::registry::protect`]) which leases to keep.
//!
//! A lease whose revoke is on its way through the log is not renewed: a
//! keep-alive then answers that the lease is gone (TTL 0), as etcd's
//! lessor does. Renewing it would acknowledge a TTL that the revoke, once
//! committed, cuts short (the chaos harness saw a key deleted 0.85 s after
//! a renewal of its 2 s lease, the revoke having waited for a quorum).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_storage::{kv, Command, CommandResult, Op};
use tokio::sync::watch;

use crate::error::Error;
use crate::raft::node::{new_request_id, Node};
use crate::registry;

/// Expired leases revoked per tick at most.
pub const EXPIRE_BATCH: usize = 500;
/// How often the leader looks for expired leases.
pub const TICK: Duration = Duration::from_millis(100);
/// A revoke proposed but not yet applied is proposed again after this long.
const RETRY: Duration = Duration::from_secs(3);

/// Deadlines of leases on this node while it leads.
#[derive(Default)]
pub struct LeaseClock {
    deadlines: Mutex<HashMap<u64, Instant>>,
    /// Leases whose revoke is proposed (locked after `deadlines`, and only
    /// under it).
    revoking: Mutex<std::collections::HashSet<u64>>,
    /// Leases renewed by a keep-alive since the expiry loop last looked.
    renewed: Mutex<std::collections::HashSet<u64>>,
}

impl LeaseClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Instant>> {
        self.deadlines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn revoking(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<u64>> {
        self.revoking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restarts `id`'s TTL now, unless its revoke is under way; whether it
    /// did.
    pub fn renew(&self, id: u64, ttl_ms: u64) -> bool {
        let mut deadlines = self.lock();
        if self.revoking().contains(&id) {
            return false;
        }
        deadlines.insert(id, Instant::now() + Duration::from_millis(ttl_ms));
        drop(deadlines);
        self.renewed.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        true
    }

    /// Of `ids`, those still past their deadline at `now` (not renewed
    /// since they were found expired), marked as being revoked: no
    /// keep-alive renews them from here on.
    fn start_revoking(&self, ids: Vec<u64>, now: Instant) -> Vec<u64> {
        let deadlines = self.lock();
        let mut revoking = self.revoking();
        let ids: Vec<u64> = ids.into_iter().filter(|id| deadlines.get(id).is_none_or(|d| *d <= now)).collect();
        revoking.extend(ids.iter().copied());
        ids
    }

    /// Forgets every deadline and revoke (this node stopped leading).
    fn clear(&self) {
        let mut deadlines = self.lock();
        deadlines.clear();
        self.revoking().clear();
    }

    /// The leases renewed since the last call.
    fn take_renewed(&self) -> std::collections::HashSet<u64> {
        std::mem::take(&mut *self.renewed.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Time left on `id`, if this node tracks it.
    pub fn remaining(&self, id: u64) -> Option<Duration> {
        self.lock().get(&id).map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// A lease id: random, never 0 (a retried grant keeps its request id, so
/// it gets the first answer, id included).
fn new_lease_id() -> u64 {
    (rand::random::<u64>() >> 1).max(1)
}

/// Grants a lease of `ttl_ms` (request id: the client's, for a retry to
/// get the first answer); its id and TTL. Starts its clock here.
pub async fn grant(node: &Node, clock: &LeaseClock, ttl_ms: u64, request_id: String) -> Result<(u64, u64), Error> {
    kv::validate_ttl(ttl_ms).map_err(Error::InvalidArgument)?;
    let request_id = if request_id.is_empty() { new_request_id() } else { request_id };
    let cmd = Command { request_id, op: Op::LeaseGrant { id: new_lease_id(), ttl_ms } };
    match node.propose(cmd).await? {
        CommandResult::LeaseGranted { id, ttl_ms } => {
            // A new id (or a retried grant's): never one being revoked.
            clock.renew(id, ttl_ms);
            Ok((id, ttl_ms))
        }
        CommandResult::Rejected { reason } => Err(Error::InvalidArgument(reason)),
        other => Err(Error::unexpected("lease grant", &other)),
    }
}

/// Ends lease `id` now and deletes its keys; the revision of the deletes.
pub async fn revoke(node: &Node, id: u64, request_id: String) -> Result<u64, Error> {
    let request_id = if request_id.is_empty() { new_request_id() } else { request_id };
    match node.propose(Command { request_id, op: Op::LeaseRevoke { ids: vec![id] } }).await? {
        CommandResult::LeasesRevoked { revoked, .. } if revoked.is_empty() => {
            Err(Error::NotFound(format!("id: unknown lease id {id}")))
        }
        CommandResult::LeasesRevoked { revision, .. } => Ok(revision),
        CommandResult::Rejected { reason } => Err(Error::InvalidArgument(reason)),
        other => Err(Error::unexpected("lease revoke", &other)),
    }
}

/// One keep-alive of lease `id`: its TTL, restarted now, or 0 if the lease
/// is gone or its revoke is under way. Only a leader that a quorum
/// acknowledged lately renews: a leader cut off from the majority answers
/// "not leader", and the holder goes to the new one.
pub fn keep_alive(node: &Node, clock: &LeaseClock, id: u64) -> Result<u64, Error> {
    if !node.leads_with_quorum() {
        return Err(node.not_leader());
    }
    match node.reader.lease(id)? {
        Some(lease) if clock.renew(id, lease.ttl_ms) => Ok(lease.ttl_ms),
        Some(_) | None => Ok(0),
    }
}

/// Lease `id` and the time left on this leader's clock.
pub fn time_to_live(node: &Node, clock: &LeaseClock, id: u64) -> Result<(kv::Lease, Duration), Error> {
    if !node.is_leader() {
        return Err(node.not_leader());
    }
    let lease = node.reader.lease(id)?.ok_or_else(|| Error::NotFound(format!("id: unknown lease id {id}")))?;
    let remaining = clock.remaining(id).unwrap_or(Duration::from_millis(lease.ttl_ms));
    Ok((lease, remaining))
}

/// Runs the expiry loop until `shutdown` turns true.
pub async fn run_expiry(node: Arc<Node>, clock: Arc<LeaseClock>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = false;
    let mut proposed: HashMap<u64, Instant> = HashMap::new();
    // Leases kept by the protect threshold (their instances are suspect).
    let mut protected: std::collections::HashSet<u64> = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        if !node.is_leader() {
            if leading {
                clock.clear();
                proposed.clear();
                protected.clear();
                leading = false;
            }
            continue;
        }
        let leases = match node.reader.leases() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leases");
                continue;
            }
        };
        let now = Instant::now();
        let mut expired: Vec<(Instant, u64)> = Vec::new();
        // Every lease whose deadline passed.
        let mut lapsed: std::collections::HashSet<u64> = std::collections::HashSet::new();
        // Leases past or within half a TTL of their deadline: a live holder
        // renews every third of a TTL, so its deadline stays further off;
        // holders that died together all fall in here together (one window).
        let mut failing: std::collections::HashSet<u64> = std::collections::HashSet::new();
        {
            let mut deadlines = clock.lock();
            if !leading {
                // A new leader: every lease gets its full TTL from now, and
                // no revoke of an earlier term counts.
                deadlines.clear();
                clock.revoking().clear();
                leading = true;
                protected = leases.iter().filter(|l| registry::has_suspect(&node, l)).map(|l| l.id).collect();
            }
            let live: std::collections::HashSet<u64> = leases.iter().map(|l| l.id).collect();
            deadlines.retain(|id, _| live.contains(id));
            clock.revoking().retain(|id| live.contains(id));
            proposed.retain(|id, at| live.contains(id) && at.elapsed() < RETRY);
            for l in &leases {
                let deadline = *deadlines.entry(l.id).or_insert_with(|| now + Duration::from_millis(l.ttl_ms));
                if deadline <= now {
                    lapsed.insert(l.id);
                }
                if deadline <= now + Duration::from_millis(l.ttl_ms / 2) {
                    failing.insert(l.id);
                }
                if deadline <= now && !proposed.contains_key(&l.id) {
                    expired.push((deadline, l.id));
                }
            }
        }
        // Protected leases a keep-alive renewed since: clear their flag. (A
        // new leader's fresh deadlines are not renewals: suspects stay
        // suspect until their holders come back.)
        let renewed_now = clock.take_renewed();
        let renewed: Vec<u64> =
            protected.iter().copied().filter(|id| renewed_now.contains(id) && !lapsed.contains(id)).collect();
        for id in renewed {
            protected.remove(&id);
            if let Some(lease) = leases.iter().find(|l| l.id == id) {
                registry::flag(&node, lease, false);
            }
        }
        if expired.is_empty() {
            continue;
        }
        expired.sort();
        let candidates: Vec<u64> = expired.into_iter().take(EXPIRE_BATCH).map(|(_, id)| id).collect();
        let mut keep = registry::protect(&node, &leases, &candidates, &failing);
        // Protection ends: leases lapsed too long ago go regardless.
        {
            let deadlines = clock.lock();
            keep.retain(|id| {
                let hold = leases
                    .iter()
                    .find(|l| l.id == *id)
                    .map(|l| {
                        (Duration::from_millis(l.ttl_ms) * registry::PROTECT_MAX_TTLS).max(registry::PROTECT_MIN_HOLD)
                    })
                    .unwrap_or(registry::PROTECT_MIN_HOLD);
                deadlines.get(id).is_some_and(|d| now.saturating_duration_since(*d) < hold)
            });
        }
        for lease in leases.iter().filter(|l| keep.contains(&l.id)) {
            if protected.insert(lease.id) {
                tracing::warn!(lease = lease.id, "mass expiry: keeping the lease's instances as suspect");
                registry::flag(&node, lease, true);
            }
        }
        let ids: Vec<u64> = candidates.into_iter().filter(|id| !keep.contains(id)).collect();
        // Renewed since they were found expired: they live on.
        let ids = clock.start_revoking(ids, now);
        protected.retain(|id| !ids.contains(id));
        if ids.is_empty() {
            continue;
        }
        for id in &ids {
            proposed.insert(*id, now);
        }
        tracing::info!(count = ids.len(), "leases expired; revoking");
        let node = node.clone();
        tokio::spawn(async move {
            let cmd = Command { request_id: new_request_id(), op: Op::LeaseRevoke { ids } };
            if let Err(e) = node.propose(cmd).await {
                tracing::warn!(error = %e, "could not revoke expired leases; will try again");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_being_revoked_is_not_renewed_and_one_renewed_first_is_not_revoked() {
        let clock = LeaseClock::default();
        assert!(clock.renew(1, 0));
        assert!(clock.renew(2, 0));
        let expired_at = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        // Lease 2's holder came back after the expiry loop found it expired.
        assert!(clock.renew(2, 60_000));
        assert_eq!(clock.start_revoking(vec![1, 2], expired_at), vec![1], "lease 2 was renewed in between");
        assert!(!clock.renew(1, 60_000), "a keep-alive of a lease on its way out renews nothing");
        assert!(clock.remaining(1).is_some_and(|left| left.is_zero()), "its deadline stays where it was");
        assert!(clock.renew(2, 60_000));
        clock.clear();
        assert!(clock.renew(1, 60_000), "a new term starts afresh");
    }
}
