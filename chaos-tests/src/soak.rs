//! The soak: the workload Ferry exists for, compressed. Twenty workers get
//! a set of five files of 10 MB (50 MB) from `w1`, edited a little and
//! pushed again every 30 s (delta updates), beside config writes at about
//! 50 a second, two watchers and leases, while the leader is killed every
//! two minutes. Every job must succeed; and every process's memory and
//! data directory must stop growing, which [`sample`] measures at a tenth
//! of the run, at each quarter and at its end, and [`growth`] judges from
//! the middle to the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::jobs::Shape;

/// The soak's schedulers keep this many finished jobs (the default 1000
/// would take 8 hours of the soak's jobs to reach).
pub const JOB_HISTORY: usize = 20;

/// Flags of the soak's schedulers: [`JOB_HISTORY`].
pub const SCHEDULER_ARGS: &[&str] = &["--job-history", "20"];

/// The soak's workers: the jobs' source and 19 targets.
pub const WORKERS: usize = 20;

/// Its jobs: five files of 10 MB, every 30 s.
pub const SHAPE: Shape = Shape { files: 5, bytes: 10_000_000, odd_sizes: false, pace: Duration::from_secs(30) };

/// The least time between two operations of one of the four config
/// clients: about 85 operations a second in all, 50 of them writes.
pub const PACE: Duration = Duration::from_millis(47);

/// Growth from the middle to the end allowed a process: a quarter of what
/// it had at the middle, or this much, whichever is more.
const MEMORY_SLACK: u64 = 32 << 20;
const DISK_SLACK: u64 = 64 << 20;

/// Every process's (name, resident memory, data directory bytes) at one
/// time (seconds since the start); `None` for one that was down.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: f64,
    pub usage: Vec<(String, Option<(u64, u64)>)>,
}

/// When [`sample`] measures, as shares of the run; [`growth`] compares the
/// one at [`MIDDLE`] with the last.
const SHARES: [f64; 5] = [0.10, 0.25, 0.50, 0.75, 1.0];
const MIDDLE: usize = 2;

/// Samples every process at each of [`SHARES`] of `duration`.
pub async fn sample(cluster: Arc<Mutex<Cluster>>, duration: Duration, started: Instant) -> Vec<Sample> {
    let mut out = Vec::new();
    for share in SHARES {
        let at = duration.mul_f64(share);
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        let c = cluster.lock().await;
        let usage = c.everyone().into_iter().map(|who| (who.to_string(), c.usage(who))).collect();
        out.push(Sample { at: started.elapsed().as_secs_f64(), usage });
    }
    out
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("down".into(), |b| format!("{:.1}", b as f64 / (1 << 20) as f64))
}

/// The table the report prints: per process, MiB of memory and of disk at
/// each sample.
pub fn table(samples: &[Sample]) -> String {
    let Some(first) = samples.first() else { return String::new() };
    let times: Vec<String> = samples.iter().map(|s| format!("{:.0} s", s.at)).collect();
    let mut out = format!("  resident memory / data directory, MiB, at {}\n", times.join(", "));
    for (i, (who, _)) in first.usage.iter().enumerate() {
        let cell = |pick: fn((u64, u64)) -> u64| -> String {
            let each: Vec<String> = samples.iter().map(|s| mib(s.usage.get(i).and_then(|u| u.1).map(pick))).collect();
            each.join(" → ")
        };
        out += &format!("  {who:<10} memory {:<22} disk {}\n", cell(|u| u.0), cell(|u| u.1));
    }
    out
}

/// The processes that grew from the middle sample to the last by more
/// than a quarter (and more than the slack).
pub fn growth(samples: &[Sample]) -> Vec<String> {
    let (Some(middle), Some(end)) = (samples.get(MIDDLE), samples.last()) else { return Vec::new() };
    let mut problems = Vec::new();
    for ((who, before), (_, after)) in middle.usage.iter().zip(&end.usage) {
        let (Some(before), Some(after)) = (before, after) else { continue };
        for (what, b, a, slack) in
            [("memory", before.0, after.0, MEMORY_SLACK), ("disk", before.1, after.1, DISK_SLACK)]
        {
            if a > b + (b / 4).max(slack) {
                problems.push(format!(
                    "{who}: {what} grew from {} MiB at {:.0} s to {} MiB at {:.0} s",
                    b >> 20,
                    middle.at,
                    a >> 20,
                    end.at
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(middle: (u64, u64), end: (u64, u64)) -> Vec<Sample> {
        let at = |at: f64, u: (u64, u64)| Sample { at, usage: vec![("w1".into(), Some((u.0 << 20, u.1 << 20)))] };
        vec![at(10.0, (20, 5)), at(25.0, (20, 5)), at(55.0, middle), at(75.0, (20, 5)), at(100.0, end)]
    }

    #[test]
    fn a_plateau_passes_and_growth_past_a_quarter_and_the_slack_does_not() {
        assert!(growth(&samples((100, 200), (110, 240))).is_empty(), "within a quarter");
        assert!(growth(&samples((10, 10), (40, 70))).is_empty(), "within the slack");
        let grew = growth(&samples((200, 300), (300, 300)));
        assert_eq!(grew.len(), 1, "{grew:?}");
        assert!(grew[0].contains("w1: memory grew from 200 MiB at 55 s to 300 MiB at 100 s"), "{grew:?}");
        let grew = growth(&samples((100, 300), (100, 500)));
        assert!(grew[0].contains("disk grew"), "{grew:?}");
    }

    #[test]
    fn a_process_down_at_a_sample_is_not_judged_and_shows_as_down() {
        let mut s = samples((100, 100), (900, 900));
        s[2].usage[0].1 = None;
        assert!(growth(&s).is_empty());
        assert!(table(&s).contains("down"), "{}", table(&s));
    }
}
