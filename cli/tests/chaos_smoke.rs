//! The chaos harness's smoke, on every change: each scenario for a short
//! while on a fixed seed, with the `ferry` binary these tests build. The
//! full runs are `ferry-chaos run --all` (docs/operations/chaos.md).

use std::time::Duration;

use ferry_chaos::scenario::{self, Options, SCENARIOS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_a_short_run() {
    let options = Options {
        ferry: env!("CARGO_BIN_EXE_ferry").into(),
        duration: Duration::from_secs(20),
        seed: 7,
        every: Duration::from_secs(4),
        dir: None,
        keep: false,
        serializable: false,
    };
    for (name, _) in SCENARIOS {
        let report = scenario::run(name, &options).await.expect("the scenario runs");
        let text = report.text();
        println!("{text}");
        assert!(report.passed(), "{text}");
        assert!(report.strikes() >= 2, "the nemesis struck: {text}");
        assert!(report.ops.0 > 100, "the workload ran: {text}");
    }
}
