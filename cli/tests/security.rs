//! Mutual TLS over real processes: who gets in, who is refused, and
//! certificates rotated on disk while a job and config writes run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_sdk::pb;
use ferry_sdk::tls::{client::ClientConn, Authority, Credentials, Files, Identity, Role};
use ferry_sdk::Security;
use tonic::transport::Endpoint;
use tower::Service;

/// `ferry ARGS` with exactly `env` for TLS (nothing of the user's): exit
/// code and stdout + stderr.
fn ferry_with(env: &[(&str, String)], args: &[&str]) -> (i32, String) {
    let out =
        std::process::Command::new(FERRY).args(args).envs(env.iter().map(|(k, v)| (*k, v))).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn env_of(f: &Files) -> Vec<(&'static str, String)> {
    f.env().into_iter().map(|(k, v)| (k, v.to_string_lossy().into_owned())).collect()
}

/// A channel to `addr`, a server of `role`, as `security` says.
async fn channel(addr: &str, security: &Security, role: Role) -> tonic::transport::Channel {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    ferry_sdk::tls::client::connect(endpoint, security, role).await.expect("connect")
}

fn creds(identity: &Identity) -> Security {
    Security::Tls(Credentials::load(files(identity)).expect("credentials"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_clusters_certificate_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let endpoints = sched.addrs.join(",");
    let put = ["--endpoints", &endpoints, "--timeout", "3s", "config", "put", "k", "v"];

    // Nothing said: the CLI names what is missing, bad input.
    let (code, text) = ferry_with(&[], &put);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("tls-ca: not set"), "{text}");

    // Plaintext against a TLS cluster: no connection.
    let (code, text) = ferry_with(&[("FERRY_INSECURE", "true".into())], &put);
    assert_eq!(code, 1, "{text}");

    // A certificate of another CA (trusting our CA): the server refuses it.
    let other = Authority::new("other").expect("CA");
    let foreign = other.write_holder(&dir.path().join("other"), &Identity::User("test".into()), &[]).expect("issue");
    let mixed = Files { ca: files(&user()).ca, ..foreign };
    let (code, text) = ferry_with(&env_of(&mixed), &put);
    assert_eq!(code, 1, "{text}");

    // An expired certificate of our CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = test_ca()
        .ca
        .issue_between(&Identity::User("old".into()), &[], now - time::Duration::days(2), now - time::Duration::days(1))
        .expect("issue");
    let old = Files { ca: files(&user()).ca, cert: dir.path().join("old.pem"), key: dir.path().join("old-key.pem") };
    std::fs::write(&old.cert, expired.cert_pem).expect("write");
    std::fs::write(&old.key, expired.key_pem).expect("write");
    let (code, text) = ferry_with(&env_of(&old), &put);
    assert_eq!(code, 1, "{text}");

    // A daemon never takes the CLI's variables for its own credentials.
    let data = dir.path().join("s9").display().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let daemon = ["scheduler", "--id", "9", "--data", &data, "--listen", &listen];
    for env in [env_of(&files(&user())), vec![("FERRY_INSECURE", "true".to_string())]] {
        let (code, text) = ferry_with(&env, &daemon);
        assert_eq!(code, 2, "{env:?}: {text}");
        assert!(text.contains("tls-ca: not set"), "{text}");
    }

    // None of them wrote: the key is not there, read from another member.
    let (code, text) = ferry_at(&sched.addr(3), &["config", "get", "k"]);
    assert_eq!(code, 1, "{text}");
    let (code, text) = ferry_at(&sched.addr(2), &["config", "put", "k", "v"]);
    assert_eq!(code, 0, "the user with a certificate of the cluster's CA writes: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_schedulers_speak_raft_workers_hold_only_their_own_name_and_only_workers_fetch_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    let leader = sched.agreed_leader(&[1, 2, 3]).await;
    let w1 = WorkerProc::start(dir.path(), "w1", &sched.addrs, &[]);
    let c = sched.client(&[1, 2, 3]);
    workers_up(&c, &["w1"]).await;

    // A user's certificate cannot send Raft messages.
    let user = creds(&user());
    let mut raft =
        pb::raft_service_client::RaftServiceClient::new(channel(&sched.addr(leader), &user, Role::Scheduler).await);
    let err = raft.vote(pb::RaftPayload::default()).await.expect_err("a user is no scheduler");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("only schedulers speak Raft; this is user test"), "{err:?}");

    // Worker w1's certificate cannot open a session as w2, nor can a user's.
    let hello = |name: &str| pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Hello(pb::WorkerInfo {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
            roots: vec!["/nonexistent".into()],
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: ferry_proto::PROTOCOL,
            ..Default::default()
        })),
    };
    for (who, name) in [(Identity::Worker("w1".into()), "w2"), (common::user(), "w2")] {
        let security = creds(&who);
        let mut workers = pb::worker_service_client::WorkerServiceClient::new(
            channel(&sched.addr(leader), &security, Role::Scheduler).await,
        );
        let opened = workers.session(tokio_stream::iter([hello(name)])).await;
        let err = opened.err().unwrap_or_else(|| panic!("{who} opened a session as {name}"));
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains(&format!("names {who}, not worker {name}")), "{err:?}");
    }
    let listed = c.list_workers().await.expect("list");
    assert!(listed.iter().all(|w| w.info.as_ref().is_some_and(|i| i.name == "w1")), "no w2 registered: {listed:?}");

    // A user's certificate cannot fetch chunks from a worker; a worker's can
    // ask (and hears the chunk is not there).
    let w1_addr = listed[0].info.as_ref().expect("info").addr.clone();
    let get = pb::GetChunkRequest { hash: vec![7; 32], len: 1, job_id: String::new() };
    let mut chunks = pb::chunk_service_client::ChunkServiceClient::new(channel(&w1_addr, &user, Role::Worker).await);
    let err = chunks.get_chunk(get.clone()).await.expect_err("a user is no worker");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let peer = creds(&Identity::Worker("w9".into()));
    let mut chunks = pb::chunk_service_client::ChunkServiceClient::new(channel(&w1_addr, &peer, Role::Worker).await);
    match chunks.get_chunk(get).await {
        Ok(mut stream) => {
            let err = stream.get_mut().message().await.expect_err("no such chunk");
            assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        }
        Err(err) => assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}"),
    }

    // A scheduler's address answers only as a scheduler: a client expecting
    // a worker there refuses it in the handshake.
    let endpoint = Endpoint::from_shared(format!("http://{}", sched.addr(leader))).expect("endpoint");
    assert!(ferry_sdk::tls::client::connect(endpoint, &user, Role::Worker).await.is_err(), "a scheduler is no worker");

    // A worker started with another worker's certificate refuses to start.
    let w1_files = files(&Identity::Worker("w1".into()));
    let (code, text) = ferry_at(
        &sched.addrs.join(","),
        &[
            "worker",
            "--name",
            "w2",
            "--data",
            &dir.path().join("w2-data").display().to_string(),
            "--allow-root",
            &w1.root.display().to_string(),
            "--tls-ca",
            &w1_files.ca.display().to_string(),
            "--tls-cert",
            &w1_files.cert.display().to_string(),
            "--tls-key",
            &w1_files.key.display().to_string(),
        ],
    );
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("tls-cert: names worker w1, but this is worker w2"), "{text}");
}

/// The days left in the `CERT` column of `ferry cluster status` (`364d left`).
fn days_left(status: &str) -> Vec<i64> {
    status
        .lines()
        .filter_map(|l| l.split_once("d left").map(|(before, _)| before))
        .filter_map(|before| before.rsplit(' ').next().and_then(|n| n.parse().ok()))
        .collect()
}

/// The certificate a fresh TLS connection to `addr` is shown.
async fn presented(addr: &str, role: Role) -> Vec<u8> {
    let mut connector = ferry_sdk::tls::Connector::new(ferry_sdk::tls::client::tcp(), creds(&user()), role);
    let conn = connector.call(format!("http://{addr}").parse().expect("uri")).await.expect("handshake");
    match conn.into_inner() {
        ClientConn::Tls(tls, ()) => tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec(),
        ClientConn::Plain(..) => panic!("plaintext"),
    }
}

fn der(path: &std::path::Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path).expect("PEM").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotated_on_disk_during_a_job_and_config_writes_fail_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sched = Schedulers::start(dir.path(), &[]);
    sched.agreed_leader(&[1, 2, 3]).await;
    let c = sched.client(&[1, 2, 3]);
    let src = WorkerProc::start(dir.path(), "rsrc", &sched.addrs, &[]);
    // The target pulls at 4 MiB/s: the 32 MB job runs about 8 s.
    let t = WorkerProc::start(dir.path(), "rt", &sched.addrs, &["--download-limit", "4MiB/s"]);
    workers_up(&c, &["rsrc", "rt"]).await;
    std::fs::write(src.root.join("big.bin"), random_bytes(32_000_000, 27)).expect("write");

    // Config writes through the whole rotation, on their own client.
    let stop = Arc::new(AtomicBool::new(false));
    let (written, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writer = {
        let (c, stop, written, failed) = (sched.client(&[2, 3, 1]), stop.clone(), written.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = written.load(Ordering::Relaxed);
                match c.put(&format!("rot/{n}"), b"v".to_vec()).await {
                    Ok(_) => written.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("put failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let spec = pb::JobSpec {
        source: "rsrc".into(),
        files: vec![src.root.join("big.bin").display().to_string()],
        targets: vec!["rt".into()],
        destination: "in/".into(),
        ..Default::default()
    };
    let job = c.submit_job(spec, false).await.expect("submit").job_id;

    // Every holder gets a new certificate and key under the same names
    // (node 1's valid for only 10 days).
    let holders = [
        Identity::Scheduler(1),
        Identity::Scheduler(2),
        Identity::Scheduler(3),
        Identity::Worker("rsrc".into()),
        Identity::Worker("rt".into()),
    ];
    let fresh: Vec<Files> =
        holders.iter().map(|h| if *h == Identity::Scheduler(1) { reissue_for(h, 10) } else { reissue(h) }).collect();
    // Each process takes its new files within its 5 s look.
    let logs: Vec<std::path::PathBuf> =
        sched.procs.iter().map(|p| p.log.clone()).chain([src.proc.log.clone(), t.proc.log.clone()]).collect();
    wait_for("every process to reload its certificate", Duration::from_secs(20), || async {
        logs.iter()
            .all(|l| std::fs::read_to_string(l).unwrap_or_default().contains("TLS credentials reloaded"))
            .then_some(())
    })
    .await;

    let report = wait_for("the job to end", Duration::from_secs(60), || async {
        let r = c.get_job(&job).await.ok()?;
        (r.state != "running").then_some(r)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert_eq!(report.state, "succeeded", "{report:?}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no config write failed");
    assert!(written.load(Ordering::Relaxed) > 10, "writes went on");

    // The status shows each member's certificate, and warns of node 1's.
    let (code, text) = ferry_at(&sched.addr(2), &["cluster", "status"]);
    assert_eq!(code, 0, "{text}");
    assert!(days_left(&text).iter().any(|d| (364..=365).contains(d)), "a year left on nodes 2 and 3: {text}");
    let warned =
        ["9", "10"].iter().any(|d| text.contains(&format!("warning: node 1's certificate expires in {d} days")));
    assert!(warned, "{text}");
    let expires = metric(&sched.admins[0], "ferry_tls_cert_not_after_seconds").expect("the expiry metric");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!((expires - now - 10.0 * 86_400.0).abs() < 600.0, "node 1's certificate expires in 10 days: {expires}");

    // New connections are shown the new certificates.
    for (i, id) in [1u64, 2, 3].iter().enumerate() {
        assert_eq!(presented(&sched.addr(*id), Role::Scheduler).await, der(&fresh[i].cert), "scheduler {id}");
    }
    let workers = c.list_workers().await.expect("list");
    let rt_addr = workers.iter().filter_map(|w| w.info.as_ref()).find(|i| i.name == "rt").expect("rt").addr.clone();
    assert_eq!(presented(&rt_addr, Role::Worker).await, der(&fresh[4].cert), "worker rt");
}

/// The setup of docs/operations/security.md, by `ferry certs`: bad input
/// first, then a CA, a scheduler, a worker and a user, and the three work
/// together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_certs_makes_what_a_cluster_needs_and_refuses_bad_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let t = tls.display().to_string();
    let certs = |args: &[&str]| ferry_with(&[], &[&["certs"], args, &["--dir", &t]].concat());

    let (code, text) = certs(&["worker", "--name", "w1"]);
    assert_eq!(code, 2, "no CA yet: {text}");
    assert!(text.contains("dir: no CA in") && text.contains("ferry certs ca"), "{text}");
    let (code, text) = certs(&["ca"]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = certs(&["ca"]);
    assert_eq!(code, 2, "a second CA would orphan the first's certificates: {text}");
    let (code, text) = certs(&["user", "--name", "a b"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("name: 'a b'"), "{text}");
    let (code, text) = certs(&["scheduler", "--id", "0"]);
    assert_eq!(code, 2, "{text}");

    let addr = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["scheduler", "--id", "1", "--host", "127.0.0.1"],
        vec!["worker", "--name", "w1"],
        vec!["user", "--name", "alice", "--days", "30"],
    ] {
        let (code, text) = certs(&args);
        assert_eq!(code, 0, "{args:?}: {text}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tls.join("user-alice-key.pem")).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "keys are the owner's only");

    let f = |name: &str| tls.join(name).display().to_string();
    let data = dir.path().join("s1").display().to_string();
    let _s1 = Proc::spawn(
        &[
            "scheduler",
            "--id",
            "1",
            "--listen",
            &addr,
            "--initial-cluster",
            &format!("1={addr}"),
            "--data",
            &data,
            "--tls-ca",
            &f("ca.pem"),
            "--tls-cert",
            &f("scheduler-1.pem"),
            "--tls-key",
            &f("scheduler-1-key.pem"),
        ]
        .map(String::from),
        &dir.path().join("s1.log"),
    );
    let root = dir.path().join("root");
    std::fs::create_dir_all(&root).expect("root");
    let _w1 = Proc::spawn(
        &[
            "worker",
            "--name",
            "w1",
            "--listen",
            "127.0.0.1:0",
            "--schedulers",
            &addr,
            "--data",
            &dir.path().join("w1").display().to_string(),
            "--allow-root",
            &root.display().to_string(),
            "--tls-ca",
            &f("ca.pem"),
            "--tls-cert",
            &f("worker-w1.pem"),
            "--tls-key",
            &f("worker-w1-key.pem"),
        ]
        .map(String::from),
        &dir.path().join("w1.log"),
    );
    let alice = env_of(&Files {
        ca: tls.join("ca.pem"),
        cert: tls.join("user-alice.pem"),
        key: tls.join("user-alice-key.pem"),
    });
    let listed = wait_for("w1 up, seen by alice", Duration::from_secs(30), || async {
        let (code, text) = ferry_with(&alice, &["--endpoints", &addr, "worker", "list"]);
        (code == 0 && text.contains("w1") && text.contains("up")).then_some(text)
    })
    .await;
    assert!(listed.contains("w1"), "{listed}");
    let (code, text) = ferry_with(&alice, &["--endpoints", &addr, "cluster", "status"]);
    assert_eq!(code, 0, "{text}");
    assert_eq!(days_left(&text).len(), 1, "{text}");
    assert!((364..=365).contains(&days_left(&text)[0]), "the scheduler's certificate, issued for 365 days: {text}");
}
