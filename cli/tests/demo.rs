//! `ferry demo`, the README's main-job command: three schedulers and six
//! workers in one process push a file to every worker, verify every copy,
//! then push a 1 MiB change. Run here with a smaller file.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

#[test]
fn the_demo_pushes_verifies_and_updates_every_copy() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("demo");
    let out_path = dir.path().join("out.txt");
    let out = std::fs::File::create(&out_path).expect("output file");
    let mut child = common::command()
        .args(["demo", "--size", "24MiB", "--dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone output"))
        .stderr(out)
        .spawn()
        .expect("start ferry demo");
    // A demo that hangs (six workers in one process once did, in a sled flush
    // pool deadlock) fails with what it printed instead of waiting forever.
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ferry demo") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("ferry demo did not finish in 240 s:\n{text}"));
    assert!(status.success(), "ferry demo failed ({status}):\n{text}");
    assert!(text.contains("every copy verified ("), "first push verified:\n{text}");
    assert!(text.contains("every copy verified again"), "update verified:\n{text}");
    assert!(text.contains("demo finished"), "{text}");
    // The update moves a small part of the file, the rest is reused.
    let update = text.lines().find(|l| l.contains("the update moved")).unwrap_or_else(|| panic!("{text}"));
    let share: f64 = update
        .split('(')
        .nth(1)
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no share in {update}"));
    assert!(share < 25.0, "a 1 MiB change of 24 MiB moved {share}% per worker");
}
