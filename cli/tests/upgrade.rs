//! A data directory written by an older ferry starts under this one with
//! its data intact: the fixture `fixtures/data-format-3.tar.gz` holds a
//! one-node cluster of data format 3 (registry instances stored as
//! protobuf), made by `fixtures/make-data-format-3.sh` with the release
//! build of commit c9ab334. Its state is partly in a snapshot file and
//! partly in the log after it.

mod common;

use std::time::Duration;

use common::*;

fn json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let (code, text) = ferry_at(endpoint, &[&["--json"], args].concat());
    assert_eq!(code, 0, "ferry {args:?}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ferry {args:?}: {e}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_3_data_directory_starts_with_every_key_lease_instance_job_and_probe() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data-format-3.tar.gz");
    let untar = std::process::Command::new("tar").args(["-xzf", fixture, "-C"]).arg(dir.path()).status();
    assert!(untar.is_ok_and(|s| s.success()), "tar -xzf {fixture}");
    let data = dir.path().join("data");
    // The node restarts on its data (no --initial-cluster): a new port is
    // fine for a single node.
    let ep = format!("127.0.0.1:{}", free_port());
    let args: Vec<String> =
        ["scheduler", "--id", "1", "--listen", &ep, "--data", &data.display().to_string()].map(String::from).to_vec();
    let node = Proc::spawn(&args, &dir.path().join("scheduler.log"));
    let c = client(vec![ep.clone()]);
    wait_for("the upgraded node to lead", Duration::from_secs(30), || async {
        c.status().await.ok().filter(|s| s.leader_id == 1).map(|_| ())
    })
    .await;
    assert!(node.log_text().contains("upgrading the data directory"), "{}", node.log_text());

    // Keys, their history, a gray variant.
    assert_eq!(ferry_at(&ep, &["config", "get", "app/color"]), (0, "green\n".into()));
    assert_eq!(ferry_at(&ep, &["config", "get", "app/limit"]), (0, "20\n".into()));
    let (code, history) = ferry_at(&ep, &["--json", "config", "history", "app/color"]);
    assert_eq!(code, 0, "{history}");
    let values: Vec<String> = history
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON event a line"))
        .filter_map(|e| e["value"].as_str().map(str::to_string))
        .collect();
    assert_eq!(values, ["blue", "green"]);
    let variants = ferry_at(&ep, &["config", "gray", "list", "app/color"]);
    assert_eq!(variants, (0, "zone=a red\n".into()));

    // The lease and its key.
    let (_, lease) = ferry_at(&ep, &["config", "get", "fixture/lease"]);
    let ttl = json(&ep, &["lease", "ttl", lease.trim()]);
    assert_eq!(ttl["ttl_ms"], 86_400_000, "{ttl}");
    assert_eq!(ttl["keys"], serde_json::json!(["session/alive"]), "{ttl}");

    // Registry instances, from the snapshot (w1) and from the log after it
    // (a1), read through the registry and stored as JSON from now on.
    let web = c.instances("web").await.expect("list web");
    assert_eq!(web.instances.len(), 1, "{web:?}");
    let w1 = &web.instances[0];
    assert_eq!((w1.id.as_str(), w1.address.as_str(), w1.port, w1.version.as_str()), ("w1", "10.0.0.1", 80, "v1"));
    assert_eq!((w1.labels.get("zone"), w1.metadata.get("team")), (Some(&"a".into()), Some(&"edge".into())));
    let api = c.instances("api").await.expect("list api");
    assert!(api.instances.len() == 1 && api.instances[0].gray, "{api:?}");
    let (_, raw) = ferry_at(&ep, &["config", "get", "registry/web/w1"]);
    let stored: serde_json::Value = serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{e}: {raw:?}"));
    assert_eq!(stored["address"], "10.0.0.1");
    // w2 was deregistered explicitly: its history says so.
    let h = c.history("registry/web/w2", 0).await.expect("history");
    let marked = h.events.iter().filter_map(|e| e.kv.as_ref()).any(|kv| marked_deregistered(&kv.value));
    assert!(marked, "w2's history keeps its deregistration: {h:?}");

    // The finished job and the probe.
    let jobs = json(&ep, &["job", "list"]);
    let jobs = jobs.as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["state"], "succeeded");
    assert_eq!(jobs[0]["targets"][0]["state"], "installed");
    assert_eq!(jobs[0]["total_bytes"], 3_000_000);
    let (code, probes) = ferry_at(&ep, &["--json", "probe", "list"]);
    assert_eq!(code, 0, "{probes}");
    let probe: serde_json::Value = serde_json::from_str(probes.trim()).expect("one probe, one JSON line");
    assert_eq!(probe["name"], "cdn", "{probe}");

    // And it takes writes: a key, an instance.
    assert_eq!(ferry_at(&ep, &["config", "put", "app/limit", "30"]).0, 0);
    assert_eq!(ferry_at(&ep, &["config", "get", "app/limit"]), (0, "30\n".into()));
    let mut i = ferry_sdk::pb::Instance { service: "web".into(), id: "w9".into(), ..Default::default() };
    (i.address, i.port) = ("10.0.0.9".into(), 80);
    c.register(i, Duration::from_secs(60)).await.expect("register");
    assert_eq!(c.instances("web").await.expect("list").instances.len(), 2);
}
