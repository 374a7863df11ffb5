//! Stable hashing for request keys and the ketama ring of virtual nodes.
//!
//! The hash must be the same in every process and every release (a key must
//! land on the same instance in all clients), so it is written out here
//! rather than taken from `std`'s randomly seeded hasher.

/// Salt of ring points and the keys looked up on the ring.
pub(crate) const RING_SALT: u64 = 0x6b65_7461_6d61_0001;
/// Salt of the canary draw, so the canary share is independent of the ring.
pub(crate) const CANARY_SALT: u64 = 0x6361_6e61_7279_0002;

/// 64-bit FNV-1a over `data`, then a splitmix64 finalizer: FNV alone leaves
/// nearby inputs (`"a#1"`, `"a#2"`) close together, which bunches ring points.
pub(crate) fn hash64(data: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A ketama ring: every instance owns `virtual_nodes × weight / 100` points
/// (at least one); a key belongs to the first point at or after its hash,
/// wrapping around. Removing one of N equal instances moves only the keys of
/// its own points, about 1/N of them.
#[derive(Debug, Default)]
pub(crate) struct Ring {
    /// (point, index of the instance in the balancer's sorted list).
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// A ring over `(id, weight)` pairs, indexed in iteration order. Points
    /// depend only on the id and weight, so every client builds the same ring.
    pub(crate) fn build<'a>(instances: impl Iterator<Item = (&'a str, u32)>, virtual_nodes: u32) -> Self {
        let mut points = Vec::new();
        for (index, (id, weight)) in instances.enumerate() {
            let n = (u64::from(virtual_nodes) * u64::from(weight) / 100).max(1);
            for v in 0..n {
                points.push((hash64(format!("{id}#{v}").as_bytes(), RING_SALT), index));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    /// Instance indexes in ring order starting at the owner of `key`
    /// (with repeats: an instance appears once per point). The first one the
    /// caller accepts is the key's instance; skipping unusable ones moves
    /// only their keys.
    pub(crate) fn walk(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        let h = hash64(key, RING_SALT);
        let start = self.points.partition_point(|p| p.0 < h);
        self.points[start..].iter().chain(self.points[..start].iter()).map(|p| p.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_builds() {
        // Pinned so a change of the function (which would move every key in
        // every deployed client) cannot go unnoticed.
        assert_eq!(hash64(b"", 0), mix(0xcbf2_9ce4_8422_2325));
        assert_ne!(hash64(b"a", RING_SALT), hash64(b"a", CANARY_SALT));
        assert_eq!(hash64(b"user-42", RING_SALT), hash64(b"user-42", RING_SALT));
    }

    #[test]
    fn ring_points_follow_weight() {
        let ring = Ring::build([("a", 100), ("b", 200), ("c", 0)].into_iter(), 160);
        let count = |i| ring.points.iter().filter(|p| p.1 == i).count();
        assert_eq!((count(0), count(1), count(2)), (160, 320, 1));
    }
}
