//! The probe runner: downloads each probe's targets every interval, starting
//! at an offset derived from hash(worker, probe) so a fleet does not download
//! at the same second, and reports the figures to the cluster.
//!
//! Bodies are streamed and dropped as they arrive (nothing is kept), over a
//! fresh connection per download so every figure includes the connect, one
//! target after another so they do not share this worker's link. A
//! probe with an output renders this worker's own ranking into a file under
//! its allowed roots, writes it only when the bytes change, then runs the
//! named hook from this worker's config. Definitions are re-read every few
//! seconds; while the cluster is unreachable the worker keeps probing with
//! the definitions it has, and its output file stays.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferry_proto::pb;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::atomic_file::{self, Outcome};
use crate::metrics::WorkerMetrics;
use crate::roots::Roots;

/// How often the definitions are re-read.
pub const REFRESH: Duration = Duration::from_secs(2);
/// The template of an output without one: one target per line, best first.
pub const DEFAULT_TEMPLATE: &str = "{url}";

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Where in each interval this worker runs this probe: a stable spread of
/// the fleet over the interval.
pub fn offset_ms(worker: &str, probe: &str, interval_ms: u64) -> u64 {
    let hash = blake3::hash(format!("{worker}\0{probe}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first) % interval_ms.max(1)
}

/// The next time (unix ms) after `now` that falls on `offset` in an interval.
pub fn next_run(now: u64, interval_ms: u64, offset: u64) -> u64 {
    let interval = interval_ms.max(1);
    let base = now.saturating_sub(offset) / interval * interval + offset;
    if base > now {
        base
    } else {
        base + interval
    }
}

/// Downloads `url` (with `host` as the Host header when set) and returns
/// the figures, or why it failed.
async fn download(client: &HttpClient, target: &pb::ProbeTarget, timeout: Duration) -> pb::ProbeResult {
    let measured_unix_ms = now_ms();
    let start = Instant::now();
    let mut result =
        pb::ProbeResult { url: target.url.clone(), host: target.host.clone(), measured_unix_ms, ..Default::default() };
    let outcome = tokio::time::timeout(timeout, async {
        let uri: hyper::Uri = target.url.parse().map_err(|e| format!("bad URL: {e}"))?;
        let mut req = hyper::Request::get(uri).header(hyper::header::USER_AGENT, "ferry-probe");
        if !target.host.is_empty() {
            req = req.header(hyper::header::HOST, target.host.as_str());
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| format!("bad request: {e}"))?;
        let resp = client.request(req).await.map_err(|e| format!("request failed: {e:#}"))?;
        result.ttfb_us = start.elapsed().as_micros() as u64;
        let status = resp.status();
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
            if let Some(data) = frame.data_ref() {
                result.bytes += data.len() as u64;
            }
        }
        result.total_us = start.elapsed().as_micros() as u64;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(())
    })
    .await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => result.error = e,
        Err(_) => result.error = format!("timed out after {}", humantime::format_duration(timeout)),
    }
    if !result.error.is_empty() {
        result.total_us = start.elapsed().as_micros() as u64;
    }
    result
}

type HttpClient =
    Client<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>, Empty<Bytes>>;

/// A client for `http://` and `https://` (rustls, Mozilla's roots) that
/// keeps no idle connection: every download connects anew, as a client would.
fn http_client() -> HttpClient {
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector)
}

/// This worker's ranking of one round: successes by total time, failures last.
pub fn rank(results: &[pb::ProbeResult]) -> Vec<&pb::ProbeResult> {
    let mut ranked: Vec<&pb::ProbeResult> = results.iter().collect();
    ranked.sort_by_key(|r| (!r.error.is_empty(), r.total_us, r.target));
    ranked
}

/// Renders `template` once per ranked target (at most `top`, 0 = all).
pub fn render(template: &str, top: u32, ranked: &[&pb::ProbeResult]) -> String {
    let template = if template.is_empty() { DEFAULT_TEMPLATE } else { template };
    let take = if top == 0 { ranked.len() } else { (top as usize).min(ranked.len()) };
    let mut out = String::new();
    for (i, r) in ranked.iter().take(take).enumerate() {
        let ip = r.url.parse::<hyper::Uri>().ok().and_then(|u| u.host().map(str::to_string)).unwrap_or_default();
        let host = if r.host.is_empty() { ip.clone() } else { r.host.clone() };
        let line = template
            .replace("{rank}", &(i + 1).to_string())
            .replace("{url}", &r.url)
            .replace("{host}", &host)
            .replace("{ip}", &ip)
            .replace("{total_ms}", &format!("{:.1}", r.total_us as f64 / 1000.0))
            .replace("{ttfb_ms}", &format!("{:.1}", r.ttfb_us as f64 / 1000.0))
            .replace("{bytes}", &r.bytes.to_string())
            .replace("{error}", &r.error);
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Runs the probes this worker is selected for.
pub struct ProbeRunner {
    worker: String,
    client: ferry_sdk::Client,
    roots: Roots,
    hooks: BTreeMap<String, String>,
    /// The hosts this worker may download from (its `fetch_hosts`).
    fetch: ferry_tls::allow::Hosts,
    metrics: Arc<WorkerMetrics>,
    http: HttpClient,
}

/// The state of one probe's output file.
#[derive(Default)]
struct OutputState {
    digest: String,
    changed_unix_ms: u64,
    /// The file changed but its hook has not succeeded yet: run it again
    /// next round.
    hook_pending: bool,
}

impl ProbeRunner {
    /// A runner for `worker` reading definitions through `client`.
    pub fn new(
        worker: &str,
        client: ferry_sdk::Client,
        roots: Roots,
        hooks: BTreeMap<String, String>,
        fetch: ferry_tls::allow::Hosts,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        Self { worker: worker.to_string(), client, roots, hooks, fetch, metrics, http: http_client() }
    }

    /// Follows the definitions until `shutdown`: starts, restarts (on a
    /// changed definition) and stops one task per probe.
    pub fn spawn(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut running: HashMap<String, (pb::ProbeSpec, JoinHandle<()>)> = HashMap::new();
            loop {
                match self.client.probes(Some(&self.worker)).await {
                    Ok(specs) => {
                        running.retain(|name, (_, task)| {
                            let keep = specs.iter().any(|s| &s.name == name);
                            if !keep {
                                tracing::info!(probe = %name, "probe removed; stopping it");
                                task.abort();
                            }
                            keep
                        });
                        for spec in specs {
                            if running.get(&spec.name).is_some_and(|(have, _)| *have == spec) {
                                continue;
                            }
                            if let Some((_, old)) = running.remove(&spec.name) {
                                old.abort();
                            }
                            tracing::info!(probe = %spec.name, "running probe");
                            let task = tokio::spawn(self.clone().run(spec.clone()));
                            running.insert(spec.name.clone(), (spec, task));
                        }
                    }
                    // Unreachable cluster, or this worker not registered yet:
                    // keep what runs.
                    Err(e) => tracing::debug!(error = %e, "reading probe definitions failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(REFRESH) => {}
                    _ = shutdown.changed() => break,
                }
            }
            for (_, (_, task)) in running {
                task.abort();
            }
        })
    }

    async fn run(self: Arc<Self>, spec: pb::ProbeSpec) {
        let offset = offset_ms(&self.worker, &spec.name, spec.interval_ms);
        let timeout = Duration::from_millis(spec.timeout_ms.clamp(1, spec.interval_ms.max(1)));
        let mut output = OutputState::default();
        if let Some(out) = &spec.output {
            // An existing file's age counts as the output's (its content is
            // compared at the first round). Not followed, not read here.
            let meta = self.roots.check_write(&out.path).ok().and_then(|p| std::fs::symlink_metadata(p).ok());
            if let Some(meta) = meta.filter(|m| m.is_file()) {
                output.changed_unix_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0);
            }
        }
        loop {
            let now = now_ms();
            let at = next_run(now, spec.interval_ms, offset);
            tokio::time::sleep(Duration::from_millis(at - now)).await;
            // One download at a time, so targets do not share this
            // worker's link and each figure is the target's own.
            let mut results = Vec::with_capacity(spec.targets.len());
            for t in &spec.targets {
                results.push(match self.fetch.check_url(&t.url, "url", "fetch_hosts") {
                    Ok(()) => download(&self.http, t, timeout).await,
                    // Never a request to a host this worker does not allow.
                    Err(error) => pb::ProbeResult {
                        url: t.url.clone(),
                        host: t.host.clone(),
                        measured_unix_ms: now_ms(),
                        error,
                        ..Default::default()
                    },
                });
            }
            for (i, r) in results.iter_mut().enumerate() {
                r.target = i as u32;
                r.worker = self.worker.clone();
                self.metrics.probe_downloads.inc();
                if !r.error.is_empty() {
                    self.metrics.probe_failures.inc();
                }
            }
            let output_error = match &spec.output {
                Some(out) => self.write_output(&spec.name, out, &results, &mut output).await.err(),
                None => None,
            };
            if let Some(e) = &output_error {
                tracing::warn!(probe = %spec.name, error = %e, "probe output not written");
            }
            let report = pb::ReportRequest {
                worker: self.worker.clone(),
                probe: spec.name.clone(),
                results,
                output_digest: output.digest.clone(),
                output_changed_unix_ms: output.changed_unix_ms,
                request_id: String::new(),
                output_error: output_error.unwrap_or_default(),
            };
            if let Err(e) = self.client.report_probe(report).await {
                tracing::info!(probe = %spec.name, error = %e, "reporting probe results failed");
            }
        }
    }

    /// Renders this round's ranking; writes and runs the hook only when the
    /// bytes differ from the file's.
    async fn write_output(
        &self,
        probe: &str,
        out: &pb::ProbeOutput,
        results: &[pb::ProbeResult],
        state: &mut OutputState,
    ) -> Result<(), String> {
        let hook = match out.hook.as_str() {
            "" => None,
            name => {
                Some(self.hooks.get(name).ok_or_else(|| format!("output.hook: this worker has no hook named {name}"))?)
            }
        };
        let path = self.roots.check_write(&out.path).map_err(|e| format!("output.path: {e}"))?;
        let text = render(&out.template, out.top, &rank(results));
        let digest = blake3::hash(text.as_bytes()).to_hex().to_string();
        let roots = self.roots.clone();
        let written =
            tokio::task::spawn_blocking(move || atomic_file::replace_if_changed(&roots, &path, text.as_bytes()))
                .await
                .map_err(|e| format!("output: {e}"))?
                .map_err(|e| format!("output: writing {}: {e}", out.path))?;
        state.digest = digest;
        if written == Outcome::Written {
            state.changed_unix_ms = now_ms();
            state.hook_pending = true;
            self.metrics.probe_outputs_written.inc();
            tracing::info!(probe, path = %out.path, "probe output changed");
        }
        let Some(command) = hook.filter(|_| state.hook_pending) else { return Ok(()) };
        let env = [("FERRY_PROBE", probe.to_string()), ("FERRY_PROBE_OUTPUT", out.path.clone())];
        match crate::hooks::run_with_env(command, &env).await {
            Ok(0) => {
                state.hook_pending = false;
                Ok(())
            }
            Ok(code) => Err(format!("output.hook: {} exited with {code} (run again next round)", out.hook)),
            Err(e) => Err(format!("output.hook: {e} (run again next round)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn https_targets_speak_tls() {
        // A server that answers TLS with plain HTTP: the worker's TLS
        // handshake fails (it does not fall back to plain text).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = conn.read(&mut request).await;
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
                let _ = conn.shutdown().await;
            }
        });
        let target = pb::ProbeTarget { url: format!("https://{addr}/obj"), host: "relay.example".into() };
        let r = download(&http_client(), &target, Duration::from_secs(5)).await;
        assert!(r.error.starts_with("request failed"), "{r:?}");
        let plain = pb::ProbeTarget { url: format!("http://{addr}/obj"), host: String::new() };
        let r = download(&http_client(), &plain, Duration::from_secs(5)).await;
        assert_eq!((r.error.as_str(), r.bytes), ("", 0), "{r:?}");
    }

    #[test]
    fn offsets_spread_a_fleet_over_the_interval_and_runs_land_on_them() {
        let offsets: Vec<u64> = (0..200).map(|i| offset_ms(&format!("w{i}"), "relays", 60_000)).collect();
        assert!(offsets.iter().all(|o| *o < 60_000));
        let distinct: std::collections::HashSet<u64> = offsets.iter().map(|o| o / 6_000).collect();
        assert_eq!(distinct.len(), 10, "200 workers touch every tenth of the interval");
        assert_eq!(offset_ms("w1", "relays", 60_000), offset_ms("w1", "relays", 60_000), "stable");
        assert_ne!(offset_ms("w1", "relays", 60_000), offset_ms("w1", "other", 60_000));
        assert_eq!(next_run(125_000, 60_000, 7_000), 127_000);
        assert_eq!(next_run(127_000, 60_000, 7_000), 187_000);
        assert_eq!(next_run(3_000, 60_000, 7_000), 7_000);
    }

    #[test]
    fn the_output_lists_successes_fastest_first_then_failures() {
        let r = |target: u32, url: &str, host: &str, total_us: u64, error: &str| pb::ProbeResult {
            target,
            url: url.into(),
            host: host.into(),
            total_us,
            error: error.into(),
            ..Default::default()
        };
        let results = vec![
            r(0, "http://10.0.0.1:8081/2M", "cdn.example", 900_000, ""),
            r(1, "http://10.0.0.2:8081/2M", "", 0, "timed out"),
            r(2, "http://10.0.0.3:8081/2M", "cdn.example", 300_000, ""),
        ];
        let ranked = rank(&results);
        assert_eq!(
            render("", 0, &ranked),
            "http://10.0.0.3:8081/2M\nhttp://10.0.0.1:8081/2M\nhttp://10.0.0.2:8081/2M\n"
        );
        assert_eq!(
            render("{rank} {ip} {host} {total_ms}", 2, &ranked),
            "1 10.0.0.3 cdn.example 300.0\n2 10.0.0.1 cdn.example 900.0\n"
        );
        assert_eq!(render("{ip} {error}", 0, &ranked).lines().last(), Some("10.0.0.2 timed out"));
    }
}
