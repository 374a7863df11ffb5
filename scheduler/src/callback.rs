//! Job callbacks: the final report as JSON, POSTed to the job's callback URL,
//! retried with backoff. Plain `http://` only (no TLS yet).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Attempts before giving up.
pub const ATTEMPTS: u32 = 6;

/// POSTs `body` to `url` until a 2xx answer or [`ATTEMPTS`] failures.
pub async fn post_with_retries(url: String, body: String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        let request = hyper::Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%url, error = %e, "bad callback URL");
                return;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
            Ok(Ok(resp)) if resp.status().is_success() => {
                tracing::info!(%url, attempt, "callback delivered");
                return;
            }
            Ok(Ok(resp)) => tracing::warn!(%url, attempt, status = %resp.status(), "callback refused"),
            Ok(Err(e)) => tracing::warn!(%url, attempt, error = %e, "callback failed"),
            Err(_) => tracing::warn!(%url, attempt, "callback timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    tracing::error!(%url, "callback abandoned after {ATTEMPTS} attempts");
}
