//! The key-value API (the config service): reads (linearizable,
//! serializable, at a revision, as a labelled reader sees them, or through
//! the local cache), writes and deletes (plain, bound to a lease, or
//! compare-and-set), listings, history, transactions and gray variants; and
//! the [`KeyValue`] and [`Put`] they answer with. Writes, deletes and cached
//! reads check their key (and a write its value) against the cluster's
//! limits ([`MAX_KEY_BYTES`], [`MAX_VALUE_BYTES`]) before anything is sent.

use ferry_proto::pb;
use ferry_proto::pb::config_service_client::ConfigServiceClient;

use super::{blocking, request_id, Client};
use crate::cache::Cached;
use crate::error::Error;

/// Longest key, in bytes (the cluster's limit, checked before sending).
pub const MAX_KEY_BYTES: usize = 4096;

/// Largest value, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Keys in one page of [`Client::list`].
pub const LIST_PAGE_KEYS: u32 = 1000;

/// A key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// Revision of its last change.
    pub mod_revision: u64,
    /// Writes since creation.
    pub version: u64,
}

/// The result of a put.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// Cluster revision of the write (the key's modify revision).
    pub revision: u64,
    /// Revision at which the key was created.
    pub create_revision: u64,
    /// The key's version after the write.
    pub version: u64,
    /// The node that applied it.
    pub member_id: u64,
}

impl From<pb::KeyValue> for KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        Self {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
        }
    }
}

/// Refuses a key the cluster would refuse, without a round trip.
fn check_key(key: &str) -> Result<(), Error> {
    // Same rules and words as the cluster's own check.
    let reason = if key.is_empty() {
        "key: must not be empty".to_string()
    } else if key.len() > MAX_KEY_BYTES {
        format!("key: must be at most {MAX_KEY_BYTES} bytes, got {}", key.len())
    } else {
        return Ok(());
    };
    Err(Error::Rejected(tonic::Status::invalid_argument(reason)))
}

impl Client {
    /// Creates or replaces `key`. Retried safely: the request id stays the same.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<Put, Error> {
        check_key(key)?;
        let msg =
            pb::PutRequest { key: key.to_string(), value, request_id: request_id(), if_mod_revision: None, lease: 0 };
        self.put_request(msg).await
    }

    /// Creates or replaces `key` bound to `lease`: it is deleted when the
    /// lease ends.
    pub async fn put_with_lease(&self, key: &str, value: Vec<u8>, lease: u64) -> Result<Put, Error> {
        check_key(key)?;
        let msg =
            pb::PutRequest { key: key.to_string(), value, request_id: request_id(), if_mod_revision: None, lease };
        self.put_request(msg).await
    }

    /// Compare-and-set: writes `key` only if its modify revision is
    /// `if_mod_revision` (0: only if it does not exist). Otherwise
    /// [`Error::Rejected`] with `FailedPrecondition`, naming what differed.
    pub async fn put_if(&self, key: &str, value: Vec<u8>, if_mod_revision: u64) -> Result<Put, Error> {
        check_key(key)?;
        let msg = pb::PutRequest {
            key: key.to_string(),
            value,
            request_id: request_id(),
            if_mod_revision: Some(if_mod_revision),
            lease: 0,
        };
        self.put_request(msg).await
    }

    /// Sends a put of any kind, once its value is known to fit.
    async fn put_request(&self, msg: pb::PutRequest) -> Result<Put, Error> {
        if msg.value.len() > MAX_VALUE_BYTES {
            return Err(Error::Rejected(tonic::Status::invalid_argument(format!(
                "value: must be at most {MAX_VALUE_BYTES} bytes (1 MiB), got {}",
                msg.value.len()
            ))));
        }
        let resp = self.call("put", msg, ConfigServiceClient::put).await?;
        let header = resp.header.unwrap_or_default();
        Ok(Put {
            revision: header.revision,
            create_revision: resp.create_revision,
            version: resp.version,
            member_id: header.member_id,
        })
    }

    /// Reads `key` (linearizable). `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, Error> {
        self.get_with(key, false).await
    }

    /// Reads `key`; `serializable` reads the answering node's replica
    /// without a read-index round trip (may be stale).
    pub async fn get_with(&self, key: &str, serializable: bool) -> Result<Option<KeyValue>, Error> {
        let msg = pb::GetRequest { key: key.to_string(), serializable, ..Default::default() };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(KeyValue::from))
    }

    /// `key` as it was at `revision`; `OutOfRange` if that is compacted.
    pub async fn get_at(&self, key: &str, revision: u64) -> Result<Option<KeyValue>, Error> {
        let msg = pb::GetRequest { key: key.to_string(), revision, ..Default::default() };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(KeyValue::from))
    }

    /// `key` as a reader with `labels` sees it: a matching gray variant's
    /// value, else the main value; with the variant's selector (empty: the
    /// main value).
    pub async fn get_with_labels(
        &self,
        key: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<(KeyValue, String)>, Error> {
        let msg = pb::GetRequest {
            key: key.to_string(),
            labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ..Default::default()
        };
        let resp = self.call("get", msg, ConfigServiceClient::get).await?;
        Ok(resp.kv.map(|kv| (KeyValue::from(kv), resp.variant)))
    }

    /// Reads `key` (linearizable) through the local cache: a successful read
    /// (the key's absence included) is stored and returned with
    /// `stale: false`. When the cluster cannot be reached
    /// ([`Error::Unavailable`]) and the cache holds a read of `key`, that
    /// read is returned with `stale: true` and the revision it was read at.
    /// Otherwise the call's error. Without `cache_dir` it is [`Client::get`]
    /// with a revision.
    pub async fn get_or_cached(&self, key: &str) -> Result<Cached<Option<KeyValue>>, Error> {
        check_key(key)?;
        let msg = pb::GetRequest { key: key.to_string(), ..Default::default() };
        let read = self.call("get", msg, ConfigServiceClient::get).await;
        let to_cached = |revision: u64, read: pb::GetResponse, stale: bool| Cached {
            value: read.kv.map(KeyValue::from),
            revision,
            stale,
        };
        let Some(cache) = self.cache.clone() else {
            return read.map(|r| to_cached(r.header.as_ref().map_or(0, |h| h.revision), r, false));
        };
        let key = key.to_string();
        match read {
            Ok(read) => {
                let revision = read.header.as_ref().map_or(0, |h| h.revision);
                let stored = read.clone();
                blocking(move || {
                    if let Err(e) = cache.store_config(&key, &stored) {
                        tracing::debug!(%key, error = %e, "cannot write the config cache");
                    }
                })
                .await;
                Ok(to_cached(revision, read, false))
            }
            Err(err @ Error::Unavailable { .. }) => match blocking(move || cache.load_config(&key)).await.flatten() {
                Some((revision, read)) => {
                    tracing::debug!(error = %err, revision, "cluster unreachable; serving the cached read");
                    Ok(to_cached(revision, read, true))
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// Every key starting with `prefix`, in key order (linearizable unless
    /// `serializable`), as it was at one revision. Read in pages of at most
    /// [`LIST_PAGE_KEYS`] keys or about 2 MiB, each read at the first page's
    /// revision, so a listing of any size arrives whole and consistent. If
    /// the history moves past that revision before the last page (many
    /// writes during a long listing), the listing starts over, at most
    /// three times.
    pub async fn list(&self, prefix: &str, serializable: bool) -> Result<Vec<KeyValue>, Error> {
        let mut attempts = 0;
        loop {
            match self.list_pages(prefix, serializable).await {
                Err(e) if e.code() == tonic::Code::OutOfRange && attempts < 3 => attempts += 1,
                done => return done,
            }
        }
    }

    async fn list_pages(&self, prefix: &str, serializable: bool) -> Result<Vec<KeyValue>, Error> {
        let mut out = Vec::new();
        let mut revision = 0;
        let mut start_after = String::new();
        loop {
            let msg = pb::ListRequest {
                prefix: prefix.to_string(),
                serializable,
                limit: LIST_PAGE_KEYS,
                start_after: std::mem::take(&mut start_after),
                revision,
            };
            let resp = self.call("list", msg, ConfigServiceClient::list).await?;
            revision = resp.header.map(|h| h.revision).unwrap_or(0);
            let more = resp.more;
            out.extend(resp.kvs.into_iter().map(KeyValue::from));
            match out.last() {
                Some(last) if more => start_after = last.key.clone(),
                _ => return Ok(out),
            }
        }
    }

    /// The changes to `key` still in the history, oldest first (the newest
    /// `limit`; 0 = all).
    pub async fn history(&self, key: &str, limit: u32) -> Result<pb::HistoryResponse, Error> {
        let msg = pb::HistoryRequest { key: key.to_string(), limit, serializable: false };
        self.call("history", msg, ConfigServiceClient::history).await
    }

    /// Compare, then write, atomically. A request id is set if missing, so
    /// retries apply once.
    pub async fn txn(&self, mut msg: pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
        if msg.request_id.is_empty() {
            msg.request_id = request_id();
        }
        self.call("txn", msg, ConfigServiceClient::txn).await
    }

    /// Gray variants of `key`: list, set (`selector` required), promote
    /// (empty selector: the only variant) or drop (empty: all). Returns the
    /// variants after the action.
    pub async fn gray(
        &self,
        action: pb::gray_request::Action,
        key: &str,
        selector: &str,
        value: Vec<u8>,
    ) -> Result<Vec<pb::Variant>, Error> {
        let msg = pb::GrayRequest {
            action: action as i32,
            key: key.to_string(),
            selector: selector.to_string(),
            value,
            request_id: request_id(),
        };
        self.call("gray", msg, ConfigServiceClient::gray).await.map(|r| r.variants)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, Error> {
        check_key(key)?;
        let msg = pb::DeleteRequest { key: key.to_string(), request_id: request_id(), if_mod_revision: None };
        self.delete_request(msg).await
    }

    /// Compare-and-delete: only if `key`'s modify revision is `if_mod_revision`.
    pub async fn delete_if(&self, key: &str, if_mod_revision: u64) -> Result<bool, Error> {
        check_key(key)?;
        let msg = pb::DeleteRequest {
            key: key.to_string(),
            request_id: request_id(),
            if_mod_revision: Some(if_mod_revision),
        };
        self.delete_request(msg).await
    }

    /// Sends a delete of either kind.
    async fn delete_request(&self, msg: pb::DeleteRequest) -> Result<bool, Error> {
        let resp = self.call("delete", msg, ConfigServiceClient::delete).await?;
        Ok(resp.deleted)
    }
}
