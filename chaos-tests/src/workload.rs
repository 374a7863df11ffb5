//! The config workload: clients reading, writing and compare-and-setting a
//! few hot keys, each operation recorded in the [`History`].
//!
//! Every value written is unique (`<client>-<n>`), so the checker can tell
//! which write a read saw. A CAS expects the revision its client last saw
//! of that key. An answer the cluster gave is `ok`, `mismatch` or `fail`;
//! a call that ran out of time or lost its connection is `unknown` (a
//! write then may have applied).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_sdk::{Client, ClientOptions, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{Call, History, Op, Outcome};

/// How many clients on how many keys.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub clients: usize,
    pub keys: usize,
    /// Reads without a read barrier (`--serializable`): the API allows
    /// them to be stale, so the checker must report them; a self-test of
    /// the harness.
    pub serializable: bool,
    /// The least time between two operations of one client (zero: as fast
    /// as answers come).
    pub pace: Duration,
    /// The SDK's own deadlines (15 s a call, retries within it), as a user's
    /// client has them, instead of [`client`]'s short ones: a rolling
    /// upgrade must not fail a call a user would have made.
    pub sdk_deadlines: bool,
}

/// How the harness's clients reach the cluster under test: set by
/// [`crate::cluster::Cluster::start`] (a user certificate of the run's CA,
/// or plaintext for a cluster that starts on a release without TLS). One
/// cluster runs at a time.
static SECURITY: std::sync::RwLock<Option<ferry_sdk::Security>> = std::sync::RwLock::new(None);

/// Sets what [`security`] returns.
pub fn set_security(security: ferry_sdk::Security) {
    *SECURITY.write().unwrap_or_else(|e| e.into_inner()) = Some(security);
}

/// The security of the cluster under test (plaintext before one started).
pub fn security() -> ferry_sdk::Security {
    SECURITY.read().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or(ferry_sdk::Security::Insecure)
}

/// The environment that gives the `ferry` CLI the harness's credentials.
pub fn cli_env() -> Vec<(&'static str, std::ffi::OsString)> {
    match security() {
        ferry_sdk::Security::Insecure => vec![("FERRY_INSECURE", "true".into())],
        ferry_sdk::Security::Tls(c) => c.files().env(),
    }
}

/// A client with the SDK's default deadlines.
pub fn connect<I: IntoIterator<Item = S>, S: AsRef<str>>(endpoints: I) -> Result<Client, Error> {
    Client::connect(endpoints, security())
}

/// A client that gives up soon: an operation cut off by a fault becomes
/// `unknown` quickly instead of waiting out the SDK's default budget.
pub fn client(endpoints: &[String]) -> anyhow::Result<Client> {
    let options = ClientOptions {
        request_timeout: Duration::from_secs(1),
        total_timeout: Duration::from_secs(3),
        security: Some(security()),
        ..ClientOptions::default()
    };
    Ok(Client::with_options(endpoints.iter().cloned(), options)?)
}

fn reason(e: &Error) -> String {
    e.to_string().chars().take(200).collect()
}

/// Runs one operation and records it.
pub async fn run_op(
    client: &Client,
    history: &History,
    process: usize,
    key: &str,
    call: Call,
    serializable: bool,
) -> Outcome {
    let invoke = history.now();
    let outcome = match &call {
        Call::Read => match client.get_with(key, serializable).await {
            Ok(kv) => {
                Outcome::Read { value: kv.map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.mod_revision)) }
            }
            Err(e) => Outcome::Unknown { reason: reason(&e) },
        },
        Call::Write { value } => match client.put(key, value.clone().into_bytes()).await {
            Ok(put) => Outcome::Written { revision: put.revision },
            Err(Error::Rejected(status)) => Outcome::Fail { reason: status.message().to_string() },
            Err(e) => Outcome::Unknown { reason: reason(&e) },
        },
        Call::Cas { expect, value } => match client.put_if(key, value.clone().into_bytes(), *expect).await {
            Ok(put) => Outcome::Written { revision: put.revision },
            Err(Error::Rejected(status)) if status.code() == tonic::Code::FailedPrecondition => Outcome::Mismatch,
            Err(Error::Rejected(status)) => Outcome::Fail { reason: status.message().to_string() },
            Err(e) => Outcome::Unknown { reason: reason(&e) },
        },
    };
    let complete = history.now();
    history.record(Op { process, key: key.into(), call, outcome: outcome.clone(), invoke, complete });
    outcome
}

/// One client's loop until `stop`.
async fn client_loop(
    client: Client,
    history: History,
    process: usize,
    config: Config,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen: Vec<Option<u64>> = vec![None; config.keys];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.gen_range(0..config.keys);
        let key = format!("chaos/k{k}");
        n += 1;
        let value = format!("{process}-{n}");
        let began = tokio::time::Instant::now();
        let roll: u32 = rng.gen_range(0..10);
        let call = match (roll, seen[k]) {
            (4..=6, _) => Call::Write { value },
            (7.., Some(expect)) => Call::Cas { expect, value },
            _ => Call::Read,
        };
        match run_op(&client, &history, process, &key, call, config.serializable).await {
            Outcome::Read { value } => seen[k] = Some(value.map_or(0, |(_, rev)| rev)),
            Outcome::Written { revision } => seen[k] = Some(revision),
            Outcome::Unknown { .. } => {
                seen[k] = None;
                // The cluster is changing leaders: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => {}
        }
        tokio::time::sleep_until(began + config.pace).await;
    }
}

/// Starts the clients; they stop when `stop` is set.
pub fn start(
    endpoints: &[String],
    history: &History,
    config: Config,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for process in 0..config.clients {
        let client = if config.sdk_deadlines { connect(endpoints)? } else { client(endpoints)? };
        let task = client_loop(client, history.clone(), process, config, seed ^ (process as u64 + 1), stop.clone());
        tasks.push(tokio::spawn(task));
    }
    Ok(tasks)
}

/// Reads every key once more after the faults: the last word on what the
/// cluster kept.
pub async fn final_reads(endpoints: &[String], history: &History, config: Config) -> anyhow::Result<()> {
    let client = client(endpoints)?;
    for k in 0..config.keys {
        let key = format!("chaos/k{k}");
        for _ in 0..10 {
            let read = run_op(&client, history, config.clients, &key, Call::Read, false).await;
            if !matches!(read, Outcome::Unknown { .. }) {
                break;
            }
        }
    }
    Ok(())
}
