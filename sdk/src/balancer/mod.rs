//! Client-side load balancing over the instances of one service.
//!
//! A [`Balancer`] holds the service's instance list (fed by
//! [`Balancer::update`], or by the registry watch through
//! [`Balancer::follow`]) and answers [`Balancer::pick`] for each request:
//!
//! 1. **Version**: a request for a version sees only instances of it.
//! 2. **Ejection**: instances ejected as outliers are out, except one that is
//!    due for its trial (half-open), which takes the next request routed to it.
//! 3. **Gray**: a gray request (or a key drawn into the canary share) goes to
//!    gray instances, falling back to normal ones unless forced; any other
//!    request goes to normal instances only.
//! 4. **Health**: suspect instances (kept by the cluster's protect threshold
//!    after a mass expiry) serve only when no healthy one is left.
//! 5. **Strategy**: [`Strategy`] chooses among what is left, with each
//!    instance's weight ramped up during its warm-up.
//!
//! The returned [`Pick`] is a guard: finishing it with an [`Outcome`] feeds
//! the in-flight counts, the latency EWMA and outlier ejection. Time comes
//! from a [`Clock`] and randomness from a seedable RNG, so tests and
//! simulations are exact. [`Balancer::call`] adds the failover policies.
//!
//! Layout: [`pick`] (strategies), [`eject`] (outlier state machine), `hash`
//! (ketama ring), [`call`] (failover, fail fast, forking), [`follow`] (registry
//! watch, tower `Discover`, balanced tonic channel).

pub mod call;
pub mod eject;
pub mod follow;
mod hash;
pub mod pick;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ferry_proto::pb;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub use call::{CallError, InstanceFault, Policy};
pub use eject::EjectionOptions;
pub use pick::Strategy;

use eject::Outlier;
use hash::Ring;
use pick::Load;

/// Weight of an instance registered without one (the cluster's default).
pub const DEFAULT_WEIGHT: u32 = 100;

/// One instance of a service, as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// Unique within the service; the balancer keys all state by it.
    pub id: String,
    /// Host name or IP.
    pub address: String,
    /// TCP port.
    pub port: u16,
    /// Release version, for version routing.
    pub version: String,
    /// Relative share of traffic (0 means the default, 100).
    pub weight: u32,
    /// Serves gray (canary) traffic only.
    pub gray: bool,
    /// A consumer of the service, registered for visibility: never picked.
    pub consumer: bool,
    /// Kept by the protect threshold after its lease ran out: used only when
    /// no healthy instance is left.
    pub suspect: bool,
    /// Methods it serves, as registered (informational: routing does not
    /// look at them).
    pub methods: Vec<String>,
    /// Labels it registered with (`zone=a`, ...), for the application's own
    /// filtering; routing does not look at them.
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata it registered with.
    pub metadata: BTreeMap<String, String>,
}

impl Instance {
    /// A normal instance of weight 100.
    pub fn new(id: impl Into<String>, address: impl Into<String>, port: u16) -> Self {
        Self {
            id: id.into(),
            address: address.into(),
            port,
            version: String::new(),
            weight: DEFAULT_WEIGHT,
            gray: false,
            consumer: false,
            suspect: false,
            methods: Vec::new(),
            labels: BTreeMap::new(),
            metadata: BTreeMap::new(),
        }
    }

    /// With this weight.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// With this version.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Marked gray (or not).
    pub fn with_gray(mut self, gray: bool) -> Self {
        self.gray = gray;
        self
    }

    /// Marked suspect (or not).
    pub fn with_suspect(mut self, suspect: bool) -> Self {
        self.suspect = suspect;
        self
    }

    /// `address:port`.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    fn weight_or_default(&self) -> u32 {
        if self.weight == 0 {
            DEFAULT_WEIGHT
        } else {
            self.weight
        }
    }
}

impl From<pb::Instance> for Instance {
    fn from(i: pb::Instance) -> Self {
        Self {
            id: i.id,
            address: i.address,
            // The cluster checks ports on registration; a bad one cannot connect anyway.
            port: u16::try_from(i.port).unwrap_or(0),
            version: i.version,
            weight: i.weight,
            gray: i.gray,
            consumer: i.consumer,
            suspect: i.suspect,
            methods: i.methods,
            labels: i.labels.into_iter().collect(),
            metadata: i.metadata.into_iter().collect(),
        }
    }
}

/// What a request asks of routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Routing key (user id, session…): the consistent-hash key and the
    /// canary draw. Stable keys give stable routing.
    pub key: Option<String>,
    /// Prefer gray instances; fall back to normal ones if there are none.
    pub gray: bool,
    /// Gray instances only: no gray instance means no pick.
    pub force_gray: bool,
    /// Only instances of this version.
    pub version: Option<String>,
}

impl Request {
    /// A request with no routing constraints.
    pub fn new() -> Self {
        Self::default()
    }

    /// With a routing key.
    pub fn keyed(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Marked gray (falls back to normal instances).
    pub fn gray(mut self) -> Self {
        self.gray = true;
        self
    }

    /// Gray instances only.
    pub fn force_gray(mut self) -> Self {
        self.gray = true;
        self.force_gray = true;
        self
    }

    /// Only instances of `version`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }
}

/// How a request ended, for the balancer's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instance served it (a refusal for the caller's own fault counts
    /// as served: the instance is fine).
    Success,
    /// The instance failed it (unreachable, timed out, overloaded…).
    Failure,
}

/// The balancer's source of time. Injected so warm-up and ejection can be
/// tested and simulated without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, on a monotonic clock.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to (tests, simulations). Clones share
/// the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    start: Instant,
    offset: Arc<Mutex<Duration>>,
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        Self { start: Instant::now(), offset: Arc::new(Mutex::new(Duration::ZERO)) }
    }

    /// Moves time forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + *self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Tuning for a [`Balancer`].
#[derive(Debug, Clone)]
pub struct BalancerOptions {
    /// How to choose among eligible instances.
    pub strategy: Strategy,
    /// Time over which a newly seen instance's weight ramps linearly from
    /// (almost) nothing to its full weight. Instances in the first list the
    /// balancer receives count as warm: they were serving before it looked.
    /// Zero disables warm-up.
    pub warm_up: Duration,
    /// When instances that keep failing are taken out, and for how long
    /// ([`EjectionOptions`]); `consecutive_failures: 0` turns it off.
    pub ejection: EjectionOptions,
    /// Share (0..=100 %) of keyed requests that go to gray instances as a
    /// canary, chosen by a hash of the key (stable per key). Unkeyed
    /// requests are never drawn.
    pub canary_percent: u8,
    /// Weight of the newest sample in the latency EWMA (0 < alpha <= 1).
    pub ewma_alpha: f64,
    /// Ring points per instance of weight 100 (consistent hashing).
    pub virtual_nodes: u32,
    /// Seed of the RNG behind random strategies; `None` seeds from entropy.
    pub seed: Option<u64>,
    /// Source of time for warm-up, ejection backoff and latency: the
    /// system's monotonic clock by default, a [`ManualClock`] in tests and
    /// simulations.
    pub clock: Arc<dyn Clock>,
}

impl Default for BalancerOptions {
    fn default() -> Self {
        Self {
            strategy: Strategy::RoundRobin,
            warm_up: Duration::from_secs(30),
            ejection: EjectionOptions::default(),
            canary_percent: 0,
            ewma_alpha: 0.3,
            virtual_nodes: 160,
            seed: None,
            clock: Arc::new(SystemClock),
        }
    }
}

/// One instance and what the balancer learnt of it.
#[derive(Debug)]
struct Slot {
    instance: Arc<Instance>,
    first_seen: Instant,
    /// Present in the first list: no warm-up.
    warm: bool,
    /// Smooth round-robin counter.
    current: i64,
    active: u32,
    ewma: Option<f64>,
    outlier: Outlier,
}

#[derive(Debug)]
struct State {
    /// Sorted by id, so iteration (and round robin) is deterministic.
    slots: Vec<Slot>,
    ring: Ring,
    rng: StdRng,
    /// A non-empty list has been applied.
    seeded: bool,
}

pub(crate) struct Inner {
    options: BalancerOptions,
    state: Mutex<State>,
    /// The routable list after every applied update (for `ready`, the
    /// discover stream and the balanced channel).
    snapshot: tokio::sync::watch::Sender<Arc<Vec<Arc<Instance>>>>,
    /// Background tasks (registry watch) that stop with the balancer.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            task.abort();
        }
    }
}

/// Balances requests over the instances of one service. Cheap to clone;
/// clones share state. Background tasks it started stop when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer").field("strategy", &self.inner.options.strategy).finish_non_exhaustive()
    }
}

impl Balancer {
    /// An empty balancer. Out-of-range options are clamped: the ejected share
    /// to 0..=1, the canary to 100 %, alpha to (0, 1].
    pub fn new(mut options: BalancerOptions) -> Self {
        options.ejection.max_ejected_share = options.ejection.max_ejected_share.clamp(0.0, 1.0);
        options.canary_percent = options.canary_percent.min(100);
        if !(options.ewma_alpha > 0.0 && options.ewma_alpha <= 1.0) {
            options.ewma_alpha = 0.3;
        }
        let rng = match options.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        let state = State { slots: Vec::new(), ring: Ring::default(), rng, seeded: false };
        let (snapshot, _) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        Self { inner: Arc::new(Inner { options, state: Mutex::new(state), snapshot, tasks: Mutex::new(Vec::new()) }) }
    }

    /// The options in force.
    pub fn options(&self) -> &BalancerOptions {
        &self.inner.options
    }

    /// Replaces the instance list (a full list, as the registry watch sends
    /// it). Consumers are dropped; a repeated id keeps its last entry.
    /// What the balancer learnt of an instance (in-flight count, latency,
    /// ejection, first-seen time) survives updates that keep its id.
    ///
    /// An empty list is ignored once a non-empty one was applied, and false
    /// is returned: from a list alone one cannot tell deregistration of every
    /// instance from expiry or a glitch, and keeping stale instances (which
    /// then fail and get ejected) is the lesser harm. The cluster's listings
    /// do tell: [`Balancer::update_from_registry`] empties the balancer when
    /// every instance was deregistered explicitly. The cluster itself never
    /// empties a service through mass expiry (protect threshold).
    pub fn update<I, T>(&self, instances: I) -> bool
    where
        I: IntoIterator<Item = T>,
        T: Into<Instance>,
    {
        let mut by_id: BTreeMap<String, Instance> = BTreeMap::new();
        for i in instances {
            let i: Instance = i.into();
            if !i.consumer {
                by_id.insert(i.id.clone(), i);
            }
        }
        let state = self.lock();
        if by_id.is_empty() && state.seeded {
            tracing::debug!("ignoring an empty instance list; keeping the last non-empty one");
            return false;
        }
        self.replace(state, by_id)
    }

    /// Applies a listing from the registry (`List`, or a message of its
    /// watch): a non-empty list as [`Balancer::update`] does. An empty one
    /// names the instances that were deregistered explicitly
    /// (`deregistered`); those are dropped, and the instances the balancer
    /// holds that are not named there (their leases ended, or the list is a
    /// glitch) are kept, so the balancer empties only when every instance it
    /// held was deregistered. Returns whether the list changed.
    pub fn update_from_registry(&self, list: &pb::ListInstancesResponse) -> bool {
        if !list.instances.is_empty() {
            return self.update(list.instances.iter().cloned());
        }
        let state = self.lock();
        let kept: BTreeMap<String, Instance> = state
            .slots
            .iter()
            .filter(|s| !list.deregistered.contains(&s.instance.id))
            .map(|s| (s.instance.id.clone(), Instance::clone(&s.instance)))
            .collect();
        if kept.len() == state.slots.len() && state.seeded {
            tracing::debug!("ignoring an empty instance list: its instances were not deregistered");
            return false;
        }
        if !kept.is_empty() {
            tracing::debug!(kept = kept.len(), "empty instance list: keeping the instances not deregistered");
        }
        self.replace(state, kept)
    }

    /// Installs `by_id` as the list, keeping what was learnt of the ids that
    /// stay, and publishes it.
    fn replace(&self, mut state: std::sync::MutexGuard<'_, State>, by_id: BTreeMap<String, Instance>) -> bool {
        let now = self.inner.options.clock.now();
        let first = !state.seeded;
        let mut old: HashMap<String, Slot> = state.slots.drain(..).map(|s| (s.instance.id.clone(), s)).collect();
        let slots: Vec<Slot> = by_id
            .into_values()
            .map(|instance| match old.remove(&instance.id) {
                Some(mut slot) => {
                    slot.instance = Arc::new(instance);
                    slot
                }
                None => Slot {
                    instance: Arc::new(instance),
                    first_seen: now,
                    warm: first,
                    current: 0,
                    active: 0,
                    ewma: None,
                    outlier: Outlier::default(),
                },
            })
            .collect();
        state.ring = Ring::build(
            slots.iter().map(|s| (s.instance.id.as_str(), s.instance.weight_or_default())),
            self.inner.options.virtual_nodes,
        );
        state.slots = slots;
        state.seeded |= !state.slots.is_empty();
        let list = Arc::new(state.slots.iter().map(|s| s.instance.clone()).collect::<Vec<_>>());
        drop(state);
        self.inner.snapshot.send_replace(list);
        true
    }

    /// The current instances (consumers excluded), sorted by id.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.lock().slots.iter().map(|s| s.instance.clone()).collect()
    }

    /// Ids of the instances currently ejected as outliers (due and probing
    /// ones included).
    pub fn ejected(&self) -> Vec<String> {
        self.lock().slots.iter().filter(|s| s.outlier.is_ejected()).map(|s| s.instance.id.clone()).collect()
    }

    /// Waits until the balancer holds at least one instance.
    pub async fn ready(&self) {
        let mut rx = self.inner.snapshot.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|list| !list.is_empty()).await;
    }

    /// Chooses an instance for `request`, or `None` when none is eligible.
    /// Finish the returned guard with the outcome (dropping it unfinished
    /// counts as cancelled: neither success nor failure).
    pub fn pick(&self, request: &Request) -> Option<Pick> {
        self.pick_excluding(request, &[])
    }

    /// Like [`Balancer::pick`], never choosing an instance in `exclude`
    /// (ids already tried by a failover).
    pub fn pick_excluding(&self, request: &Request, exclude: &[String]) -> Option<Pick> {
        let options = &self.inner.options;
        let now = options.clock.now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let slots = &state.slots;

        let base: Vec<usize> = (0..slots.len())
            .filter(|&i| {
                let inst = &slots[i].instance;
                !exclude.contains(&inst.id) && request.version.as_ref().is_none_or(|v| *v == inst.version)
            })
            .collect();
        let usable: Vec<usize> =
            base.into_iter().filter(|&i| !slots[i].outlier.is_ejected() || slots[i].outlier.is_due(now)).collect();

        let canary = options.canary_percent > 0
            && request.key.as_ref().is_some_and(|k| {
                hash::hash64(k.as_bytes(), hash::CANARY_SALT) % 100 < u64::from(options.canary_percent)
            });
        let group: Vec<usize> = if request.gray || request.force_gray || canary {
            let gray: Vec<usize> = usable.iter().copied().filter(|&i| slots[i].instance.gray).collect();
            if !gray.is_empty() {
                gray
            } else if request.force_gray {
                return None;
            } else {
                usable.into_iter().filter(|&i| !slots[i].instance.gray).collect()
            }
        } else {
            usable.into_iter().filter(|&i| !slots[i].instance.gray).collect()
        };

        // Half-open: a due instance gets its one trial before anyone else.
        if let Some(&i) = group.iter().find(|&&i| slots[i].outlier.is_due(now)) {
            state.slots[i].outlier.start_probe();
            return Some(self.grant(state, i, true, now));
        }

        let healthy: Vec<usize> = group.iter().copied().filter(|&i| !slots[i].instance.suspect).collect();
        let tier = if healthy.is_empty() { group } else { healthy };
        if tier.is_empty() {
            return None;
        }

        let loads: Vec<Load> = slots
            .iter()
            .map(|s| Load { weight: effective_weight(s, now, options.warm_up), active: s.active, ewma: s.ewma })
            .collect();
        let chosen = match options.strategy {
            Strategy::RoundRobin => {
                let mut current: Vec<i64> = state.slots.iter().map(|s| s.current).collect();
                let i = pick::round_robin(&tier, &loads, &mut current);
                for (slot, c) in state.slots.iter_mut().zip(current) {
                    slot.current = c;
                }
                i
            }
            Strategy::WeightedRandom => pick::weighted_random(&tier, &loads, &mut state.rng),
            Strategy::LeastActive => pick::least_active(&tier, &loads, &mut state.rng),
            Strategy::LeastResponseTime => pick::least_response_time(&tier, &loads, &mut state.rng),
            Strategy::PowerOfTwoChoices => pick::power_of_two(&tier, &loads, &mut state.rng),
            Strategy::ConsistentHash => match &request.key {
                Some(key) => pick::consistent_hash(&tier, &state.ring, slots.len(), key.as_bytes())
                    .unwrap_or_else(|| pick::weighted_random(&tier, &loads, &mut state.rng)),
                None => pick::weighted_random(&tier, &loads, &mut state.rng),
            },
        };
        Some(self.grant(state, chosen, false, now))
    }

    fn grant(&self, state: &mut State, i: usize, probe: bool, now: Instant) -> Pick {
        let slot = &mut state.slots[i];
        slot.active += 1;
        Pick {
            instance: slot.instance.clone(),
            balancer: Arc::downgrade(&self.inner),
            started: now,
            probe,
            finished: false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies the end of a request to instance `id` (if it is still there).
    fn finish(&self, id: &str, probe: bool, outcome: Option<(Outcome, Duration)>) {
        let options = &self.options;
        let now = options.clock.now();
        let mut state = self.lock();
        let total = state.slots.len();
        let ejected = state.slots.iter().filter(|s| s.outlier.is_ejected()).count();
        let may_eject = ejected < (options.ejection.max_ejected_share * total as f64).floor() as usize;
        let Some(slot) = state.slots.iter_mut().find(|s| s.instance.id == id) else { return };
        slot.active = slot.active.saturating_sub(1);
        match outcome {
            Some((Outcome::Success, latency)) => {
                let sample = latency.as_nanos() as f64;
                slot.ewma = Some(match slot.ewma {
                    Some(old) => options.ewma_alpha * sample + (1.0 - options.ewma_alpha) * old,
                    None => sample,
                });
                slot.outlier.on_success(probe, now);
            }
            Some((Outcome::Failure, _)) => {
                if slot.outlier.on_failure(probe, now, &options.ejection, may_eject) {
                    tracing::info!(
                        instance = %slot.instance.id,
                        ejections = slot.outlier.ejections(),
                        "instance ejected as an outlier"
                    );
                }
            }
            None => {
                if probe {
                    slot.outlier.abandon_probe(now);
                }
            }
        }
    }
}

/// Weight after warm-up: linear in the time since the instance was first
/// seen, at least 1 so a new instance still gets a trickle.
fn effective_weight(slot: &Slot, now: Instant, warm_up: Duration) -> u64 {
    let full = u64::from(slot.instance.weight_or_default());
    if slot.warm || warm_up.is_zero() {
        return full;
    }
    let age = now.saturating_duration_since(slot.first_seen);
    if age >= warm_up {
        return full;
    }
    ((u128::from(full) * age.as_nanos() / warm_up.as_nanos()) as u64).max(1)
}

/// An instance chosen for one request. Finish it with the outcome; dropping
/// it unfinished releases it without judging the instance.
#[derive(Debug)]
pub struct Pick {
    instance: Arc<Instance>,
    balancer: Weak<Inner>,
    started: Instant,
    probe: bool,
    finished: bool,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Balancer")
    }
}

impl Pick {
    /// The chosen instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// This request is the half-open trial of an ejected instance.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports `outcome`, with the latency measured on the balancer's clock
    /// since the pick.
    pub fn finish(self, outcome: Outcome) {
        let latency = self
            .balancer
            .upgrade()
            .map(|b| b.options.clock.now().saturating_duration_since(self.started))
            .unwrap_or_default();
        self.finish_with_latency(outcome, latency);
    }

    /// Reports `outcome` with a latency the caller measured.
    pub fn finish_with_latency(mut self, outcome: Outcome, latency: Duration) {
        self.finished = true;
        if let Some(b) = self.balancer.upgrade() {
            b.finish(&self.instance.id, self.probe, Some((outcome, latency)));
        }
    }

    /// Shorthand for `finish(Outcome::Success)`.
    pub fn success(self) {
        self.finish(Outcome::Success);
    }

    /// Shorthand for `finish(Outcome::Failure)`.
    pub fn failure(self) {
        self.finish(Outcome::Failure);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(b) = self.balancer.upgrade() {
                b.finish(&self.instance.id, self.probe, None);
            }
        }
    }
}
