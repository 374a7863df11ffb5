//! The strategies: which instance of an eligible group serves a request.
//!
//! Each function gets the group (indexes into the balancer's slots, never
//! empty) and returns one of them. They are pure apart from the balancer's
//! own state (round-robin counters, the seeded RNG), so a seeded balancer
//! picks the same sequence every run.

use rand::rngs::StdRng;
use rand::Rng;

use super::hash::Ring;

/// How a balancer chooses among eligible instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Smooth weighted round robin (nginx): weights 5, 1, 1 give
    /// `a a b a c a a`, spreading the heavy instance's turns out.
    #[default]
    RoundRobin,
    /// Random, with probability proportional to weight.
    WeightedRandom,
    /// Fewest requests in flight; ties drawn by weight.
    LeastActive,
    /// Lowest score `EWMA latency × (in flight + 1) / weight`; ties drawn
    /// by weight. Instances with no latency yet count as the group's average.
    LeastResponseTime,
    /// Two distinct instances drawn at random, the lower score (as in
    /// `LeastResponseTime`) wins: near-least-loaded without herding.
    PowerOfTwoChoices,
    /// The request key's instance on a ketama ring (weighted virtual nodes);
    /// requests without a key are drawn by weight.
    ConsistentHash,
}

/// What the strategies need to know of one instance, as of this pick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    /// Weight after warm-up, at least 1.
    pub(crate) weight: u64,
    /// Requests in flight.
    pub(crate) active: u32,
    /// EWMA of successful latencies in nanoseconds, if any was measured.
    pub(crate) ewma: Option<f64>,
}

/// Smooth weighted round robin over `group`: every member gains its weight,
/// the richest is chosen and pays the group's total.
pub(crate) fn round_robin(group: &[usize], loads: &[Load], current: &mut [i64]) -> usize {
    let mut total = 0i64;
    let mut best = group[0];
    for &i in group {
        let w = loads[i].weight as i64;
        current[i] += w;
        total += w;
        if current[i] > current[best] {
            best = i;
        }
    }
    current[best] -= total;
    best
}

/// A draw proportional to weight.
pub(crate) fn weighted_random(group: &[usize], loads: &[Load], rng: &mut StdRng) -> usize {
    let total: u64 = group.iter().map(|&i| loads[i].weight).sum();
    let mut r = rng.gen_range(0..total.max(1));
    for &i in group {
        let w = loads[i].weight;
        if r < w {
            return i;
        }
        r -= w;
    }
    group[group.len() - 1]
}

/// Fewest in flight; ties by weight.
pub(crate) fn least_active(group: &[usize], loads: &[Load], rng: &mut StdRng) -> usize {
    let least = group.iter().map(|&i| loads[i].active).min().unwrap_or(0);
    let ties: Vec<usize> = group.iter().copied().filter(|&i| loads[i].active == least).collect();
    weighted_random(&ties, loads, rng)
}

/// Latency score of each member (lower is better).
fn scores(group: &[usize], loads: &[Load]) -> Vec<f64> {
    let measured: Vec<f64> = group.iter().filter_map(|&i| loads[i].ewma).collect();
    let fallback = if measured.is_empty() { 1.0 } else { measured.iter().sum::<f64>() / measured.len() as f64 };
    group
        .iter()
        .map(|&i| {
            let l = &loads[i];
            l.ewma.unwrap_or(fallback).max(1.0) * f64::from(l.active + 1) / l.weight as f64
        })
        .collect()
}

/// Lowest latency score; ties by weight.
pub(crate) fn least_response_time(group: &[usize], loads: &[Load], rng: &mut StdRng) -> usize {
    let s = scores(group, loads);
    let best = s.iter().copied().fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = group.iter().zip(&s).filter(|(_, &v)| v <= best).map(|(&i, _)| i).collect();
    weighted_random(&ties, loads, rng)
}

/// Two distinct uniform draws; the lower score wins (the first on a tie).
pub(crate) fn power_of_two(group: &[usize], loads: &[Load], rng: &mut StdRng) -> usize {
    if group.len() == 1 {
        return group[0];
    }
    let a = rng.gen_range(0..group.len());
    let mut b = rng.gen_range(0..group.len() - 1);
    if b >= a {
        b += 1;
    }
    let pair = [group[a], group[b]];
    let s = scores(&pair, loads);
    if s[1] < s[0] {
        pair[1]
    } else {
        pair[0]
    }
}

/// The first member met walking the ring from the key's position.
pub(crate) fn consistent_hash(group: &[usize], ring: &Ring, slots: usize, key: &[u8]) -> Option<usize> {
    let mut member = vec![false; slots];
    for &i in group {
        member[i] = true;
    }
    ring.walk(key).find(|&i| member.get(i).copied().unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn loads(weights: &[u64]) -> Vec<Load> {
        weights.iter().map(|&weight| Load { weight, active: 0, ewma: None }).collect()
    }

    #[test]
    fn smooth_round_robin_sequence_for_5_1_1() {
        let l = loads(&[5, 1, 1]);
        let mut current = vec![0; 3];
        let seq: Vec<usize> = (0..14).map(|_| round_robin(&[0, 1, 2], &l, &mut current)).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn power_of_two_draws_distinct_instances() {
        let mut l = loads(&[1, 1]);
        l[0].ewma = Some(1e6);
        l[1].ewma = Some(9e6);
        let mut rng = StdRng::seed_from_u64(1);
        // With two members both are always drawn, so the better one always wins.
        assert!((0..1000).all(|_| power_of_two(&[0, 1], &l, &mut rng) == 0));
    }
}
