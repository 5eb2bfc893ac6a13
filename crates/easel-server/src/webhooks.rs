//! Webhooks: when a job with a `webhook_url` ends, POST its final state (the same JSON as the
//! final SSE event), signed with HMAC-SHA256, retried with exponential backoff.
//!
//! Deliveries come from the queue's outbox (see [`easel_queue`]): the transition that ends a job
//! queues its delivery, and every process that runs [`deliver`] (each API node and each
//! `easel worker`) claims due deliveries with a lease. So each final state is sent by one
//! process however many there are, a delivery whose sender dies is sent again by another, and
//! pending deliveries survive restarts. Each carries `X-Easel-Delivery`, stable across retries:
//! a receiver deduplicates on it (at least once always; exactly once unless a sender dies
//! between the receiver's 2xx and recording it).
//!
//! Targets must not reach the private network ([`crate::ssrf`]): checked without DNS when the
//! job is submitted, and resolved and checked again at every attempt, connecting only to the
//! addresses that passed, following no redirects.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use easel_api::{ApiError, Event, WebhookFormat};
use easel_queue::{Delivery, JobQueue};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::Instrument;

use crate::image_urls::ImageUrls;
use crate::ssrf::{self, SsrfError};

/// Webhook delivery settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub signing: WebhookSigning,
    /// Permit loopback and private-network targets (tests, trusted networks).
    pub allow_private: bool,
    pub max_attempts: u32,
    pub first_backoff: Duration,
}

/// How long a claimed delivery is this process's before another may send it.
const DELIVERY_LEASE: Duration = Duration::from_secs(60);
/// How often the outbox is checked for due deliveries.
const OUTBOX_POLL: Duration = Duration::from_millis(200);
/// The longest wait between two attempts: a receiver down for hours still gets its webhooks.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// One POST's time limit.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks a webhook URL at submission without DNS (a handler must not wait on a lookup):
/// http(s), a host, and no private IP literal or `localhost` unless allowed.
pub fn validate_url(raw: &str, allow_private: bool) -> Result<(), ApiError> {
    ssrf::check_without_dns(raw, allow_private).map(|_| ()).map_err(|e| ApiError::invalid("webhook_url", format!("webhook_url: {e}")))
}

/// The keys webhooks are signed with, all from the deployment's signing secret: easel's own
/// (`X-Easel-Signature`), and the Standard Webhooks key Replicate-shaped ones use (its
/// clients fetch it as `whsec_...` from `GET /v1/webhooks/default/secret`).
#[derive(Debug, Clone)]
pub struct WebhookSigning {
    secret: String,
    replicate_key: Vec<u8>,
}

impl WebhookSigning {
    pub fn new(secret: &str) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"easel replicate webhooks v1");
        Self { secret: secret.to_string(), replicate_key: mac.finalize().into_bytes().to_vec() }
    }

    /// `X-Easel-Signature` for a body sent at `timestamp`.
    pub fn easel(&self, timestamp: u64, body: &[u8]) -> String {
        signature(&self.secret, timestamp, body)
    }

    /// The Replicate-shaped webhooks' secret, as Replicate hands it out.
    pub fn replicate_secret(&self) -> String {
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&self.replicate_key))
    }

    /// `webhook-signature`: `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`.
    pub fn replicate(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.replicate_key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// `sha256=<hex>` of HMAC(secret, "<timestamp>.<body>").
pub fn signature(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends due webhook deliveries from the queue's outbox until the runtime stops.
pub async fn deliver(queue: Arc<dyn JobQueue>, urls: ImageUrls, config: WebhookConfig) {
    loop {
        let q = queue.clone();
        let due = tokio::task::spawn_blocking(move || q.claim_deliveries(16, DELIVERY_LEASE)).await;
        match due {
            Ok(Ok(deliveries)) => {
                for d in deliveries {
                    let (queue, urls, config) = (queue.clone(), urls.clone(), config.clone());
                    let span = tracing::info_span!("webhook", delivery = %d.id, job = %d.job_id, attempt = d.attempt);
                    tokio::spawn(async move { deliver_one(&*queue, &urls, &config, d).await }.instrument(span));
                }
            }
            Ok(Err(e)) => tracing::error!("reading the webhook outbox: {e}"),
            Err(e) => tracing::error!("reading the webhook outbox: {e}"),
        }
        tokio::time::sleep(OUTBOX_POLL).await;
    }
}

/// Why one attempt did not deliver.
enum Undelivered {
    /// Worth trying again later (network, DNS, 5xx, 429).
    Retry(String),
    /// Never deliverable (a refused target); the delivery is dropped.
    Never(String),
}

async fn deliver_one(queue: &dyn JobQueue, urls: &ImageUrls, config: &WebhookConfig, d: Delivery) {
    let event = match queue.get(&d.job_id) {
        Ok(Some(job)) => crate::events::final_event(&job, urls).map(|e| (job, e)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("reading the job: {e}");
            let _ = queue.delivery_retry(&d.id, config.first_backoff);
            return;
        }
    };
    let Some((job, event)) = event else {
        tracing::warn!("the job is gone or not final; dropping its delivery");
        let _ = queue.delivery_done(&d.id);
        return;
    };
    let payload = match &job.spec.webhook_format {
        Some(WebhookFormat::Replicate { base_url }) => Payload::Replicate(serde_json::to_vec(&crate::http::replicate_prediction(&job, base_url, urls)).unwrap_or_default()),
        Some(WebhookFormat::Easel { base_url }) => {
            let event = match event {
                Event::Completed { job_id, urls } => Event::Completed { job_id, urls: urls.iter().map(|u| format!("{base_url}{u}")).collect() },
                other => other,
            };
            Payload::Easel { event: event.name(), body: serde_json::to_vec(&event).unwrap_or_default() }
        }
        None => Payload::Easel { event: event.name(), body: serde_json::to_vec(&event).unwrap_or_default() },
    };
    let outcome = send(config, &d, &payload).await;
    let recorded = match outcome {
        Ok(()) => queue.delivery_done(&d.id),
        Err(Undelivered::Never(why)) => {
            tracing::warn!(url = %d.url, "webhook not sent: {why}");
            queue.delivery_done(&d.id)
        }
        Err(Undelivered::Retry(why)) if d.attempt >= config.max_attempts => {
            tracing::error!(url = %d.url, "webhook gave up after {} attempts: {why}", d.attempt);
            queue.delivery_done(&d.id)
        }
        Err(Undelivered::Retry(why)) => {
            let backoff = (config.first_backoff * 2u32.saturating_pow(d.attempt.saturating_sub(1).min(20))).min(MAX_BACKOFF);
            tracing::warn!(url = %d.url, "webhook failed ({why}); retrying in {backoff:?}");
            queue.delivery_retry(&d.id, backoff)
        }
    };
    if let Err(e) = recorded {
        tracing::error!("recording the delivery: {e}");
    }
}

/// A webhook's body and how it is signed.
enum Payload {
    /// easel's final event: `X-Easel-Signature`, `X-Easel-Event`.
    Easel { event: &'static str, body: Vec<u8> },
    /// A Replicate prediction: Standard Webhooks headers (`webhook-id`, `-timestamp`, `-signature`).
    Replicate(Vec<u8>),
}

/// One attempt: resolve and check the target, connect to the checked addresses only.
async fn send(config: &WebhookConfig, d: &Delivery, payload: &Payload) -> Result<(), Undelivered> {
    let target = match ssrf::resolve(&d.url, config.allow_private).await {
        Ok(t) => t,
        Err(e @ SsrfError::Dns { .. }) => return Err(Undelivered::Retry(e.to_string())),
        Err(e) => return Err(Undelivered::Never(e.to_string())),
    };
    let client = reqwest::Client::builder()
        .timeout(SEND_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .resolve_to_addrs(target.host.trim_start_matches('[').trim_end_matches(']'), &target.addrs)
        .build()
        .map_err(|e| Undelivered::Retry(format!("building the HTTP client: {e}")))?;
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let req = client.post(target.url).header("content-type", "application/json").header("x-easel-delivery", &d.id);
    let req = match payload {
        Payload::Easel { event, body } => req
            .header("x-easel-timestamp", ts.to_string())
            .header("x-easel-signature", config.signing.easel(ts, body))
            .header("x-easel-event", *event)
            .body(body.clone()),
        Payload::Replicate(body) => req
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", config.signing.replicate(&d.id, ts, body))
            .body(body.clone()),
    };
    let res = req.send().await;
    match res {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(Undelivered::Retry(format!("the receiver answered {}", r.status().as_u16()))),
        Err(e) => Err(Undelivered::Retry(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_literal_targets_are_refused_at_submission_unless_allowed() {
        for u in ["http://127.0.0.1:9/x", "http://localhost/x", "http://10.1.2.3/", "http://192.168.0.1/", "http://[::1]/", "http://169.254.169.254/latest", "http://[::ffff:10.0.0.1]/"] {
            assert!(validate_url(u, false).is_err(), "{u}");
            assert!(validate_url(u, true).is_ok(), "{u}");
        }
        assert!(validate_url("http://8.8.8.8/hook", false).is_ok());
        assert!(validate_url("ftp://8.8.8.8/", true).is_err());
        assert!(validate_url("not a url", true).is_err());
    }

    #[test]
    fn replicate_shaped_webhooks_are_signed_the_standard_webhooks_way() {
        // What replicate.webhooks.validate computes: HMAC-SHA256 keyed with the base64 after
        // `whsec_`, over "<id>.<timestamp>.<body>", base64, prefixed `v1,`.
        let s = WebhookSigning::new("deployment secret");
        let secret = s.replicate_secret();
        let key = base64::engine::general_purpose::STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        mac.update(b"dlv_1.1700000000.{}");
        let want = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
        assert_eq!(s.replicate("dlv_1", 1_700_000_000, b"{}"), want);
        assert_ne!(WebhookSigning::new("other").replicate_secret(), secret);
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // Known answer from Python: hmac.new(b"key", b"1.{}", hashlib.sha256).hexdigest()
        let sig = signature("key", 1, b"{}");
        assert_eq!(sig, "sha256=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224");
        assert_ne!(sig, signature("key", 2, b"{}"));
    }
}
