//! `ferry.v1.ChunkService`: serves chunk bytes to peers as a stream of frames,
//! read straight from the file that holds them (source file, staging file or
//! installed file), with a cap on concurrent uploads. The receiver checks the
//! hash; this side only reads.
//!
//! Fail points (builds with the `failpoints` feature only, armed with
//! `FAILPOINTS=name=return`): `chunk-server-corrupt` flips a byte in every
//! chunk served (a misbehaving peer); `chunk-server-stall` answers every
//! request, then sends nothing until the caller gives up (a peer whose disk
//! or process hangs).

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use ferry_proto::pb::{self, chunk_service_server::ChunkService};
use tokio::sync::Semaphore;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::store::ChunkStore;

/// Bytes per stream frame, at most.
pub const FRAME: usize = 256 * 1024;
/// Bytes per stream frame, at least.
const MIN_FRAME: usize = 16 * 1024;

/// The frame size for an upload cap of `limit` bytes/s shared by up to
/// `max_uploads` streams: about a second of one stream's share, from
/// 16 KiB to [`FRAME`]. A frame leaves only once the cap allows all
/// of it, so under a low cap full-size frames would leave the receiver
/// waiting long enough to give the pull up as stalled.
pub fn frame_size(limit: Option<u64>, max_uploads: usize) -> usize {
    match limit {
        None => FRAME,
        Some(l) => (l / max_uploads.max(1) as u64).clamp(MIN_FRAME as u64, FRAME as u64) as usize,
    }
}

/// The ChunkService implementation.
pub struct ChunkServer {
    pub(crate) store: ChunkStore,
    pub(crate) uploads: Arc<Semaphore>,
    /// Bytes per frame ([`frame_size`]).
    pub(crate) frame: usize,
    /// Upload cap.
    pub(crate) bandwidth: crate::limiter::Bandwidth,
    pub(crate) metrics: Arc<crate::metrics::WorkerMetrics>,
}

impl ChunkServer {
    /// A server for the chunks in `store`, with at most `max_uploads` at once
    /// and an upload cap.
    pub fn new(store: ChunkStore, max_uploads: usize, bandwidth: crate::limiter::Bandwidth) -> Self {
        Self { store, uploads: Arc::new(Semaphore::new(max_uploads)), frame: FRAME, bandwidth, metrics: Arc::default() }
    }
}

#[tonic::async_trait]
impl ChunkService for ChunkServer {
    type GetChunkStream = ReceiverStream<Result<pb::ChunkFrame, Status>>;

    async fn get_chunk(&self, request: Request<pb::GetChunkRequest>) -> Result<Response<Self::GetChunkStream>, Status> {
        let req = request.into_inner();
        let hash: [u8; 32] = req.hash.as_slice().try_into().map_err(|_| {
            Status::invalid_argument(format!("hash: a BLAKE3 hash has 32 bytes, not {}", req.hash.len()))
        })?;
        let name = || crate::index::hex(&hash);
        let loc =
            self.store.get(&hash).ok_or_else(|| Status::not_found(format!("chunk {} is not held here", name())))?;
        if req.len != loc.len {
            return Err(Status::invalid_argument(format!(
                "len: chunk {} has {} bytes, not {}",
                name(),
                loc.len,
                req.len
            )));
        }
        let permit = self
            .uploads
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("this worker is at its upload limit"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if armed("chunk-server-stall") {
            tokio::spawn(async move {
                let _permit = permit;
                tx.closed().await;
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let corrupt = armed("chunk-server-corrupt");
        let frame = self.frame;
        let bandwidth = self.bandwidth.clone();
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            metrics.uploads_in_flight.inc();
            let _in_flight = InFlight(&metrics.uploads_in_flight);
            let send = |item| tx.blocking_send(item).is_ok();
            let open = |loc: &crate::store::Location| {
                std::fs::File::open(&loc.path).and_then(|mut f| f.seek(SeekFrom::Start(loc.offset)).map(|_| f))
            };
            // A staging file may have just been renamed into place: look again.
            let opened = open(&loc).or_else(|e| match store.get(&hash) {
                Some(moved) if moved != loc && moved.len == loc.len => open(&moved),
                _ => Err(e),
            });
            let mut file = match opened {
                Ok(f) => f,
                Err(e) => {
                    store.forget(&hash);
                    send(Err(Status::not_found(format!("chunk file {}: {e}", loc.path.display()))));
                    return;
                }
            };
            // What is served is checked as it goes: a file changed since it
            // was indexed (a source rewritten during a job, a copy damaged
            // on disk) must not pass for the chunk. The last frame goes only
            // if the whole chunk matches; otherwise the entry is forgotten
            // and the puller told the chunk is gone from here.
            let mut hasher = blake3::Hasher::new();
            let mut left = loc.len as usize;
            let mut first = true;
            while left > 0 {
                // Read into spare capacity: no zeroing of a buffer about
                // to be overwritten.
                let want = left.min(frame);
                let mut buf = Vec::with_capacity(want);
                let short = match (&mut file).take(want as u64).read_to_end(&mut buf) {
                    Ok(n) if n == want => None,
                    Ok(n) => Some(format!("the file ends {} bytes short", want - n)),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(why) = short {
                    store.forget(&hash);
                    send(Err(Status::data_loss(format!("reading {}: {why}", loc.path.display()))));
                    return;
                }
                hasher.update(&buf);
                if left == buf.len() && hasher.finalize().as_bytes() != &hash {
                    store.forget(&hash);
                    let at = format!("{} at offset {}", loc.path.display(), loc.offset);
                    send(Err(Status::data_loss(format!(
                        "chunk {}: {at} no longer holds it (the file changed)",
                        crate::index::hex(&hash)
                    ))));
                    return;
                }
                if corrupt && first {
                    buf[0] ^= 0xff;
                }
                first = false;
                left -= buf.len();
                runtime.block_on(bandwidth.take(buf.len()));
                metrics.bytes_uploaded.inc_by(buf.len() as u64);
                if !send(Ok(pb::ChunkFrame { data: buf.into() })) {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// True if the test fail point `name` is armed; always false in builds
/// without the `failpoints` feature.
fn armed(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    return fail::eval(name, |_| ()).is_some();
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}

/// Lowers a gauge raised for the life of a task.
pub(crate) struct InFlight<'a>(pub(crate) &'a prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_shrink_with_a_stream_share_of_the_upload_cap_within_bounds() {
        assert_eq!(frame_size(None, 8), FRAME);
        assert_eq!(frame_size(Some(100 << 20), 8), FRAME);
        assert_eq!(frame_size(Some(1 << 20), 8), 128 * 1024);
        assert_eq!(frame_size(Some(4096), 8), MIN_FRAME);
        assert_eq!(frame_size(Some(1 << 20), 0), FRAME, "no division by zero");
    }
}
