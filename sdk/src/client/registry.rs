//! The service registry API: registering and deregistering instances,
//! listing a service's instances (live, or through the local cache while the
//! cluster is unreachable) and watching them. [`Client::register_kept`],
//! which keeps an instance registered by its handle, is in
//! [`crate::registration`]; the cache helpers here also serve
//! [`crate::Balancer::follow`].

use std::time::Duration;

use ferry_proto::pb;
use ferry_proto::pb::registry_service_client::RegistryServiceClient;

use super::{blocking, request_id, Call, Client};
use crate::cache::{Cache, Cached};
use crate::error::Error;

/// Stores `list` as the cached instances of `service`; a failure is logged
/// (the cache is an aid, never a reason to fail a read).
pub(crate) async fn store_instances(cache: Cache, service: String, list: pb::ListInstancesResponse) {
    blocking(move || {
        if let Err(e) = cache.store_instances(&service, &list) {
            tracing::debug!(%service, error = %e, "cannot write the registry cache");
        }
    })
    .await;
}

/// The cached instances of `service` and their revision, if any.
pub(crate) async fn load_instances(cache: Cache, service: String) -> Option<(u64, pb::ListInstancesResponse)> {
    blocking(move || cache.load_instances(&service)).await.flatten()
}

impl Client {
    /// Registers (or replaces) a service instance bound to a new lease of
    /// `ttl`; returns the lease, which the caller keeps alive
    /// ([`Client::keep_alive`]) to stay registered.
    /// [`Client::register_kept`] does both and returns one handle.
    ///
    /// An instance id belongs to the lease that registered it: while that
    /// lease lives, registering the id again is refused (`AlreadyExists`,
    /// naming the lease). [`Client::register_replacing`] takes it over.
    pub async fn register(&self, instance: pb::Instance, ttl: Duration) -> Result<u64, Error> {
        self.register_with(instance, ttl, false).await
    }

    /// [`Client::register`], taking the id over from the lease that holds
    /// it, if any (the old owner's lease is revoked if the instance was all
    /// it held: its renewals then say the lease is gone).
    pub async fn register_replacing(&self, instance: pb::Instance, ttl: Duration) -> Result<u64, Error> {
        self.register_with(instance, ttl, true).await
    }

    pub(crate) async fn register_with(
        &self,
        instance: pb::Instance,
        ttl: Duration,
        replace: bool,
    ) -> Result<u64, Error> {
        let msg = pb::RegisterRequest {
            instance: Some(instance),
            lease: 0,
            ttl_ms: ttl.as_millis() as u64,
            request_id: request_id(),
            replace,
        };
        self.call("register", msg, RegistryServiceClient::register).await.map(|r| r.lease)
    }

    /// Removes an instance now, whichever lease holds it; returns whether
    /// it was registered.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<bool, Error> {
        self.deregister_held(service, id, 0).await
    }

    /// Removes an instance only if `lease` (not 0) holds it.
    pub(crate) async fn deregister_held(&self, service: &str, id: &str, lease: u64) -> Result<bool, Error> {
        let msg = pb::DeregisterRequest { service: service.into(), id: id.into(), request_id: request_id(), lease };
        self.call("deregister", msg, RegistryServiceClient::deregister).await.map(|r| r.deregistered)
    }

    /// The instances of `service` (linearizable).
    pub async fn instances(&self, service: &str) -> Result<pb::ListInstancesResponse, Error> {
        let msg = pb::ListInstancesRequest { service: service.into() };
        self.call("list instances", msg, RegistryServiceClient::list).await
    }

    /// The instances of `service` (linearizable) through the local cache:
    /// a successful list is stored and returned with `stale: false`; when
    /// the cluster cannot be reached ([`Error::Unavailable`]) the cached list
    /// is returned with `stale: true`, if there is one. Otherwise the call's
    /// error. Without `cache_dir` it is [`Client::instances`].
    pub async fn instances_or_cached(&self, service: &str) -> Result<Cached<pb::ListInstancesResponse>, Error> {
        let list = self.instances(service).await;
        let Some(cache) = self.cache.clone() else {
            return list.map(|l| Cached {
                revision: l.header.as_ref().map_or(0, |h| h.revision),
                value: l,
                stale: false,
            });
        };
        let service = service.to_string();
        match list {
            Ok(list) => {
                let revision = list.header.as_ref().map_or(0, |h| h.revision);
                store_instances(cache, service, list.clone()).await;
                Ok(Cached { value: list, revision, stale: false })
            }
            Err(err @ Error::Unavailable { .. }) => match load_instances(cache, service).await {
                Some((revision, list)) => {
                    tracing::debug!(error = %err, revision, "cluster unreachable; serving the cached instances");
                    Ok(Cached { value: list, revision, stale: true })
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// The full instance list of `service`, again after every change.
    pub async fn watch_instances(&self, service: &str) -> Result<tonic::Streaming<pb::ListInstancesResponse>, Error> {
        let msg = pb::WatchInstancesRequest { service: service.into() };
        self.call(Call::stream("watch instances"), msg, RegistryServiceClient::watch).await
    }
}
