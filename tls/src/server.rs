//! TLS on the connections a server accepts.
//!
//! [`incoming`] takes the accepted TCP connections and yields them once
//! their handshake is done (each handshake runs on its own, so a slow or
//! silent peer holds up no one else), with the peer's [`Identity`] read
//! from its certificate. tonic puts the [`Peer`] into the extensions of
//! every request on the connection, where [`Peer::of`] finds it.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::Identity;
use crate::Security;

/// A handshake not done in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its address.
    pub remote: Option<SocketAddr>,
    /// Whom its certificate names; `None` on a plaintext connection.
    pub identity: Option<Identity>,
}

impl Peer {
    /// The peer of the connection `request` came on; `None` for a
    /// request that did not come through [`incoming`] (an in-process call).
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&Peer> {
        request.extensions().get::<Peer>()
    }
}

/// An accepted connection, plaintext or TLS, with its peer.
pub type Conn = crate::io::Io<tokio_rustls::server::TlsStream<TcpStream>, Peer>;

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.meta().clone()
    }
}

/// The connections of `tcp` secured as `security` says, for
/// `Server::serve_with_incoming`. Accept errors and failed handshakes are
/// logged and skipped; the stream ends when `tcp` does or when the server
/// drops it (which also drops the listener).
pub fn incoming<S, E>(tcp: S, security: Security) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static
where
    S: Stream<Item = Result<TcpStream, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        let mut tcp = std::pin::pin!(tcp);
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                next = tcp.next() => next,
            };
            let stream = match next {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    // Out of descriptors, say: give them a moment to free.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let remote = stream.peer_addr().ok();
            let credentials = match &security {
                Security::Insecure => {
                    let _ = tx.send(Conn::Plain(stream, Peer { remote, identity: None })).await;
                    continue;
                }
                Security::Tls(c) => c.clone(),
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(credentials.server_config());
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        // A certificate or a protocol refused (a plaintext
                        // client, another CA's certificate) is worth an
                        // operator's eye; a peer that went away is not.
                        let refused = e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
                        if refused {
                            tracing::info!(peer = ?remote, error = %e, "TLS handshake refused");
                        } else {
                            tracing::debug!(peer = ?remote, error = %e, "TLS handshake failed");
                        }
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = ?remote, "TLS handshake timed out");
                        return;
                    }
                };
                let identity = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    Some(cert) => match Identity::of_certificate(cert) {
                        Ok((identity, _)) => identity,
                        Err(reason) => {
                            tracing::info!(peer = ?remote, %reason, "a peer's certificate names no Ferry identity");
                            return;
                        }
                    },
                    None => return,
                };
                let _ = tx.send(Conn::Tls(Box::new(tls), Peer { remote, identity: Some(identity) })).await;
            });
        }
    });
    ReceiverStream::new(rx).map(Ok)
}

/// An interceptor admitting only callers whose certificate names a holder
/// of one role (only workers fetch chunks); everyone when plaintext.
#[derive(Clone)]
pub struct Admit {
    role: crate::Role,
    checked: bool,
}

impl Admit {
    /// Admits holders of `role` when `security` is TLS.
    pub fn new(role: crate::Role, security: &Security) -> Self {
        Self { role, checked: !security.is_insecure() }
    }
}

impl tonic::service::Interceptor for Admit {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if !self.checked {
            return Ok(request);
        }
        let wanted = self.role.server_name().trim_end_matches(".ferry");
        match Peer::of(&request).and_then(|p| p.identity.as_ref()) {
            Some(who) if who.role() == Some(self.role) => Ok(request),
            Some(who) => Err(tonic::Status::permission_denied(format!("only a {wanted} may call this; this is {who}"))),
            None => {
                Err(tonic::Status::unauthenticated(format!("only a {wanted} may call this; the caller is not known")))
            }
        }
    }
}
