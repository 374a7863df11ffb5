//! Outlier ejection: the per-instance state machine behind it.
//!
//! An instance that fails `consecutive_failures` times in a row is ejected
//! for `base_ejection × ejections` (capped at `max_ejection`). When that time
//! has passed it is *due*: the next request routed to its group is its one
//! trial (half-open). Success restores it; failure ejects it again, for
//! longer. The share of instances ejected at once is capped by the balancer,
//! which knows the whole list.

use std::time::{Duration, Instant};

/// When and for how long an instance is ejected.
#[derive(Debug, Clone)]
pub struct EjectionOptions {
    /// Consecutive failures that eject an instance (0 disables ejection).
    pub consecutive_failures: u32,
    /// Length of the first ejection; the n-th lasts n times this.
    pub base_ejection: Duration,
    /// Longest ejection. Also the healthy time after which an instance's
    /// ejection count starts again from zero.
    pub max_ejection: Duration,
    /// Largest share of the instances (0.0..=1.0) ejected at the same time,
    /// rounded down: with 0.5 and three instances, one. A failure that would
    /// pass it leaves the instance in rotation.
    pub max_ejected_share: f64,
}

impl Default for EjectionOptions {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

/// Where an instance stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// In rotation.
    Healthy,
    /// Out of rotation until `until`; due for a trial after.
    Ejected { until: Instant },
    /// Its trial request is in flight; no other request goes there.
    Probing,
}

/// Failure bookkeeping of one instance.
#[derive(Debug, Clone)]
pub(crate) struct Outlier {
    pub(crate) health: Health,
    /// Failures since the last success.
    consecutive: u32,
    /// Ejections so far (sets the next backoff).
    ejections: u32,
    /// When a trial last brought it back; a long healthy stretch after it
    /// forgives past ejections.
    restored_at: Option<Instant>,
}

impl Default for Outlier {
    fn default() -> Self {
        Self { health: Health::Healthy, consecutive: 0, ejections: 0, restored_at: None }
    }
}

impl Outlier {
    /// Out of normal rotation (ejected, due or probing).
    pub(crate) fn is_ejected(&self) -> bool {
        self.health != Health::Healthy
    }

    /// Ejected and its backoff has passed: ready for a trial request.
    pub(crate) fn is_due(&self, now: Instant) -> bool {
        matches!(self.health, Health::Ejected { until } if now >= until)
    }

    /// Number of ejections counted toward the next backoff.
    pub(crate) fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Marks the trial request as sent.
    pub(crate) fn start_probe(&mut self) {
        self.health = Health::Probing;
    }

    /// A request succeeded. A trial's success restores the instance; a late
    /// success of a request sent before the ejection does not.
    pub(crate) fn on_success(&mut self, probe: bool, now: Instant) {
        self.consecutive = 0;
        if probe && self.health == Health::Probing {
            self.health = Health::Healthy;
            self.restored_at = Some(now);
        }
    }

    /// A request failed. Returns true when this ejected the instance.
    /// `may_eject` is false when the share of ejected instances is at its
    /// cap; a failed trial re-ejects regardless (the instance was already
    /// counted as ejected).
    pub(crate) fn on_failure(&mut self, probe: bool, now: Instant, options: &EjectionOptions, may_eject: bool) -> bool {
        if probe && self.health == Health::Probing {
            self.eject(now, options);
            return true;
        }
        if self.is_ejected() {
            // A late answer to a request sent before the ejection.
            return false;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        if options.consecutive_failures > 0 && self.consecutive >= options.consecutive_failures && may_eject {
            if let Some(restored) = self.restored_at {
                if now.saturating_duration_since(restored) >= options.max_ejection {
                    self.ejections = 0;
                }
            }
            self.eject(now, options);
            return true;
        }
        false
    }

    /// The trial was abandoned (its caller gave up without an outcome): the
    /// instance is due again at once.
    pub(crate) fn abandon_probe(&mut self, now: Instant) {
        if self.health == Health::Probing {
            self.health = Health::Ejected { until: now };
        }
    }

    fn eject(&mut self, now: Instant, options: &EjectionOptions) {
        self.ejections = self.ejections.saturating_add(1);
        let backoff = options.base_ejection.saturating_mul(self.ejections).min(options.max_ejection);
        self.health = Health::Ejected { until: now + backoff };
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> EjectionOptions {
        EjectionOptions {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_share: 1.0,
        }
    }

    #[test]
    fn backoff_grows_per_ejection_and_is_capped() {
        let o = options();
        let t0 = Instant::now();
        let mut s = Outlier::default();
        assert!(!s.on_failure(false, t0, &o, true));
        assert!(!s.on_failure(false, t0, &o, true));
        assert!(s.on_failure(false, t0, &o, true));
        assert_eq!(s.health, Health::Ejected { until: t0 + Duration::from_secs(10) });
        // Trial fails twice: 20 s, then 30 s capped at 25 s.
        for (n, secs) in [(2, 20), (3, 25)] {
            let now = match s.health {
                Health::Ejected { until } => until,
                h => panic!("not ejected: {h:?}"),
            };
            assert!(s.is_due(now));
            s.start_probe();
            assert!(s.on_failure(true, now, &o, false));
            assert_eq!(s.ejections(), n);
            assert_eq!(s.health, Health::Ejected { until: now + Duration::from_secs(secs) });
        }
    }

    #[test]
    fn success_resets_the_failure_run() {
        let o = options();
        let t0 = Instant::now();
        let mut s = Outlier::default();
        s.on_failure(false, t0, &o, true);
        s.on_failure(false, t0, &o, true);
        s.on_success(false, t0);
        assert!(!s.on_failure(false, t0, &o, true));
        assert!(!s.is_ejected());
    }

    #[test]
    fn ejection_count_is_forgiven_after_a_long_healthy_stretch() {
        let o = options();
        let t0 = Instant::now();
        let mut s = Outlier::default();
        for _ in 0..3 {
            s.on_failure(false, t0, &o, true);
        }
        let t1 = t0 + Duration::from_secs(10);
        s.start_probe();
        s.on_success(true, t1);
        assert!(!s.is_ejected());
        let t2 = t1 + o.max_ejection;
        for _ in 0..3 {
            s.on_failure(false, t2, &o, true);
        }
        assert_eq!(s.ejections(), 1);
    }
}
