//! One lazily connected gRPC channel per peer address, shared by the Raft
//! network and leader forwarding. Channels have a connect timeout and HTTP/2
//! keepalive, so a paused peer (which still accepts TCP) is noticed; and
//! mutual TLS, checking that the peer holds a scheduler certificate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_tls::{Role, Security};
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;

/// Largest gRPC message between schedulers: one AppendEntries batch of
/// `max_batch_entries` values of up to 1 MiB each, with room.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The channel cache. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    security: Security,
}

impl Peers {
    /// Channels secured as `security` says.
    pub fn new(security: Security) -> Self {
        Self { channels: Arc::default(), security }
    }

    /// How this node's connections are secured.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// A channel to `addr` (`host:port`), created on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Unreachable { addr: addr.into(), reason: format!("bad address: {e}") })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(4 * 1024 * 1024))
            .initial_connection_window_size(Some(16 * 1024 * 1024));
        let ch = ferry_tls::client::channel(endpoint, &self.security, Role::Scheduler);
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }
}
