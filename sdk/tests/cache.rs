//! The local cache against a registry that goes away and comes back: a fake
//! `RegistryService` on `127.0.0.1:0`, stopped and restarted on the same
//! port, and a client caching in a temp dir. Reads are fresh while it is up,
//! stale (the last list) while it is down, fresh again once it is back; a
//! balancer started while it is down serves the cached list until the watch
//! replaces it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use common::{instances as list, serve, FakeRegistry as Registry};
use ferry_sdk::pb::ListInstancesResponse;
use ferry_sdk::{Balancer, BalancerOptions, Client, ClientOptions};
use tokio::sync::mpsc;

fn client(addr: SocketAddr, cache: &std::path::Path) -> anyhow::Result<Client> {
    let options = ClientOptions {
        request_timeout: Duration::from_millis(300),
        total_timeout: Duration::from_millis(600),
        connect_timeout: Duration::from_millis(100),
        cache_dir: Some(cache.to_path_buf()),
        // The fake registry below is plaintext.
        security: Some(ferry_sdk::Security::Insecure),
        ..Default::default()
    };
    Ok(Client::with_options([addr.to_string()], options)?)
}

fn ids(l: &ListInstancesResponse) -> Vec<String> {
    l.instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn fresh_when_up_stale_when_down_fresh_again_when_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = Registry::default();
    *registry.list.lock().unwrap() = list(&["a", "b"], 5);
    let (addr, server) = serve(registry.clone(), "127.0.0.1:0".parse()?).await?;
    let client = client(addr, dir.path())?;

    // Up: fresh, and stored.
    let got = client.instances_or_cached("svc").await?;
    assert!(!got.stale);
    assert_eq!((ids(&got.value), got.revision), (vec!["a".to_string(), "b".into()], 5));

    // Down: the same list, marked stale, from the cache.
    server.stop().await?;
    let got = client.instances_or_cached("svc").await?;
    assert!(got.stale);
    assert_eq!((ids(&got.value), got.revision), (vec!["a".to_string(), "b".into()], 5));

    // A second process starting now (same cache dir) sees it too.
    let other = self::client(addr, dir.path())?;
    assert!(other.instances_or_cached("svc").await?.stale);

    // Back, with a change: fresh again once the client reconnects.
    *registry.list.lock().unwrap() = list(&["c"], 9);
    let (_, server) = serve(registry.clone(), addr).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = client.instances_or_cached("svc").await?;
        if !got.stale {
            assert_eq!((ids(&got.value), got.revision), (vec!["c".to_string()], 9));
            break;
        }
        if Instant::now() > deadline {
            bail!("still stale after the registry came back");
        }
    }
    // And the cache now holds the new list.
    let (revision, cached) = client.cache().context("cache")?.load_instances("svc").context("entry")?;
    assert_eq!((ids(&cached), revision), (vec!["c".to_string()], 9));
    server.stop().await
}

#[tokio::test]
async fn a_balancer_starts_from_the_cache_and_the_watch_replaces_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // The registry is up but its watch fails (nothing queued): the first
    // attempt to open it gives up, as when the cluster is unreachable.
    let registry = Registry::default();
    let (addr, server) = serve(registry.clone(), "127.0.0.1:0".parse()?).await?;
    let client = client(addr, dir.path())?;
    client.cache().context("cache")?.store_instances("svc", &list(&["cached"], 3))?;

    let balancer = Balancer::new(BalancerOptions::default());
    balancer.follow(client.clone(), "svc");
    tokio::time::timeout(Duration::from_secs(10), balancer.ready()).await.context("seeded from the cache")?;
    let names: Vec<String> = balancer.instances().iter().map(|i| i.id.clone()).collect();
    assert_eq!(names, ["cached"]);

    // The watch comes back: its list replaces the cached one, and is stored.
    let (tx, rx) = mpsc::channel(4);
    registry.watches.lock().unwrap().push_back(rx);
    tx.send(Ok(list(&["live"], 8))).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let names: Vec<String> = balancer.instances().iter().map(|i| i.id.clone()).collect();
        if names == ["live"] {
            break;
        }
        if Instant::now() > deadline {
            bail!("the watch did not replace the cached list: {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (revision, cached) = client.cache().context("cache")?.load_instances("svc").context("entry")?;
    assert_eq!((ids(&cached), revision), (vec!["live".to_string()], 8));
    drop(tx);
    drop(balancer);
    server.stop().await
}
