//! What a worker does for the leader's commands.
//!
//! - **index** (as a source): chunk and hash files under the roots, remember
//!   where each chunk is so peers can pull it.
//! - **prepare** (as a target): check what it already holds. A destination
//!   that is already identical is `unchanged`; otherwise chunks found locally
//!   (the current destination file, any file in the chunk store) are copied
//!   into the staging file at their offsets and reported, so they never move
//!   over the network (delta transfer).
//! - **pull**: stream one chunk from a peer, check its BLAKE3 while writing it
//!   at its offset in the staging file (no second copy), then acknowledge.
//! - **pack**: fsync, whole-file BLAKE3 check, atomic rename into place with
//!   the source's mode, run the named hook, report fin. The check reads the
//!   staging file back; most of it is read and hashed while the chunks are
//!   still arriving (see [`crate::file_tree`]).
//! - **cancel**: drop the job's staging data.
//!
//! Concurrency: a per-job gate lets pulls write in parallel but never while
//! or after pack runs; a per-chunk state refuses a second pull of a region
//! being written; a repeated prepare or pack (after a reconnect or a leader
//! change) is answered from what this worker already did.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_proto::pb::{self, chunk_service_client::ChunkServiceClient};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use crate::command::{Command, Fin, Held, Manifest, Pull, PullError, PullFailure, Report, TargetFile};
use crate::file_tree::{FileTree, LEAF};
use crate::index;
use crate::metrics::WorkerMetrics;
use crate::roots::{c_name, io_result, open_at, Roots};
use crate::store::{ChunkStore, Location, Retained};

struct WorkFile {
    chunks: Vec<index::ChunkRef>,
    /// Chunks of the file at the destination before this job, if it differs.
    previous: Vec<index::ChunkRef>,
    size: u64,
    mode: u32,
    blake3: [u8; 32],
    dest: PathBuf,
    staging: PathBuf,
    /// The destination's directory, opened when the job was prepared (see
    /// [`Roots::open_dir`]): the staging file is created, written, renamed
    /// and removed relative to it, never through a path looked up again.
    dir: Arc<OwnedFd>,
    staging_name: CString,
    dest_name: CString,
    unchanged: bool,
    /// The whole-file hash, leaf by leaf as chunks land.
    tree: Mutex<FileTree>,
}

impl WorkFile {
    fn tree(&self) -> std::sync::MutexGuard<'_, FileTree> {
        self.tree.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where one chunk of a job stands on this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// A pull is writing it now; a second pull is refused, so a region is
    /// never written twice at once.
    Pulling,
    /// Written and verified.
    Done,
}

struct JobWork {
    files: Vec<WorkFile>,
    /// `None` until packed, then the fin it produced. Pulls hold it shared
    /// while they write; pack holds it exclusively, so no write can touch a
    /// file once pack starts, and a repeated pack replays the same fin.
    gate: tokio::sync::RwLock<Option<Fin>>,
    chunks: Mutex<HashMap<(u32, u32), ChunkState>>,
    /// Turns true when the job is cancelled: a hook still running for it
    /// is killed (with everything it started).
    stop: tokio::sync::watch::Sender<bool>,
}

impl JobWork {
    fn chunk_state(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u32), ChunkState>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Frees the files' leaf hashes: nothing reads them after pack or cancel.
    fn release_trees(&self) {
        for f in &self.files {
            f.tree().release();
        }
    }

    /// What a prepare reports: files identical already, and chunks held.
    fn report(&self) -> Held {
        let unchanged = self.files.iter().enumerate().filter(|(_, f)| f.unchanged).map(|(i, _)| i as u32).collect();
        let mut local: Vec<(u32, u32)> =
            self.chunk_state().iter().filter(|(_, s)| **s == ChunkState::Done).map(|(k, _)| *k).collect();
        local.sort_unstable();
        Held { unchanged, local }
    }
}

/// HTTP/2 stream window for pulls.
const PULL_WINDOW: u32 = 512 * 1024;

/// How a worker reaches a peer's chunk service (`ferry-bench stream`
/// measures the same settings), connecting on first use, secured as
/// `security` says (the peer must hold a worker certificate); with
/// `socket_priority` the connection's packets go first in the host's queue
/// (see [`crate::net`]).
pub fn peer_channel(addr: &str, socket_priority: bool, security: &ferry_tls::Security) -> Result<Channel, String> {
    let tcp = crate::net::PullConnector::new(socket_priority.then_some(crate::net::INTERACTIVE));
    let connector = ferry_tls::Connector::new(tcp, security.clone(), ferry_tls::Role::Worker);
    Ok(peer_endpoint(addr)?.connect_with_connector_lazy(connector))
}

fn peer_endpoint(addr: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("peer address {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        // A small window: the sender runs at most this far ahead of what
        // this worker consumes, so a download cap pushes back on the
        // sender (as a slow link would) instead of tying up its upload.
        .initial_stream_window_size(Some(PULL_WINDOW))
        .initial_connection_window_size(Some(16 * PULL_WINDOW))
        // HTTP/2's default 16 KiB frames cut each 256 KiB chunk frame into
        // sixteen, each parsed, counted against the window and woken for
        // on its own: on loopback that halved the throughput.
        .max_frame_size(PULL_WINDOW))
}

/// Finished jobs remembered (to answer a repeated pack or prepare).
const KEEP_FINISHED: usize = 256;

/// Executes commands. Shared by the session and its spawned tasks.
pub struct Executor {
    pub(crate) name: String,
    pub(crate) roots: Roots,
    pub(crate) store: ChunkStore,
    pub(crate) hooks: BTreeMap<String, String>,
    pub(crate) downloads: Arc<Semaphore>,
    bandwidth: crate::limiter::Bandwidth,
    /// How long a pull may receive nothing before it fails.
    stall_timeout: Duration,
    /// Whether pull connections ask to go first in the host's queue.
    socket_priority: bool,
    /// How this worker's connections (to peers and to the leader) are
    /// secured.
    pub(crate) security: ferry_tls::Security,
    pub(crate) metrics: Arc<WorkerMetrics>,
    pub(crate) retained: Retained,
    /// Started by the leader's drain command (or the daemon's SIGTERM).
    pub drain: crate::drain::Drain,
    jobs: Mutex<HashMap<String, Arc<JobWork>>>,
    /// Finished or cancelled job ids, oldest first (bounded).
    ended: Mutex<std::collections::VecDeque<String>>,
    cancelled: Mutex<std::collections::HashSet<String>>,
    peers: Mutex<HashMap<String, Channel>>,
}

/// Largest chunk accepted in a manifest.
const MAX_MANIFEST_CHUNK: u64 = 64 * 1024 * 1024;

/// Checks a manifest from the leader: chunks contiguous from 0 to `size`.
fn check_manifest(m: &Manifest) -> Result<(), String> {
    let mut next = 0u64;
    for c in &m.chunks {
        if c.offset != next || c.len == 0 || c.len > MAX_MANIFEST_CHUNK {
            return Err(format!("manifest of {}: chunk at {} does not follow on {next}", m.path, c.offset));
        }
        next = next.checked_add(c.len).ok_or("manifest: chunk offsets overflow")?;
    }
    if next != m.size {
        return Err(format!("manifest of {}: chunks cover {next} of {} bytes", m.path, m.size));
    }
    Ok(())
}

/// Reads `len` bytes at `loc` and returns them if they hash to `hash`.
fn read_verified(loc: &Location, hash: &[u8; 32]) -> Option<Vec<u8>> {
    let file = std::fs::File::open(&loc.path).ok()?;
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset).ok()?;
    (blake3::hash(&buf).as_bytes() == hash).then_some(buf)
}

fn safe_job_dir(job_id: &str) -> String {
    job_id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

/// Opens a staging file in `dir` without following a symlink at its name
/// (created readable by its owner only; pack sets the final mode).
fn open_staging(dir: &OwnedFd, name: &CStr, create: bool) -> std::io::Result<std::fs::File> {
    let flags = libc::O_RDWR | libc::O_NOFOLLOW | if create { libc::O_CREAT } else { 0 };
    open_at(dir, name, flags, 0o600)
}

impl Executor {
    /// A new executor for the worker `config` describes.
    pub fn new(
        config: &crate::WorkerConfig,
        roots: Roots,
        store: ChunkStore,
        metrics: Arc<WorkerMetrics>,
        retained: Retained,
        security: ferry_tls::Security,
    ) -> Self {
        Self {
            security,
            name: config.name.clone(),
            roots,
            store,
            hooks: config.hooks.clone(),
            downloads: Arc::new(Semaphore::new(config.max_downloads)),
            bandwidth: crate::limiter::Bandwidth::new(config.download_limit),
            stall_timeout: config.pull_stall_timeout,
            socket_priority: config.socket_priority,
            drain: crate::drain::Drain::new(config.drain_timeout, config.heartbeat, metrics.clone()),
            metrics,
            retained,
            jobs: Mutex::new(HashMap::new()),
            ended: Mutex::new(std::collections::VecDeque::new()),
            cancelled: Mutex::new(std::collections::HashSet::new()),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// Runs one command from the leader (the session spawns each); its
    /// answer, if it has one.
    pub async fn handle(self: Arc<Self>, cmd: Command) -> Option<Report> {
        match cmd {
            Command::Drain => {
                self.drain.start("the leader asked");
                None
            }
            Command::Index { request, paths } => Some(Report::Indexed { request, result: self.index(paths).await }),
            Command::Prepare { job, files } => {
                let this = self.clone();
                let id = job.clone();
                let result = tokio::task::spawn_blocking(move || this.prepare(&id, &files))
                    .await
                    .unwrap_or_else(|e| Err(format!("prepare task failed: {e}")));
                Some(Report::Prepared { job, result })
            }
            Command::Pull(p) => Some(match self.pull(&p).await {
                Ok(()) => Report::Pulled { job: p.job, file: p.file, chunk: p.chunk, from: p.from_worker },
                Err(error) => {
                    tracing::warn!(worker = %self.name, job = %p.job, file = p.file, chunk = p.chunk,
                        from = %p.from_worker, failure = ?error.failure, %error, "pull failed");
                    Report::PullFailed { job: p.job, file: p.file, chunk: p.chunk, from: p.from_worker, error }
                }
            }),
            Command::Pack { job, hook } => Some(Report::Fin(self.pack(&job, &hook).await)),
            Command::Cancel { job } => {
                self.cancel(&job).await;
                None
            }
            // The check prepare makes first, without creating anything.
            Command::Check { request, destinations } => {
                let roots = self.roots.clone();
                let check = move || destinations.iter().try_for_each(|d| roots.check_write(d).map(|_| ()));
                let result =
                    tokio::task::spawn_blocking(check).await.unwrap_or_else(|e| Err(format!("check task: {e}")));
                Some(Report::Checked { request, result })
            }
        }
    }

    async fn index(self: Arc<Self>, paths: Vec<String>) -> Result<Vec<Manifest>, String> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut files = Vec::new();
            for path in &paths {
                let resolved = this.roots.check_read(path)?;
                let mut f = this.store.index(&resolved).map_err(|e| format!("{path}: {e}"))?;
                for c in &f.chunks {
                    let loc = Location { path: resolved.clone(), offset: c.offset, len: c.len };
                    this.store.put(&c.hash, &loc).map_err(|e| e.to_string())?;
                }
                // Named as asked, not as resolved.
                f.path = path.clone();
                files.push(f);
            }
            Ok(files)
        })
        .await
        .unwrap_or_else(|e| Err(format!("index task failed: {e}")))
    }

    fn is_cancelled(&self, job_id: &str) -> bool {
        self.cancelled.lock().unwrap_or_else(|e| e.into_inner()).contains(job_id)
    }

    /// Blocking. Returns unchanged file indexes and chunks held
    /// (`file << 32 | chunk`). Idempotent: a job this worker knows already
    /// (a repeated prepare after a reconnect, or after pack) is reported as
    /// it stands, without touching its files.
    fn prepare(&self, job_id: &str, targets: &[TargetFile]) -> Result<Held, String> {
        if self.is_cancelled(job_id) {
            return Err("the job was cancelled".into());
        }
        if let Some(work) = self.work(job_id) {
            return Ok(work.report());
        }
        let mut files = Vec::new();
        let mut done = HashMap::new();
        // One handle per destination directory, shared by its files.
        let mut dirs: HashMap<PathBuf, Arc<OwnedFd>> = HashMap::new();
        for (i, tf) in targets.iter().enumerate() {
            let m = &tf.manifest;
            let dest = self.roots.check_write(&tf.destination)?;
            check_manifest(m)?;
            let (chunks, blake3) = (m.chunks.clone(), m.blake3);
            // Staged beside the destination (same file system), so the final
            // rename is atomic; the hidden name is never the final one.
            let parent = dest.parent().ok_or("destination has no parent directory")?;
            if !parent.is_dir() {
                std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
                sync_new_dirs(self.roots.list(), parent)?;
            }
            let dir = match dirs.get(parent) {
                Some(dir) => Arc::clone(dir),
                None => {
                    let dir = Arc::new(self.roots.open_dir(parent)?);
                    dirs.insert(parent.to_path_buf(), Arc::clone(&dir));
                    dir
                }
            };
            let dest_file = dest.file_name().ok_or("destination has no file name")?;
            let name = dest_file.to_string_lossy();
            let dest_name = c_name(dest_file.as_bytes())?;
            let staging_file = format!(".{name}.ferry-{}.part", safe_job_dir(job_id));
            let staging = parent.join(&staging_file);
            let staging_name = c_name(staging_file.as_bytes())?;
            let mut same = false;
            let mut previous = Vec::new();
            if dest.is_file() {
                let current = self.store.index(&dest).ok();
                if current.as_ref().is_some_and(|c| c.size == m.size && c.blake3 == blake3) {
                    same = true;
                    for c in &chunks {
                        let _ = self.store.put(&c.hash, &Location { path: dest.clone(), offset: c.offset, len: c.len });
                    }
                } else if let Some(old) = current {
                    // The previous version: its chunks are candidates for reuse.
                    for c in &old.chunks {
                        let _ = self.store.put(&c.hash, &Location { path: dest.clone(), offset: c.offset, len: c.len });
                    }
                    previous = old.chunks;
                }
            }
            if !same {
                let out = open_staging(&dir, &staging_name, true)
                    .map_err(|e| format!("staging {}: {e}", staging.display()))?;
                out.set_len(m.size).map_err(|e| format!("staging {}: {e}", staging.display()))?;
                for (c, chunk) in chunks.iter().enumerate() {
                    let Some(loc) = self.store.get(&chunk.hash) else { continue };
                    let here = Location { path: staging.clone(), offset: chunk.offset, len: chunk.len };
                    match read_verified(&loc, &chunk.hash) {
                        Some(bytes) => {
                            if loc != here {
                                out.write_all_at(&bytes, chunk.offset).map_err(|e| format!("staging write: {e}"))?;
                                start_writeback(&out, chunk.offset, chunk.len);
                            }
                            let _ = self.store.put(&chunk.hash, &here);
                            done.insert((i as u32, c as u32), ChunkState::Done);
                            self.metrics.chunks_reused.inc();
                        }
                        None => self.store.forget(&chunk.hash),
                    }
                }
            }
            files.push(WorkFile {
                chunks,
                previous,
                size: m.size,
                mode: m.mode,
                blake3,
                dest,
                staging,
                dir,
                staging_name,
                dest_name,
                unchanged: same,
                tree: Mutex::new(FileTree::new(m.size)),
            });
        }
        let work = Arc::new(JobWork {
            files,
            gate: tokio::sync::RwLock::new(None),
            chunks: Mutex::new(done),
            stop: tokio::sync::watch::Sender::new(false),
        });
        let report = work.report();
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        // A cancel that came in while this ran wins.
        if self.is_cancelled(job_id) {
            drop(jobs);
            remove_staging(&work);
            return Err("the job was cancelled".into());
        }
        jobs.insert(job_id.to_string(), work);
        Ok(report)
    }

    fn work(&self, job_id: &str) -> Option<Arc<JobWork>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(job_id).cloned()
    }

    fn peer(&self, addr: &str) -> Result<Channel, String> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ch) = peers.get(addr) {
            return Ok(ch.clone());
        }
        let ch = peer_channel(addr, self.socket_priority, &self.security)?;
        peers.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    async fn pull(&self, cmd: &Pull) -> Result<(), PullError> {
        use PullFailure::*;
        let work = self.work(&cmd.job).ok_or_else(|| PullError::new(NotPrepared, "job not prepared on this worker"))?;
        let key = (cmd.file, cmd.chunk);
        let file = work.files.get(cmd.file as usize).ok_or_else(|| PullError::new(Local, "no such file in the job"))?;
        let chunk =
            *file.chunks.get(cmd.chunk as usize).ok_or_else(|| PullError::new(Local, "no such chunk in the file"))?;
        let gate = work.gate.read().await;
        if gate.is_some() {
            return Err(PullError::new(AlreadyInstalled, "job already installed on this worker"));
        }
        {
            let mut states = work.chunk_state();
            match states.get(&key) {
                Some(ChunkState::Done) => return Ok(()),
                Some(ChunkState::Pulling) => return Err(PullError::new(AlreadyPulling, "already pulling this chunk")),
                None => {
                    states.insert(key, ChunkState::Pulling);
                }
            }
        }
        self.metrics.downloads_in_flight.inc();
        let result = self.fetch(cmd, file, chunk).await;
        self.metrics.downloads_in_flight.dec();
        match &result {
            Ok(()) => self.metrics.chunks_pulled.inc(),
            Err(_) => self.metrics.pull_failures.inc(),
        };
        let mut states = work.chunk_state();
        match &result {
            Ok(()) => states.insert(key, ChunkState::Done),
            // The region holds nothing verified: another pull may write it.
            Err(_) => states.remove(&key),
        };
        drop(states);
        drop(gate);
        if result.is_ok() {
            // Not awaited: the ack does not wait for it, and pack hashes
            // whatever it has not done.
            let work = work.clone();
            tokio::task::spawn_blocking(move || hash_written(&work, key.0, key.1));
        }
        result
    }

    /// Streams one chunk from a peer into its region of the staging file,
    /// checking its length and BLAKE3.
    async fn fetch(&self, cmd: &Pull, file: &WorkFile, chunk: index::ChunkRef) -> Result<(), PullError> {
        use PullFailure::*;
        let local = |what: &str, e: &dyn std::fmt::Display| PullError::new(Local, format!("{what}: {e}"));
        let _permit = self.downloads.acquire().await.map_err(|_| PullError::new(Local, "worker stopping"))?;
        let channel = self.peer(&cmd.from_addr).map_err(|e| PullError::new(Holder, e))?;
        let mut client = ChunkServiceClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
        let mut req = tonic::Request::new(pb::GetChunkRequest {
            hash: chunk.hash.to_vec(),
            len: chunk.len,
            job_id: cmd.job.clone(),
        });
        req.set_timeout(Duration::from_secs(60));
        // A peer that stops sending while its connection lives on (a hung
        // disk read, a stuck upload: the keep-alive pings still get their
        // answers) would otherwise hold this pull slot until its server gives
        // up on the call.
        let stall = self.stall_timeout;
        let stalled = || {
            PullError::new(
                Stalled,
                format!("{} sent nothing for {}", cmd.from_worker, humantime::format_duration(stall)),
            )
        };
        // The holder's answer: at its upload limit it says so (and another
        // holder is tried); a chunk it no longer has (its file changed or is
        // gone) is told apart; anything else is the holder's failure.
        let refused = |s: tonic::Status| {
            let failure = match s.code() {
                tonic::Code::ResourceExhausted => HolderBusy,
                tonic::Code::NotFound | tonic::Code::DataLoss => Gone,
                _ => Holder,
            };
            PullError::new(failure, format!("{}: {}", cmd.from_worker, s.message()))
        };
        let mut stream = tokio::time::timeout(stall, client.get_chunk(req))
            .await
            .map_err(|_| stalled())?
            .map_err(refused)?
            .into_inner();
        let out = Arc::new(open_staging(&file.dir, &file.staging_name, false).map_err(|e| local("staging", &e))?);
        let mut hasher = blake3::Hasher::new();
        let end = chunk.offset + chunk.len;
        let mut offset = chunk.offset;
        while let Some(frame) =
            tokio::time::timeout(stall, stream.message()).await.map_err(|_| stalled())?.map_err(refused)?
        {
            if frame.data.len() as u64 > end - offset {
                return Err(PullError::new(Holder, format!("{} sent more than {} bytes", cmd.from_worker, chunk.len)));
            }
            self.bandwidth.take(frame.data.len()).await;
            self.metrics.bytes_downloaded.inc_by(frame.data.len() as u64);
            hasher.update(&frame.data);
            let (out, at) = (out.clone(), offset);
            offset += frame.data.len() as u64;
            tokio::task::spawn_blocking(move || out.write_all_at(&frame.data, at))
                .await
                .map_err(|e| local("write task", &e))?
                .map_err(|e| local("staging write", &e))?;
        }
        if offset != end {
            let sent = offset - chunk.offset;
            return Err(PullError::new(Holder, format!("{} sent {sent} of {} bytes", cmd.from_worker, chunk.len)));
        }
        if hasher.finalize().as_bytes() != &chunk.hash {
            self.metrics.bad_chunks.inc();
            return Err(PullError::new(BadChunk, format!("chunk from {} failed its BLAKE3 check", cmd.from_worker)));
        }
        // Start writing the chunk to disk now, at the rate it arrives,
        // instead of leaving it to the kernel's dirty-page writeback: that
        // starts only once gigabytes are dirty (10 % of memory), then stalls
        // every fsync on the machine behind it, and leaves the whole file
        // for the fsync at pack.
        let _ = tokio::task::spawn_blocking(move || start_writeback(&out, chunk.offset, chunk.len)).await;
        let here = Location { path: file.staging.clone(), offset: chunk.offset, len: chunk.len };
        self.store.put(&chunk.hash, &here).map_err(|e| local("chunk store", &e))?;
        // Durable before the ack, so a restarted worker still finds it.
        self.store.flush().await.map_err(|e| local("chunk store", &e))?;
        Ok(())
    }

    async fn pack(&self, job_id: &str, hook_name: &str) -> Fin {
        let fin =
            |ok: bool, reason: String, hook_exit: Option<i32>| Fin { job: job_id.to_string(), ok, reason, hook_exit };
        let Some(work) = self.work(job_id) else {
            return fin(false, "job not prepared on this worker".into(), None);
        };
        // Waits for running pulls; later pulls see the job packed.
        let mut gate = work.gate.write().await;
        if let Some(done) = gate.as_ref() {
            return done.clone();
        }
        let missing = {
            let states = work.chunk_state();
            work.files.iter().enumerate().any(|(i, f)| {
                !f.unchanged
                    && (0..f.chunks.len()).any(|c| states.get(&(i as u32, c as u32)) != Some(&ChunkState::Done))
            })
        };
        if missing {
            return fin(false, "pack arrived before every chunk was held".into(), None);
        }
        let hook = if hook_name.is_empty() {
            None
        } else {
            match self.hooks.get(hook_name) {
                Some(c) => Some(c.clone()),
                None => return fin(false, format!("hook: this worker has no hook named {hook_name}"), None),
            }
        };
        let (w, store, retained) = (work.clone(), self.store.clone(), self.retained.clone());
        let installed = tokio::task::spawn_blocking(move || install_all(&w, &store, &retained))
            .await
            .unwrap_or_else(|e| Err(format!("install task failed: {e}")));
        // A finished job stays known for a while (repeated packs): keep its
        // fin, not its leaves.
        work.release_trees();
        if installed.is_ok() {
            self.metrics.files_installed.inc_by(work.files.iter().filter(|f| !f.unchanged).count() as u64);
            self.metrics.retained_bytes.set(self.retained.bytes() as i64);
        }
        let result = match installed {
            Err(reason) => {
                remove_staging(&work);
                fin(false, reason, None)
            }
            Ok(paths) => match hook {
                None => fin(true, String::new(), None),
                Some(command) => match crate::hooks::run(&command, job_id, &paths, cancelled(&work)).await {
                    Ok(0) => fin(true, String::new(), Some(0)),
                    Ok(code) => {
                        self.metrics.hook_failures.inc();
                        fin(false, format!("hook {hook_name} exited with {code}"), Some(code))
                    }
                    Err(e) => {
                        self.metrics.hook_failures.inc();
                        fin(false, format!("hook {hook_name}: {e}"), None)
                    }
                },
            },
        };
        *gate = Some(result.clone());
        drop(gate);
        self.ended(job_id);
        result
    }

    /// Remembers that a job ended; forgets the oldest beyond the bound.
    fn ended(&self, job_id: &str) {
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended.push_back(job_id.to_string());
        while ended.len() > KEEP_FINISHED {
            if let Some(old) = ended.pop_front() {
                self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&old);
                self.cancelled.lock().unwrap_or_else(|e| e.into_inner()).remove(&old);
            }
        }
    }

    /// Drops a job's staged data; installed files stay as they are.
    async fn cancel(&self, job_id: &str) {
        self.cancelled.lock().unwrap_or_else(|e| e.into_inner()).insert(job_id.to_string());
        let work = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(job_id);
        if let Some(work) = work {
            // A hook still running for the job ends now.
            work.stop.send_replace(true);
            // Wait for pulls writing into staging files, then remove them.
            let gate = work.gate.write().await;
            if gate.is_none() {
                remove_staging(&work);
                work.release_trees();
            }
        }
        self.ended(job_id);
    }
}

/// Blocking: after `create_dir_all(dir)`, makes the new directories
/// durable entries of their parents: fsyncs each parent from `dir`'s up to
/// the root holding it.
fn sync_new_dirs(roots: &[PathBuf], dir: &Path) -> Result<(), String> {
    let mut at = dir;
    while let Some(parent) = at.parent() {
        let synced = std::fs::File::open(parent).and_then(|d| d.sync_all());
        synced.map_err(|e| format!("fsync {}: {e}", parent.display()))?;
        if roots.iter().any(|r| r == parent) || !roots.iter().any(|r| parent.starts_with(r)) {
            return Ok(());
        }
        at = parent;
    }
    Ok(())
}

/// Resolves when `work`'s job is cancelled.
fn cancelled(work: &JobWork) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut stop = work.stop.subscribe();
    async move {
        if stop.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` of `file` to
/// disk, without waiting for it (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). Advisory: an error changes nothing, since pack
/// fsyncs the whole file anyway.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    // SAFETY: a valid open descriptor; the call only reads its arguments.
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Blocking, best effort: hashes the leaves of the whole-file hash that
/// chunk `chunk` of file `file` completed, with the chunks next to it that are
/// written already, reading them back from the staging file.
fn hash_written(work: &JobWork, file: u32, chunk: u32) {
    let Some(f) = work.files.get(file as usize) else { return };
    let Some(this) = f.chunks.get(chunk as usize) else { return };
    let held = {
        let states = work.chunk_state();
        let done = |c: usize| states.get(&(file, c as u32)) == Some(&ChunkState::Done);
        // Far enough to cover the leaves this chunk touches.
        let (want_start, want_end) = (this.offset / LEAF * LEAF, (this.offset + this.len).div_ceil(LEAF) * LEAF);
        let (mut first, mut last) = (chunk as usize, chunk as usize);
        while first > 0 && f.chunks[first].offset > want_start && done(first - 1) {
            first -= 1;
        }
        while last + 1 < f.chunks.len() && f.chunks[last].offset + f.chunks[last].len < want_end && done(last + 1) {
            last += 1;
        }
        f.chunks[first].offset..f.chunks[last].offset + f.chunks[last].len
    };
    let mut tree = f.tree();
    let leaves = tree.unhashed_within(held);
    if leaves.is_empty() {
        return;
    }
    let range = tree.leaf_range(leaves.start).start..tree.leaf_range(leaves.end - 1).end;
    let mut buf = vec![0u8; (range.end - range.start) as usize];
    // Gone after pack or cancel: nothing left to do.
    let Ok(staging) = open_staging(&f.dir, &f.staging_name, false) else { return };
    if staging.read_exact_at(&mut buf, range.start).is_ok() {
        tree.hash_leaves(leaves, &buf);
    }
}

fn remove_staging(work: &JobWork) {
    for f in &work.files {
        // SAFETY: valid descriptor and NUL-terminated name.
        let _ = unsafe { libc::unlinkat(f.dir.as_raw_fd(), f.staging_name.as_ptr(), 0) };
    }
}

/// Blocking: checks and moves every staged file into place. Returns the
/// installed paths. Never leaves a partial file under a final name: the
/// rename happens only after the whole-file hash matched.
fn install_all(work: &JobWork, store: &ChunkStore, retained: &Retained) -> Result<Vec<String>, String> {
    let mut paths = Vec::new();
    for f in &work.files {
        paths.push(f.dest.display().to_string());
        if f.unchanged {
            continue;
        }
        let file = open_staging(&f.dir, &f.staging_name, false).map_err(|e| format!("staging: {e}"))?;
        file.set_len(f.size).map_err(|e| format!("staging: {e}"))?;
        // fchmod on the handle, before the fsync that makes it durable with
        // the data; setuid, setgid and sticky bits are dropped.
        file.set_permissions(std::fs::Permissions::from_mode(f.mode & 0o777))
            .map_err(|e| format!("chmod {}: {e}", f.staging.display()))?;
        file.sync_all().map_err(|e| format!("fsync {}: {e}", f.staging.display()))?;
        let got = f
            .tree()
            .root(|range, buf| {
                buf.resize((range.end - range.start) as usize, 0);
                file.read_exact_at(buf, range.start)
            })
            .map_err(|e| format!("hashing {}: {e}", f.staging.display()))?;
        if got != f.blake3 {
            return Err(format!("{} failed its whole-file BLAKE3 check", f.dest.display()));
        }
        drop(file);
        if !f.previous.is_empty() {
            // Keep the version being replaced, so its chunks stay reusable.
            retained.keep(store, &f.dest, &f.previous);
        }
        let dir = f.dir.as_raw_fd();
        fail::fail_point!("install-before-rename", |_| crate::crash("install-before-rename"));
        // SAFETY: valid descriptor and NUL-terminated names; both in `dir`.
        io_result(unsafe { libc::renameat(dir, f.staging_name.as_ptr(), dir, f.dest_name.as_ptr()) })
            .map_err(|e| format!("rename into {}: {e}", f.dest.display()))?;
        // The new name is durable only once its directory is: a failure
        // here is the install's (the hook does not run), not ignored.
        // SAFETY: valid descriptor.
        io_result(unsafe { libc::fsync(dir) })
            .map_err(|e| format!("fsync of the directory of {}: {e}", f.dest.display()))?;
        for c in &f.chunks {
            let _ = store.put(&c.hash, &Location { path: f.dest.clone(), offset: c.offset, len: c.len });
        }
        let installed = index::IndexedFile {
            path: f.dest.display().to_string(),
            size: f.size,
            mode: f.mode & 0o777,
            blake3: f.blake3,
            chunks: f.chunks.clone(),
        };
        store.remember_installed(&f.dest, &installed);
    }
    Ok(paths)
}
