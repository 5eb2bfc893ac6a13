//! Routing policy: which providers may serve a request, in what order, and why.
//!
//! Public model names are aliases for candidates (`flux-dev` -> the local FLUX.1-dev, fal's
//! flux/dev, Replicate's, BFL's); tiers (hero, standard, draft) name candidate lists too.
//! Per request, `route` (auto, local, or a provider), `privacy: "private"` and `tier` narrow
//! the list; a strategy orders it; disabled providers (no key), open circuit breakers and
//! spent budgets drop out. `privacy: private` is a hard guarantee: a private request's plan
//! never holds anything but the local engine, whatever fails later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The name the local engine goes by in candidate lists (`local:MODEL`).
pub const LOCAL: &str = "local";

/// One place a request could go.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// `local` or a configured provider's name.
    pub provider: String,
    /// The model name at that provider.
    pub model: String,
    /// Why it is in the plan at this position, for the response and the job record.
    pub reason: String,
}

impl Candidate {
    pub fn is_local(&self) -> bool {
        self.provider == LOCAL
    }
}

/// How candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Local engines first; closed providers only when the estimated local wait exceeds the
    /// latency budget (overflow) or the local engine fails.
    #[default]
    LocalFirst,
    /// Lowest estimated price per image first (local at its amortised cost).
    Cheapest,
    /// Lowest observed latency first (unobserved providers in configured order).
    Fastest,
    /// Exactly the configured order.
    Ordered,
}

/// The routing section of the config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Public name -> candidates as `provider:model` (`local:NAME` for a local model).
    #[serde(default)]
    pub aliases: HashMap<String, Vec<String>>,
    /// Tier name -> candidates.
    #[serde(default)]
    pub tiers: HashMap<String, Vec<String>>,
    #[serde(default)]
    pub strategy: Strategy,
    /// Local-first overflows to closed providers when the local queue's estimated wait is longer.
    #[serde(default = "default_latency_budget")]
    pub latency_budget_s: f64,
    /// Consecutive failures that open a provider's circuit, and for how long.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_s: f64,
    /// Daily spend caps on paid providers, USD: all keys together, and per key.
    #[serde(default)]
    pub daily_budget_usd: Option<f64>,
    #[serde(default)]
    pub daily_budget_per_key_usd: HashMap<String, f64>,
}

fn default_latency_budget() -> f64 {
    30.0
}
fn default_breaker_failures() -> u32 {
    3
}
fn default_breaker_cooldown() -> f64 {
    30.0
}

/// A request's routing hints (easel's fields in the request body).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hints {
    /// `auto` (None), `local`, or a provider name.
    pub route: Option<String>,
    pub private: bool,
    pub tier: Option<String>,
    pub api_key: Option<String>,
}

/// What the router knows about the world when it plans.
pub struct Situation<'a> {
    /// Local models served now.
    pub local_models: &'a [String],
    /// Estimated seconds until a new local job would start.
    pub local_wait_s: f64,
    /// Providers that are configured and have their key.
    pub enabled: &'a [String],
    /// Estimated price of one image at (provider, model); local included.
    pub price: &'a dyn Fn(&str, &str) -> Option<f64>,
    /// Spend so far today: all keys, and this request's key.
    pub spent_today_usd: f64,
    pub spent_today_by_key_usd: f64,
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    #[error("unknown model or alias `{0}`")]
    UnknownModel(String),
    #[error("unknown tier `{0}`")]
    UnknownTier(String),
    #[error("unknown route `{0}` (use auto, local, or a configured provider)")]
    UnknownRoute(String),
    /// The private request has no local engine to run on; it is never sent out.
    #[error("`{0}` is private and no local engine serves it; it was not sent to any closed provider")]
    PrivateWithoutLocal(String),
    #[error("no provider can serve `{model}` now: {why}")]
    NoCandidate { model: String, why: String },
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    latency_ewma_s: Option<f64>,
    last_error: Option<String>,
}

/// What the router has seen of one provider, for dashboards.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProviderHealth {
    pub provider: String,
    /// The circuit breaker skips the provider until it closes again.
    pub circuit_open: bool,
    pub consecutive_failures: u32,
    /// Smoothed seconds per request.
    pub latency_s: Option<f64>,
    pub last_error: Option<String>,
}

/// The routing policy plus what it has observed (latencies, failures).
pub struct Router {
    config: RoutingConfig,
    health: Mutex<HashMap<String, Health>>,
}

fn parse_candidate(s: &str) -> (String, String) {
    match s.split_once(':') {
        Some((p, m)) => (p.to_string(), m.to_string()),
        None => (LOCAL.to_string(), s.to_string()),
    }
}

impl Router {
    pub fn new(config: RoutingConfig) -> Self {
        Self { config, health: Mutex::new(HashMap::new()) }
    }

    pub fn config(&self) -> &RoutingConfig {
        &self.config
    }

    /// Whether `name` is an alias or tier this router resolves.
    pub fn knows(&self, model: &str) -> bool {
        self.config.aliases.contains_key(model)
    }

    /// The ordered plan for `model` under `hints`.
    pub fn plan(&self, model: &str, hints: &Hints, s: &Situation) -> Result<Vec<Candidate>, RouteError> {
        let listed: Vec<(String, String)> = match (&hints.tier, self.config.aliases.get(model)) {
            (Some(tier), _) => self.config.tiers.get(tier).ok_or_else(|| RouteError::UnknownTier(tier.clone()))?.iter().map(|c| parse_candidate(c)).collect(),
            (None, Some(list)) => list.iter().map(|c| parse_candidate(c)).collect(),
            (None, None) if model.contains(':') => vec![parse_candidate(model)],
            (None, None) if s.local_models.iter().any(|m| m == model) => vec![(LOCAL.to_string(), model.to_string())],
            (None, None) => return Err(RouteError::UnknownModel(model.to_string())),
        };
        let mut why_not: Vec<String> = vec![];
        let mut out: Vec<Candidate> = vec![];
        match hints.route.as_deref() {
            None | Some("auto") | Some(LOCAL) => {}
            Some(p) if s.enabled.iter().any(|e| e == p) || listed.iter().any(|(lp, _)| lp == p) => {}
            Some(p) => return Err(RouteError::UnknownRoute(p.to_string())),
        }
        let budget_spent = self.config.daily_budget_usd.is_some_and(|cap| s.spent_today_usd >= cap);
        let key_spent = hints.api_key.as_ref().and_then(|k| self.config.daily_budget_per_key_usd.get(k)).is_some_and(|cap| s.spent_today_by_key_usd >= *cap);
        for (provider, m) in listed {
            let local = provider == LOCAL;
            if hints.private && !local {
                continue;
            }
            match hints.route.as_deref() {
                Some(LOCAL) if !local => continue,
                Some(r) if r != "auto" && r != LOCAL && r != provider => continue,
                _ => {}
            }
            if local {
                if !s.local_models.iter().any(|x| *x == m) {
                    why_not.push(format!("no local engine serves {m}"));
                    continue;
                }
            } else {
                if !s.enabled.iter().any(|e| *e == provider) {
                    why_not.push(format!("{provider} is not configured or has no API key"));
                    continue;
                }
                if self.circuit_open(&provider) {
                    why_not.push(format!("{provider}'s circuit is open after repeated failures"));
                    continue;
                }
                if budget_spent || key_spent {
                    why_not.push(format!("the daily budget for paid providers is spent ({provider} skipped)"));
                    continue;
                }
            }
            out.push(Candidate { provider, model: m, reason: String::new() });
        }
        if out.is_empty() {
            if hints.private {
                return Err(RouteError::PrivateWithoutLocal(model.to_string()));
            }
            return Err(RouteError::NoCandidate { model: model.to_string(), why: if why_not.is_empty() { "no candidates".into() } else { why_not.join("; ") } });
        }
        self.order(&mut out, hints, s);
        Ok(out)
    }

    fn order(&self, out: &mut [Candidate], hints: &Hints, s: &Situation) {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let latency = |c: &Candidate| health.get(&c.provider).and_then(|h| h.latency_ewma_s);
        match self.config.strategy {
            Strategy::Ordered => {
                for (i, c) in out.iter_mut().enumerate() {
                    c.reason = format!("ordered: candidate {} of the configured list", i + 1);
                }
            }
            Strategy::Cheapest => {
                out.sort_by(|a, b| {
                    let pa = (s.price)(&a.provider, &a.model).unwrap_or(f64::INFINITY);
                    let pb = (s.price)(&b.provider, &b.model).unwrap_or(f64::INFINITY);
                    pa.total_cmp(&pb)
                });
                for c in out.iter_mut() {
                    c.reason = match (s.price)(&c.provider, &c.model) {
                        Some(p) => format!("cheapest: ${p:.4} per image"),
                        None => "cheapest: unpriced, tried last".into(),
                    };
                }
            }
            Strategy::Fastest => {
                out.sort_by(|a, b| latency(a).unwrap_or(f64::INFINITY).total_cmp(&latency(b).unwrap_or(f64::INFINITY)));
                for c in out.iter_mut() {
                    c.reason = match latency(c) {
                        Some(l) => format!("fastest: {l:.2} s observed"),
                        None => "fastest: not observed yet".into(),
                    };
                }
            }
            Strategy::LocalFirst => {
                let overflow = s.local_wait_s > self.config.latency_budget_s && !hints.private && hints.route.as_deref() != Some(LOCAL);
                // Stable: the configured order within local and within remote.
                out.sort_by_key(|c| if overflow { c.is_local() } else { !c.is_local() });
                for c in out.iter_mut() {
                    c.reason = match (c.is_local(), overflow) {
                        (true, false) => "local-first: the local engine".into(),
                        (true, true) => format!("local-first: local queue wait ~{:.0} s exceeds the {:.0} s budget; local kept as the last resort", s.local_wait_s, self.config.latency_budget_s),
                        (false, false) => "local-first: fallback if the local engine fails".into(),
                        (false, true) => format!("overflow: local queue wait ~{:.0} s exceeds the {:.0} s budget", s.local_wait_s, self.config.latency_budget_s),
                    };
                }
            }
        }
        if hints.private {
            for c in out.iter_mut() {
                c.reason = format!("{} (private: local only)", c.reason);
            }
        }
    }

    fn circuit_open(&self, provider: &str) -> bool {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.entry(provider.to_string()).or_default();
        match h.open_until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                // Half-open: let one request through; a failure re-opens at once.
                h.open_until = None;
                h.consecutive_failures = self.config.breaker_failures.saturating_sub(1);
                false
            }
            None => false,
        }
    }

    /// Records a success and its latency.
    pub fn succeeded(&self, provider: &str, seconds: f64) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.entry(provider.to_string()).or_default();
        h.consecutive_failures = 0;
        h.open_until = None;
        h.latency_ewma_s = Some(match h.latency_ewma_s {
            Some(l) => 0.8 * l + 0.2 * seconds,
            None => seconds,
        });
    }

    /// What the router has seen of each of `providers`.
    pub fn health(&self, providers: &[String]) -> Vec<ProviderHealth> {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        providers
            .iter()
            .map(|p| {
                let h = health.get(p);
                ProviderHealth {
                    provider: p.clone(),
                    circuit_open: h.and_then(|h| h.open_until).is_some_and(|t| Instant::now() < t),
                    consecutive_failures: h.map(|h| h.consecutive_failures).unwrap_or(0),
                    latency_s: h.and_then(|h| h.latency_ewma_s),
                    last_error: h.and_then(|h| h.last_error.clone()),
                }
            })
            .collect()
    }

    /// Records a failure (and why); enough in a row open the provider's circuit for the cooldown.
    pub fn failed(&self, provider: &str, error: &str) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.entry(provider.to_string()).or_default();
        h.last_error = Some(error.to_string());
        h.consecutive_failures += 1;
        if h.consecutive_failures >= self.config.breaker_failures.max(1) {
            h.open_until = Some(Instant::now() + Duration::from_secs_f64(self.config.breaker_cooldown_s.max(0.0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(strategy: Strategy) -> Router {
        let cfg: RoutingConfig = serde_json::from_value(serde_json::json!({
            "aliases": {"flux-dev": ["local:flux-dev", "fal:fal-ai/flux/dev", "replicate:black-forest-labs/flux-dev", "bfl:flux-dev"]},
            "tiers": {"hero": ["bfl:flux-pro-1.1-ultra", "openai:gpt-image-1"], "draft": ["local:easel-shapes"]},
            "strategy": strategy,
            "latency_budget_s": 20,
            "breaker_failures": 2,
            "breaker_cooldown_s": 0.2,
            "daily_budget_usd": 10.0,
            "daily_budget_per_key_usd": {"intern": 1.0}
        }))
        .unwrap();
        Router::new(cfg)
    }

    fn price(p: &str, _m: &str) -> Option<f64> {
        match p {
            "local" => Some(0.002),
            "fal" => Some(0.025),
            "replicate" => Some(0.02),
            "bfl" => Some(0.03),
            _ => None,
        }
    }

    fn situation<'a>(local: &'a [String], wait: f64, enabled: &'a [String], spent: f64) -> Situation<'a> {
        Situation { local_models: local, local_wait_s: wait, enabled, price: &price, spent_today_usd: spent, spent_today_by_key_usd: spent }
    }

    fn names(plan: &[Candidate]) -> Vec<&str> {
        plan.iter().map(|c| c.provider.as_str()).collect()
    }

    fn all() -> Vec<String> {
        ["fal", "replicate", "bfl", "openai"].map(String::from).to_vec()
    }

    #[test]
    fn local_first_overflows_when_the_local_queue_is_long() {
        let r = router(Strategy::LocalFirst);
        let local = vec!["flux-dev".to_string()];
        let (en, h) = (all(), Hints::default());
        assert_eq!(names(&r.plan("flux-dev", &h, &situation(&local, 1.0, &en, 0.0)).unwrap()), ["local", "fal", "replicate", "bfl"]);
        let plan = r.plan("flux-dev", &h, &situation(&local, 60.0, &en, 0.0)).unwrap();
        assert_eq!(names(&plan), ["fal", "replicate", "bfl", "local"]);
        assert!(plan[0].reason.contains("overflow"), "{}", plan[0].reason);
    }

    #[test]
    fn private_requests_never_plan_a_closed_provider() {
        let r = router(Strategy::LocalFirst);
        let local = vec!["flux-dev".to_string()];
        let en = all();
        let private = Hints { private: true, ..Default::default() };
        // Even overflowing, even asking for a provider by route: local only.
        for wait in [0.0, 1e6] {
            assert_eq!(names(&r.plan("flux-dev", &private, &situation(&local, wait, &en, 0.0)).unwrap()), ["local"]);
        }
        let routed = Hints { private: true, route: Some("bfl".into()), ..Default::default() };
        assert!(r.plan("flux-dev", &routed, &situation(&local, 0.0, &en, 0.0)).is_err());
        // No local engine: a clear error, never a closed provider.
        let none: Vec<String> = vec![];
        assert_eq!(r.plan("flux-dev", &private, &situation(&none, 0.0, &en, 0.0)), Err(RouteError::PrivateWithoutLocal("flux-dev".into())));
        assert_eq!(r.plan("x", &Hints { private: true, tier: Some("hero".into()), ..Default::default() }, &situation(&local, 0.0, &en, 0.0)), Err(RouteError::PrivateWithoutLocal("x".into())));
    }

    #[test]
    fn strategies_routes_tiers_and_unknowns() {
        let local = vec!["flux-dev".to_string()];
        let en = all();
        let h = Hints::default();
        assert_eq!(names(&router(Strategy::Cheapest).plan("flux-dev", &h, &situation(&local, 0.0, &en, 0.0)).unwrap()), ["local", "replicate", "fal", "bfl"]);
        let fastest = router(Strategy::Fastest);
        fastest.succeeded("bfl", 2.0);
        fastest.succeeded("fal", 5.0);
        assert_eq!(names(&fastest.plan("flux-dev", &h, &situation(&local, 0.0, &en, 0.0)).unwrap())[..2], ["bfl", "fal"]);
        let r = router(Strategy::Ordered);
        let only_fal = Hints { route: Some("fal".into()), ..Default::default() };
        assert_eq!(names(&r.plan("flux-dev", &only_fal, &situation(&local, 0.0, &en, 0.0)).unwrap()), ["fal"]);
        let only_local = Hints { route: Some("local".into()), ..Default::default() };
        assert_eq!(names(&r.plan("flux-dev", &only_local, &situation(&local, 0.0, &en, 0.0)).unwrap()), ["local"]);
        let hero = Hints { tier: Some("hero".into()), ..Default::default() };
        assert_eq!(names(&r.plan("anything", &hero, &situation(&local, 0.0, &en, 0.0)).unwrap()), ["bfl", "openai"]);
        assert_eq!(r.plan("nope", &h, &situation(&local, 0.0, &en, 0.0)), Err(RouteError::UnknownModel("nope".into())));
        assert!(matches!(r.plan("flux-dev", &Hints { tier: Some("gold".into()), ..Default::default() }, &situation(&local, 0.0, &en, 0.0)), Err(RouteError::UnknownTier(_))));
        assert!(matches!(r.plan("flux-dev", &Hints { route: Some("midjourney".into()), ..Default::default() }, &situation(&local, 0.0, &en, 0.0)), Err(RouteError::UnknownRoute(_))));
    }

    #[test]
    fn disabled_broken_and_over_budget_providers_drop_out() {
        let r = router(Strategy::Ordered);
        let none: Vec<String> = vec![];
        let only_bfl = vec!["bfl".to_string()];
        let h = Hints::default();
        assert_eq!(names(&r.plan("flux-dev", &h, &situation(&none, 0.0, &only_bfl, 0.0)).unwrap()), ["bfl"], "providers without keys are never planned");
        r.failed("bfl", "HTTP 503");
        r.failed("bfl", "HTTP 502: bad gateway");
        let e = r.plan("flux-dev", &h, &situation(&none, 0.0, &only_bfl, 0.0)).unwrap_err();
        assert!(e.to_string().contains("circuit is open"), "{e}");
        let seen = r.health(&only_bfl);
        assert!(seen[0].circuit_open && seen[0].consecutive_failures == 2, "{seen:?}");
        assert_eq!(seen[0].last_error.as_deref(), Some("HTTP 502: bad gateway"));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(names(&r.plan("flux-dev", &h, &situation(&none, 0.0, &only_bfl, 0.0)).unwrap()), ["bfl"], "half-open after the cooldown");
        r.failed("bfl", "timed out");
        assert!(r.plan("flux-dev", &h, &situation(&none, 0.0, &only_bfl, 0.0)).is_err(), "one more failure re-opens it");
        let r = router(Strategy::Ordered);
        let e = r.plan("flux-dev", &h, &situation(&none, 0.0, &only_bfl, 10.0)).unwrap_err();
        assert!(e.to_string().contains("daily budget"), "{e}");
        let intern = Hints { api_key: Some("intern".into()), ..Default::default() };
        assert!(r.plan("flux-dev", &intern, &situation(&none, 0.0, &only_bfl, 1.5)).is_err(), "the intern's own cap");
        let local = vec!["flux-dev".to_string()];
        assert_eq!(names(&r.plan("flux-dev", &intern, &situation(&local, 0.0, &only_bfl, 1.5)).unwrap()), ["local"], "local stays available past the budget");
    }
}
