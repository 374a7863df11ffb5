//! Client-side balancing against a running cluster (`ferry dev` gives one).
//!
//! Registers two instances of `demo-svc` (one gray), follows the service's
//! registry watch with a [`Balancer`], and shows where plain, gray and keyed
//! requests go, and a failover call.
//!
//! ```text
//! cargo run -p ferry-sdk --example balancer -- 127.0.0.1:7001
//! ```

use std::time::Duration;

use anyhow::Context;
use ferry_sdk::balancer::{CallError, InstanceFault};
use ferry_sdk::{pb, Balancer, BalancerOptions, Client, Policy, Request, Strategy};

/// The error of our pretend RPC: always the instance's fault.
#[derive(Debug)]
struct Down;

impl InstanceFault for Down {
    fn is_instance_fault(&self) -> bool {
        true
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoints: Vec<String> = std::env::args().skip(1).collect();
    let endpoints = if endpoints.is_empty() { vec!["127.0.0.1:7001".to_string()] } else { endpoints };
    let client = Client::connect(&endpoints, ferry_sdk::Security::from_env()?)?;

    // Two instances, kept registered while their handles live.
    let mut registrations = Vec::new();
    for (id, port, gray) in [("web-1", 9001, false), ("web-2", 9002, true)] {
        let instance = pb::Instance {
            service: "demo-svc".into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            version: "v1".into(),
            weight: 100,
            gray,
            ..Default::default()
        };
        registrations.push(client.register_kept(instance, Duration::from_secs(10)).await.context("register")?);
    }

    let balancer = Balancer::new(BalancerOptions { strategy: Strategy::ConsistentHash, ..BalancerOptions::default() });
    balancer.follow(client.clone(), "demo-svc");
    tokio::time::timeout(Duration::from_secs(10), balancer.ready()).await.context("no instances of demo-svc")?;

    for request in [Request::new(), Request::new().gray(), Request::new().keyed("user-42").version("v1")] {
        match balancer.pick(&request) {
            Some(pick) => {
                println!("{request:?} -> {} ({})", pick.instance().id, pick.instance().authority());
                pick.success();
            }
            None => println!("{request:?} -> no instance"),
        }
    }

    // A failover call whose attempts all fail: it tries each plain instance once.
    let result: Result<(), CallError<Down>> = balancer
        .call(&Request::new(), Policy::Failover { retries: 2 }, |instance| async move {
            println!("attempt on {}", instance.id);
            Err(Down)
        })
        .await;
    println!("failover result: {result:?}");

    // Deregistered, not just dropped: gone at once, and followers of the
    // service know it was on purpose.
    for registration in registrations {
        registration.deregister().await?;
    }
    Ok(())
}
