//! `ferry worker`: the daemon, and `ferry worker list`.

use std::path::PathBuf;

use ferry_worker::{Worker, WorkerConfig};
use serde_json::json;

use crate::args::{ClientArgs, TlsArgs, WorkerArgs};
use crate::output::escape;

fn merge(a: WorkerArgs, tls: &TlsArgs) -> Result<WorkerConfig, String> {
    let mut c = match &a.config {
        Some(p) => WorkerConfig::from_toml_file(p).map_err(|e| e.to_string())?,
        None => WorkerConfig::default(),
    };
    if let Some(v) = a.name {
        if a.config.is_none() && a.data.is_none() {
            c.data = PathBuf::from(format!("./data/{v}"));
        }
        c.name = v;
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if a.admin_listen.is_some() {
        c.admin_listen = a.admin_listen;
    }
    if let Some(v) = a.store_limit {
        c.store_limit = v;
    }
    if a.advertise.is_some() {
        c.advertise = a.advertise;
    }
    if !a.schedulers.is_empty() {
        c.schedulers = a.schedulers;
    }
    if let Some(v) = a.data {
        c.data = v;
    }
    if !a.allow_root.is_empty() {
        c.roots = a.allow_root;
    }
    if !a.fetch_hosts.is_empty() {
        c.fetch_hosts = a.fetch_hosts;
    }
    if let Some(v) = a.labels {
        c.labels = v;
    }
    for (name, cmd) in a.hooks {
        c.hooks.insert(name, cmd);
    }
    if let Some(v) = a.max_uploads {
        c.max_uploads = v as usize;
    }
    if let Some(v) = a.max_downloads {
        c.max_downloads = v as usize;
    }
    if a.upload_limit.is_some() {
        c.upload_limit = a.upload_limit;
    }
    if a.download_limit.is_some() {
        c.download_limit = a.download_limit;
    }
    if let Some(v) = a.pull_stall_timeout {
        c.pull_stall_timeout = v;
    }
    if let Some(v) = a.drain_timeout {
        c.drain_timeout = v;
    }
    if a.no_socket_priority {
        c.socket_priority = false;
    }
    c.config_files.extend(a.config_files);
    if let Some(v) = a.config_resync {
        c.config_resync = v;
    }
    tls.apply(&mut c.tls, &mut c.insecure);
    c.validate().map_err(|e| format!("invalid value for --{e}"))?;
    Ok(c)
}

/// Runs the worker until SIGTERM or Ctrl-C.
pub async fn run(a: WorkerArgs, tls: &TlsArgs) -> u8 {
    let config = match merge(a, tls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let worker = match Worker::start(config).await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return if matches!(e, ferry_worker::Error::Config(_)) { 2 } else { 1 };
        }
    };
    let code = tokio::select! {
        _ = crate::daemon_cmd::stop_signal() => {
            // Drain first: no new work, what is in flight finishes; a
            // second signal stops at once.
            worker.drain("signal");
            tokio::select! {
                _ = worker.drained() => {}
                _ = crate::daemon_cmd::stop_signal() => tracing::info!("second signal: stopping without draining"),
            }
            0
        }
        _ = worker.drained() => 0,
        why = worker.refused() => {
            eprintln!("error: {why}");
            1
        }
    };
    worker.shutdown().await;
    code
}

/// `ferry worker drain NAME`: asks, then waits until the worker has stopped.
pub async fn drain(args: &ClientArgs, name: &str) -> u8 {
    let c = match crate::client_cmd::client(args) {
        Ok(c) => c,
        Err(e) => return crate::client_cmd::fail(e),
    };
    if let Err(e) = c.drain_worker(name).await {
        return crate::client_cmd::fail(e);
    }
    let started = std::time::Instant::now();
    // A worker waits at most its drain_timeout (at most 1h) before it exits.
    while started.elapsed() < std::time::Duration::from_secs(3660) {
        let state = c.list_workers().await.ok().and_then(|list| {
            list.into_iter().find(|w| w.info.as_ref().is_some_and(|i| i.name == name)).map(|w| w.state)
        });
        if state.as_deref() == Some("down") {
            println!("worker {name} drained and stopped in {:.1}s", started.elapsed().as_secs_f64());
            return 0;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("error: worker {name} is still running an hour after it was asked to drain");
    1
}

/// `ferry worker list`.
pub async fn list(args: &ClientArgs) -> u8 {
    let c = match crate::client_cmd::client(args) {
        Ok(c) => c,
        Err(e) => return crate::client_cmd::fail(e),
    };
    let workers = match c.list_workers().await {
        Ok(w) => w,
        Err(e) => return crate::client_cmd::fail(e),
    };
    if args.json {
        let rows: Vec<_> = workers
            .iter()
            .map(|w| {
                let info = w.info.clone().unwrap_or_default();
                json!({
                    "name": info.name, "addr": info.addr, "labels": info.labels, "roots": info.roots,
                    "hooks": info.hooks, "version": info.version, "state": w.state,
                    "last_seen_unix_ms": w.last_seen_unix_ms,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!("{:<16} {:<22} {:<6} {:<10} {:<24} ROOTS", "NAME", "ADDR", "STATE", "VERSION", "LABELS");
        for w in workers {
            let info = w.info.unwrap_or_default();
            let mut labels: Vec<_> = info.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            println!(
                "{:<16} {:<22} {:<6} {:<10} {:<24} {}",
                escape(&info.name),
                escape(&info.addr),
                w.state,
                escape(&info.version),
                escape(&labels.join(",")),
                escape(&info.roots.join(","))
            );
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(argv: &[&str]) -> WorkerConfig {
        use clap::Parser;
        let mut all = vec!["ferry", "worker", "--name", "w1", "--allow-root", "/srv/ferry"];
        all.extend_from_slice(argv);
        let cli = crate::args::Cli::try_parse_from(all).expect("parses");
        match cli.command {
            crate::args::Command::Worker(w) => merge(*w.run, &cli.client.tls).expect("valid"),
            other => panic!("not a worker: {other:?}"),
        }
    }

    #[test]
    fn socket_priorities_are_on_unless_the_flag_turns_them_off() {
        assert!(merged(&[]).socket_priority);
        assert!(!merged(&["--no-socket-priority"]).socket_priority);
    }
}
