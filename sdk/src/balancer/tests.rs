//! Balancer behaviour: strategies, ejection, gray routing, warm-up, updates.
//! Seeded RNG and a manual clock: every assertion is exact or within a
//! stated tolerance of a fixed draw.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;

fn options(strategy: Strategy, clock: &ManualClock) -> BalancerOptions {
    BalancerOptions {
        strategy,
        warm_up: Duration::ZERO,
        ejection: EjectionOptions { consecutive_failures: 0, ..EjectionOptions::default() },
        seed: Some(7),
        clock: Arc::new(clock.clone()),
        ..BalancerOptions::default()
    }
}

fn inst(id: &str) -> Instance {
    Instance::new(id, "10.0.0.1", 8080)
}

/// Picks `n` times (each released at once) and counts picks per id.
fn counts(b: &Balancer, req: &Request, n: usize) -> HashMap<String, usize> {
    let mut c = HashMap::new();
    for _ in 0..n {
        let p = b.pick(req).expect("an instance");
        *c.entry(p.instance().id.clone()).or_insert(0) += 1;
    }
    c
}

/// Picks until `id` comes up and reports `outcome` for it `times` times.
fn report(b: &Balancer, id: &str, outcome: Outcome, latency: Duration, times: usize) {
    for _ in 0..times {
        let p = (0..1000).filter_map(|_| b.pick(&Request::new())).find(|p| p.instance().id == id);
        p.unwrap_or_else(|| panic!("{id} never picked")).finish_with_latency(outcome, latency);
    }
}

fn picked(b: &Balancer, req: &Request) -> Option<String> {
    b.pick(req).map(|p| p.instance().id.clone())
}

#[test]
fn smooth_round_robin_spreads_weights_5_1_1() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    b.update([inst("a").with_weight(5), inst("b").with_weight(1), inst("c").with_weight(1)]);
    let seq: String = (0..14).map(|_| picked(&b, &Request::new()).unwrap()).collect();
    assert_eq!(seq, "aabacaaaabacaa");
}

#[test]
fn weighted_random_follows_weights_within_3_percent() {
    let b = Balancer::new(options(Strategy::WeightedRandom, &ManualClock::new()));
    b.update([inst("a").with_weight(100), inst("b").with_weight(200), inst("c").with_weight(700)]);
    let c = counts(&b, &Request::new(), 100_000);
    for (id, share) in [("a", 0.1), ("b", 0.2), ("c", 0.7)] {
        let got = c[id] as f64 / 100_000.0;
        assert!((got / share - 1.0).abs() < 0.03, "{id}: {got} vs {share}");
    }
}

#[test]
fn least_active_prefers_the_idle_instance() {
    let b = Balancer::new(options(Strategy::LeastActive, &ManualClock::new()));
    b.update([inst("a"), inst("b")]);
    let busy = b.pick(&Request::new()).unwrap();
    let idle = if busy.instance().id == "a" { "b" } else { "a" };
    // While one request is in flight on `busy`, every other goes to `idle`.
    assert_eq!(counts(&b, &Request::new(), 100).get(idle), Some(&100));
    drop(busy);
    // Both idle again: both are used.
    assert_eq!(counts(&b, &Request::new(), 100).len(), 2);
}

#[test]
fn least_response_time_prefers_the_faster_until_it_is_busy() {
    let b = Balancer::new(options(Strategy::LeastResponseTime, &ManualClock::new()));
    b.update([inst("fast"), inst("slow")]);
    // One sample each: once slow is measured, it is no longer picked.
    report(&b, "fast", Outcome::Success, Duration::from_millis(10), 1);
    report(&b, "slow", Outcome::Success, Duration::from_millis(45), 1);
    assert_eq!(counts(&b, &Request::new(), 100).get("fast"), Some(&100));
    // Score = EWMA × (in flight + 1): fast takes four concurrent requests
    // (10..40 < 45); with four in flight, 10 ms × 5 > 45 ms × 1, so slow
    // takes the fifth.
    let held: Vec<Pick> = (0..4).map(|_| b.pick(&Request::new()).unwrap()).collect();
    assert!(held.iter().all(|p| p.instance().id == "fast"));
    assert_eq!(picked(&b, &Request::new()).as_deref(), Some("slow"));
}

#[test]
fn power_of_two_never_picks_the_worst_of_three() {
    let b = Balancer::new(options(Strategy::PowerOfTwoChoices, &ManualClock::new()));
    b.update([inst("a"), inst("b"), inst("c")]);
    report(&b, "a", Outcome::Success, Duration::from_millis(10), 1);
    report(&b, "b", Outcome::Success, Duration::from_millis(20), 1);
    report(&b, "c", Outcome::Success, Duration::from_millis(100), 1);
    // Every pair drawn contains a better instance than c, so c never wins;
    // a wins both pairs it is in (about 2/3), b only {b, c} (about 1/3).
    let c = counts(&b, &Request::new(), 10_000);
    assert_eq!(c.get("c"), None);
    assert!(c["a"] > c["b"] && c["b"] > 2_000, "{c:?}");
}

#[test]
fn consistent_hash_moves_about_one_nth_of_keys_when_one_leaves() {
    let b = Balancer::new(options(Strategy::ConsistentHash, &ManualClock::new()));
    let ids: Vec<String> = (0..10).map(|i| format!("i{i}")).collect();
    b.update(ids.iter().map(|id| inst(id)));
    let keys: Vec<Request> = (0..100_000).map(|k| Request::new().keyed(format!("user-{k}"))).collect();
    let before: Vec<String> = keys.iter().map(|r| picked(&b, r).unwrap()).collect();
    // Stable: the same key goes to the same instance.
    assert!(keys.iter().zip(&before).take(1_000).all(|(r, id)| picked(&b, r).as_ref() == Some(id)));

    b.update(ids.iter().filter(|id| *id != "i3").map(|id| inst(id)));
    let after: Vec<String> = keys.iter().map(|r| picked(&b, r).unwrap()).collect();
    let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    let share = moved as f64 / keys.len() as f64;
    assert!((0.07..=0.13).contains(&share), "moved share {share}");
    // Only the leaver's keys moved.
    assert!(before.iter().zip(&after).all(|(x, y)| x == y || x == "i3"));
}

fn ejecting(clock: &ManualClock) -> Balancer {
    Balancer::new(BalancerOptions {
        ejection: EjectionOptions {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_share: 0.5,
        },
        ..options(Strategy::RoundRobin, clock)
    })
}

#[test]
fn ejection_after_k_failures_respects_the_share_and_recovers_half_open() {
    let clock = ManualClock::new();
    let b = ejecting(&clock);
    b.update([inst("a"), inst("b"), inst("c"), inst("d")]);
    let fail = Outcome::Failure;
    let ms = Duration::from_millis(1);

    report(&b, "a", fail, ms, 2);
    assert!(b.ejected().is_empty(), "two failures are below the threshold");
    report(&b, "a", fail, ms, 1);
    assert_eq!(b.ejected(), ["a"]);
    assert_eq!(counts(&b, &Request::new(), 30).get("a"), None);

    // Half of four may be out at once: b goes, c stays despite its failures.
    report(&b, "b", fail, ms, 3);
    report(&b, "c", fail, ms, 3);
    assert_eq!(b.ejected(), ["a", "b"]);

    // Not due yet just before the backoff ends.
    clock.advance(Duration::from_secs(10) - ms);
    assert_eq!(counts(&b, &Request::new(), 20).get("a"), None);
    clock.advance(ms);
    // Due: the next request is a's single trial; others avoid it meanwhile.
    let trial = b.pick(&Request::new()).unwrap();
    assert_eq!((trial.instance().id.as_str(), trial.is_probe()), ("a", true));
    // b's trial is due too, and a's is taken: the next request is b's trial.
    let b_trial = b.pick(&Request::new()).unwrap();
    assert_eq!((b_trial.instance().id.as_str(), b_trial.is_probe()), ("b", true));
    b_trial.failure();
    // Both out (a probing, b re-ejected): only c and d serve.
    let during = counts(&b, &Request::new(), 20);
    assert_eq!((during.get("a"), during.get("b")), (None, None));
    trial.failure();

    // A failed trial ejects again for twice the base: 20 s.
    clock.advance(Duration::from_secs(19));
    assert_eq!(counts(&b, &Request::new(), 20).get("a"), None);
    clock.advance(Duration::from_secs(1));
    for id in ["a", "b"] {
        let trial = b.pick(&Request::new()).unwrap();
        assert_eq!((trial.instance().id.as_str(), trial.is_probe()), (id, true));
        trial.success();
    }
    assert!(b.ejected().is_empty());
    assert!(counts(&b, &Request::new(), 20).contains_key("a"));

    // Failing again soon after: the third ejection lasts 30 s.
    report(&b, "a", fail, ms, 3);
    assert!(b.ejected().contains(&"a".to_string()));
    clock.advance(Duration::from_secs(29));
    assert!((0..20).all(|_| !matches!(b.pick(&Request::new()), Some(p) if p.instance().id == "a")));
    clock.advance(Duration::from_secs(1));
    let trial = (0..5).filter_map(|_| b.pick(&Request::new())).find(|p| p.instance().id == "a").unwrap();
    assert!(trial.is_probe());
}

#[test]
fn a_lone_instance_is_never_ejected() {
    let clock = ManualClock::new();
    let b = ejecting(&clock);
    b.update([inst("a")]);
    report(&b, "a", Outcome::Failure, Duration::from_millis(1), 10);
    assert!(b.ejected().is_empty());
    assert_eq!(picked(&b, &Request::new()).as_deref(), Some("a"));
}

#[test]
fn gray_requests_go_to_gray_instances_and_fall_back_unless_forced() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    b.update([inst("n1"), inst("n2"), inst("g1").with_gray(true)]);
    assert_eq!(counts(&b, &Request::new().gray(), 10).get("g1"), Some(&10));
    assert_eq!(counts(&b, &Request::new().force_gray(), 10).get("g1"), Some(&10));
    assert_eq!(counts(&b, &Request::new(), 100).get("g1"), None, "plain requests avoid gray instances");

    b.update([inst("n1"), inst("n2")]);
    assert_eq!(counts(&b, &Request::new().gray(), 10).len(), 2, "fell back to normal instances");
    assert!(b.pick(&Request::new().force_gray()).is_none());
}

#[test]
fn canary_share_is_within_tolerance_and_stable_per_key() {
    let b = Balancer::new(BalancerOptions { canary_percent: 20, ..options(Strategy::RoundRobin, &ManualClock::new()) });
    b.update([inst("n1"), inst("n2"), inst("g1").with_gray(true)]);
    let keys: Vec<Request> = (0..100_000).map(|k| Request::new().keyed(format!("user-{k}"))).collect();
    let gray: Vec<bool> = keys.iter().map(|r| picked(&b, r).as_deref() == Some("g1")).collect();
    let share = gray.iter().filter(|g| **g).count() as f64 / keys.len() as f64;
    assert!((0.19..=0.21).contains(&share), "canary share {share}");
    assert!(keys.iter().zip(&gray).take(2_000).all(|(r, g)| (picked(&b, r).as_deref() == Some("g1")) == *g));
    // Unkeyed requests are never drawn into the canary.
    assert_eq!(counts(&b, &Request::new(), 100).get("g1"), None);
}

#[test]
fn version_routing_sees_only_that_version() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    b.update([inst("a").with_version("v1"), inst("b").with_version("v1"), inst("c").with_version("v2")]);
    assert_eq!(counts(&b, &Request::new().version("v2"), 10).get("c"), Some(&10));
    assert_eq!(counts(&b, &Request::new().version("v1"), 10).len(), 2);
    assert!(b.pick(&Request::new().version("v3")).is_none());
}

#[test]
fn suspects_serve_only_when_no_healthy_instance_is_left_and_consumers_never() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    let mut consumer = inst("user");
    consumer.consumer = true;
    b.update([inst("ok"), inst("sus").with_suspect(true), consumer.clone()]);
    assert_eq!(b.instances().len(), 2);
    assert_eq!(counts(&b, &Request::new(), 20).get("ok"), Some(&20));
    b.update([inst("sus").with_suspect(true), consumer]);
    assert_eq!(picked(&b, &Request::new()).as_deref(), Some("sus"));
}

#[test]
fn warm_up_ramps_a_new_instance_weight() {
    let warm_up = Duration::from_secs(100);
    // One fresh balancer per phase so smooth round robin starts from zero
    // and a cycle of `total weight` picks gives every instance exactly its weight.
    for (elapsed, new_weight) in [(0, 1), (50, 50), (100, 100)] {
        let clock = ManualClock::new();
        let b = Balancer::new(BalancerOptions { warm_up, ..options(Strategy::RoundRobin, &clock) });
        b.update([inst("old")]);
        clock.advance(Duration::from_secs(1));
        b.update([inst("old"), inst("new")]);
        clock.advance(Duration::from_secs(elapsed));
        let c = counts(&b, &Request::new(), 100 + new_weight);
        assert_eq!(c.get("new"), Some(&new_weight), "at {elapsed}% of warm-up");
        assert_eq!(c.get("old"), Some(&100));
    }
}

#[test]
fn an_empty_update_does_not_wipe_a_non_empty_list() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    assert!(b.update(Vec::<Instance>::new()), "nothing to keep yet");
    assert!(b.update([inst("a")]));
    assert!(!b.update(Vec::<Instance>::new()));
    let mut consumer = inst("c");
    consumer.consumer = true;
    assert!(!b.update([consumer]), "a consumers-only list is empty too");
    assert_eq!(picked(&b, &Request::new()).as_deref(), Some("a"));
}

/// A registry listing of `ids`, with `deregistered` named when it is empty.
fn listing(ids: &[&str], deregistered: &[&str]) -> pb::ListInstancesResponse {
    pb::ListInstancesResponse {
        header: None,
        instances: ids
            .iter()
            .map(|id| pb::Instance { id: (*id).into(), address: "10.0.0.1".into(), port: 80, ..Default::default() })
            .collect(),
        deregistered: deregistered.iter().map(|id| (*id).to_string()).collect(),
    }
}

fn ids(b: &Balancer) -> Vec<String> {
    b.instances().iter().map(|i| i.id.clone()).collect()
}

#[test]
fn an_empty_listing_empties_the_balancer_only_when_every_instance_was_deregistered() {
    let b = Balancer::new(options(Strategy::RoundRobin, &ManualClock::new()));
    assert!(b.update_from_registry(&listing(&["a", "b"], &[])));
    // Expired (not named as deregistered): kept.
    assert!(!b.update_from_registry(&listing(&[], &[])));
    assert!(!b.update_from_registry(&listing(&[], &["x"])), "others' deregistrations change nothing");
    assert_eq!(ids(&b), ["a", "b"]);
    // a deregistered, b expired: only b is kept.
    assert!(b.update_from_registry(&listing(&[], &["a", "x"])));
    assert_eq!(ids(&b), ["b"]);
    assert_eq!(picked(&b, &Request::new()).as_deref(), Some("b"));
    // Every instance held was deregistered: empty.
    assert!(b.update_from_registry(&listing(&[], &["a", "b"])));
    assert!(ids(&b).is_empty());
    assert_eq!(picked(&b, &Request::new()), None);
    // A non-empty listing replaces the list as `update` does.
    assert!(b.update_from_registry(&listing(&["c"], &[])));
    assert_eq!(ids(&b), ["c"]);
}

#[test]
fn state_survives_an_update_that_keeps_the_id() {
    let clock = ManualClock::new();
    let b = ejecting(&clock);
    b.update([inst("a"), inst("b")]);
    report(&b, "a", Outcome::Failure, Duration::from_millis(1), 3);
    assert_eq!(b.ejected(), ["a"]);
    b.update([inst("a").with_weight(300), inst("b"), inst("c")]);
    assert_eq!(b.ejected(), ["a"]);
}

#[test]
fn pb_instances_convert_with_defaults() {
    let pb = pb::Instance { id: "x".into(), address: "::1".into(), port: 9000, weight: 0, ..Default::default() };
    let i = Instance::from(pb);
    assert_eq!(i.authority(), "[::1]:9000");
    assert_eq!(i.weight_or_default(), DEFAULT_WEIGHT);
}
