//! The leader's time, in one place: wall-clock milliseconds for what goes
//! into commands (apply never reads a clock; the leader puts times into
//! commands), monotonic instants for its soft-state timers.

use std::time::{SystemTime, UNIX_EPOCH};

/// Leader time in milliseconds since the Unix epoch (goes into commands).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
