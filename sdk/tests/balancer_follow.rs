//! A balancer fed by a registry over real gRPC. The registry is a fake
//! `RegistryService` on `127.0.0.1:0` whose watch streams the test drives
//! by hand, so each step is observed rather than timed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use ferry_sdk::balancer::Instance;
use ferry_sdk::pb::registry_service_client::RegistryServiceClient;
use ferry_sdk::pb::registry_service_server::{RegistryService, RegistryServiceServer};
use ferry_sdk::pb::{self, ListInstancesResponse};
use ferry_sdk::{Balancer, BalancerOptions, Client};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

type WatchItem = Result<ListInstancesResponse, Status>;

/// Answers `List` with one instance named after itself (so a caller sees
/// which server answered) and serves queued watch streams, one per `Watch`.
struct FakeRegistry {
    name: String,
    watches: Arc<Mutex<VecDeque<mpsc::Receiver<WatchItem>>>>,
}

#[tonic::async_trait]
impl RegistryService for FakeRegistry {
    async fn register(&self, _: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn deregister(&self, _: Request<pb::DeregisterRequest>) -> Result<Response<pb::DeregisterResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list(&self, _: Request<pb::ListInstancesRequest>) -> Result<Response<ListInstancesResponse>, Status> {
        let me = pb::Instance { id: self.name.clone(), ..Default::default() };
        Ok(Response::new(ListInstancesResponse { header: None, instances: vec![me] }))
    }

    type WatchStream = ReceiverStream<WatchItem>;

    async fn watch(&self, _: Request<pb::WatchInstancesRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let next = self.watches.lock().unwrap().pop_front();
        next.map(|rx| Response::new(ReceiverStream::new(rx))).ok_or_else(|| Status::unavailable("no watch queued"))
    }
}

async fn serve(name: &str, watches: Arc<Mutex<VecDeque<mpsc::Receiver<WatchItem>>>>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("bind")?;
    let addr = listener.local_addr()?;
    let registry = FakeRegistry { name: name.into(), watches };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServiceServer::new(registry))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

fn list(ids: &[&str]) -> WatchItem {
    let instances = ids
        .iter()
        .map(|id| pb::Instance {
            service: "svc".into(),
            id: (*id).into(),
            address: "10.0.0.1".into(),
            port: 80,
            weight: 100,
            ..Default::default()
        })
        .collect();
    Ok(ListInstancesResponse { header: None, instances })
}

fn ids(b: &Balancer) -> Vec<String> {
    b.instances().iter().map(|i| i.id.clone()).collect()
}

/// Polls `cond` every 10 ms until it holds, for at most 10 s.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test]
async fn follow_applies_the_watch_keeps_the_last_non_empty_list_and_reconnects() -> anyhow::Result<()> {
    let (tx1, rx1) = mpsc::channel(8);
    let (tx2, rx2) = mpsc::channel(8);
    let queue = Arc::new(Mutex::new(VecDeque::from([rx1, rx2])));
    let addr = serve("registry", queue.clone()).await?;

    let balancer = Balancer::new(BalancerOptions::default());
    balancer.follow(Client::connect([addr.to_string()])?, "svc");

    tx1.send(list(&["a", "b"])).await?;
    tokio::time::timeout(Duration::from_secs(10), balancer.ready()).await.context("first list")?;
    assert_eq!(ids(&balancer), ["a", "b"]);

    // An empty list, then the watch breaks: the balancer re-opens it (taking
    // the second queued stream) after applying what came before.
    tx1.send(list(&[])).await?;
    drop(tx1);
    wait_until("the watch to be re-opened", || queue.lock().unwrap().is_empty()).await?;
    assert_eq!(ids(&balancer), ["a", "b"], "an empty list must not wipe the instances");

    tx2.send(list(&["c"])).await?;
    wait_until("the list from the re-opened watch", || ids(&balancer) == ["c"]).await?;

    // Dropping the balancer stops its watch: the server sees the stream go.
    drop(balancer);
    tokio::time::timeout(Duration::from_secs(10), tx2.closed()).await.context("watch not closed")?;
    Ok(())
}

#[tokio::test]
async fn channel_routes_calls_to_the_live_instances() -> anyhow::Result<()> {
    let none = || Arc::new(Mutex::new(VecDeque::new()));
    let a = serve("a", none()).await?;
    let b = serve("b", none()).await?;
    let at = |id: &str, addr: SocketAddr| Instance::new(id, addr.ip().to_string(), addr.port());

    let balancer = Balancer::new(BalancerOptions::default());
    balancer.update([at("a", a), at("gray", b).with_gray(true)]);
    let registry = RegistryServiceClient::new(balancer.channel());
    let answered_by = || {
        let mut registry = registry.clone();
        let mut req = Request::new(pb::ListInstancesRequest { service: "svc".into() });
        req.set_timeout(Duration::from_secs(5));
        async move { anyhow::Ok(registry.list(req).await?.into_inner().instances[0].id.clone()) }
    };
    // Only a is a plain instance (the gray one is not offered to the channel).
    for _ in 0..10 {
        assert_eq!(answered_by().await?, "a");
    }

    // a leaves, b joins: calls move over to b and stay there.
    balancer.update([at("b", b)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while answered_by().await? != "b" {
        if tokio::time::Instant::now() > deadline {
            bail!("calls never reached b");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..10 {
        assert_eq!(answered_by().await?, "b");
    }
    Ok(())
}
