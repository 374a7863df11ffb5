//! Probes over real processes: a 3-scheduler cluster, a worker running the
//! probe against two local HTTP servers of different speeds (and a closed
//! port), the ranking, the rendered file and its hook, staleness and the
//! alert webhook, and bad definitions.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ferry, free_port, wait_for, Schedulers, WorkerProc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What one local HTTP server saw: the request heads it answered.
type Seen = Arc<Mutex<Vec<String>>>;

/// Accepts connections on a fresh loopback port and runs `handle` on each,
/// with the log of what the server saw.
async fn serve<F, Fut>(handle: F) -> (String, Seen)
where
    F: Fn(TcpStream, Seen) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(handle(conn, log.clone()));
        }
    });
    (addr, seen)
}

/// Serves a `size`-byte body after `delay` to every request; records heads.
async fn object_server(size: usize, delay: Duration) -> (String, Seen) {
    serve(move |mut conn, log| async move {
        let head = read_head(&mut conn).await;
        log.lock().expect("lock").push(head);
        tokio::time::sleep(delay).await;
        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
        let _ = conn.write_all(reply.as_bytes()).await;
        let _ = conn.write_all(&vec![b'x'; size]).await;
    })
    .await
}

async fn read_head(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut byte).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&byte[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Answers every request with 200 and records what was POSTed.
async fn alert_receiver() -> (String, Seen) {
    serve(|mut conn, log| async move {
        let mut request = read_head(&mut conn).await;
        let mut rest = vec![0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut rest)).await {
            request.push_str(&String::from_utf8_lossy(&rest[..n]));
        }
        log.lock().expect("lock").push(request);
        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    })
    .await
}

/// `ferry --endpoints E --json ARGS`, parsed as one JSON value per line.
fn json_lines(endpoints: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--endpoints", endpoints, "--json"];
    all.extend_from_slice(args);
    let out = ferry(&all);
    assert_eq!(out.status.code(), Some(0), "ferry {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect()
}

fn hook_runs(dir: &std::path::Path) -> usize {
    std::fs::read_to_string(dir.join("w1").join("hook.log")).map(|s| s.lines().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_ranks_two_servers_by_speed_renders_once_and_alerts_when_stale() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Alerts may go to loopback only; w1 may download from loopback only.
    let sched = Schedulers::start(dir.path(), &["--callback-host", "127.0.0.1"]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let mut w1 =
        WorkerProc::start(dir.path(), "w1", &sched.addrs, &["--labels", "zone=a", "--fetch-host", "127.0.0.1"]);
    common::workers_up(&sched.client(&[1, 2, 3]), &["w1"]).await;

    let (fast, fast_seen) = object_server(256 * 1024, Duration::ZERO).await;
    let (slow, _) = object_server(256 * 1024, Duration::from_millis(400)).await;
    let closed = format!("127.0.0.1:{}", free_port());
    let (alert, alerts) = alert_receiver().await;
    let output = w1.root.join("relays.txt");
    let (slow_url, fast_url, closed_url) =
        (format!("http://{slow}/obj"), format!("http://{fast}/obj"), format!("http://{closed}/obj"));

    // Bad definitions are refused with the field named, and change nothing.
    let refused = |args: &[&str], field: &str| {
        let mut all = vec!["--endpoints", endpoints.as_str(), "probe", "define", "bad"];
        all.extend_from_slice(args);
        let out = ferry(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    };
    refused(&["--target", "ftp://10.0.0.1/obj"], "targets[0].url");
    refused(&["--target", &fast_url, "--alert", "http://169.254.169.254/latest"], "alert_url: host '169.254.169.254'");
    refused(&["--target", &fast_url, "--interval", "10ms"], "interval");
    refused(&["--target", &fast_url, "--output", "/etc/relays.txt"], "output.path");
    let inside = output.display().to_string();
    refused(&["--target", &fast_url, "--output", &inside, "--hook", "nope"], "output.hook");
    assert!(json_lines(&endpoints, &["probe", "list"]).is_empty(), "nothing was defined");

    // The slow server is listed first: the ranking has to reorder.
    let target = |url: &str| format!("{url}@cdn.example");
    let out = ferry(&[
        "--endpoints",
        &endpoints,
        "probe",
        "define",
        "relays",
        "--target",
        &target(&slow_url),
        "--target",
        &target(&fast_url),
        "--target",
        &closed_url,
        "--interval",
        "2s",
        "--selector",
        "zone=a",
        "--output",
        &inside,
        "--template",
        "{rank} {url}",
        "--hook",
        "reload",
        "--stale-after",
        "6s",
        "--alert",
        &format!("http://{alert}/alerts"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    let want = format!("1 {fast_url}\n2 {slow_url}\n3 {closed_url}\n");
    wait_for("the ranking file", Duration::from_secs(30), || async {
        (std::fs::read_to_string(&output).ok()? == want).then_some(())
    })
    .await;
    let best = json_lines(&endpoints, &["probe", "best", "relays"]);
    let ranking = best[0]["ranking"].as_array().expect("ranking");
    let urls: Vec<&str> = ranking.iter().map(|r| r["url"].as_str().unwrap_or_default()).collect();
    assert_eq!(urls, vec![fast_url.as_str(), slow_url.as_str(), closed_url.as_str()]);
    assert!(ranking[1]["total_ms"].as_f64().unwrap_or(0.0) >= 400.0, "{ranking:?}");
    assert_eq!(ranking[0]["bytes"].as_u64(), Some(256 * 1024));
    assert!(ranking[2]["errors"].as_u64() >= Some(1) && ranking[2]["ok"].as_u64() == Some(0), "{ranking:?}");
    let mine = json_lines(&endpoints, &["probe", "best", "relays", "--worker", "w1"]);
    assert_eq!(mine[0]["ranking"][0]["url"].as_str(), Some(fast_url.as_str()));
    assert!(
        fast_seen.lock().expect("lock").iter().all(|h| h.to_ascii_lowercase().contains("host: cdn.example")),
        "the Host header was sent"
    );
    let results = json_lines(&endpoints, &["probe", "results", "relays"]);
    assert_eq!(results.len(), 3, "{results:?}");
    assert!(results.iter().all(|r| r["worker"] == "w1"));

    // More rounds with the same ranking: the file is not rewritten and the
    // hook ran once.
    let runs_before = fast_seen.lock().expect("lock").len();
    wait_for("three more rounds", Duration::from_secs(15), || async {
        (fast_seen.lock().ok()?.len() >= runs_before + 3).then_some(())
    })
    .await;
    assert_eq!(hook_runs(dir.path()), 1, "rendered once, hook ran once");
    assert_eq!(std::fs::read_to_string(&output).expect("file"), want);
    let status = json_lines(&endpoints, &["probe", "status"]);
    assert_eq!(status[0]["stale"], false, "{status:?}");
    assert!(alerts.lock().expect("lock").is_empty());

    // The worker goes away: results stop, the probe turns stale, the alert
    // webhook gets a POST naming it.
    w1.proc.kill9();
    wait_for("the probe to turn stale", Duration::from_secs(20), || async {
        let status = json_lines(&endpoints, &["probe", "status"]);
        (status[0]["stale"] == true).then_some(())
    })
    .await;
    let text = ferry(&["--endpoints", &endpoints, "probe", "status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("relays: STALE (no results for"));
    wait_for("the stale alert", Duration::from_secs(15), || async {
        let alerts = alerts.lock().ok()?;
        alerts.iter().any(|a| a.starts_with("POST /alerts") && a.contains("\"probe\":\"relays\"")).then_some(())
    })
    .await;

    // Deleting it removes definition and results.
    let out = ferry(&["--endpoints", &endpoints, "probe", "delete", "relays"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(json_lines(&endpoints, &["probe", "list"]).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_downloads_only_from_hosts_its_own_config_allows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    // w2 allows 10.0.0.0/8 only: the loopback server is not for it.
    let _w2 = WorkerProc::start(dir.path(), "w2", &sched.addrs, &["--labels", "zone=b", "--fetch-host", "10.0.0.0/8"]);
    common::workers_up(&sched.client(&[1, 2, 3]), &["w2"]).await;
    let (server, seen) = object_server(1024, Duration::ZERO).await;
    let url = format!("http://{server}/obj");
    let out = ferry(&["--endpoints", &endpoints, "probe", "define", "inside", "--target", &url, "--interval", "1s"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let results = wait_for("w2's result", Duration::from_secs(20), || async {
        let r = json_lines(&endpoints, &["probe", "results", "inside"]);
        (!r.is_empty()).then_some(r)
    })
    .await;
    let error = results[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("url: host '127.0.0.1' is not in fetch_hosts"), "{results:?}");
    assert!(seen.lock().expect("lock").is_empty(), "no request was made");
}
