//! The Rust client for Ferry.
//!
//! [`Client`] talks to any scheduler of a cluster: it tries the endpoints in
//! turn when one is down, follows "not leader" hints, retries with backoff
//! under a deadline, and reuses a write's request id across retries so the
//! write applies once. Every call has a deadline.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ferry_sdk::Error> {
//! use ferry_sdk::tls::{Credentials, Files};
//! let files = Files { ca: "ca.pem".into(), cert: "user-alice.pem".into(), key: "user-alice-key.pem".into() };
//! let security = ferry_sdk::Security::Tls(Credentials::load(files).expect("credentials"));
//! let client = ferry_sdk::Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"], security)?;
//! client.put("app/feature", b"on".to_vec()).await?;
//! let kv = client.get("app/feature").await?;
//! # Ok(()) }
//! ```
//!
//! Tuning (per-attempt and whole-call deadlines, the retry budget, the
//! cache directory) is in [`ClientOptions`]. Connections are HTTP/2 over
//! mutual TLS ([`Security`]; [`Security::from_env`] reads the files the CLI
//! reads); plaintext only when asked for. Runnable examples are in
//! `sdk/examples/`: `push_job` (submit a job and follow its progress),
//! `watch_config` (print a prefix's changes, resuming by itself) and
//! `balancer` (register instances and call them through a [`Balancer`]).
//!
//! Layout: [`client`] (the [`Client`]: endpoints, failover and retries in
//! `client/mod.rs`, where one generic helper sends every typed call, and a
//! file per API: `kv`, `leases`, `registry`, `probes`, `jobs`, `cluster`,
//! `watch`), [`registration`] (an instance kept registered by its handle),
//! [`balancer`] (client-side balancing, failover, outlier ejection, gray
//! routing over a service's instances), [`cache`] (the last reads kept on
//! disk, served stale while the cluster is unreachable), [`transport`] (the
//! channel under the client, which sends a unary call in one write),
//! [`error`].

#![warn(missing_docs)]

pub mod balancer;
pub mod cache;
pub mod client;
pub mod error;
pub mod registration;
pub mod transport;

pub use balancer::{Balancer, BalancerOptions, Policy, Request, Strategy};
pub use cache::{Cache, Cached};
pub use client::{
    Client, ClientOptions, KeepAlive, KeyValue, Put, Status, Watch, KEEP_ALIVE_BUFFER, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
pub use error::Error;
pub use ferry_proto::pb;
/// Transport security: credentials, identities, a CA for tests and tools.
pub use ferry_tls as tls;
pub use ferry_tls::Security;
pub use registration::Registration;
