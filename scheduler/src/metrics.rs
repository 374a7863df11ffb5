//! Prometheus metrics of a scheduler, served on the admin port.
//! Names follow `ferry_<component>_<what>_<unit>`.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What the gauges and counters show, read from the node at scrape time
/// (see `admin`).
#[derive(Debug, Clone, Default)]
pub struct Readings {
    /// Current Raft term.
    pub term: u64,
    /// The known leader (0: none).
    pub leader_id: u64,
    /// This node leads.
    pub is_leader: bool,
    /// Last committed log index.
    pub commit_index: u64,
    /// Last applied log index.
    pub applied_index: u64,
    /// Last log index.
    pub last_log_index: u64,
    /// Entries in the log.
    pub log_entries: u64,
    /// Log index of the current snapshot.
    pub snapshot_index: u64,
    /// Revision of the replicated state.
    pub revision: u64,
    /// Snapshots built by this node.
    pub snapshots_built: u64,
    /// Snapshots installed from a leader.
    pub snapshots_installed: u64,
    /// fsyncs of appended log entries.
    pub log_flushes: u64,
    /// When this node's certificate expires (Unix seconds; 0: plaintext).
    pub tls_not_after: i64,
    /// Each probe and whether it is stale.
    pub probes: Vec<(String, bool)>,
}

/// Every metric a scheduler exports. Gauges are refreshed at scrape time.
pub struct Metrics {
    registry: Registry,
    term: Gauge<i64, AtomicI64>,
    leader_id: Gauge<i64, AtomicI64>,
    is_leader: Gauge<i64, AtomicI64>,
    commit_index: Gauge<i64, AtomicI64>,
    applied_index: Gauge<i64, AtomicI64>,
    last_log_index: Gauge<i64, AtomicI64>,
    log_entries: Gauge<i64, AtomicI64>,
    snapshot_index: Gauge<i64, AtomicI64>,
    revision: Gauge<i64, AtomicI64>,
    snapshots_built: Counter<u64, AtomicU64>,
    snapshots_installed: Counter<u64, AtomicU64>,
    log_flushes: Counter<u64, AtomicU64>,
    apply_seconds: Histogram,
    applied_entries: Counter<u64, AtomicU64>,
    probe_stale: Family<Vec<(String, String)>, Gauge<i64, AtomicI64>>,
    tls_not_after: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let m = Self {
            term: Gauge::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            log_entries: Gauge::default(),
            snapshot_index: Gauge::default(),
            revision: Gauge::default(),
            snapshots_built: Counter::default(),
            snapshots_installed: Counter::default(),
            log_flushes: Counter::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            applied_entries: Counter::default(),
            probe_stale: Family::default(),
            tls_not_after: Gauge::default(),
            registry: Registry::default(),
        };
        let registry = root.sub_registry_with_prefix("ferry_raft");
        registry.register("term", "Current Raft term", m.term.clone());
        registry.register("leader_id", "Id of the known leader (0: none)", m.leader_id.clone());
        registry.register("is_leader", "1 on the leader", m.is_leader.clone());
        registry.register("commit_index", "Last committed log index", m.commit_index.clone());
        registry.register("applied_index", "Last applied log index", m.applied_index.clone());
        registry.register("last_log_index", "Last log index", m.last_log_index.clone());
        registry.register("log_entries", "Entries in the log (after purges)", m.log_entries.clone());
        registry.register("snapshot_index", "Log index of the current snapshot", m.snapshot_index.clone());
        registry.register("revision", "Revision of the replicated state", m.revision.clone());
        registry.register("snapshots_built", "Snapshots built by this node", m.snapshots_built.clone());
        registry.register("snapshots_installed", "Snapshots installed from a leader", m.snapshots_installed.clone());
        registry.register("log_flushes", "fsyncs of appended log entries", m.log_flushes.clone());
        registry.register("apply_duration_seconds", "Time to apply one batch of entries", m.apply_seconds.clone());
        registry.register("applied_entries", "Entries applied", m.applied_entries.clone());
        root.sub_registry_with_prefix("ferry_probe").register(
            "stale",
            "1 while a probe is stale (results stopped or its output unchanged too long)",
            m.probe_stale.clone(),
        );
        root.sub_registry_with_prefix("ferry_tls").register(
            "cert_not_after_seconds",
            "When this node's TLS certificate expires, Unix time (0: plaintext)",
            m.tls_not_after.clone(),
        );
        Self { registry: root, ..m }
    }
}

fn set_counter(c: &Counter<u64, AtomicU64>, value: u64) {
    let have = c.get();
    if value > have {
        c.inc_by(value - have);
    }
}

impl Metrics {
    /// Records one apply batch.
    pub fn observe_apply(&self, took: Duration, entries: usize) {
        self.apply_seconds.observe(took.as_secs_f64());
        self.applied_entries.inc_by(entries as u64);
    }

    /// Sets the gauges to `r` and renders the text format.
    pub fn render(&self, r: &Readings) -> String {
        self.term.set(r.term as i64);
        self.leader_id.set(r.leader_id as i64);
        self.is_leader.set(r.is_leader as i64);
        self.commit_index.set(r.commit_index as i64);
        self.applied_index.set(r.applied_index as i64);
        self.last_log_index.set(r.last_log_index as i64);
        self.log_entries.set(r.log_entries as i64);
        self.snapshot_index.set(r.snapshot_index as i64);
        self.revision.set(r.revision as i64);
        self.tls_not_after.set(r.tls_not_after);
        set_counter(&self.snapshots_built, r.snapshots_built);
        set_counter(&self.snapshots_installed, r.snapshots_installed);
        set_counter(&self.log_flushes, r.log_flushes);
        self.probe_stale.clear();
        for (name, stale) in &r.probes {
            self.probe_stale.get_or_create(&vec![("probe".to_string(), name.clone())]).set(*stale as i64);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}
