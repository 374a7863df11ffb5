//! Bandwidth caps (bytes per second) for uploads and downloads, on
//! governor's token bucket with a burst of one second's worth.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// A shared byte-rate limiter; unlimited when built from `None`.
#[derive(Clone, Default)]
pub struct Bandwidth(Option<(Arc<DefaultDirectRateLimiter>, u32)>);

impl Bandwidth {
    /// A cap of `bytes_per_sec` (none if `None` or 0).
    pub fn new(bytes_per_sec: Option<u64>) -> Self {
        let rate = bytes_per_sec.and_then(|b| NonZeroU32::new(b.min(u32::MAX as u64) as u32));
        Self(rate.map(|r| (Arc::new(RateLimiter::direct(Quota::per_second(r))), r.get())))
    }

    /// Waits until `n` bytes may pass, in steps no larger than the burst.
    pub async fn take(&self, n: usize) {
        let Some((limiter, burst)) = &self.0 else { return };
        let mut left = n as u64;
        while left > 0 {
            let step = left.min(*burst as u64).min(64 * 1024) as u32;
            let Some(step) = NonZeroU32::new(step) else { return };
            // Cannot fail: a step never exceeds the burst.
            if limiter.until_n_ready(step).await.is_err() {
                return;
            }
            left -= step.get() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cap_slows_transfers_down() {
        let bw = Bandwidth::new(Some(256 * 1024));
        let start = std::time::Instant::now();
        // The first second's worth passes at once (burst); the next 256 KiB waits ~1s.
        bw.take(512 * 1024).await;
        assert!(start.elapsed() >= std::time::Duration::from_millis(700), "{:?}", start.elapsed());
        Bandwidth::new(None).take(1 << 30).await;
    }
}
