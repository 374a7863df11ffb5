//! The chaos harness's smoke, on every change: three scenarios (a leader
//! killed, a leader cut off from its peers, a job's target killed) for a
//! short while on a fixed seed, with the `ferry` binary these tests build.
//! The full matrix is `ferry-chaos run --all` (docs/operations/chaos.md).

use std::time::Duration;

use ferry_chaos::scenario::{self, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_scenarios_pass_a_short_run() {
    let options = Options {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        duration: Duration::from_secs(30),
        seed: 7,
        every: Duration::from_secs(5),
        dir: None,
        keep: false,
        serializable: false,
    };
    // Cutting links needs network namespaces (root); without them the
    // leader is frozen instead.
    let partition =
        if ferry_lab::netns::Lab::unavailable().is_none() { "leader-isolate-cas" } else { "leader-freeze-cas" };
    for name in ["leader-kill-cas", partition, "target-kill"] {
        let report = scenario::run(name, &options).await.expect("the scenario runs");
        let text = report.text();
        println!("{text}");
        assert!(report.passed(), "{text}");
        assert!(report.strikes() >= 2, "the nemesis struck: {text}");
        assert!(report.ops.0 > 100, "the config workload ran: {text}");
        assert!(report.jobs.counts().0 >= 5, "the job workload ran: {text}");
    }
}
