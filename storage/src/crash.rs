//! Crash points for the chaos harness. In builds with the `failpoints`
//! feature (tests, and `cargo build -p ferry --features failpoints`), a
//! process started with `FAILPOINTS="name=N%return;..."` dies at once at the
//! point `name`, N % of the times it passes there: no unwinding, no
//! destructor, nothing flushed, as if the machine had killed it. Without
//! the feature the points compile to nothing.
//!
//! The points in this crate: `log-before-sync` (an append written to sled
//! and the journal, not yet synced), `snapshot-build` (a snapshot file
//! written, not yet synced or renamed), `snapshot-install` (a received
//! snapshot saved, not yet loaded or made current) and `apply-batch` (a
//! batch half applied).

/// The exit status of a process that died at a crash point.
pub const CRASH_EXIT: i32 = 70;

/// Dies at once, naming the point in the log.
pub fn now(point: &str) -> ! {
    eprintln!("crash point {point}: exiting with status {CRASH_EXIT}");
    std::process::exit(CRASH_EXIT)
}

/// A crash point: see the module doc.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| $crate::crash::now($name))
    };
}

/// Arms the points named in `FAILPOINTS` (`name=actions;...`), once per
/// process (does nothing without the `failpoints` feature, where there are
/// no points). Each point is set with `fail::cfg`: `fail::FailScenario`
/// would hold the crate's one scenario lock for good, and a second holder
/// in the same process (`ferry demo` runs schedulers and workers together)
/// would wait on it forever.
pub fn arm() {
    #[cfg(feature = "failpoints")]
    {
        static ARMED: std::sync::Once = std::sync::Once::new();
        ARMED.call_once(|| {
            let spec = std::env::var("FAILPOINTS").unwrap_or_default();
            for (name, actions) in spec.split(';').filter_map(|point| point.split_once('=')) {
                if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
                    eprintln!("FAILPOINTS: {name}: {e}");
                }
            }
        });
    }
}
