//! The local cache: the last config reads and registry views a client saw,
//! kept on disk so a process that starts while the cluster is unreachable
//! can serve them (marked stale) until the cluster is back.
//!
//! One file per entry under the cache directory: `config/<hex of key>` holds
//! a key's last read (a `pb::GetResponse`, whose unset `kv` records "absent"),
//! `registry/<service>` the last instance list (a `pb::ListInstancesResponse`).
//! Each file is a header — format tag, revision, BLAKE3 of revision and
//! payload — followed by the prost-encoded payload.
//!
//! Durability: a file is written to a temporary name in the same directory,
//! fsynced, then renamed over the old one (and the directory fsynced, best
//! effort), so a reader sees the old entry or the new one, never a torn one.
//! A file whose tag or checksum does not match is treated as absent and
//! reported at debug level. Every call here does blocking file I/O: async
//! callers run it under `spawn_blocking`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_proto::pb;
use prost::Message;

/// Tag opening every cache file; a new layout gets a new tag.
const FORMAT: &[u8; 8] = b"FERRYC01";
/// Tag, revision (u64 LE), BLAKE3 digest.
const HEADER_LEN: usize = 8 + 8 + 32;

/// A value read through the cache: fresh from the cluster, or the last one
/// stored when the cluster could not be reached.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached<T> {
    /// The value.
    pub value: T,
    /// Cluster revision at which the value was read.
    pub revision: u64,
    /// True when the cluster was unreachable and this is the cached copy.
    pub stale: bool,
}

/// A file-per-entry store of config reads and instance lists under one
/// directory (created on first write).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// A cache rooted at `dir`. Nothing is touched until the first write.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory the cache lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the read of `key` (an unset `kv` records that it is absent).
    pub fn store_config(&self, key: &str, read: &pb::GetResponse) -> io::Result<()> {
        let revision = read.header.as_ref().map_or(0, |h| h.revision);
        self.write(&self.config_path(key), revision, &read.encode_to_vec())
    }

    /// The last stored read of `key` and its revision; `None` if there is
    /// none or it is unreadable.
    pub fn load_config(&self, key: &str) -> Option<(u64, pb::GetResponse)> {
        self.read(&self.config_path(key))
    }

    /// Stores the instance list of `service`.
    pub fn store_instances(&self, service: &str, list: &pb::ListInstancesResponse) -> io::Result<()> {
        let revision = list.header.as_ref().map_or(0, |h| h.revision);
        self.write(&self.registry_path(service), revision, &list.encode_to_vec())
    }

    /// The last stored instance list of `service` and its revision; `None`
    /// if there is none or it is unreadable.
    pub fn load_instances(&self, service: &str) -> Option<(u64, pb::ListInstancesResponse)> {
        self.read(&self.registry_path(service))
    }

    fn config_path(&self, key: &str) -> PathBuf {
        self.dir.join("config").join(hex(key.as_bytes()))
    }

    fn registry_path(&self, service: &str) -> PathBuf {
        // Plain names stay readable; anything that could escape the
        // directory or clash with a temp file is hex-encoded behind a `%`,
        // which plain names never contain.
        let plain = !service.is_empty()
            && !service.starts_with('.')
            && service.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        let name = if plain { service.to_string() } else { format!("%{}", hex(service.as_bytes())) };
        self.dir.join("registry").join(name)
    }

    fn write(&self, path: &Path, revision: u64, payload: &[u8]) -> io::Result<()> {
        let parent = path.parent().ok_or_else(|| io::Error::other("cache path has no parent"))?;
        fs::create_dir_all(parent)?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(FORMAT);
        bytes.extend_from_slice(&revision.to_le_bytes());
        bytes.extend_from_slice(checksum(revision, payload).as_bytes());
        bytes.extend_from_slice(payload);
        // Leading dot: never a valid entry name (hex and plain names have none).
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
        let tmp = parent.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let written = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
            return written;
        }
        // The rename is durable once the directory is; not every platform
        // lets a directory be opened for that, hence best effort.
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn read<M: Message + Default>(&self, path: &Path) -> Option<(u64, M)> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cache entry unreadable; ignored");
                return None;
            }
        };
        let Some((header, payload)) = bytes.split_at_checked(HEADER_LEN) else {
            tracing::debug!(path = %path.display(), "cache entry truncated; ignored");
            return None;
        };
        let (tag, rest) = header.split_at(8);
        let (rev, digest) = rest.split_at(8);
        if tag != FORMAT {
            tracing::debug!(path = %path.display(), "cache entry of an unknown format; ignored");
            return None;
        }
        let mut rev_bytes = [0u8; 8];
        rev_bytes.copy_from_slice(rev);
        let revision = u64::from_le_bytes(rev_bytes);
        if checksum(revision, payload).as_bytes().as_slice() != digest {
            tracing::debug!(path = %path.display(), "cache entry checksum mismatch; ignored");
            return None;
        }
        match M::decode(payload) {
            Ok(m) => Some((revision, m)),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cache entry does not decode; ignored");
                None
            }
        }
    }
}

/// BLAKE3 over the revision and the payload, so neither can rot unnoticed.
fn checksum(revision: u64, payload: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(&revision.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], rev: u64) -> pb::GetResponse {
        pb::GetResponse {
            header: Some(pb::ResponseHeader { revision: rev, ..Default::default() }),
            kv: Some(pb::KeyValue { key: key.into(), value: value.to_vec(), mod_revision: rev, ..Default::default() }),
            variant: String::new(),
        }
    }

    fn instances(ids: &[&str], rev: u64) -> pb::ListInstancesResponse {
        pb::ListInstancesResponse {
            header: Some(pb::ResponseHeader { revision: rev, ..Default::default() }),
            instances: ids.iter().map(|id| pb::Instance { id: (*id).into(), ..Default::default() }).collect(),
            deregistered: vec![],
        }
    }

    #[test]
    fn round_trip_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        assert!(cache.load_config("app/x").is_none());
        cache.store_config("app/x", &kv("app/x", b"one", 3)).unwrap();
        cache.store_config("app/x", &kv("app/x", b"two", 7)).unwrap();
        let (rev, read) = cache.load_config("app/x").unwrap();
        assert_eq!(rev, 7);
        assert_eq!(read.kv.unwrap().value, b"two");
        // "Absent" is an entry too.
        let absent = pb::GetResponse {
            header: Some(pb::ResponseHeader { revision: 9, ..Default::default() }),
            ..Default::default()
        };
        cache.store_config("gone", &absent).unwrap();
        assert_eq!(cache.load_config("gone").map(|(r, g)| (r, g.kv.is_none())), Some((9, true)));

        cache.store_instances("bidder", &instances(&["a", "b"], 4)).unwrap();
        let (rev, list) = cache.load_instances("bidder").unwrap();
        assert_eq!(rev, 4);
        assert_eq!(list.instances.len(), 2);
        // No temp files are left behind.
        let names: Vec<_> =
            fs::read_dir(dir.path().join("registry")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("bidder")]);
    }

    #[test]
    fn odd_service_names_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("c"));
        cache.store_instances("../escape", &instances(&["a"], 1)).unwrap();
        assert!(cache.load_instances("../escape").is_some());
        assert!(cache.load_instances("escape").is_none());
        assert!(!dir.path().join("escape").exists());
    }

    /// A client whose only endpoint is a port nobody listens on, with short
    /// deadlines, caching under `dir`.
    fn unreachable_client(dir: &Path) -> crate::Client {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let options = crate::ClientOptions {
            request_timeout: std::time::Duration::from_millis(200),
            total_timeout: std::time::Duration::from_millis(400),
            connect_timeout: std::time::Duration::from_millis(100),
            cache_dir: Some(dir.to_path_buf()),
            security: Some(crate::Security::Insecure),
            ..Default::default()
        };
        crate::Client::with_options([format!("127.0.0.1:{port}")], options).unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_cluster_serves_the_cached_read_as_stale() {
        let dir = tempfile::tempdir().unwrap();
        let client = unreachable_client(dir.path());
        client.cache().unwrap().store_config("app/flag", &kv("app/flag", b"on", 12)).unwrap();
        client.cache().unwrap().store_instances("bidder", &instances(&["a", "b"], 13)).unwrap();

        let got = client.get_or_cached("app/flag").await.unwrap();
        assert!(got.stale);
        assert_eq!(got.revision, 12);
        assert_eq!(got.value.map(|kv| kv.value), Some(b"on".to_vec()));

        let got = client.instances_or_cached("bidder").await.unwrap();
        assert!(got.stale);
        assert_eq!(got.revision, 13);
        let ids: Vec<_> = got.value.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[tokio::test]
    async fn an_unreachable_cluster_without_an_entry_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let client = unreachable_client(dir.path());
        let err = client.get_or_cached("app/flag").await.unwrap_err();
        assert!(matches!(err, crate::Error::Unavailable { .. }), "{err:?}");
        let err = client.instances_or_cached("bidder").await.unwrap_err();
        assert!(matches!(err, crate::Error::Unavailable { .. }), "{err:?}");
        // A corrupted entry is no entry.
        client.cache().unwrap().store_config("app/flag", &kv("app/flag", b"on", 12)).unwrap();
        let path = client.cache().unwrap().config_path("app/flag");
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER_LEN] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(client.get_or_cached("app/flag").await.is_err());
        // An invalid key is refused before any cache lookup.
        assert!(client.get_or_cached("").await.unwrap_err().is_invalid_argument());
    }

    #[test]
    fn corrupted_or_truncated_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path());
        cache.store_config("k", &kv("k", b"value", 5)).unwrap();
        let path = cache.config_path("k");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(cache.load_config("k").is_none());
        // A changed revision is caught as well.
        cache.store_config("k", &kv("k", b"value", 5)).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[8] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(cache.load_config("k").is_none());
        fs::write(&path, b"FERRYC01short").unwrap();
        assert!(cache.load_config("k").is_none());
        // And a good write makes it readable again.
        cache.store_config("k", &kv("k", b"value", 6)).unwrap();
        assert_eq!(cache.load_config("k").map(|(r, _)| r), Some(6));
    }
}
