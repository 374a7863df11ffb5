//! Configuration keys: the stored form, limits and validation.

use serde::{Deserialize, Serialize};

/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// A key with its value and revisions, as readers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision at which the key was created (again, after a delete).
    pub create_revision: u64,
    /// Revision of the last write to the key.
    pub mod_revision: u64,
    /// Writes since creation; 1 after the first put.
    pub version: u64,
}

impl KeyValue {
    /// What the key and value weigh in a message: listings and watches
    /// bound their messages by it.
    pub fn bytes(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// The stored form of a key: everything but the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredValue {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

impl StoredValue {
    pub(crate) fn with_key(self, key: String) -> KeyValue {
        KeyValue {
            key,
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// `key`: 1..=4096 bytes.
pub fn validate_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key: must not be empty".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("key: must be at most {MAX_KEY_BYTES} bytes, got {}", key.len()));
    }
    Ok(())
}

/// `value`: at most 1 MiB.
pub fn validate_value(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("value: must be at most {MAX_VALUE_BYTES} bytes (1 MiB), got {}", value.len()));
    }
    Ok(())
}

/// Revisions of history kept: every change within the last this many
/// revisions can be read back (`get` at a revision, `history`, `watch`
/// from a revision). Older changes are compacted one for one as new ones
/// are applied, so every replica compacts at the same revisions.
pub const HISTORY_REVISIONS: u64 = 10_000;

/// ...and fewer when the changes in the window hold more than this many
/// bytes (keys, values and the values they replaced), oldest first: the
/// history is kept in memory, and 10,000 changes of 1 MiB values would not
/// fit. Counted the same on every replica, so they compact alike.
pub const HISTORY_MAX_BYTES: u64 = 256 * 1024 * 1024;

/// What a change did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Created or replaced.
    Put,
    /// Removed.
    Delete,
}

/// One change to a key, as the history and watches report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change. For a delete: empty value, version 0,
    /// `mod_revision` the revision of the delete.
    pub kv: KeyValue,
}

/// A condition of a transaction on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key exists and its last change was at this revision.
    ModRevision {
        /// The key.
        key: String,
        /// Its expected modify revision.
        revision: u64,
    },
    /// The key does not exist.
    Absent {
        /// The key.
        key: String,
    },
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Create or replace a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove a key (nothing happens if it is absent).
    Delete {
        /// The key.
        key: String,
    },
    /// Create or replace a key bound to a lease (skipped if the lease no
    /// longer exists).
    PutLeased {
        /// The key.
        key: String,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The lease.
        lease: u64,
    },
}

/// Compare, then write: if every compare holds, `success` is applied, else
/// `failure`, all in one log entry (atomic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Writes when they hold.
    pub success: Vec<TxnOp>,
    /// Writes when one does not.
    pub failure: Vec<TxnOp>,
}

/// Most compares and writes in one transaction.
pub const MAX_TXN_OPS: usize = 128;

/// Most key and value bytes the writes of one transaction carry: a little
/// over one largest value, as etcd's 1.5 MiB request limit. Every write is
/// one log entry, which followers must take within a heartbeat interval.
pub const MAX_TXN_BYTES: usize = MAX_VALUE_BYTES + MAX_VALUE_BYTES / 2;

impl Txn {
    /// Checks keys, values and sizes; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.compares.len() > MAX_TXN_OPS || self.success.len() + self.failure.len() > MAX_TXN_OPS {
            return Err(format!("txn: at most {MAX_TXN_OPS} compares and {MAX_TXN_OPS} writes"));
        }
        for c in &self.compares {
            match c {
                Compare::ModRevision { key, revision } => {
                    validate_key(key).map_err(|e| format!("compare {e}"))?;
                    if *revision == 0 {
                        return Err("compare: mod revision 0 never matches; compare absence instead".into());
                    }
                }
                Compare::Absent { key } => validate_key(key).map_err(|e| format!("compare {e}"))?,
            }
        }
        let bytes: usize = self
            .success
            .iter()
            .chain(&self.failure)
            .map(|op| match op {
                TxnOp::Put { key, value } | TxnOp::PutLeased { key, value, .. } => key.len() + value.len(),
                TxnOp::Delete { key } => key.len(),
            })
            .sum();
        if bytes > MAX_TXN_BYTES {
            return Err(format!(
                "txn: its writes carry {bytes} bytes of keys and values, more than {MAX_TXN_BYTES} (1.5 MiB)"
            ));
        }
        for op in self.success.iter().chain(&self.failure) {
            match op {
                TxnOp::Put { key, value } => {
                    validate_key(key)?;
                    validate_value(value)?;
                }
                TxnOp::Delete { key } => validate_key(key)?,
                TxnOp::PutLeased { key, value, .. } => {
                    validate_key(key)?;
                    validate_value(value)?;
                }
            }
        }
        Ok(())
    }
}

/// Shortest lease TTL.
pub const MIN_LEASE_TTL_MS: u64 = 1000;
/// Longest lease TTL.
pub const MAX_LEASE_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// A lease as replicated: its TTL and the keys bound to it. When it runs
/// out is leader soft state (the leader's monotonic clock), never logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Id (never 0).
    pub id: u64,
    /// Time to live without a keep-alive.
    pub ttl_ms: u64,
    /// Keys removed when the lease ends.
    pub keys: Vec<String>,
}

/// `ttl`: 1 s to 1 day.
pub fn validate_ttl(ttl_ms: u64) -> Result<(), String> {
    if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(&ttl_ms) {
        return Err(format!("ttl: must be between 1s and 1 day, got {ttl_ms} ms"));
    }
    Ok(())
}

/// Most gray variants one key can have.
pub const MAX_VARIANTS: usize = 16;

/// A label selector: every `key=value` pair must match.
pub type Selector = std::collections::BTreeMap<String, String>;

/// A gray variant of a key: readers whose labels match `selector` get
/// `value` instead of the key's main value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    /// Who sees it.
    pub selector: Selector,
    /// What they see.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Cluster revision when it was set.
    pub revision: u64,
}

/// Most `key=value` pairs in one selector (or one set of labels).
pub const MAX_SELECTOR_PAIRS: usize = 64;

/// Parses `k=v,k2=v2` (at most [`MAX_SELECTOR_PAIRS`] pairs); the error
/// names the field.
pub fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut out = Selector::new();
    for (i, part) in s.split(',').map(str::trim).filter(|p| !p.is_empty()).enumerate() {
        if i == MAX_SELECTOR_PAIRS {
            return Err(format!("selector: at most {MAX_SELECTOR_PAIRS} key=value pairs"));
        }
        let (k, v) = part.split_once('=').ok_or_else(|| format!("selector: '{part}' is not key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        let ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !ok(k) || !ok(v) {
            return Err(format!("selector: '{part}' must be key=value of letters, digits, '.', '_' or '-'"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// True if `labels` has every `key=value` of `selector` (an empty selector
/// selects everything).
pub fn selects(selector: &Selector, labels: &std::collections::BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Renders a selector as `k=v,k2=v2`.
pub fn selector_text(s: &Selector) -> String {
    s.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// The variant `labels` see: the matching one with the most pairs (the
/// earliest set among equals).
pub fn pick_variant<'a>(variants: &'a [Variant], labels: &Selector) -> Option<&'a Variant> {
    variants.iter().filter(|v| selects(&v.selector, labels)).fold(None, |best: Option<&Variant>, v| match best {
        Some(b) if b.selector.len() >= v.selector.len() => Some(b),
        _ => Some(v),
    })
}
