//! A balancer fed by a registry over real gRPC. The registry is a fake
//! `RegistryService` on `127.0.0.1:0` whose watch streams the test drives
//! by hand, so each step is observed rather than timed.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use common::{instances, FakeRegistry, Running, WatchItem};
use ferry_sdk::balancer::Instance;
use ferry_sdk::pb;
use ferry_sdk::pb::registry_service_client::RegistryServiceClient;
use ferry_sdk::{Balancer, BalancerOptions, Client};
use tokio::sync::mpsc;
use tonic::Request;

/// A registry whose `List` answers one instance named `name` (so a caller
/// sees which server answered), serving the queued watch streams.
async fn serve(
    name: &str,
    watches: Arc<Mutex<VecDeque<mpsc::Receiver<WatchItem>>>>,
) -> anyhow::Result<(SocketAddr, Running)> {
    let registry = FakeRegistry { list: Arc::new(Mutex::new(instances(&[name], 0))), watches };
    common::serve(registry, "127.0.0.1:0".parse()?).await
}

fn list(ids: &[&str]) -> WatchItem {
    Ok(instances(ids, 0))
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
    let (addr, _server) = serve("registry", queue.clone()).await?;

    let balancer = Balancer::new(BalancerOptions::default());
    balancer.follow(Client::connect([addr.to_string()], ferry_sdk::Security::Insecure)?, "svc");

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
async fn follow_empties_the_balancer_only_once_every_instance_was_deregistered() -> anyhow::Result<()> {
    let (tx1, rx1) = mpsc::channel(8);
    let (tx2, rx2) = mpsc::channel(8);
    let (_tx3, rx3) = mpsc::channel(8);
    let queue = Arc::new(Mutex::new(VecDeque::from([rx1, rx2, rx3])));
    let (addr, _server) = serve("registry", queue.clone()).await?;
    let cache = tempfile::tempdir()?;
    let options = ferry_sdk::ClientOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        security: Some(ferry_sdk::Security::Insecure),
        ..Default::default()
    };
    let client = Client::with_options([addr.to_string()], options)?;

    let balancer = Balancer::new(BalancerOptions::default());
    balancer.follow(client.clone(), "svc");
    tx1.send(list(&["a", "b"])).await?;
    tokio::time::timeout(Duration::from_secs(10), balancer.ready()).await.context("first list")?;

    // Empty: a was deregistered, b is not named (its lease ended). Then the
    // watch breaks, so the balancer has applied the list once it re-opens.
    let mut empty = instances(&[], 0);
    empty.deregistered = vec!["a".into()];
    tx1.send(Ok(empty)).await?;
    drop(tx1);
    wait_until("the watch to be re-opened", || queue.lock().unwrap().len() == 1).await?;
    assert_eq!(ids(&balancer), ["b"], "the expired instance is kept, the deregistered one goes");
    let cached = |client: &Client| client.cache().and_then(|c| c.load_instances("svc")).map(|(_, l)| l.instances.len());
    assert_eq!(cached(&client), Some(2), "a list that did not empty the balancer is not stored");

    // Empty again, now naming b too: every instance it held was deregistered.
    let mut empty = instances(&[], 0);
    empty.deregistered = vec!["a".into(), "b".into()];
    tx2.send(Ok(empty)).await?;
    drop(tx2);
    wait_until("the watch to be re-opened again", || queue.lock().unwrap().is_empty()).await?;
    assert!(ids(&balancer).is_empty(), "{:?}", ids(&balancer));
    assert!(balancer.pick(&ferry_sdk::Request::new()).is_none());
    assert_eq!(cached(&client), Some(0), "the emptied list is stored, so a restart does not resurrect a and b");
    Ok(())
}

#[tokio::test]
async fn channel_routes_calls_to_the_live_instances() -> anyhow::Result<()> {
    let none = || Arc::new(Mutex::new(VecDeque::new()));
    let (a, _a) = serve("a", none()).await?;
    let (b, _b) = serve("b", none()).await?;
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
