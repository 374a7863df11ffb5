//! Three real `ferry scheduler` processes: replicate, lose the leader, keep
//! writing, restart on the old data, and catch a lagging node up through a
//! snapshot. Every wait polls a condition under a deadline.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_sdk::Client;

use common::{ferry, free_port, metric, wait_for, Schedulers};

/// Waits until every node in `ids` has the same applied index and returns
/// their (equal) digests.
async fn converged_digest(c: &Client, cluster: &Schedulers, ids: &[u64]) -> (u64, String) {
    let addrs: Vec<_> = ids.iter().map(|id| cluster.addr(*id)).collect();
    let digests = wait_for("replicas at one applied index", Duration::from_secs(30), || {
        let addrs = addrs.clone();
        async move {
            let mut ds = Vec::new();
            for a in &addrs {
                ds.push(c.state_digest_of(a).await.ok()?);
            }
            ds.windows(2).all(|w| w[0].applied_index == w[1].applied_index).then_some(ds)
        }
    })
    .await;
    for d in &digests[1..] {
        assert_eq!(d.digest, digests[0].digest, "replicas differ at applied index {}", d.applied_index);
        assert_eq!(d.revision, digests[0].revision);
    }
    (digests[0].keys, digests[0].digest.clone())
}

async fn write_keys(clients: &[Client], range: std::ops::Range<u32>) {
    let mut tasks = Vec::new();
    for worker in 0..8u32 {
        let clients = clients.to_vec();
        let range = range.clone();
        tasks.push(tokio::spawn(async move {
            for i in range.filter(|i| i % 8 == worker) {
                let c = &clients[i as usize % clients.len()];
                c.put(&format!("key/{i:05}"), format!("value-{i}").into_bytes()).await.expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
}

/// Every put a client saw acknowledged is still there after all three nodes
/// are killed at once (SIGKILL) and restarted. No snapshot is taken, and sled
/// is not flushed by an append: the entries come back from each node's
/// journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_puts_survive_killing_every_node_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Schedulers::start(dir.path(), &["--snapshot-every", "100000"]);
    let all = cluster.client(&[1, 2, 3]);
    cluster.agreed_leader(&[1, 2, 3]).await;
    write_keys(std::slice::from_ref(&all), 0..300).await;
    for id in 1..=3 {
        cluster.kill9(id);
    }
    for id in 1..=3 {
        cluster.restart(id);
    }
    let (keys, _) = converged_digest(&all, &cluster, &[1, 2, 3]).await;
    assert_eq!(keys, 300, "{}", cluster.logs());
    for i in [0u32, 150, 299] {
        let v = all.get(&format!("key/{i:05}")).await.expect("get").expect("present");
        assert_eq!(v.value, format!("value-{i}").into_bytes());
    }
}

/// The three nodes build their snapshots a third of the interval apart
/// (node `id` at `(id mod 3) * n / 3 + k * n`), not all at the same entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_take_turns_building_snapshots() {
    const EVERY: u64 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Schedulers::start(dir.path(), &["--snapshot-every", &EVERY.to_string()]);
    let all = cluster.client(&[1, 2, 3]);
    cluster.agreed_leader(&[1, 2, 3]).await;
    // One put at a time (one log entry each), in steps of 20 with pauses,
    // so that a node, which looks at its applied index every 100 ms, builds
    // within a step of its point. Until every node has built one.
    let addrs: Vec<String> = (1..=3).map(|id| cluster.addr(id)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut next_key = 0u32;
    let snapshots = loop {
        for _ in 0..20 {
            all.put(&format!("key/{next_key:05}"), b"v".to_vec()).await.expect("put");
            next_key += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut at = Vec::new();
        for a in &addrs {
            let s = all.status_of(a).await.expect("status");
            at.push((s.id, s.snapshot_index));
        }
        if at.iter().all(|(_, index)| *index > 0) {
            break at;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot on every node after {next_key} puts: {at:?}\n{}",
            cluster.logs()
        );
    };
    for (id, index) in &snapshots {
        let phase = (id % 3) * EVERY / 3;
        let into_turn = (index - phase) % EVERY;
        assert!(
            *index >= phase + EVERY && into_turn < EVERY / 3,
            "node {id} built at {index}, not within a third of {EVERY} after its point ({phase} + k * {EVERY}): \
             {snapshots:?}\n{}",
            cluster.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_survive_leader_kill_restart_and_snapshot_catch_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster = Schedulers::start(dir.path(), &["--snapshot-every", "300", "--logs-to-keep", "20"]);
    let all = cluster.client(&[1, 2, 3]);
    let leader = cluster.agreed_leader(&[1, 2, 3]).await;

    // 1000 keys, each written through one specific member (followers forward).
    let pinned: Vec<Client> = (1..=3).map(|id| cluster.client(&[id])).collect();
    write_keys(&pinned, 0..1000).await;
    let (keys, _) = converged_digest(&all, &cluster, &[1, 2, 3]).await;
    assert_eq!(keys, 1000);

    // kill -9 the leader: the other two elect a new one and keep taking writes.
    cluster.kill9(leader);
    let rest: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let survivors = cluster.client(&rest);
    let new_leader = cluster.agreed_leader(&rest).await;
    assert_ne!(new_leader, leader);
    write_keys(std::slice::from_ref(&survivors), 1000..1200).await;
    assert_eq!(survivors.get("key/01199").await.expect("get").expect("present").value, b"value-1199");

    // Restart the killed node on its data directory: it catches up.
    cluster.restart(leader);
    let (keys, digest) = converged_digest(&all, &cluster, &[1, 2, 3]).await;
    assert_eq!(keys, 1200, "{}", cluster.logs());
    let s = all.status_of(&cluster.addr(leader)).await.expect("status");
    assert_eq!(s.members.len(), 3, "a restart must not re-initialize the membership");

    // A follower falls behind a purged log and comes back through a snapshot.
    let current = cluster.agreed_leader(&[1, 2, 3]).await;
    let lagger = (1..=3).find(|id| *id != current).expect("a follower");
    let lag_at = all.status_of(&cluster.addr(lagger)).await.expect("status").last_log_index;
    // It stops at once on SIGTERM, though the leader keeps an AppendEntries
    // stream open to it (the stop would wait for the stream, up to 5 s, if
    // the follower did not end it).
    let stopped = cluster.terminate(lagger, Duration::from_secs(3));
    assert!(stopped.is_some_and(|s| s.success()), "SIGTERM: {stopped:?}\n{}", cluster.logs());
    let up: Vec<u64> = (1..=3).filter(|id| *id != lagger).collect();
    let up_client = cluster.client(&up);
    write_keys(std::slice::from_ref(&up_client), 1200..2000).await;
    let leader_addr = cluster.addr(current);
    wait_for("the leader to purge past the lagging node", Duration::from_secs(30), || {
        let c = up_client.clone();
        let addr = leader_addr.clone();
        async move { (c.status_of(&addr).await.ok()?.purged_index > lag_at).then_some(()) }
    })
    .await;
    cluster.restart(lagger);
    let (keys, new_digest) = converged_digest(&all, &cluster, &[1, 2, 3]).await;
    assert_eq!(keys, 2000, "{}", cluster.logs());
    assert_ne!(new_digest, digest);
    let admin = cluster.admins[(lagger - 1) as usize].clone();
    let installed = metric(&admin, "ferry_raft_snapshots_installed_total").unwrap_or(0.0);
    assert!(installed >= 1.0, "the lagging node must catch up through a snapshot\n{}", cluster.logs());
    let v = cluster.client(&[lagger]).get_with("key/01999", true).await.expect("get").expect("present");
    assert_eq!(v.value, b"value-1999");

    // The CLI shows the same digest for every member.
    let endpoints = cluster.addrs.join(",");
    let out = ferry(&["--endpoints", &endpoints, "--json", "cluster", "digest"]);
    assert!(out.status.success(), "cluster digest: {}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cluster digest --json");
    let members = shown["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{shown}");
    for m in members {
        assert_eq!((m["digest"].as_str(), m["keys"].as_u64()), (Some(new_digest.as_str()), Some(2000)), "{shown}");
    }
}

#[test]
fn bad_flags_exit_2_and_name_the_flag() {
    let out = ferry(&["scheduler", "--id", "1", "--initial-cluster", "1=nohost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--initial-cluster"));

    let out = ferry(&["scheduler", "--id", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));

    let out = ferry(&["scheduler", "--id", "2", "--listen", "127.0.0.1:7999", "--initial-cluster", "1=127.0.0.1:7001"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("initial-cluster"), "{out:?}");

    let out = ferry(&["--endpoints", "nonsense", "config", "get", "k"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoints"));
}

fn wait_child_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Kills the child if the test ends early (a failed assertion).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_single(data: &Path, port: u16) -> KillOnDrop {
    let addr = format!("127.0.0.1:{port}");
    common::command_for(&["scheduler", "--id", "1", "--listen", &addr, "--initial-cluster", &format!("1={addr}")])
        .arg("--data")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(KillOnDrop)
        .expect("spawn")
}

#[tokio::test]
async fn single_node_cli_round_trip_and_locked_data_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let mut first = start_single(dir.path(), port);
    let endpoint = format!("127.0.0.1:{port}");
    let client = Client::connect([endpoint.as_str()], common::security()).expect("client");
    wait_for("a single-node leader", Duration::from_secs(20), || async {
        (client.status().await.ok()?.leader_id == 1).then_some(())
    })
    .await;

    let cli = |args: &[&str]| {
        let mut all = vec!["--endpoints", endpoint.as_str()];
        all.extend_from_slice(args);
        ferry(&all)
    };
    assert!(cli(&["config", "put", "app/color", "blue"]).status.success());
    let out = cli(&["config", "get", "app/color"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "blue\n");
    let out = cli(&["--json", "config", "get", "app/color"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["value"], "blue");
    assert_eq!(v["version"], 1);
    // A dead endpoint first in the list: the client moves on to the live one.
    let both = format!("127.0.0.1:{},{endpoint}", free_port());
    let out = ferry(&["--endpoints", &both, "config", "get", "app/color"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "blue\n", "{out:?}");
    let out = cli(&["config", "get", "app/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "not found");
    let big = "x".repeat(5000);
    let out = cli(&["config", "put", &big, "v"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("key: must be at most 4096 bytes"));
    let out = cli(&["--json", "config", "list", "app/"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(1), "the rejected put changed nothing");

    // A second scheduler on the same data directory is refused, not corrupted.
    let mut second = start_single(dir.path(), free_port());
    let status = wait_child_exit(&mut second.0, Duration::from_secs(10)).expect("second node must exit");
    assert!(!status.success());
    let mut err = String::new();
    second.0.stderr.take().expect("stderr").read_to_string(&mut err).expect("read");
    assert!(err.contains("in use by another running process"), "{err}");
    assert_eq!(client.get("app/color").await.expect("get").expect("present").value, b"blue");

    // SIGTERM stops it gracefully.
    let pid = first.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    let status = wait_child_exit(&mut first.0, Duration::from_secs(10)).expect("graceful exit");
    assert!(status.success(), "{status:?}");
}

/// The soft and hard open files limits of process `pid`.
fn open_files_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.split_whitespace().skip(3);
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

#[test]
fn daemons_lift_their_open_files_limit_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let schedulers = format!("127.0.0.1:{}", free_port());
    let mut cmd =
        common::command_for(&["worker", "--name", "w1", "--listen", "127.0.0.1:0", "--schedulers", &schedulers]);
    cmd.arg("--data")
        .arg(tmp.path().join("data"))
        .arg("--allow-root")
        .arg(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setrlimit is async-signal-safe and touches only the rlimit on the stack.
    unsafe {
        cmd.pre_exec(|| {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Started as a service manager would: a low soft limit.
            limit.rlim_cur = limit.rlim_max.min(256);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // What the worker should raise its soft limit to, given the hard one.
    let wanted = |hard: &str| if hard == "unlimited" { (1u64 << 20).to_string() } else { hard.to_string() };
    let mut child = cmd.spawn().expect("spawn worker");
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        last = open_files_limits(pid);
        if last.as_ref().is_some_and(|(soft, hard)| *soft == wanted(hard)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let (soft, hard) = last.expect("limits of the worker");
    assert_eq!(soft, wanted(&hard), "the worker's soft limit (hard: {hard})");
}

/// `cluster add-node` with the CLI's defaults: a node nothing runs for is
/// refused and leaves the membership as it was; a real one becomes a voter
/// once it has caught up. Removed again, it notices, stops Raft and turns
/// clients away instead of answering from a state that no longer moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_only_once_caught_up_and_a_removed_node_turns_clients_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[1, 2, 3]);
    c.put("before", b"1".to_vec()).await.expect("put");
    let endpoints = sched.addrs.join(",");
    let cli = |args: &[&str]| {
        let out = ferry(&[&["--endpoints", endpoints.as_str()][..], args].concat());
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // Nothing listens there: refused, and the membership is as it was.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let (code, _, err) = cli(&["cluster", "add-node", "--id", "4", "--addr", &nowhere]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("received nothing") && err.contains("not added"), "{err}");
    let members = c.status().await.expect("status").members;
    assert_eq!(
        members.iter().map(|m| (m.id, m.kind.as_str())).collect::<Vec<_>>(),
        [(1, "voter"), (2, "voter"), (3, "voter")]
    );

    // A real fourth node.
    let addr4 = format!("127.0.0.1:{}", free_port());
    let data4 = dir.path().join("s4");
    let args: Vec<String> = ["scheduler", "--id", "4", "--listen", &addr4, "--data", &data4.display().to_string()]
        .map(String::from)
        .to_vec();
    let _n4 = common::Proc::spawn(&args, &dir.path().join("s4.log"));
    let (code, out, err) = cli(&["cluster", "add-node", "--id", "4", "--addr", &addr4]);
    assert_eq!(code, Some(0), "{out}{err}");
    let four = Client::connect(vec![addr4.clone()], common::security()).expect("client of node 4");
    wait_for("node 4 to serve a read", Duration::from_secs(20), || async {
        four.get_with("before", true).await.ok().flatten().map(|kv| kv.value)
    })
    .await;

    let (code, out, err) = cli(&["cluster", "remove-node", "--id", "4"]);
    assert_eq!(code, Some(0), "{out}{err}");
    c.put("after", b"2".to_vec()).await.expect("the three write on");
    let only4 = |args: &[&str]| {
        let out = ferry(&[&["--endpoints", addr4.as_str(), "--timeout", "2s"][..], args].concat());
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let err = wait_for("node 4 to turn clients away", Duration::from_secs(30), || async {
        let (code, err) = only4(&["worker", "list"]);
        (code != Some(0) && err.contains("removed from the cluster")).then_some(err)
    })
    .await;
    assert!(err.contains("node 4"), "{err}");
    let (code, err) = only4(&["config", "get", "before", "--serializable"]);
    assert_ne!(code, Some(0), "no stale reads from a removed node: {err}");
}

/// Found by `ferry-chaos run leader-kill-cas` (100 leader kills): a leader
/// killed and restarted before the others' election timeout came back as
/// the leader of its old term (openraft restores a committed vote for
/// itself) with a commit index older than the cluster's (it is not synced),
/// and answered linearizable reads from that older state. A restarted node
/// now starts as a follower, as etcd's do: its reads wait for a leader's
/// commit index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_at_once_serves_no_stale_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Elections slow enough that the restart always comes first.
    let mut cluster = Schedulers::start(dir.path(), &["--election-timeout-min", "3s", "--election-timeout-max", "5s"]);
    let leader = cluster.agreed_leader(&[1, 2, 3]).await;
    let term = cluster.client(&[1, 2, 3]).status().await.expect("status").term;
    let pinned = cluster.client(&[leader]);
    for i in 0..300 {
        pinned.put("k", i.to_string().into_bytes()).await.expect("put");
    }
    cluster.kill9(leader);
    cluster.restart(leader);
    let read = wait_for("the restarted node to answer a read", Duration::from_secs(30), || async {
        cluster.client(&[leader]).get("k").await.ok().flatten()
    })
    .await;
    assert_eq!(read.value, b"299", "a linearizable read after the restart saw an older value");
    let now = cluster.client(&[1, 2, 3]).status().await.expect("status");
    assert!(now.term > term, "an election happened after the restart (term {term} -> {})", now.term);
}
