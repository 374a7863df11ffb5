//! `ferry-bench`: benchmarks that print figures and ratios against a baseline
//! measured in the same run. Never used by tests; figures are medians.
//!
//! - `kv` — puts at several concurrencies and watch delivery latency,
//!   against etcd in the same run with feature `etcd` ([`kv`]).
//! - `distribute` — one file to N capped workers vs. the naive fan-out
//!   ([`distribute`]).
//! - `stream` — gRPC chunk streaming vs. a plain TCP copy on loopback
//!   ([`stream`]).
//! - `big` — small writes alone and beside the largest legal requests
//!   ([`big`]).
//! - `damage` — starts on data directories with one flipped byte: refused,
//!   whole, or silently short ([`damage`]).

mod big;
mod damage;
mod distribute;
#[cfg(feature = "etcd")]
mod etcd;
mod kv;
mod kv_target;
mod procs;
mod stats;
mod stream;
mod tls;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-bench", about = "Ferry benchmarks (figures and ratios, medians over runs)")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Puts and watch latency, against etcd in the same run (feature
    /// `etcd`; otherwise Ferry only).
    #[command(alias = "kv-put")]
    Kv(kv::Args),
    /// S bytes to N workers with capped bandwidth, against the source
    /// copying to every target over the same capped link.
    Distribute(distribute::Args),
    /// Loopback throughput of gRPC chunk streaming vs. a plain TCP copy.
    Stream(stream::Args),
    /// Small writes alone, then beside the largest legal requests.
    Big(big::Args),
    /// Starts on copies of a data directory with one flipped byte each.
    Damage(damage::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Kv(a) => kv::run(a).await,
        Bench::Distribute(a) => distribute::run(a).await,
        Bench::Stream(a) => stream::run(a).await,
        Bench::Big(a) => big::run(a).await,
        Bench::Damage(a) => damage::run(a).await,
    }
}
