//! The CLI at its edges, against three real scheduler processes, bad input
//! first: a refused watch ends, text output cannot be spoofed, a closed pipe
//! ends quietly, large values go in from stdin or a file, listings and
//! watches of any size arrive, lease ids survive JSON, and a message that is
//! not valid protobuf is the caller's fault. Writes go to one member, reads
//! to another.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{ferry, random_bytes, Schedulers};

/// `ferry --endpoints ENDPOINT ARGS` with `stdin`: exit code, stdout bytes, stderr.
fn run(endpoint: &str, args: &[&str], stdin: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    let mut child = common::command()
        .args(["--endpoints", endpoint])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("ferry output");
    let _ = writer.join();
    (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits up to `timeout` for `child` to exit and returns its code; kills it
/// and panics if it does not.
fn exits_within(child: &mut std::process::Child, timeout: Duration, what: &str) -> Option<i32> {
    common::exit_code_within(child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("{what} still running after {timeout:?}");
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_at_its_edges_refuses_clearly_and_prints_safely() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let (one, two) = (sched.addr(1), sched.addr(2));

    // A zero deadline is refused before anything is sent (global flag,
    // also where `job submit` takes it).
    let (code, _, err) = run(&one, &["--timeout", "0s", "config", "put", "zero", "x"], b"");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--timeout"), "{err}");
    let (code, _, err) = run(
        &one,
        &["job", "submit", "--timeout", "0s", "--source", "w1", "--file", "/etc/hostname", "--dest", "h"],
        b"",
    );
    assert_eq!(code, Some(2), "{err}");
    let (code, _, _) = run(&two, &["config", "get", "zero"], b"");
    assert_eq!(code, Some(1), "nothing was written");
    let (_, jobs, _) = run(&two, &["--json", "job", "list"], b"");
    assert!(!text(&jobs).contains("\"job_id\""), "no job was submitted: {}", text(&jobs));

    // A watch the cluster refuses (a prefix over 4096 bytes) ends with exit 2.
    let long = "p".repeat(5000);
    let mut watch = common::command()
        .args(["--endpoints", &one, "config", "watch", &long])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    assert_eq!(exits_within(&mut watch, Duration::from_secs(20), "a refused watch"), Some(2));
    let mut err = String::new();
    watch.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    assert!(err.contains("prefix"), "the error names the field: {err}");

    // Values from stdin and from a file, bad ones first.
    let (code, _, err) = run(&one, &["config", "put", "big", "--file", "/nonexistent/value"], b"");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--file"), "{err}");
    let (code, _, err) = run(&one, &["config", "put", "big", "-"], &vec![b'x'; 1024 * 1024 + 1]);
    assert_eq!(code, Some(2), "a value over 1 MiB is bad input: {err}");
    let (code, _, err) = run(&one, &["config", "put", "big", "v", "--file", "/etc/hostname"], b"");
    assert_eq!(code, Some(2), "{err}");
    let (code, _, _) = run(&two, &["config", "get", "big"], b"");
    assert_eq!(code, Some(1), "nothing was written");
    // 900 KiB of every byte value: far over what one shell argument takes.
    let binary = random_bytes(900 * 1024, 7);
    let (code, _, err) = run(&one, &["config", "put", "big", "-"], &binary);
    assert_eq!(code, Some(0), "{err}");
    let (code, got, _) = run(&two, &["config", "get", "big"], b"");
    assert_eq!(code, Some(0));
    assert_eq!(got.len(), binary.len() + 1, "the value as is, then a newline");
    assert!(got.starts_with(&binary), "config get into a pipe gives the value byte for byte");
    let file = dir.path().join("value.bin");
    std::fs::write(&file, &binary[..1000]).expect("write value file");
    let (code, _, err) = run(&one, &["config", "put", "from-file", "--file", file.to_str().expect("path")], b"");
    assert_eq!(code, Some(0), "{err}");
    let (_, got, _) = run(&two, &["config", "get", "from-file"], b"");
    assert_eq!(&got[..1000], &binary[..1000]);

    // Keys and values with control characters cannot fake a line or reach
    // the terminal; JSON keeps them exact.
    let sneaky = "a\nfake/key=spoofed";
    let (code, _, err) = run(&one, &["config", "put", sneaky, "v\u{1b}[2J"], b"");
    assert_eq!(code, Some(0), "{err}");
    let (_, listed, _) = run(&two, &["config", "list", "a"], b"");
    let listed = text(&listed);
    assert_eq!(listed.lines().count(), 1, "one key, one line: {listed:?}");
    assert!(!listed.lines().any(|l| l.starts_with("fake/key")), "{listed:?}");
    assert!(!listed.contains('\u{1b}'), "{listed:?}");
    assert!(listed.contains("a\\nfake/key=spoofed=v\\u{1b}[2J"), "{listed:?}");
    let (_, json, _) = run(&two, &["--json", "config", "list", "a"], b"");
    let json: serde_json::Value = serde_json::from_slice(&json).expect("json");
    assert_eq!(json[0]["key"], sneaky);

    // Lease ids are strings in JSON (they are 64-bit) and work as given.
    let (code, granted, err) = run(&one, &["--json", "lease", "grant", "30s"], b"");
    assert_eq!(code, Some(0), "{err}");
    let granted: serde_json::Value = serde_json::from_slice(&granted).expect("json");
    let id = granted["id"].as_str().expect("the lease id is a JSON string").to_string();
    let (code, ttl, err) = run(&two, &["--json", "lease", "ttl", &id], b"");
    assert_eq!(code, Some(0), "{err}");
    let ttl: serde_json::Value = serde_json::from_slice(&ttl).expect("json");
    assert_eq!(ttl["id"].as_str(), Some(id.as_str()));

    // A closed pipe ends a listing quietly (more than a pipe buffer of it).
    let c = sched.client(&[1]);
    for i in 0..40 {
        c.put(&format!("many/{i:03}"), vec![b'v'; 4000]).await.expect("put");
    }
    let mut list = common::command()
        .args(["--endpoints", &two, "config", "list", "many/"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn list");
    let mut first = String::new();
    BufReader::new(list.stdout.take().expect("stdout")).read_line(&mut first).expect("read one line");
    assert!(first.starts_with("many/000="), "{first}");
    // The reader is gone now (dropped above).
    let code = exits_within(&mut list, Duration::from_secs(20), "a listing into a closed pipe");
    let mut err = String::new();
    list.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_and_a_watch_over_seventy_mib_arrive_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[1, 2, 3]);
    // 70 values of 1 MiB: more than one response may carry (64 MiB).
    let n = 70;
    let mut first_revision = 0;
    for i in 0..n {
        let value = vec![b'a' + (i % 26) as u8; 1024 * 1024];
        let p = c.put(&format!("big/{i:03}"), value).await.expect("put 1 MiB");
        if i == 0 {
            first_revision = p.revision;
        }
    }
    let other = sched.addr(3);

    let out = ferry(&["--endpoints", &other, "config", "list", "big/"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<&[u8]> = out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), n, "every key once");
    for (i, line) in lines.iter().enumerate() {
        let key = format!("big/{i:03}=");
        assert!(line.starts_with(key.as_bytes()), "key order");
        assert_eq!(line.len(), key.len() + 1024 * 1024);
    }

    // A watch from the first revision replays them all, promptly.
    let mut watch = common::command()
        .args(["--endpoints", &other, "config", "watch", "big/", "--rev", &first_revision.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn watch");
    let stdout = watch.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = 0;
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            if line.windows(4).any(|w| w == b" PUT") {
                seen += 1;
            }
            if seen == n {
                break;
            }
        }
        seen
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = watch.kill();
    let _ = watch.wait();
    let seen = reader.join().expect("reader");
    assert_eq!(seen, n, "every change replayed within 60 s");
}

/// A `PutRequest` whose key is raw bytes: what a client in another language
/// can send, including bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPut {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_utf8_is_invalid_argument_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", sched.addr(leader))).expect("endpoint");
    let channel = ferry_sdk::tls::client::connect(endpoint, &common::security(), ferry_sdk::tls::Role::Scheduler)
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/ferry.v1.ConfigService/Put");
    let request = tonic::Request::new(RawPut { key: vec![b'k', 0xff, 0xfe], value: b"v".to_vec() });
    let codec = ferry_proto::codec::FerryCodec::<RawPut, ferry_proto::pb::PutResponse>::default();
    let status = grpc.unary(request, path, codec).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let c = sched.client(&[1, 2, 3]);
    let status = c.status().await.expect("status");
    assert_eq!(status.revision, 0, "nothing was written");
}
