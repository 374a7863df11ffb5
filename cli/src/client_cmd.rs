//! Client commands: `ferry cluster ...`, `ferry config ...` (but `config
//! txn`, in `txn_cmd`), `ferry lease ...`, `ferry registry ...`, `ferry probe ...`.

use std::io::Write;

use ferry_sdk::{pb, Client, ClientOptions};
use serde_json::json;

use crate::args::{ClientArgs, ConfigCmd, GrayCmd, LeaseCmd, ProbeCmd, RegistryCmd};
use crate::output::{self, escape};

pub(crate) fn client(args: &ClientArgs) -> Result<Client, ferry_sdk::Error> {
    let security = args
        .tls
        .config()
        .security(args.tls.insecure)
        .map_err(|(field, reason)| ferry_sdk::Error::Credentials(format!("{field}: {reason}")))?;
    let options = ClientOptions { total_timeout: args.timeout, security: Some(security), ..ClientOptions::default() };
    Client::with_options(&args.endpoints, options)
}

/// Prints an SDK error and returns its exit code (2 for bad input).
pub(crate) fn fail(e: ferry_sdk::Error) -> u8 {
    eprintln!("error: {e}");
    if e.is_invalid_argument() {
        2
    } else {
        1
    }
}

pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{v}");
}

/// One event as JSON: type, key, value (UTF-8, lossy), revision, and the
/// key's create revision and version.
fn event_json(e: &pb::Event, revision: u64) -> serde_json::Value {
    let kind = if e.r#type == pb::event::Type::Delete as i32 { "DELETE" } else { "PUT" };
    let kv = e.kv.clone().unwrap_or_default();
    json!({
        "type": kind,
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "revision": revision,
        "create_revision": kv.create_revision,
        "version": kv.version,
    })
}

async fn watch(c: &Client, prefix: &str, rev: u64, json_out: bool) -> u8 {
    let mut w = c.watch(prefix, rev);
    while let Some(msg) = w.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e @ ferry_sdk::Error::Rejected(_)) => return fail(e),
            Err(e) => {
                eprintln!("watch: {e}; retrying");
                continue;
            }
        };
        let at = msg.header.as_ref().map(|h| h.revision).unwrap_or(0);
        for e in &msg.events {
            // A snapshot's values are as of the header's revision.
            let revision = if msg.snapshot { at } else { e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(at) };
            let mut line = event_json(e, revision);
            if msg.snapshot {
                line["snapshot"] = json!(true);
            }
            if json_out {
                print_json(&line);
            } else {
                let kind = line["type"].as_str().unwrap_or("");
                let tag = if msg.snapshot { " (current value)" } else { "" };
                println!(
                    "{revision} {kind} {}={}{tag}",
                    escape(line["key"].as_str().unwrap_or("")),
                    escape(line["value"].as_str().unwrap_or(""))
                );
            }
        }
    }
    0
}

fn kv_json(kv: &ferry_sdk::KeyValue) -> serde_json::Value {
    json!({
        "key": kv.key,
        "value": String::from_utf8_lossy(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
    })
}

/// `ferry config ...`.
pub async fn config(args: &ClientArgs, cmd: ConfigCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        ConfigCmd::Put { key, value, file, if_mod_rev, lease } => {
            let value = match read_value(value, file) {
                Ok(v) => v,
                Err(reason) => {
                    eprintln!("error: {reason}");
                    return 2;
                }
            };
            put(&c, args.json, &key, value, if_mod_rev, lease).await
        }
        ConfigCmd::Get { key, labels: Some(labels), .. } => match c.get_with_labels(&key, &labels).await {
            Ok(Some((kv, variant))) => {
                if args.json {
                    let mut v = kv_json(&kv);
                    v["variant"] = json!(variant);
                    print_json(&v);
                } else {
                    output::value(&kv.value);
                }
                0
            }
            Ok(None) => {
                eprintln!("not found");
                1
            }
            Err(e) => fail(e),
        },
        ConfigCmd::Gray(g) => gray(&c, g, args.json).await,
        ConfigCmd::Get { key, serializable, rev, labels: None } => match match rev {
            None => c.get_with(&key, serializable).await,
            Some(rev) => c.get_at(&key, rev).await,
        } {
            Ok(Some(kv)) => {
                if args.json {
                    print_json(&kv_json(&kv));
                } else {
                    output::value(&kv.value);
                }
                0
            }
            Ok(None) => {
                eprintln!("not found");
                1
            }
            Err(e) => fail(e),
        },
        ConfigCmd::Delete { key, if_mod_rev } => match match if_mod_rev {
            None => c.delete(&key).await,
            Some(rev) => c.delete_if(&key, rev).await,
        } {
            Ok(deleted) => {
                if args.json {
                    print_json(&json!({"key": key, "deleted": deleted}));
                } else if deleted {
                    println!("deleted");
                }
                if deleted {
                    0
                } else {
                    if !args.json {
                        eprintln!("not found");
                    }
                    1
                }
            }
            Err(e) => fail(e),
        },
        ConfigCmd::List { prefix, serializable } => match c.list(&prefix, serializable).await {
            Ok(kvs) => {
                if args.json {
                    print_json(&serde_json::Value::Array(kvs.iter().map(kv_json).collect()));
                } else {
                    for kv in kvs {
                        println!("{}={}", escape(&kv.key), output::escape_bytes(&kv.value));
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
        ConfigCmd::History { key, limit } => match c.history(&key, limit).await {
            Ok(h) => {
                for e in h.events {
                    let line = event_json(&e, e.kv.as_ref().map(|kv| kv.mod_revision).unwrap_or(0));
                    if args.json {
                        print_json(&line);
                    } else {
                        println!(
                            "{} {} {}",
                            line["revision"],
                            line["type"].as_str().unwrap_or(""),
                            escape(line["value"].as_str().unwrap_or(""))
                        );
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
        ConfigCmd::Watch { prefix, rev } => watch(&c, &prefix, rev, args.json).await,
        ConfigCmd::Txn(t) => crate::txn_cmd::run(&c, &t, args.json).await,
    }
}

/// A value from the command line, stdin (`-`) or a file (`--file`), as
/// bytes; at most 1 MiB is read (a longer one is refused by the put).
fn read_value(value: Option<String>, file: Option<std::path::PathBuf>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let limit = ferry_sdk::MAX_VALUE_BYTES as u64 + 1;
    let mut out = Vec::new();
    let from = match (value, file) {
        (_, Some(path)) => {
            std::fs::File::open(&path)
                .and_then(|f| f.take(limit).read_to_end(&mut out))
                .map_err(|e| format!("--file: cannot read {}: {e}", path.display()))?;
            format!("--file: {}", path.display())
        }
        (Some(v), None) if v == "-" => {
            let read = std::io::stdin().lock().take(limit).read_to_end(&mut out);
            read.map_err(|e| format!("value: cannot read stdin: {e}"))?;
            "value: stdin".to_string()
        }
        (Some(v), None) => return Ok(v.into_bytes()),
        (None, None) => return Err("value: give a value, - for stdin, or --file".into()),
    };
    if out.len() as u64 == limit {
        return Err(format!("{from} holds more than {} bytes (1 MiB), the largest value", limit - 1));
    }
    Ok(out)
}

async fn put(c: &Client, as_json: bool, key: &str, value: Vec<u8>, if_mod_rev: Option<u64>, lease: Option<u64>) -> u8 {
    let result = match (if_mod_rev, lease) {
        (Some(rev), _) => c.put_if(key, value, rev).await,
        (None, Some(lease)) => c.put_with_lease(key, value, lease).await,
        (None, None) => c.put(key, value).await,
    };
    match result {
        Ok(p) => {
            if as_json {
                print_json(
                    &json!({"key": key, "revision": p.revision, "create_revision": p.create_revision, "version": p.version}),
                );
            } else {
                println!("OK revision {}", p.revision);
            }
            0
        }
        Err(e) => fail(e),
    }
}

/// `ferry lease ...`.
pub async fn lease(args: &ClientArgs, cmd: LeaseCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        LeaseCmd::Grant { ttl } => match c.grant(ttl).await {
            Ok(id) => {
                if args.json {
                    print_json(&json!({"id": id.to_string(), "ttl_ms": ttl.as_millis() as u64}));
                } else {
                    println!("{id}");
                }
                0
            }
            Err(e) => fail(e),
        },
        LeaseCmd::Keepalive { id } => {
            let mut k = c.keep_alive(id);
            while let Some(answer) = k.next().await {
                match answer {
                    Ok(r) if r.ttl_ms == 0 => {
                        eprintln!("lease {id} no longer exists");
                        return 1;
                    }
                    Ok(r) if args.json => print_json(&json!({"id": r.id.to_string(), "ttl_ms": r.ttl_ms})),
                    Ok(r) => println!("lease {} renewed for {} ms", r.id, r.ttl_ms),
                    Err(e) => eprintln!("keep-alive: {e}; retrying"),
                }
            }
            0
        }
        LeaseCmd::Revoke { id } => match c.revoke(id).await {
            Ok(()) => {
                if !args.json {
                    println!("revoked");
                }
                0
            }
            Err(e) => fail(e),
        },
        LeaseCmd::Ttl { id } => match c.time_to_live(id).await {
            Ok(r) => {
                if args.json {
                    print_json(
                        &json!({"id": r.id.to_string(), "ttl_ms": r.ttl_ms, "remaining_ms": r.remaining_ms, "keys": r.keys}),
                    );
                } else {
                    println!(
                        "lease {} ttl {} ms, {} ms left, keys: {}",
                        r.id,
                        r.ttl_ms,
                        r.remaining_ms,
                        r.keys.join(",")
                    );
                }
                0
            }
            Err(e) => fail(e),
        },
    }
}

fn instance_json(i: &pb::Instance) -> serde_json::Value {
    json!({
        "service": i.service, "id": i.id, "address": i.address, "port": i.port, "version": i.version,
        "weight": i.weight, "gray": i.gray, "consumer": i.consumer, "suspect": i.suspect,
        "labels": i.labels, "metadata": i.metadata,
    })
}

fn print_instances(r: &pb::ListInstancesResponse, json_out: bool) {
    let revision = r.header.as_ref().map(|h| h.revision).unwrap_or(0);
    if json_out {
        print_json(&json!({
            "revision": revision,
            "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
            "deregistered": r.deregistered,
        }));
        return;
    }
    println!("revision {revision}: {} instance(s)", r.instances.len());
    if !r.deregistered.is_empty() {
        println!("  deregistered: {}", escape(&r.deregistered.join(", ")));
    }
    for i in &r.instances {
        let flags = [(i.gray, " gray"), (i.consumer, " consumer"), (i.suspect, " SUSPECT")]
            .iter()
            .filter(|f| f.0)
            .map(|f| f.1)
            .collect::<String>();
        println!(
            "  {} {}:{} weight {} version {}{flags}",
            escape(&i.id),
            escape(&i.address),
            i.port,
            i.weight,
            escape(&i.version)
        );
    }
}

/// `ferry registry ...`.
pub async fn registry(args: &ClientArgs, cmd: RegistryCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        RegistryCmd::Register { service, id, addr, weight, version, gray, consumer, meta, labels, ttl, replace } => {
            let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "0"));
            let instance = pb::Instance {
                service: service.clone(),
                id: id.clone(),
                address: host.to_string(),
                port: port.parse().unwrap_or(0),
                version,
                methods: vec![],
                weight,
                gray,
                labels: labels.unwrap_or_default().into_iter().collect(),
                metadata: meta.unwrap_or_default().into_iter().collect(),
                consumer,
                ..Default::default()
            };
            let registered = match replace {
                true => c.register_kept_replacing(instance, ttl).await,
                false => c.register_kept(instance, ttl).await,
            };
            let mut registration = match registered {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            println!("registered {service}/{id} (lease {}); keeping it alive until interrupted", registration.lease());
            // Listening from before the first answer: a signal between two
            // answers must not be missed.
            let stop = crate::daemon_cmd::stop_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    answer = registration.next() => match answer {
                        Some(Ok(r)) if r.ttl_ms == 0 => {
                            eprintln!("the lease ended; {service}/{id} is no longer registered");
                            return 1;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => eprintln!("keep-alive: {e}; retrying"),
                        None => return 1,
                    },
                    _ = &mut stop => {
                        return match registration.deregister().await {
                            Ok(_) => 0,
                            Err(e) => fail(e),
                        };
                    }
                }
            }
        }
        RegistryCmd::List { service } => match c.instances(&service).await {
            Ok(r) => {
                print_instances(&r, args.json);
                0
            }
            Err(e) => fail(e),
        },
        RegistryCmd::Watch { service } => {
            let mut stream = match c.watch_instances(&service).await {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            while let Ok(Some(r)) = stream.message().await {
                print_instances(&r, args.json);
            }
            eprintln!("watch ended");
            1
        }
        RegistryCmd::Deregister { service, id } => match c.deregister(&service, &id).await {
            Ok(true) => 0,
            Ok(false) => {
                eprintln!("not found");
                1
            }
            Err(e) => fail(e),
        },
    }
}

async fn gray(c: &Client, cmd: GrayCmd, json_out: bool) -> u8 {
    use pb::gray_request::Action;
    let result = match &cmd {
        GrayCmd::Set { key, value, selector } => c.gray(Action::Set, key, selector, value.clone().into_bytes()).await,
        GrayCmd::Promote { key, selector } => c.gray(Action::Promote, key, selector, vec![]).await,
        GrayCmd::Drop { key, selector } => c.gray(Action::Drop, key, selector, vec![]).await,
        GrayCmd::List { key } => c.gray(Action::List, key, "", vec![]).await,
    };
    match result {
        Ok(variants) => {
            for v in variants {
                let value = String::from_utf8_lossy(&v.value);
                if json_out {
                    print_json(&json!({"selector": v.selector, "value": value, "revision": v.revision}));
                } else {
                    println!("{} {}", escape(&v.selector), escape(&value));
                }
            }
            0
        }
        Err(e) => fail(e),
    }
}

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis() as u64
}

fn ranking_json(ranking: &[pb::RankedTarget]) -> serde_json::Value {
    json!(ranking
        .iter()
        .map(|r| json!({
            "rank": r.rank, "target": r.target, "url": r.url, "host": r.host,
            "total_ms": r.total_us as f64 / 1000.0, "ttfb_ms": r.ttfb_us as f64 / 1000.0,
            "bytes": r.bytes, "ok": r.ok, "errors": r.errors, "error": r.error,
        }))
        .collect::<Vec<_>>())
}

fn print_ranking(name: &str, ranking: &[pb::RankedTarget], json_out: bool) {
    if json_out {
        print_json(&json!({"probe": name, "ranking": ranking_json(ranking)}));
        return;
    }
    for r in ranking {
        let host = if r.host.is_empty() { String::new() } else { format!(" (Host: {})", escape(&r.host)) };
        if r.ok > 0 {
            println!(
                "{:>3}. {}{host}  {:.1} ms (first byte {:.1} ms), {} bytes, {} ok / {} failed",
                r.rank,
                escape(&r.url),
                r.total_us as f64 / 1000.0,
                r.ttfb_us as f64 / 1000.0,
                r.bytes,
                r.ok,
                r.errors
            );
        } else if r.errors > 0 {
            println!("{:>3}. {}{host}  FAILED: {}", r.rank, escape(&r.url), escape(&r.error));
        } else {
            println!("{:>3}. {}{host}  not measured yet", r.rank, escape(&r.url));
        }
    }
}

/// `ferry probe ...`.
pub async fn probe(args: &ClientArgs, cmd: ProbeCmd) -> u8 {
    let c = match client(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match cmd {
        ProbeCmd::Define {
            name,
            targets,
            interval,
            download_timeout,
            selector,
            output,
            template,
            top,
            hook,
            stale_after,
            output_stale_after,
            alert,
        } => {
            let spec = pb::ProbeSpec {
                name: name.clone(),
                targets: targets.into_iter().map(|(url, host)| pb::ProbeTarget { url, host }).collect(),
                interval_ms: ms(interval),
                timeout_ms: download_timeout.map(ms).unwrap_or(0),
                selector,
                output: output.map(|path| pb::ProbeOutput { path, template, top, hook }),
                stale_after_ms: stale_after.map(ms).unwrap_or(0),
                output_stale_after_ms: output_stale_after.map(ms).unwrap_or(0),
                alert_url: alert,
            };
            match c.define_probe(spec).await {
                Ok(_) => {
                    if args.json {
                        print_json(&json!({"probe": name, "defined": true}));
                    } else {
                        println!("defined probe {name}");
                    }
                    0
                }
                Err(e) => fail(e),
            }
        }
        ProbeCmd::List => match c.probes(None).await {
            Ok(specs) => {
                for s in &specs {
                    if args.json {
                        let targets: Vec<_> = s.targets.iter().map(|t| json!({"url": t.url, "host": t.host})).collect();
                        print_json(&json!({
                            "name": s.name, "targets": targets, "interval_ms": s.interval_ms,
                            "timeout_ms": s.timeout_ms, "selector": s.selector,
                            "output": s.output.as_ref().map(|o| json!({"path": o.path, "template": o.template, "top": o.top, "hook": o.hook})),
                            "stale_after_ms": s.stale_after_ms, "output_stale_after_ms": s.output_stale_after_ms,
                            "alert_url": s.alert_url,
                        }));
                    } else {
                        let every = humantime::format_duration(std::time::Duration::from_millis(s.interval_ms));
                        let sel = if s.selector.is_empty() { "every worker".to_string() } else { s.selector.clone() };
                        let out = s.output.as_ref().map(|o| format!(", output {}", o.path)).unwrap_or_default();
                        println!("{}: {} target(s) every {every} on {sel}{out}", s.name, s.targets.len());
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
        ProbeCmd::Results { name, worker } => match c.probe_results(&name, worker.as_deref()).await {
            Ok(results) => {
                for r in &results {
                    if args.json {
                        print_json(&json!({
                            "worker": r.worker, "target": r.target, "url": r.url, "host": r.host,
                            "ttfb_ms": r.ttfb_us as f64 / 1000.0, "total_ms": r.total_us as f64 / 1000.0,
                            "bytes": r.bytes, "error": r.error, "measured_unix_ms": r.measured_unix_ms,
                        }));
                    } else if r.error.is_empty() {
                        println!(
                            "{} {}  {:.1} ms (first byte {:.1} ms), {} bytes",
                            escape(&r.worker),
                            escape(&r.url),
                            r.total_us as f64 / 1000.0,
                            r.ttfb_us as f64 / 1000.0,
                            r.bytes
                        );
                    } else {
                        println!("{} {}  FAILED: {}", escape(&r.worker), escape(&r.url), escape(&r.error));
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
        ProbeCmd::Best { name, worker, watch: false } => match c.probe_best(&name, worker.as_deref()).await {
            Ok(ranking) => {
                print_ranking(&name, &ranking, args.json);
                0
            }
            Err(e) => fail(e),
        },
        ProbeCmd::Best { name, worker, watch: true } => {
            let mut stream = match c.watch_probe_best(&name, worker.as_deref()).await {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(r)) => {
                            print_ranking(&name, &r.ranking, args.json);
                            if !args.json {
                                println!();
                            }
                            let _ = std::io::stdout().flush();
                        }
                        Ok(None) => return 1,
                        Err(status) => {
                            eprintln!("error: {}", status.message());
                            return 1;
                        }
                    },
                    _ = crate::daemon_cmd::stop_signal() => return 0,
                }
            }
        }
        ProbeCmd::Status => match c.probe_status().await {
            Ok(states) => {
                for s in &states {
                    if args.json {
                        print_json(&json!({
                            "probe": s.name, "stale": s.stale, "reasons": s.reasons,
                            "workers": s.workers, "last_result_unix_ms": s.last_result_unix_ms,
                        }));
                    } else if s.stale {
                        println!("{}: STALE ({})", s.name, escape(&s.reasons.join("; ")));
                    } else {
                        println!("{}: ok, {} worker(s) reporting", s.name, s.workers);
                    }
                }
                0
            }
            Err(e) => fail(e),
        },
        ProbeCmd::Delete { name } => match c.delete_probe(&name).await {
            Ok(true) => {
                if args.json {
                    print_json(&json!({"probe": name, "deleted": true}));
                } else {
                    println!("deleted probe {name}");
                }
                0
            }
            Ok(false) => {
                eprintln!("error: no probe named {name}");
                1
            }
            Err(e) => fail(e),
        },
    }
}
