//! Webhooks: when a job with a `webhook_url` ends, POST its state, signed with HMAC-SHA256,
//! retrying with exponential backoff. Loopback, private and link-local targets are refused
//! unless the operator allows them (a webhook must not become a way into the private network).

use std::net::IpAddr;
use std::time::Duration;

use easel_api::{ApiError, Event};
use easel_queue::JobQueue;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::events::EventBus;

/// Webhook delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Key of the `X-Easel-Signature: sha256=<hex>` HMAC over `<timestamp>.<body>`.
    pub secret: String,
    /// Permit loopback and private-network targets (tests, trusted networks).
    pub allow_private: bool,
    pub max_attempts: u32,
    pub first_backoff: Duration,
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast() || v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64,
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_private(IpAddr::V4(v4)))
        }
    }
}

/// Checks a webhook URL at submission: http(s), and not private unless allowed.
pub fn validate_url(raw: &str, allow_private: bool) -> Result<(), ApiError> {
    let bad = |m: &str| ApiError::invalid("webhook_url", m.to_string());
    let url = url::Url::parse(raw).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("webhook_url must be http or https"));
    }
    let host = url.host_str().ok_or_else(|| bad("webhook_url has no host"))?;
    if allow_private {
        return Ok(());
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let lower = host.to_ascii_lowercase();
    if lower == "localhost" || lower.ends_with(".localhost") {
        return Err(bad("webhook_url must not point at loopback or private addresses"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).map(|a| a.map(|s| s.ip()).collect()).unwrap_or_default(),
    };
    if addrs.iter().any(|ip| is_private(*ip)) {
        return Err(bad("webhook_url must not point at loopback or private addresses"));
    }
    Ok(())
}

/// `sha256=<hex>` of HMAC(secret, "<timestamp>.<body>").
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers final events of jobs that asked for a webhook, until the bus closes.
pub async fn deliver(bus: EventBus, queue: std::sync::Arc<dyn JobQueue>, config: WebhookConfig) {
    let mut rx = bus.subscribe();
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(10)).redirect(reqwest::redirect::Policy::none()).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("webhooks disabled: {e}");
            return;
        }
    };
    loop {
        let event = match rx.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("webhook delivery lagged by {n} events");
                continue;
            }
            Err(_) => return,
        };
        if !event.is_final() {
            continue;
        }
        let Ok(Some(job)) = queue.get(event.job_id()) else { continue };
        let Some(url) = job.spec.webhook_url.clone() else { continue };
        let (client, config) = (client.clone(), config.clone());
        tokio::spawn(async move { send(&client, &config, &url, &event).await });
    }
}

async fn send(client: &reqwest::Client, config: &WebhookConfig, url: &str, event: &Event) {
    let body = serde_json::to_vec(event).unwrap_or_default();
    let mut backoff = config.first_backoff;
    for attempt in 1..=config.max_attempts {
        if validate_url(url, config.allow_private).is_err() {
            tracing::warn!(url, "webhook target resolves to a refused address; not sent");
            return;
        }
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let res = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-easel-timestamp", ts.to_string())
            .header("x-easel-signature", signature(&config.secret, ts, &body))
            .header("x-easel-event", event.name())
            .body(body.clone())
            .send()
            .await;
        match res {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(url, attempt, status = r.status().as_u16(), "webhook refused"),
            Err(e) => tracing::warn!(url, attempt, "webhook failed: {e}"),
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    tracing::error!(url, job = event.job_id(), "webhook gave up after {} attempts", config.max_attempts);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_targets_are_refused_unless_allowed() {
        for u in ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/", "http://192.168.0.1/", "http://[::1]/", "http://169.254.169.254/latest"] {
            assert!(validate_url(u, false).is_err(), "{u}");
            assert!(validate_url(u, true).is_ok(), "{u}");
        }
        assert!(validate_url("http://8.8.8.8/hook", false).is_ok());
        assert!(validate_url("ftp://8.8.8.8/", true).is_err());
        assert!(validate_url("not a url", true).is_err());
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // Known answer from Python: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()
        let sig = signature("key", 1, b"{}");
        assert_eq!(sig, "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224");
        assert_ne!(sig, signature("key", 2, b"{}"));
    }
}
