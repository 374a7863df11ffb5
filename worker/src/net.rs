//! Sockets of chunk traffic, with priorities for the host's queue.
//!
//! A worker's link carries two kinds of packets in each direction: the bulk
//! data of chunks it uploads, and the small packets of its own pulls (the
//! chunk request, HTTP/2 window updates, the TCP ACKs of the data coming
//! in). In one FIFO queue behind a busy uplink the small ones wait for the
//! bulk ones: the request of every pull and the ACKs of every download then
//! take the queue's delay, and a swarm's downloads slow down with it (in
//! `ferry-bench distribute`, a median pull waited 33 ms for its response
//! headers). So pull connections ask for `TC_PRIO_INTERACTIVE` and upload
//! connections for `TC_PRIO_BULK` (`SO_PRIORITY`). The kernel's built-in
//! default queue, `pfifo_fast`, sends the former first and the latter after
//! everything else on the host, so Ferry's uploads also give way to the
//! host's own traffic. (`fq_codel`, the default that systemd sets, keeps
//! small flows ahead of bulk ones by itself.) Nothing is marked on the wire
//! (no DSCP). `socket_priority =
//! false` in the worker's config leaves the sockets alone, for hosts whose
//! traffic classes are set up otherwise.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::codegen::Service;

/// `TC_PRIO_INTERACTIVE`: the first band of `pfifo_fast`.
pub const INTERACTIVE: i32 = 6;
/// `TC_PRIO_BULK`: the last band of `pfifo_fast`.
pub const BULK: i32 = 2;

/// Sets `SO_PRIORITY` on `stream` (0-6 need no privilege).
pub fn set_priority(stream: &TcpStream, priority: i32) -> std::io::Result<()> {
    // SAFETY: a valid open descriptor and a pointer to an `int` that lives
    // through the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&priority as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Connects a pull channel: hyper's TCP connector with `TCP_NODELAY` and,
/// if set, a socket priority on the connection it makes.
#[derive(Clone, Debug)]
pub struct PullConnector {
    tcp: HttpConnector,
    priority: Option<i32>,
}

impl PullConnector {
    /// A connector whose connections get `SO_PRIORITY` `priority`, if any.
    pub fn new(priority: Option<i32>) -> Self {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        Self { tcp, priority }
    }
}

impl Service<Uri> for PullConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.tcp.poll_ready(cx).map_err(std::io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let priority = self.priority;
        // Peers always name their port; no default of 80 for them.
        if uri.port_u16().is_none() {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("peer address {uri}"));
            return Box::pin(std::future::ready(Err(e)));
        }
        let connecting = self.tcp.call(uri);
        Box::pin(async move {
            let io = connecting.await.map_err(std::io::Error::other)?;
            if let Some(p) = priority {
                if let Err(e) = set_priority(io.inner(), p) {
                    tracing::debug!(error = %e, "could not set the pull connection's priority");
                }
            }
            Ok(io)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn priority_of(s: &TcpStream) -> i32 {
        let mut v: i32 = -1;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: valid descriptor; `v` and `len` outlive the call.
        let rc = unsafe {
            libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PRIORITY, (&mut v as *mut i32).cast(), &mut len)
        };
        assert_eq!(rc, 0);
        v
    }

    #[tokio::test]
    async fn pull_connections_carry_the_priority_they_are_given() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let marked = PullConnector::new(Some(INTERACTIVE)).call(uri.clone()).await.unwrap();
        assert_eq!(priority_of(marked.inner()), INTERACTIVE);
        assert!(marked.inner().nodelay().unwrap());
        let plain = PullConnector::new(None).call(uri).await.unwrap();
        assert_eq!(priority_of(plain.inner()), 0);
        let (accepted, _) = listener.accept().await.unwrap();
        set_priority(&accepted, BULK).unwrap();
        assert_eq!(priority_of(&accepted), BULK);
    }

    #[tokio::test]
    async fn a_uri_without_a_port_is_refused() {
        let uri: Uri = "http://example.invalid".parse().unwrap();
        let err = PullConnector::new(None).call(uri).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
