//! Watch configuration keys and print every change, until Ctrl-C.
//!
//! The [`ferry_sdk::Watch`] reconnects by itself (to any scheduler) and
//! resumes after the last revision it delivered, so a scheduler dying or the
//! leader changing shows up at most as a "reconnecting" line: no change is
//! missed or printed twice. Try it against `ferry dev`, then kill the
//! leader's node or write keys with `ferry config put app/x 1`.
//!
//! ```text
//! cargo run -p ferry-sdk --example watch_config -- PREFIX [START_REVISION] [ENDPOINT...]
//! cargo run -p ferry-sdk --example watch_config -- app/ 0 127.0.0.1:7001 127.0.0.1:7002 127.0.0.1:7003
//! ```
//!
//! START_REVISION 0 (the default) watches changes from now on; an older
//! revision replays the changes since then (or, if the history no longer
//! goes back that far, first the current values, marked as such).

use anyhow::{bail, Context};
use ferry_sdk::{pb, Client};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((prefix, rest)) = args.split_first() else {
        bail!("usage: watch_config PREFIX [START_REVISION] [ENDPOINT...]");
    };
    let (start, endpoints) = match rest.split_first() {
        Some((rev, endpoints)) => (rev.parse::<u64>().context("START_REVISION: a whole number")?, endpoints.to_vec()),
        None => (0, Vec::new()),
    };
    let endpoints = if endpoints.is_empty() { vec!["127.0.0.1:7001".to_string()] } else { endpoints };
    let client = Client::connect(&endpoints, ferry_sdk::Security::from_env()?)?;

    let mut watch = client.watch(prefix, start);
    println!("watching '{prefix}' (Ctrl-C to stop)");
    loop {
        let msg = tokio::select! {
            msg = watch.next() => msg,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let msg = match msg {
            Some(Ok(msg)) => msg,
            // The watch keeps trying on its own; this only reports it.
            Some(Err(e)) => {
                eprintln!("reconnecting: {e}");
                continue;
            }
            None => return Ok(()),
        };
        let at = msg.header.as_ref().map_or(0, |h| h.revision);
        for event in &msg.events {
            let Some(kv) = &event.kv else { continue };
            let value = String::from_utf8_lossy(&kv.value);
            if msg.snapshot {
                // The start revision was compacted: current values at `at`.
                println!("{at} CURRENT {}={value}", kv.key);
            } else if event.r#type == pb::event::Type::Delete as i32 {
                println!("{} DELETE {}", kv.mod_revision, kv.key);
            } else {
                println!("{} PUT {}={value} (version {})", kv.mod_revision, kv.key, kv.version);
            }
        }
    }
}
