//! A scheduler whose disk fills up, with a real process on a small tmpfs
//! (root only: elsewhere the test says why and passes). openraft stops on
//! a storage error; the process must exit (status 1, the error named) so
//! that its supervisor restarts it, and the restart, once there is room
//! again, must serve every write acknowledged before.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{client, exit_code_within, free_port, Proc};

fn run(args: &[&str]) -> bool {
    Command::new(args[0]).args(&args[1..]).status().is_ok_and(|s| s.success())
}

/// A tmpfs of `bytes` at `path`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        run(&["umount", "-l", &self.0.to_string_lossy()]);
    }
}

#[tokio::test]
async fn a_scheduler_whose_disk_fills_exits_and_restarts_with_every_acknowledged_write() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: mounting a small tmpfs needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    assert!(run(&["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", &disk.to_string_lossy()]), "mount");
    let _mounted = Tmpfs(disk.clone());
    let addr = format!("127.0.0.1:{}", free_port());
    let data = disk.join("data").to_string_lossy().into_owned();
    let args: Vec<String> = ["scheduler", "--id", "1", "--listen", &addr, "--data", &data]
        .iter()
        .map(|s| s.to_string())
        .chain(["--initial-cluster".to_string(), format!("1={addr}")])
        .collect();
    let mut node = Proc::spawn(&args, &tmp.path().join("s1.log"));
    let c = client(vec![addr.clone()]);
    c.put("before", b"1".to_vec()).await.expect("a write before the disk fills");

    // Fill what is left, then write until the node stops taking writes.
    let mut ballast = std::fs::File::create(disk.join("ballast")).unwrap();
    while std::io::Write::write_all(&mut ballast, &[0u8; 65536]).is_ok() {}
    let mut acknowledged = vec!["before".to_string()];
    let value = vec![7u8; 4096];
    for i in 0..2000 {
        let key = format!("k{i}");
        match tokio::time::timeout(Duration::from_secs(2), c.put(&key, value.clone())).await {
            Ok(Ok(_)) => acknowledged.push(key),
            _ => break,
        }
    }
    let child = node.child.as_mut().unwrap();
    let code = exit_code_within(child, Duration::from_secs(30));
    assert_eq!(code, Some(Some(1)), "the node exits on the storage error:\n{}", node.log_text());
    assert!(node.log_text().contains("raft stopped"), "and says why:\n{}", node.log_text());

    // Room again: the restart serves every acknowledged write.
    drop(ballast);
    std::fs::remove_file(disk.join("ballast")).unwrap();
    let _node = Proc::spawn(&args, &tmp.path().join("s1-again.log"));
    let c = client(vec![addr]);
    for key in &acknowledged {
        let got = c.get(key).await.unwrap_or_else(|e| panic!("reading {key} after the restart: {e}"));
        assert!(got.is_some(), "{key} was acknowledged before the disk filled, and is gone");
    }
}
