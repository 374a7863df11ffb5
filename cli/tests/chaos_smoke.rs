//! The chaos harness's smoke, on every change: three scenarios (power cuts
//! of the leader and a follower, a leader cut off from its peers, crash
//! points in every process) for a short while on a fixed seed, with the
//! `ferry` binary these tests build (which has the crash points).
//! The full matrix is `ferry-chaos run --all` (docs/operations/chaos.md).

use std::time::Duration;

use ferry_chaos::scenario::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scenarios_pass_a_short_run() {
    let options = Options {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        duration: Duration::from_secs(30),
        seed: 7,
        every: Some(Duration::from_secs(5)),
        dir: None,
        keep: false,
        serializable: false,
        base: None,
    };
    // Cutting links needs network namespaces, and power cuts a FUSE mount
    // (root for both); without them the leader is frozen, or killed, instead.
    let partition =
        if ferry_lab::netns::Lab::unavailable().is_none() { "leader-isolate-cas" } else { "leader-freeze-cas" };
    let power = if ferry_chaos::lazyfs::LazyFs::unsupported().is_none() { "power-cut" } else { "leader-kill-cas" };
    for name in [power, partition, "crash-points"] {
        let report = scenario::run(name, &options).await.expect("the scenario runs");
        let text = report.text();
        println!("{text}");
        assert!(report.passed(), "{text}");
        assert!(report.strikes() >= 2, "the nemesis struck: {text}");
        assert!(report.ops.0 > 100, "the config workload ran: {text}");
        assert!(report.jobs.counts().0 >= 5, "the job workload ran: {text}");
    }
}
