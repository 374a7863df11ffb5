//! A service instance that stays registered while its handle lives:
//! [`Client::register_kept`] registers it and keeps its lease alive from a
//! background task the returned [`Registration`] owns.
//!
//! The two ways out differ on purpose, as the cluster tells them apart:
//! [`Registration::deregister`] removes the instance at once and is recorded
//! as a deregistration (an empty listing names it, so a balancer lets the
//! service empty); dropping the handle only stops the renewals, so the
//! instance expires like one whose process died (and a balancer whose
//! service empties that way keeps its last instances: see
//! [`crate::Balancer::follow`]).

use std::fmt;
use std::time::Duration;

use ferry_proto::pb;

use crate::client::{Client, KeepAlive};
use crate::error::Error;

impl Client {
    /// Registers (or replaces) `instance` bound to a new lease of `ttl` (1 s
    /// to 1 day) and keeps that lease alive until the returned
    /// [`Registration`] is dropped or deregistered: [`Client::register`] and
    /// [`Client::keep_alive`] in one handle.
    ///
    /// ```no_run
    /// # async fn demo(client: ferry_sdk::Client) -> Result<(), ferry_sdk::Error> {
    /// use std::time::Duration;
    /// let instance = ferry_sdk::pb::Instance {
    ///     service: "bidder".into(),
    ///     id: "b1".into(),
    ///     address: "10.0.0.1".into(),
    ///     port: 8080,
    ///     ..Default::default()
    /// };
    /// let registration = client.register_kept(instance, Duration::from_secs(10)).await?;
    /// // ... serve ...
    /// registration.deregister().await?; // on a clean shutdown: gone at once
    /// # Ok(()) }
    /// ```
    pub async fn register_kept(&self, instance: pb::Instance, ttl: Duration) -> Result<Registration, Error> {
        self.register_kept_with(instance, ttl, false).await
    }

    /// [`Client::register_kept`], taking the id over from the lease that
    /// holds it, if any (see [`Client::register_replacing`]).
    pub async fn register_kept_replacing(&self, instance: pb::Instance, ttl: Duration) -> Result<Registration, Error> {
        self.register_kept_with(instance, ttl, true).await
    }

    async fn register_kept_with(
        &self,
        instance: pb::Instance,
        ttl: Duration,
        replace: bool,
    ) -> Result<Registration, Error> {
        let lease = self.register_with(instance.clone(), ttl, replace).await?;
        let keep = self.keep_alive(lease);
        Ok(Registration { client: self.clone(), instance, lease, keep })
    }
}

/// A registered instance whose lease is kept alive while the handle lives
/// (see [`Client::register_kept`]).
///
/// **Dropping it does not deregister.** It stops the renewals, and the
/// instance stays listed until its lease runs out, one TTL after the last
/// renewal (a new leader first gives every lease its full TTL again, and
/// the protect threshold may keep it, flagged `suspect`, while much of its
/// service expires at once). That is what a crash looks like, and consumers
/// handle it as one. For a clean shutdown call
/// [`Registration::deregister`], which removes the instance at once and
/// tells consumers it left on purpose.
///
/// The handle does not register again by itself: if the lease is gone (it
/// was revoked, or the renewals failed for longer than the TTL, for example
/// while this process was cut off from the cluster), so is the instance,
/// and [`Registration::next`] says so. If someone else deregisters the
/// instance, the lease lives on without it and the instance stays gone.
pub struct Registration {
    client: Client,
    /// As given to [`Client::register_kept`]; its service and id name the
    /// key that [`Registration::deregister`] removes.
    instance: pb::Instance,
    lease: u64,
    /// Owns the renewal task; dropping it aborts the task.
    keep: KeepAlive,
}

impl Registration {
    /// The lease the instance is bound to.
    pub fn lease(&self) -> u64 {
        self.lease
    }

    /// The instance as it was registered (the cluster fills in a weight of
    /// 100 when it is 0).
    pub fn instance(&self) -> &pb::Instance {
        &self.instance
    }

    /// The next answer of the lease's keep-alive, as [`KeepAlive::next`]:
    /// `ttl_ms == 0` means the lease, and with it the instance, is gone;
    /// an `Err` is a failed reconnect (the renewals keep trying). Reading is
    /// optional: the renewals never wait for it.
    pub async fn next(&mut self) -> Option<Result<pb::LeaseKeepAliveResponse, Error>> {
        self.keep.next().await
    }

    /// Deregisters the instance now and ends the registration: the cluster
    /// records the removal as a deregistration, the renewals stop and the
    /// lease is revoked. Returns whether the instance was still registered
    /// under this handle's lease (false if its lease had run out, someone
    /// deregistered it, or another registration took the id over: that one
    /// stays).
    ///
    /// The lease is renewed until the deregistration applies, so a slow
    /// call cannot turn it into an expiry. If the call fails (the cluster
    /// was unreachable until the retry budget ran out), the renewals stop
    /// all the same and the instance expires one TTL later. Revoking the
    /// then empty lease is best effort: if it fails, the lease runs out by
    /// itself.
    pub async fn deregister(self) -> Result<bool, Error> {
        let Registration { client, instance, lease, keep } = self;
        let removed = client.deregister_held(&instance.service, &instance.id, lease).await;
        drop(keep);
        if removed.is_ok() {
            if let Err(e) = client.revoke(lease).await {
                tracing::debug!(lease, error = %e, "revoking a deregistered instance's lease failed; it runs out by itself");
            }
        }
        removed
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("service", &self.instance.service)
            .field("id", &self.instance.id)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}
