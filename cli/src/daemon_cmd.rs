//! `ferry scheduler` and `ferry dev`: long-running commands that stop
//! gracefully on SIGTERM or Ctrl-C.

use std::path::PathBuf;

use ferry_scheduler::{LocalCluster, Scheduler, SchedulerConfig};

use crate::args::{DevArgs, SchedulerArgs, TlsArgs};

/// Resolves when SIGTERM or SIGINT arrives.
pub(crate) async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

fn merge(a: SchedulerArgs, tls: &TlsArgs) -> Result<SchedulerConfig, String> {
    let mut c = match &a.config {
        Some(path) => SchedulerConfig::from_toml_file(path).map_err(|e| e.to_string())?,
        None => SchedulerConfig::default(),
    };
    if let Some(v) = a.id {
        c.id = v;
        if a.config.is_none() && a.data.is_none() {
            c.data = PathBuf::from(format!("./data/s{v}"));
        }
    }
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if a.advertise.is_some() {
        c.advertise = a.advertise;
    }
    if a.admin_listen.is_some() {
        c.admin_listen = a.admin_listen;
    }
    if let Some(v) = a.data {
        c.data = v;
    }
    if let Some(v) = a.initial_cluster {
        c.initial_cluster = v;
    }
    if let Some(v) = a.initial_cluster_token {
        c.initial_cluster_token = v;
    }
    if let Some(v) = a.heartbeat_interval {
        c.heartbeat_interval = v;
    }
    if let Some(v) = a.election_timeout_min {
        c.election_timeout_min = v;
    }
    if let Some(v) = a.election_timeout_max {
        c.election_timeout_max = v;
    }
    if let Some(v) = a.rpc_timeout {
        c.rpc_timeout = v;
    }
    if let Some(v) = a.snapshot_timeout {
        c.snapshot_timeout = v;
    }
    if let Some(v) = a.snapshot_every {
        c.snapshot_every = v;
    }
    if let Some(v) = a.registry_protect_threshold {
        c.registry_protect_threshold = v;
    }
    if let Some(v) = a.logs_to_keep {
        c.logs_to_keep = v;
    }
    if let Some(v) = a.job_history {
        c.job_history = v;
    }
    if !a.callback_hosts.is_empty() {
        c.callback_hosts = a.callback_hosts;
    }
    tls.apply(&mut c.tls, &mut c.insecure);
    c.validate().map_err(|e| format!("invalid value for --{e}"))?;
    Ok(c)
}

/// `ferry scheduler`.
pub async fn scheduler(a: SchedulerArgs, tls: &TlsArgs) -> u8 {
    let config = match merge(a, tls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    };
    let scheduler = match Scheduler::start(config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return if matches!(e, ferry_scheduler::Error::Config(_)) { 2 } else { 1 };
        }
    };
    let code = tokio::select! {
        () = stop_signal() => {
            tracing::info!("stopping on signal");
            scheduler.step_down().await;
            0
        }
        why = scheduler.failed() => {
            tracing::error!(reason = %why, "raft stopped on an error; exiting so that a restart replays the journals");
            eprintln!("error: raft stopped: {why}");
            1
        }
    };
    scheduler.shutdown().await;
    code
}

/// `ferry dev`: three schedulers in one process on loopback, under a
/// throwaway CA (plaintext with `--insecure`).
pub async fn dev(a: DevArgs, tls: &TlsArgs) -> u8 {
    match run_dev(a, tls.insecure).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run_dev(a: DevArgs, insecure: bool) -> Result<(), String> {
    let (root, temporary) = match a.data {
        Some(d) => (d, false),
        None => (std::env::temp_dir().join(format!("ferry-dev-{}", std::process::id())), true),
    };
    let cluster = LocalCluster::start(&root, 3, a.base_port, Some(a.admin_base_port), |c| c.insecure = insecure)
        .await
        .map_err(|e| e.to_string())?;
    let addrs = cluster.endpoints();
    let endpoints = addrs.join(",");
    println!("ferry dev: 3 schedulers running, data in {}", root.display());
    for n in &cluster.nodes {
        let admin = n.admin_addr().map(|a| a.to_string()).unwrap_or_default();
        println!("  node {}  grpc {}  admin http://{admin}/metrics", n.node().id, n.addr());
    }
    let security = if insecure {
        "export FERRY_INSECURE=true".to_string()
    } else {
        // A user certificate for the CLI, from the cluster's throwaway CA.
        let files = cluster.files(&ferry_sdk::tls::Identity::User("dev".into())).map_err(|e| e.to_string())?;
        format!(
            "export FERRY_TLS_CA={} FERRY_TLS_CERT={} FERRY_TLS_KEY={}",
            files.ca.display(),
            files.cert.display(),
            files.key.display()
        )
    };
    // The two lines a shell needs, in a file to `source`.
    let env = root.join("env");
    std::fs::write(&env, format!("export FERRY_ENDPOINTS={endpoints}\n{security}\n"))
        .map_err(|e| format!("{}: {e}", env.display()))?;
    println!("try, in another shell:");
    println!("  source {}        # FERRY_ENDPOINTS and the CLI's certificate", env.display());
    println!("  ferry cluster status");
    println!("  ferry config put greeting hello && ferry config get greeting");
    println!("Ctrl-C stops the cluster.");
    stop_signal().await;
    cluster.shutdown().await;
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    Ok(())
}
