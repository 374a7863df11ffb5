//! A fake `RegistryService` for the SDK's tests: `List` answers a list the
//! test sets, `Watch` serves streams the test queues (one per call), and
//! `serve` runs it on a port until stopped.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use ferry_sdk::pb::registry_service_server::{RegistryService, RegistryServiceServer};
use ferry_sdk::pb::{self, ListInstancesResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// One message of a watch stream.
pub type WatchItem = Result<ListInstancesResponse, Status>;

/// The registry's state, shared by clones (and across restarts).
#[derive(Clone, Default)]
pub struct FakeRegistry {
    /// What `List` answers.
    pub list: Arc<Mutex<ListInstancesResponse>>,
    /// Streams handed out by `Watch`, in order; none left: `Unavailable`.
    pub watches: Arc<Mutex<VecDeque<mpsc::Receiver<WatchItem>>>>,
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
        Ok(Response::new(self.list.lock().unwrap().clone()))
    }

    type WatchStream = ReceiverStream<WatchItem>;

    async fn watch(&self, _: Request<pb::WatchInstancesRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let next = self.watches.lock().unwrap().pop_front();
        next.map(|rx| Response::new(ReceiverStream::new(rx))).ok_or_else(|| Status::unavailable("no watch queued"))
    }
}

/// Instances of service `svc` with these ids, at `revision`.
pub fn instances(ids: &[&str], revision: u64) -> ListInstancesResponse {
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
    ListInstancesResponse {
        header: Some(pb::ResponseHeader { revision, ..Default::default() }),
        instances,
        deregistered: vec![],
    }
}

/// A running server; stopped (and its port freed) by `stop` or on drop.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Running {
    /// Shuts the server down and waits until the port is free.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("server task")?.context("server")?;
        Ok(())
    }
}

/// Serves `registry` on `addr` (port 0: any free one).
pub async fn serve(registry: FakeRegistry, addr: SocketAddr) -> anyhow::Result<(SocketAddr, Running)> {
    let listener = tokio::net::TcpListener::bind(addr).await.context("bind")?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistryServiceServer::new(registry))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async {
                let _ = stopped.await;
            }),
    );
    Ok((addr, Running { stop, task }))
}
