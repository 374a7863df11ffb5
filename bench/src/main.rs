//! `ferry-bench`: benchmarks that print figures and ratios against a baseline
//! measured in the same run. Never used by tests; figures are medians.
//!
//! - `kv-put` — replicated puts at several concurrencies ([`kv_put`]).
//! - `distribute` — one file to N capped workers vs. the naive fan-out
//!   ([`distribute`]).
//! - `stream` — gRPC chunk streaming vs. a plain TCP copy on loopback
//!   ([`stream`]).

mod distribute;
mod kv_put;
mod netns;
mod stats;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-bench", about = "Ferry benchmarks (figures and ratios, medians over runs)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Replicated puts: throughput and latency at several concurrencies.
    KvPut {
        /// A running cluster (HOST:PORT,...); default: start three nodes here.
        #[arg(long, value_delimiter = ',')]
        endpoints: Vec<String>,
        /// Concurrent clients, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
        clients: Vec<usize>,
        /// Measured time per run (after a short warm-up).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Repeat each run this many times and report the median.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Where the in-process cluster and the baseline put their data.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// S bytes to N workers with capped bandwidth, against the source
    /// copying to every target over the same capped link.
    Distribute(distribute::Args),
    /// Loopback throughput of gRPC chunk streaming vs. a plain TCP copy.
    Stream(stream::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::KvPut { endpoints, clients, duration, repeat, data } => {
            kv_put::run(endpoints, clients, duration, repeat.max(1), data).await
        }
        Bench::Distribute(a) => distribute::run(a).await,
        Bench::Stream(a) => stream::run(a).await,
    }
}
