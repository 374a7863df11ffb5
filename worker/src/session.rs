//! The control session with the leader: connect to a scheduler, say hello,
//! send heartbeats, run the commands that arrive. A follower answers with the
//! leader's address and the worker goes there; a broken session is retried
//! with backoff over every configured scheduler.

use std::sync::Arc;
use std::time::Duration;

use ferry_proto::pb::{self, worker_message::Msg, worker_service_client::WorkerServiceClient};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::executor::Executor;

enum Ended {
    /// Go to this address next.
    Redirect(String),
    /// Try again after a pause.
    Failed(String),
    /// Shutting down.
    Stop,
}

/// Runs sessions until `shutdown` turns true.
pub async fn run(
    exec: Arc<Executor>,
    hello: pb::WorkerInfo,
    schedulers: Vec<String>,
    heartbeat: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next: Option<String> = None;
    let mut turn = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let addr = next.take().unwrap_or_else(|| {
            turn += 1;
            schedulers[turn % schedulers.len()].clone()
        });
        match serve(&exec, &addr, &hello, heartbeat, &mut shutdown).await {
            Ended::Stop => return,
            Ended::Redirect(leader) => {
                tracing::debug!(from = %addr, to = %leader, "following the leader");
                next = Some(leader);
            }
            Ended::Failed(why) => {
                tracing::info!(scheduler = %addr, %why, "session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        backoff = Duration::from_millis(100);
    }
}

async fn serve(
    exec: &Arc<Executor>,
    addr: &str,
    hello: &pb::WorkerInfo,
    heartbeat: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let endpoint = match Endpoint::from_shared(format!("http://{addr}")) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(1))
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(3))
            .keep_alive_while_idle(true),
        Err(e) => return Ended::Failed(format!("bad scheduler address: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return Ended::Failed(format!("connect: {e}")),
    };
    let (tx, rx) = mpsc::channel(1024);
    if tx.send(pb::WorkerMessage { msg: Some(Msg::Hello(hello.clone())) }).await.is_err() {
        return Ended::Failed("session queue closed".into());
    }
    let mut client = WorkerServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = match client.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            if let Some(leader) = ferry_proto::leader_hint(&status) {
                if leader != addr {
                    return Ended::Redirect(leader.to_string());
                }
            }
            return Ended::Failed(status.message().to_string());
        }
    };
    tracing::info!(scheduler = %addr, worker = %hello.name, "session open");
    exec.outbox.set(Some(tx.clone()));
    exec.metrics.connected.set(1);
    let beat = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tick.tick().await;
                if tx.send(pb::WorkerMessage { msg: Some(Msg::Heartbeat(pb::Heartbeat {})) }).await.is_err() {
                    return;
                }
            }
        })
    };
    let ended = loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(pb::ControlMessage { msg: Some(cmd) })) => {
                    tokio::spawn(exec.clone().handle(cmd));
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ended::Failed("the scheduler closed the session".into()),
                Err(status) => break Ended::Failed(status.message().to_string()),
            },
            _ = shutdown.changed() => break Ended::Stop,
        }
    };
    exec.outbox.set(None);
    exec.metrics.connected.set(0);
    beat.abort();
    ended
}
