//! Outgoing webhooks: a job's final report (its callback URL) and a probe's
//! stale alert, as JSON POSTs to `http://` or `https://` URLs (rustls with
//! Mozilla's root certificates), retried with backoff.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Attempts before giving up.
pub const ATTEMPTS: u32 = 6;

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Checks that `url` is an `http://` or `https://` URL with a host; the
/// error names `field`.
pub fn check_url(url: &str, field: &str) -> Result<hyper::Uri, String> {
    if url.len() > 2048 {
        return Err(format!("{field}: a URL is at most 2048 bytes, got {}", url.len()));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{field}: '{url}' is not a URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("{field}: '{url}' must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{field}: '{url}' has no host"));
    }
    Ok(uri)
}

/// [`check_url`], and the URL's host must be in `hosts` (the scheduler's
/// `callback_hosts`).
pub fn check_allowed(url: &str, field: &str, hosts: &ferry_tls::allow::Hosts) -> Result<(), String> {
    check_url(url, field)?;
    hosts.check_url(url, field, "callback_hosts")
}

fn client() -> HttpsClient {
    let mut tcp = HttpConnector::new();
    // The TLS connector does the scheme check: https gets TLS, never plain text.
    tcp.enforce_http(false);
    tcp.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One POST of `body` to `url`: Ok on a 2xx answer, else why not.
async fn post(client: &HttpsClient, url: &str, body: &str) -> Result<(), String> {
    let request = hyper::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| format!("bad URL: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("refused with {}", resp.status())),
        Ok(Err(e)) => Err(format!("failed: {e:?}")),
        Err(_) => Err("timed out after 10s".into()),
    }
}

/// POSTs `body` to `url` until a 2xx answer or [`ATTEMPTS`] failures; not
/// at all unless `hosts` allows the URL's host (checked again here: the
/// list may have changed since the job or probe was accepted).
pub async fn post_with_retries(url: String, body: String, hosts: ferry_tls::allow::Hosts) {
    if let Err(why) = check_allowed(&url, "url", &hosts) {
        tracing::warn!(%url, %why, "webhook not sent");
        return;
    }
    let client = client();
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=ATTEMPTS {
        match post(&client, &url, &body).await {
            Ok(()) => {
                tracing::info!(%url, attempt, "webhook delivered");
                return;
            }
            Err(why) => tracing::warn!(%url, attempt, %why, "webhook not delivered"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    tracing::error!(%url, "webhook abandoned after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers every request with 200 and hands over the
    /// first bytes each connection sent.
    async fn server() -> (String, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(buf[..n].to_vec());
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                let _ = conn.shutdown().await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn http_urls_get_the_report_as_a_json_post() {
        let (addr, mut seen) = server().await;
        post(&client(), &format!("http://{addr}/done?job=1"), r#"{"state":"succeeded"}"#).await.unwrap();
        let request = String::from_utf8(seen.recv().await.unwrap()).unwrap();
        assert!(request.starts_with("POST /done?job=1 HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("content-type: application/json"), "{request}");
        assert!(request.ends_with(r#"{"state":"succeeded"}"#), "{request}");
    }

    #[tokio::test]
    async fn https_urls_speak_tls_and_never_send_the_report_in_clear() {
        let (addr, mut seen) = server().await;
        // The plain-text server cannot finish a TLS handshake: the POST fails.
        let err = post(&client(), &format!("https://{addr}/done"), r#"{"secret":1}"#).await.unwrap_err();
        assert!(err.starts_with("failed"), "{err}");
        let first = seen.recv().await.unwrap();
        assert_eq!(first.first(), Some(&0x16), "a TLS handshake record, not {:?}", String::from_utf8_lossy(&first));
        assert!(!String::from_utf8_lossy(&first).contains("secret"));
    }

    #[test]
    fn urls_are_checked_and_the_error_names_the_field() {
        assert!(check_url("https://ops.example/hooks/ferry", "callback_url").is_ok());
        assert!(check_url("http://10.0.0.1:8080/x", "callback_url").is_ok());
        for (url, why) in
            [("ftp://x/y", "must start with"), ("/hooks/ferry", "must start with"), ("http://a b/", "not a URL")]
        {
            let err = check_url(url, "callback_url").unwrap_err();
            assert!(err.starts_with("callback_url:") && err.contains(why), "{url}: {err}");
        }
    }
}
