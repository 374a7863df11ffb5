//! TLS on the connections a client opens: a connector for tonic channels
//! (`Endpoint::connect_with_connector_lazy`) wrapping a TCP connector.
//!
//! The client checks that the server holds a certificate of the cluster's
//! CA naming the role it expects ([`Role::server_name`]), whatever address
//! it dialled; and presents its own certificate. Each new connection takes
//! the credentials current at that moment.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::Service;

use crate::identity::Role;
use crate::Security;

/// An opened connection, plaintext or TLS.
pub type ClientConn = crate::io::Io<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS connector over `C` (which opens TCP connections).
#[derive(Clone)]
pub struct Connector<C = HttpConnector> {
    tcp: C,
    security: Security,
    server: Role,
}

/// hyper's TCP connector with `TCP_NODELAY`.
pub fn tcp() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp
}

/// A lazy channel from `endpoint` to a server of role `server`, secured as
/// `security` says.
pub fn channel(endpoint: Endpoint, security: &Security, server: Role) -> Channel {
    endpoint.connect_with_connector_lazy(Connector::new(tcp(), security.clone(), server))
}

/// Connects `endpoint` now (see [`channel`]).
pub async fn connect(
    endpoint: Endpoint,
    security: &Security,
    server: Role,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(Connector::new(tcp(), security.clone(), server)).await
}

impl<C> Connector<C> {
    /// Opens TCP connections with `tcp` and secures them as `security` says,
    /// expecting a server of role `server`.
    pub fn new(tcp: C, security: Security, server: Role) -> Self {
        Self { tcp, security, server }
    }
}

impl<C> Service<Uri> for Connector<C>
where
    C: Service<Uri, Response = TokioIo<TcpStream>> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = TokioIo<ClientConn>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp.poll_ready(cx).map_err(|e| io::Error::other(e.into()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.tcp.call(uri);
        let security = self.security.clone();
        let server = self.server;
        Box::pin(async move {
            let tcp = connecting.await.map_err(|e| io::Error::other(e.into()))?.into_inner();
            let credentials = match security {
                Security::Insecure => return Ok(TokioIo::new(ClientConn::Plain(tcp, ()))),
                Security::Tls(c) => c,
            };
            let name = ServerName::try_from(server.server_name()).map_err(io::Error::other)?;
            let connector = tokio_rustls::TlsConnector::from(credentials.client_config());
            let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(TokioIo::new(ClientConn::Tls(Box::new(tls), ())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Authority, Credentials, Identity};

    /// A server and clients on loopback: the right holders connect, the
    /// others are refused in the handshake.
    #[tokio::test]
    async fn only_holders_of_the_clusters_ca_connect_and_the_server_learns_who() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("a").unwrap();
        let server =
            Credentials::load(ca.write_holder(&dir.path().join("s"), &Identity::Scheduler(1), &[]).unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listening = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let mut accepted = Box::pin(crate::incoming(listening, Security::Tls(server)));

        let alice =
            Credentials::load(ca.write_holder(&dir.path().join("a"), &Identity::User("alice".into()), &[]).unwrap())
                .unwrap();
        let uri: Uri = format!("http://{addr}").parse().unwrap();
        let mut good = Connector::new(tcp(), Security::Tls(alice.clone()), Role::Scheduler);
        let conn = good.call(uri.clone()).await.unwrap();
        assert!(matches!(conn.into_inner(), ClientConn::Tls(..)));
        let peer = match futures::StreamExt::next(&mut accepted).await.unwrap().unwrap() {
            crate::server::Conn::Tls(_, peer) => peer,
            crate::server::Conn::Plain(..) => panic!("plaintext"),
        };
        assert_eq!(peer.identity, Some(Identity::User("alice".into())));

        // A server that is a worker is not a scheduler.
        let mut wrong_role = Connector::new(tcp(), Security::Tls(alice), Role::Worker);
        let err = wrong_role.call(uri.clone()).await.err().unwrap();
        assert!(err.to_string().contains("certificate"), "{err}");

        // A client of another CA is refused by the server.
        let other = Authority::new("b").unwrap();
        let mut files = other.write_holder(&dir.path().join("m"), &Identity::User("mallory".into()), &[]).unwrap();
        let mallory = Credentials::load(files.clone()).unwrap();
        let mut foreign = Connector::new(tcp(), Security::Tls(mallory), Role::Scheduler);
        assert!(foreign.call(uri.clone()).await.is_err(), "a server of another CA is not trusted");
        files.ca = dir.path().join("a/ca.pem");
        let mallory = Credentials::load(files).unwrap();
        let mut foreign = Connector::new(tcp(), Security::Tls(mallory), Role::Scheduler);
        // TLS 1.3: the client finishes first; the server's refusal shows on
        // the first read.
        if let Ok(conn) = foreign.call(uri).await {
            let mut conn = conn.into_inner();
            let mut buf = [0u8; 1];
            let read = tokio::io::AsyncReadExt::read(&mut conn, &mut buf).await;
            assert!(read.is_err() || read.unwrap() == 0, "the server closes on a foreign client");
        }
        let next = tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut accepted)).await;
        assert!(next.is_err(), "no connection is yielded for a refused handshake");
    }
}
