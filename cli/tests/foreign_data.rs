//! Data directories in the wrong place or damaged, with real processes: a
//! copy of another node's directory, another cluster's directory started in
//! a member's place, a member whose database was damaged. Each is refused
//! at start; the cluster never notices, and the documented recovery (a new
//! member under a new id) works.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{exit_code_within, free_port, wait_for, Proc, Schedulers};

/// `cp -a FROM TO`.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let ok = Command::new("cp").arg("-a").arg(from).arg(to).status().is_ok_and(|s| s.success());
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

/// Runs `ferry ARGS` (a daemon expected to refuse to start) and returns its
/// exit code and stderr, or panics if it still runs after `timeout`.
fn refused_start(args: &[String], timeout: Duration) -> (Option<i32>, String) {
    let mut child = common::command_for(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ferry");
    let Some(code) = exit_code_within(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("ferry {args:?} still runs after {timeout:?}: it should have refused to start");
    };
    let mut err = String::new();
    use std::io::Read;
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    (code, err)
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

/// Node 1's flags as the cluster started it.
fn node1_args(sched: &Schedulers) -> Vec<String> {
    let data = sched.data[0].display().to_string();
    args(&["scheduler", "--id", "1", "--listen", &sched.addr(1), "--data", &data, "--initial-cluster", &sched.members])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_another_nodes_directory_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    sched.client(&[1, 2, 3]).put("k", b"v".to_vec()).await.expect("put");
    sched.terminate(2, Duration::from_secs(10)).expect("node 2 stops");
    let copy = dir.path().join("s4");
    copy_dir(&sched.data[1], &copy);
    let listen = format!("127.0.0.1:{}", free_port());
    let (code, err) = refused_start(
        &args(&["scheduler", "--id", "4", "--listen", &listen, "--data", &copy.display().to_string()]),
        Duration::from_secs(20),
    );
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("belongs to node 2, not node 4"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_clusters_directory_in_a_members_place_is_refused_and_the_cluster_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A one-node cluster of its own, with a key only it has.
    let other_addr = format!("127.0.0.1:{}", free_port());
    let other_data = dir.path().join("other");
    let members = format!("1={other_addr}");
    let other_args = args(&[
        "scheduler",
        "--id",
        "1",
        "--listen",
        &other_addr,
        "--data",
        &other_data.display().to_string(),
        "--initial-cluster",
        &members,
    ]);
    let mut other = Proc::spawn(&other_args, &dir.path().join("other.log"));
    let oc = common::client(vec![other_addr.clone()]);
    wait_for("the other cluster to take a write", Duration::from_secs(20), || async {
        oc.put("only-in-other", b"x".to_vec()).await.ok()
    })
    .await;
    other.kill9();

    let mut sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[2, 3]);
    c.put("k", b"1".to_vec()).await.expect("put");
    sched.terminate(1, Duration::from_secs(10)).expect("node 1 stops");
    let leader = sched.agreed_leader(&[2, 3]).await;
    let term = c.status().await.expect("status").term;

    // Node 1's directory swapped for the other cluster's, started as before.
    std::fs::remove_dir_all(&sched.data[0]).expect("remove node 1's data");
    copy_dir(&other_data, &sched.data[0]);
    let node1 = node1_args(&sched);
    let (code, err) = refused_start(&node1, Duration::from_secs(20));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("belongs to cluster"), "{err}");

    // Started without the flag it runs, but as its own cluster: the
    // members' messages to it are refused, and nothing changes for them.
    let node1: Vec<String> = node1[..node1.len() - 2].to_vec();
    let foreign = Proc::spawn(&node1, &dir.path().join("foreign.log"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..20 {
        c.put(&format!("after/{i}"), b"x".to_vec()).await.expect("the members write on");
    }
    let status = c.status().await.expect("status");
    assert_eq!((status.leader_id, status.term), (leader, term), "no election because of the foreign node");
    assert!(c.get("only-in-other").await.expect("get").is_none(), "nothing of the other cluster came in");
    assert!(foreign.log_text().contains("refused a Raft message from another cluster"), "{}", foreign.log_text());
}

/// The case: node 1's sled database replaced by garbage, then lost
/// altogether. Either way node 1 refuses to start (before, it rejoined as a
/// voter with no record of its vote), at every try; the others write on,
/// and the recovery from `docs/operations/safety.md` brings the cluster back
/// to three voters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_directory_is_refused_at_every_start_and_replaced_by_a_new_member() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[2, 3]);
    for i in 0..50 {
        c.put(&format!("k/{i}"), b"v".to_vec()).await.expect("put");
    }
    sched.terminate(1, Duration::from_secs(10)).expect("node 1 stops");
    let node1 = node1_args(&sched);
    let db = sched.data[0].join("sled").join("db");
    std::fs::write(&db, common::random_bytes(std::fs::metadata(&db).expect("sled/db").len() as usize, 7))
        .expect("garbage over sled/db");
    let (code, err) = refused_start(&node1, Duration::from_secs(20));
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("is damaged") || err.contains("is corrupt"), "{err}");
    std::fs::remove_dir_all(sched.data[0].join("sled")).expect("remove sled");
    for _ in 0..2 {
        let (code, err) = refused_start(&node1, Duration::from_secs(20));
        assert_ne!(code, Some(0), "{err}");
        assert!(err.contains("is damaged: sled holds the log through nothing but it was durable through"), "{err}");
        assert!(err.contains("under a new --id"), "{err}");
    }
    c.put("after", b"1".to_vec()).await.expect("nodes 2 and 3 write on");

    // The recovery: node 1 out, an empty directory in as node 4.
    let endpoints = format!("{},{}", sched.addr(2), sched.addr(3));
    let cli = |list: &[&str]| {
        let out = common::ferry(&[&["--endpoints", endpoints.as_str()][..], list].concat());
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, out) = cli(&["cluster", "remove-node", "--id", "1"]);
    assert_eq!(code, Some(0), "{out}");
    let addr4 = format!("127.0.0.1:{}", free_port());
    let data4 = dir.path().join("s4").display().to_string();
    let _n4 = Proc::spawn(
        &args(&["scheduler", "--id", "4", "--listen", &addr4, "--data", &data4]),
        &dir.path().join("s4.log"),
    );
    let (code, out) = cli(&["cluster", "add-node", "--id", "4", "--addr", &addr4]);
    assert_eq!(code, Some(0), "{out}");
    let members = c.status().await.expect("status").members;
    assert_eq!(
        members.iter().map(|m| (m.id, m.kind.as_str())).collect::<Vec<_>>(),
        [(2, "voter"), (3, "voter"), (4, "voter")]
    );
    let four = common::client(vec![addr4]);
    let value = wait_for("node 4 to serve what was written", Duration::from_secs(20), || async {
        four.get_with("k/49", true).await.ok().flatten().map(|kv| kv.value)
    })
    .await;
    assert_eq!(value, b"v");
}
