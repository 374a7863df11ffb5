//! In-process clusters on real sockets: health and reflection on every
//! listener, readiness, and membership changes while writes continue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_scheduler::{LocalCluster, Scheduler, SchedulerConfig};
use ferry_sdk::Client;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn cluster(dir: &std::path::Path) -> LocalCluster {
    let c = LocalCluster::start(dir, 3, 0, Some(0), |_| {}).await.expect("start cluster");
    c.wait_leader(Duration::from_secs(10)).await.expect("a leader");
    c
}

/// A user's credentials from the cluster's CA.
fn user(c: &LocalCluster) -> ferry_sdk::Security {
    c.credentials(&ferry_sdk::tls::Identity::User("test".into())).expect("user credentials")
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_serves_health_reflection_and_admin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    for node in &c.nodes {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr())).expect("endpoint");
        let channel = ferry_sdk::tls::client::connect(endpoint, &user(&c), ferry_sdk::tls::Role::Scheduler)
            .await
            .expect("connect");
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "ferry.v1.ConfigService", "ferry.v1.ClusterService"] {
            let resp = health.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
            assert_eq!(resp.into_inner().status, 1, "{service} must be SERVING");
        }

        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient as V1Alpha,
            server_reflection_request::MessageRequest as MA, server_reflection_response::MessageResponse as RA,
            ServerReflectionRequest as ReqA,
        };
        let req = ReqA { host: String::new(), message_request: Some(MA::ListServices(String::new())) };
        let mut stream = V1Alpha::new(channel.clone())
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha")
            .into_inner();
        let msg = stream.message().await.expect("reply").expect("one reply");
        let Some(RA::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected reply") };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for want in
            ["ferry.v1.ConfigService", "ferry.v1.ClusterService", "ferry.v1.RaftService", "grpc.health.v1.Health"]
        {
            assert!(names.contains(&want), "v1alpha lists {names:?}");
        }

        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient as V1, server_reflection_request::MessageRequest as M1,
            server_reflection_response::MessageResponse as R1, ServerReflectionRequest as Req1,
        };
        let req = Req1 { host: String::new(), message_request: Some(M1::ListServices(String::new())) };
        let mut stream =
            V1::new(channel).server_reflection_info(tokio_stream::iter(vec![req])).await.expect("v1").into_inner();
        let msg = stream.message().await.expect("reply").expect("one reply");
        let Some(R1::ListServicesResponse(list)) = msg.message_response else { panic!("unexpected reply") };
        assert!(list.service.iter().any(|s| s.name == "ferry.v1.ConfigService"));

        let admin = node.admin_addr().expect("admin listener");
        assert_eq!(http_get(admin, "/healthz").await.0, 200);
        let (code, body) = http_get(admin, "/readyz").await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = http_get(admin, "/metrics").await;
        assert_eq!(code, 200);
        for metric in ["ferry_raft_term", "ferry_raft_leader_id", "ferry_raft_applied_index", "ferry_raft_commit_index"]
        {
            assert!(body.contains(metric), "missing {metric}");
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_a_node_while_writes_continue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let client = Client::connect(c.endpoints(), user(&c)).expect("client");

    // A steady writer for the whole membership dance.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (client, stop, written) = (client.clone(), stop.clone(), written.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = written.load(Ordering::Relaxed);
                client
                    .put(&format!("w/{n:06}"), n.to_string().into_bytes())
                    .await
                    .expect("write during membership change");
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    // Node 4 starts empty, without --initial-cluster, and waits to be added.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr4 = listener.local_addr().expect("addr").to_string();
    let tls = c.files(&ferry_sdk::tls::Identity::Scheduler(4)).expect("node 4's certificate").into();
    let config = SchedulerConfig { id: 4, tls, ..SchedulerConfig::for_test(4, dir.path().join("s4")) };
    let n4 = Scheduler::start_with(config, listener, None).await.expect("start node 4");

    let resp = client.add_node(4, &addr4, false).await.expect("add node 4");
    let voters: Vec<_> = resp.members.iter().filter(|m| m.kind == "voter").map(|m| m.id).collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);

    // Adding it again, or another id on its address, is a clear InvalidArgument.
    let err = client.add_node(4, &addr4, false).await.expect_err("duplicate id");
    assert!(err.is_invalid_argument() && err.to_string().contains("id:"), "{err}");
    let err = client.add_node(9, &addr4, false).await.expect_err("duplicate addr");
    assert!(err.is_invalid_argument() && err.to_string().contains("addr:"), "{err}");
    let err = client.add_node(5, "not-an-address", false).await.expect_err("bad addr");
    assert!(err.is_invalid_argument(), "{err}");

    // Node 4 catches up and holds the same state as the others.
    let before = written.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while written.load(Ordering::Relaxed) < before + 20 {
        assert!(Instant::now() < deadline, "writes stalled after adding node 4");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probe = client.get("w/000001").await.expect("get").expect("present");
    assert_eq!(probe.value, b"1");
    let n4_leader = n4.node().leader();
    assert!(n4_leader.is_some(), "node 4 follows the leader");

    let resp = client.remove_node(4).await.expect("remove node 4");
    assert!(resp.members.iter().all(|m| m.id != 4));
    let err = client.remove_node(4).await.expect_err("already removed");
    assert!(err.is_invalid_argument() && err.to_string().contains("no node 4"), "{err}");

    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer never failed");
    let total = written.load(Ordering::Relaxed);
    assert!(total > 20, "writes continued throughout ({total})");
    let last = client.get(&format!("w/{:06}", total - 1)).await.expect("get").expect("last write present");
    assert_eq!(last.value, (total - 1).to_string().into_bytes());
    n4.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_voter_without_a_reachable_quorum_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path()).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await.expect("leader");
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // Stop one follower, then ask to remove the other: the voters left
    // (leader + the stopped one) have no reachable quorum.
    let down = c.nodes.remove((followers[0] - 1) as usize);
    down.shutdown().await;
    let client = Client::connect(c.endpoints(), user(&c)).expect("client");
    let err = client.remove_node(followers[1]).await.expect_err("must be refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("quorum"), "{err}");
    let status = client.status().await.expect("status");
    assert_eq!(status.members.len(), 3, "nothing changed");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_size_limit_replicate_to_every_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let endpoints = c.endpoints();
    let mut tasks = Vec::new();
    for i in 0..24u8 {
        // Through every member in turn, so followers forward 1 MiB writes.
        let client = Client::connect([endpoints[i as usize % 3].as_str()], user(&c)).expect("client");
        tasks.push(tokio::spawn(async move {
            let value = vec![i; ferry_storage::MAX_VALUE_BYTES];
            client.put(&format!("big/{i:02}"), value).await.expect("1 MiB put");
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let client = Client::connect(&endpoints, user(&c)).expect("client");
    let too_big = client.put("big/too", vec![0; ferry_storage::MAX_VALUE_BYTES + 1]).await.expect_err("over the limit");
    assert!(too_big.is_invalid_argument() && too_big.to_string().contains("value:"), "{too_big}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let digests: Vec<_> = c.nodes.iter().map(|n| n.node().reader.digest().expect("digest")).collect();
        if digests.iter().all(|d| d.applied_index == digests[0].applied_index) {
            assert!(digests.iter().all(|d| d.hex == digests[0].hex && d.keys == 24), "{digests:?}");
            break;
        }
        assert!(Instant::now() < deadline, "replicas did not converge: {digests:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = client.get("big/23").await.expect("get").expect("present");
    assert_eq!(v.value, vec![23u8; ferry_storage::MAX_VALUE_BYTES]);
    c.shutdown().await;
}

/// A follower passes leader-only calls to the leader as they are (a unary
/// write, a lease keep-alive stream), serves reads itself, and never passes
/// on a call that was forwarded already: that one gets "not leader" with the
/// leader's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_writes_and_streams_once_and_serves_reads() {
    use ferry_proto::pb::{self, config_service_client::ConfigServiceClient, lease_service_client::LeaseServiceClient};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = cluster(dir.path()).await;
    let leader = c.wait_leader(Duration::from_secs(10)).await.expect("a leader");
    let follower = c.nodes.iter().find(|n| n.node().id != leader).expect("a follower");
    let leader_addr = c.nodes.iter().find(|n| n.node().id == leader).expect("the leader").addr().to_string();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", follower.addr())).expect("endpoint");
    let channel =
        ferry_sdk::tls::client::connect(endpoint, &user(&c), ferry_sdk::tls::Role::Scheduler).await.expect("connect");

    let mut config = ConfigServiceClient::new(channel.clone());
    let put = pb::PutRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() };
    let header = config.put(put.clone()).await.expect("put through a follower").into_inner().header.expect("header");
    assert_eq!(header.member_id, leader, "the leader applied and answered the forwarded put");
    let got = config.get(pb::GetRequest { key: "k".into(), ..Default::default() }).await.expect("get").into_inner();
    assert_eq!(got.kv.map(|kv| kv.value), Some(b"v".to_vec()));
    assert_eq!(got.header.map(|h| h.member_id), Some(follower.node().id), "the follower served the read itself");

    let mut leases = LeaseServiceClient::new(channel.clone());
    let id = leases.grant(pb::LeaseGrantRequest { ttl_ms: 5_000, request_id: String::new() }).await.expect("grant");
    let id = id.into_inner().id;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = leases
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("keep-alive through a follower")
        .into_inner();
    for _ in 0..3 {
        tx.send(pb::LeaseKeepAliveRequest { id }).await.expect("send");
        let answer = answers.message().await.expect("answer").expect("an answer per request");
        assert_eq!((answer.id, answer.ttl_ms), (id, 5_000));
    }

    let mut once = tonic::Request::new(put);
    once.metadata_mut().insert(ferry_proto::FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    let refused = config.put(once).await.expect_err("a forwarded call is not forwarded again");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(ferry_proto::leader_hint(&refused), Some(leader_addr.as_str()), "{refused:?}");
    c.shutdown().await;
}
