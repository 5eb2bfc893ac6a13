//! Image URLs that can be handed to a browser but not guessed or kept forever:
//! `/v1/images/{key}?expires=UNIX_SECONDS&sig=HEX`, where `sig` is HMAC-SHA256 over the key and
//! the expiry under the deployment's signing secret.
//!
//! Why signed rather than "send your API key": an `<img src>` cannot send a header, and a URL
//! that works for anyone who guesses a job id leaks one tenant's images to another. Every node
//! (API nodes, workers) signs with the same secret, so a URL made by the worker that finished the
//! job opens on any API node until it expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Why a signed image URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error("this image URL expired; fetch the job again for a fresh one")]
    Expired,
    #[error("this image URL's signature is wrong")]
    BadSignature,
}

/// Signs and checks image URLs.
#[derive(Clone)]
pub struct ImageUrls {
    key: Vec<u8>,
    lifetime: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl ImageUrls {
    /// URLs valid for `lifetime`, under a key derived from `secret` (so the same secret can also
    /// sign webhooks without one signature being usable as the other).
    pub fn new(secret: &str, lifetime: Duration) -> Self {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"easel image URLs v1");
        Self { key: mac.finalize().into_bytes().to_vec(), lifetime: lifetime.max(Duration::from_secs(1)) }
    }

    fn mac(&self, key: &str, expires: u64) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The signed path of a stored image.
    pub fn path(&self, key: &str) -> String {
        let expires = unix_now() + self.lifetime.as_secs();
        let sig = hex::encode(self.mac(key, expires).finalize().into_bytes());
        format!("/v1/images/{key}?expires={expires}&sig={sig}")
    }

    /// Checks a URL's `expires` and `sig` for `key` (in constant time).
    pub fn verify(&self, key: &str, expires: u64, sig: &str) -> Result<(), UrlRefusal> {
        let bytes = hex::decode(sig).map_err(|_| UrlRefusal::BadSignature)?;
        self.mac(key, expires).verify_slice(&bytes).map_err(|_| UrlRefusal::BadSignature)?;
        if expires < unix_now() {
            return Err(UrlRefusal::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(path: &str) -> (String, u64, String) {
        let (key, q) = path.trim_start_matches("/v1/images/").split_once('?').expect("query");
        let mut expires = 0;
        let mut sig = String::new();
        for pair in q.split('&') {
            match pair.split_once('=') {
                Some(("expires", v)) => expires = v.parse().expect("number"),
                Some(("sig", v)) => sig = v.to_string(),
                _ => {}
            }
        }
        (key.to_string(), expires, sig)
    }

    #[test]
    fn a_signed_path_verifies_for_its_key_only_and_not_under_another_secret() {
        let urls = ImageUrls::new("s3cret", Duration::from_secs(60));
        let (key, expires, sig) = query(&urls.path("job_1/1_0.png"));
        assert_eq!(key, "job_1/1_0.png");
        assert_eq!(urls.verify(&key, expires, &sig), Ok(()));
        assert_eq!(urls.verify("job_2/1_0.png", expires, &sig), Err(UrlRefusal::BadSignature));
        assert_eq!(urls.verify(&key, expires + 1, &sig), Err(UrlRefusal::BadSignature), "the expiry is signed");
        assert_eq!(ImageUrls::new("other", Duration::from_secs(60)).verify(&key, expires, &sig), Err(UrlRefusal::BadSignature));
        assert_eq!(urls.verify(&key, expires, "zz"), Err(UrlRefusal::BadSignature));
    }

    #[test]
    fn an_expired_signature_is_refused_as_expired() {
        let urls = ImageUrls::new("s3cret", Duration::from_secs(60));
        let past = unix_now() - 10;
        let sig = hex::encode(urls.mac("j/0.png", past).finalize().into_bytes());
        assert_eq!(urls.verify("j/0.png", past, &sig), Err(UrlRefusal::Expired));
    }
}
