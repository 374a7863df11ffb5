//! Probes: definitions and the latest results per worker, as replicated.
//!
//! The `probes` tree holds `d/<name>` -> [`ProbeDef`],
//! `r/<name>\0<worker>` -> [`WorkerProbe`] (one value per worker: the
//! latest result for every target and the state of its output file), and
//! `w/<name>` -> the names of the workers that reported (so a delete finds
//! their results inside a transaction, which cannot scan).

use serde::{Deserialize, Serialize};

use crate::kv::Selector;

/// Shortest interval between two rounds of a probe.
pub const MIN_INTERVAL_MS: u64 = 1_000;
/// Longest interval.
pub const MAX_INTERVAL_MS: u64 = 86_400_000;
/// Most targets in one probe.
pub const MAX_TARGETS: usize = 64;

/// One URL to download, with an optional Host header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeTarget {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Host header to send instead of the URL's host (empty: the URL's).
    pub host: String,
}

/// A file every running worker renders from its own ranking.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOutput {
    /// Absolute path on the worker (under its allowed roots).
    pub path: String,
    /// Line template (see the proto for placeholders).
    pub template: String,
    /// Only the best N targets (0: all).
    pub top: u32,
    /// Hook named in the worker's config (empty: none).
    pub hook: String,
}

/// A probe definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeDef {
    /// Unique name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// What to download.
    pub targets: Vec<ProbeTarget>,
    /// Time between rounds.
    pub interval_ms: u64,
    /// Per download.
    pub timeout_ms: u64,
    /// Which workers run it (empty: all).
    pub selector: Selector,
    /// Optional file to render.
    pub output: Option<ProbeOutput>,
    /// Stale when no result arrived for this long.
    pub stale_after_ms: u64,
    /// Stale when a worker's output has not changed for this long (0: never).
    pub output_stale_after_ms: u64,
    /// Where to POST an alert when the probe turns stale (empty: nowhere).
    pub alert_url: String,
    /// The defining leader's wall clock (unix ms), so a probe nobody
    /// reports for turns stale too.
    pub defined_unix_ms: u64,
}

/// One download's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Index into the probe's targets.
    pub target: u32,
    /// Time to the response headers.
    pub ttfb_us: u64,
    /// Time to the end of the body.
    pub total_us: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Empty on success.
    pub error: String,
    /// The worker's wall clock when the download started.
    pub measured_unix_ms: u64,
}

/// What one worker last reported for one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerProbe {
    /// The worker.
    pub worker: String,
    /// The latest result for each target it measured.
    pub results: Vec<ProbeResult>,
    /// BLAKE3 of its rendered output (empty: no output).
    pub output_digest: String,
    /// When that output content was first written.
    pub output_changed_unix_ms: u64,
    /// Why the output could not be written (empty: it could).
    pub output_error: String,
}

/// `name`: 1..=128 letters, digits, `.`, `_` or `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("name: must be 1 to 128 bytes".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("name: '{name}' may hold only letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// Checks what the state machine relies on; URL syntax and the like are
/// checked by the service before proposing.
pub fn validate_def(def: &ProbeDef) -> Result<(), String> {
    validate_name(&def.name)?;
    if def.targets.is_empty() || def.targets.len() > MAX_TARGETS {
        return Err(format!("targets: a probe needs 1 to {MAX_TARGETS} targets"));
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&def.interval_ms) {
        return Err("interval: must be between 1s and 1 day".into());
    }
    // Targets are downloaded one after another: a round must fit its interval.
    let round = def.timeout_ms.saturating_mul(def.targets.len() as u64);
    if def.timeout_ms == 0 || round > def.interval_ms {
        return Err(format!(
            "timeout: {} targets of at most {} ms each must fit the {} ms interval",
            def.targets.len(),
            def.timeout_ms,
            def.interval_ms
        ));
    }
    Ok(())
}
