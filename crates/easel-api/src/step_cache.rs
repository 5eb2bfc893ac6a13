//! Step caching as requests name it: `cache` is `none`, `deepcache[:INTERVAL]` (Stable
//! Diffusion's UNets) or `fbcache[:THRESHOLD]` (FLUX's First-Block Cache). One string, as
//! ComfyUI's and diffusers' cache nodes take one setting each, so a request, a model's
//! `easel.json` default and the CLI's `--cache` all read the same way.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A step cache and its setting (see the engine's `StepCache` for what each does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepCache {
    /// The whole UNet runs every `interval` steps; the steps between reuse its deep features.
    DeepCache { interval: usize },
    /// Steps whose first FLUX block changed by less than `threshold` reuse the other blocks'.
    FirstBlock { threshold: f64 },
}

/// DeepCache's interval when the request gives none: every third step runs the whole UNet
/// (measured in docs/step-cache.md; DeepCache's paper uses 3 to 5 at 50 steps).
const DEEPCACHE_DEFAULT_INTERVAL: usize = 3;
/// FBCache's threshold when the request gives none (ParaAttention's FLUX example).
const FBCACHE_DEFAULT_THRESHOLD: f64 = 0.08;

impl StepCache {
    /// Reads `none`, `deepcache`, `deepcache:N` (N from 1 to 50), `fbcache` or `fbcache:T`
    /// (T from 0 to 1); `none` is `Ok(None)`. The error is a sentence for the `cache` field.
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        let (kind, setting) = match text.split_once(':') {
            Some((k, s)) => (k, Some(s)),
            None => (text, None),
        };
        let bad = || format!("cache must be none, deepcache[:INTERVAL] or fbcache[:THRESHOLD], got `{text}`");
        match (kind, setting) {
            ("none", None) => Ok(None),
            ("deepcache", None) => Ok(Some(Self::DeepCache { interval: DEEPCACHE_DEFAULT_INTERVAL })),
            ("deepcache", Some(s)) => match s.parse::<usize>() {
                Ok(interval) if (1..=50).contains(&interval) => Ok(Some(Self::DeepCache { interval })),
                _ => Err(format!("deepcache's interval is a whole number of steps from 1 to 50, got `{s}`")),
            },
            ("fbcache", None) => Ok(Some(Self::FirstBlock { threshold: FBCACHE_DEFAULT_THRESHOLD })),
            ("fbcache", Some(s)) => match s.parse::<f64>() {
                // `+ 0.0` makes -0 plain 0, so one setting has one spelling in batch and cache keys.
                Ok(threshold) if (0.0..=1.0).contains(&threshold) => Ok(Some(Self::FirstBlock { threshold: threshold + 0.0 })),
                _ => Err(format!("fbcache's threshold is a number from 0 to 1, got `{s}`")),
            },
            _ => Err(bad()),
        }
    }

    /// The cache's name: `deepcache` or `fbcache`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DeepCache { .. } => "deepcache",
            Self::FirstBlock { .. } => "fbcache",
        }
    }
}

impl std::fmt::Display for StepCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeepCache { interval } => write!(f, "deepcache:{interval}"),
            Self::FirstBlock { threshold } => write!(f, "fbcache:{threshold}"),
        }
    }
}

impl Serialize for StepCache {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StepCache {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)?.ok_or_else(|| serde::de::Error::custom("a job's step cache is never `none` (that is no cache)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_settings_read_and_print_the_same_way() {
        for (text, want) in [
            ("none", None),
            ("deepcache", Some(StepCache::DeepCache { interval: 3 })),
            ("deepcache:2", Some(StepCache::DeepCache { interval: 2 })),
            ("fbcache", Some(StepCache::FirstBlock { threshold: 0.08 })),
            ("fbcache:0.2", Some(StepCache::FirstBlock { threshold: 0.2 })),
            ("fbcache:-0", Some(StepCache::FirstBlock { threshold: 0.0 })),
        ] {
            let got = StepCache::parse(text).unwrap();
            assert_eq!(got, want, "{text}");
            if let Some(c) = got {
                assert_eq!(StepCache::parse(&c.to_string()).unwrap(), Some(c));
                assert_eq!(serde_json::from_value::<StepCache>(serde_json::to_value(c).unwrap()).unwrap(), c);
            }
        }
        for bad in ["deep", "deepcache:0", "deepcache:x", "deepcache:51", "fbcache:-1", "fbcache:2", "none:1", ""] {
            assert!(StepCache::parse(bad).is_err(), "{bad}");
        }
    }
}
