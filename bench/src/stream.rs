//! `stream`: how fast one worker's `ChunkService` streams chunks to a client
//! on loopback, against a plain TCP copy of the same file, in the same run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_proto::pb::{self, chunk_service_client::ChunkServiceClient, chunk_service_server::ChunkServiceServer};
use ferry_worker::chunk_server::ChunkServer;
use ferry_worker::index::index_file;
use ferry_worker::limiter::Bandwidth;
use ferry_worker::store::{ChunkStore, Location};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::stats::median;

/// Flags of `stream`.
#[derive(clap::Args)]
pub struct Args {
    /// Bytes to move per run.
    #[arg(long, default_value = "512MiB", value_parser = ferry_worker::config::parse_rate)]
    size: u64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Chunks pulled at once over gRPC.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Scratch directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

async fn grpc_once(
    addr: &str,
    security: &ferry_sdk::Security,
    chunks: &[(Vec<u8>, u64)],
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let channel = ferry_worker::executor::peer_channel(addr, true, security).map_err(anyhow::Error::msg)?;
    let start = Instant::now();
    let queue = std::sync::Arc::new(tokio::sync::Mutex::new(chunks.to_vec()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (queue, channel) = (queue.clone(), channel.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = ChunkServiceClient::new(channel);
            let mut got = 0u64;
            loop {
                let Some((hash, len)) = queue.lock().await.pop() else { return anyhow::Ok(got) };
                let mut s =
                    client.get_chunk(pb::GetChunkRequest { hash, len, job_id: String::new() }).await?.into_inner();
                while let Some(frame) = s.message().await? {
                    got += frame.data.len() as u64;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

async fn tcp_once(file: &std::path::Path) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let path = file.to_path_buf();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await?;
        let mut f = tokio::fs::File::open(path).await?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await?;
        }
        anyhow::Ok(())
    });
    let start = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    let mut buf = vec![0u8; 1 << 20];
    while sock.read(&mut buf).await? > 0 {}
    server.await??;
    Ok(start.elapsed())
}

/// Runs the comparison and prints MiB/s for both and their ratio.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let dir = a.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("ferry-bench-stream-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("payload.bin");
    ferry_worker::sample::write_random(&file, a.size, 99)?;
    let indexed = tokio::task::spawn_blocking({
        let file = file.clone();
        move || index_file(&file)
    })
    .await??;
    let store = ChunkStore::open(&dir.join("store")).context("chunk store")?;
    let mut chunks = Vec::new();
    for c in &indexed.chunks {
        store.put(&c.hash, &Location { path: file.clone(), offset: c.offset, len: c.len })?;
        chunks.push((c.hash.to_vec(), c.len));
    }
    // The same chunk service twice: with mutual TLS (a worker's
    // certificate on each side, as between two workers) and in plaintext.
    let ca = crate::tls::BenchCa::new(&dir.join("tls"))?;
    let tls = ferry_sdk::Security::Tls(ferry_sdk::tls::Credentials::load(
        ca.files(&ferry_sdk::tls::Identity::Worker("bench".into()))?,
    )?);
    let mut servers = Vec::new();
    for security in [tls.clone(), ferry_sdk::Security::Insecure] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let server = ChunkServiceServer::new(ChunkServer::new(store.clone(), 64, Bandwidth::new(None)));
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                .initial_stream_window_size(Some(4 * 1024 * 1024))
                .initial_connection_window_size(Some(16 * 1024 * 1024))
                .add_service(server)
                .serve_with_incoming(ferry_sdk::tls::incoming(incoming, security.clone())),
        );
        servers.push((addr, security, serving));
    }
    let mib = a.size as f64 / (1024.0 * 1024.0);
    let (mut secured, mut plain, mut tcp) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..a.repeat.max(1) {
        // Alternate which goes first: neither always meets a cache the
        // other just warmed.
        for i in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let (addr, security, _) = &servers[i];
            let took = mib / grpc_once(addr, security, &chunks, a.concurrency).await?.as_secs_f64();
            if i == 0 { &mut secured } else { &mut plain }.push(took);
        }
        tcp.push(mib / tcp_once(&file).await?.as_secs_f64());
    }
    for (_, _, serving) in servers {
        serving.abort();
    }
    std::fs::remove_dir_all(&dir).ok();
    let (s, g, t) = (median(secured), median(plain), median(tcp));
    println!(
        "stream: {mib:.0} MiB from page cache over loopback, {} chunks, median of {} runs",
        chunks.len(),
        a.repeat.max(1)
    );
    println!("  gRPC chunk streaming, mutual TLS ({} chunks at once): {s:.0} MiB/s", a.concurrency);
    println!("  gRPC chunk streaming, plaintext:                       {g:.0} MiB/s");
    println!("  plain TCP copy of the same bytes:                      {t:.0} MiB/s");
    println!("  ratio TLS / plaintext: {:.2}   ratio plaintext gRPC / TCP: {:.2}", s / g, g / t);
    Ok(())
}
