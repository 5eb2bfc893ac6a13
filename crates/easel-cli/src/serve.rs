//! `easel serve`: the API server with an in-process worker over the embedded queue.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use easel_engine::LoadOptions;
use easel_queue::SqliteQueue;
use easel_server::events::EventBus;
use easel_server::http::ApiKey;
use easel_server::metrics::Metrics;
use easel_server::store::LocalStore;
use easel_server::worker::Worker;
use easel_server::{AppState, ServerConfig, WorkerConfig};

use crate::executor::EngineExecutor;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Where the queue database and images live (default: easel's data dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A model to serve, as NAME=DIR_OR_HUB_ID or DIR_OR_HUB_ID; repeatable (default: the bundled model).
    #[arg(long = "model")]
    models: Vec<String>,
    /// Compatible queued jobs run together, up to this many.
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
    /// Queued jobs beyond this are refused with 429.
    #[arg(long, default_value_t = 1000)]
    queue_cap: usize,
    /// A job that keeps failing ends as failed after this many attempts.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Seconds a loaded model stays warm without use.
    #[arg(long, default_value_t = 120)]
    idle_timeout: u64,
    /// Memory for loaded model weights, in MB; least recently used models are evicted first.
    #[arg(long, default_value_t = 16384)]
    memory_budget_mb: u64,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// A JSON config file: {"api_keys": [{"name", "sha256" (hex of the secret) or "secret", "rate_per_minute"}]}.
    #[arg(long)]
    config: Option<PathBuf>,
    /// API key as NAME:SECRET[:REQUESTS_PER_MINUTE]; repeatable. Also EASEL_API_KEYS (comma-separated).
    #[arg(long = "api-key")]
    api_keys: Vec<String>,
    /// Listen on a non-loopback address without API keys.
    #[arg(long)]
    allow_unauthenticated: bool,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// HMAC-SHA256 key for webhook signatures (default: EASEL_WEBHOOK_SECRET, else random per run).
    #[arg(long)]
    webhook_secret: Option<String>,
    /// Allow webhooks to loopback and private-network addresses.
    #[arg(long)]
    allow_private_webhooks: bool,
    /// Queued plus running jobs one API key may have at once.
    #[arg(long, default_value_t = 100)]
    max_jobs_per_key: usize,
    /// Seconds a worker holds a job before another may take it over.
    #[arg(long, default_value_t = 30)]
    lease: u64,
}

fn parse_key(spec: &str) -> Result<ApiKey> {
    let parts: Vec<&str> = spec.split(':').collect();
    match parts.as_slice() {
        [name, secret] if !name.is_empty() && !secret.is_empty() => Ok(ApiKey::from_secret(name, secret, 600)),
        [name, secret, rate] if !name.is_empty() && !secret.is_empty() => {
            Ok(ApiKey::from_secret(name, secret, rate.parse().with_context(|| format!("API key `{name}`: rate `{rate}` is not a number"))?))
        }
        _ => bail!("API keys are NAME:SECRET[:REQUESTS_PER_MINUTE]"),
    }
}

/// `--config` file contents.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    api_keys: Vec<KeyEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    /// Hex SHA-256 of the secret, so the file need not hold the secret itself.
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default = "default_rate")]
    rate_per_minute: u32,
}

fn default_rate() -> u32 {
    600
}

fn keys_from_file(path: &std::path::Path) -> Result<Vec<ApiKey>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg: ConfigFile = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    cfg.api_keys
        .into_iter()
        .map(|k| match (k.sha256, k.secret) {
            (Some(h), None) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                Ok(ApiKey { name: k.name, sha256: h.to_ascii_lowercase(), rate_per_minute: k.rate_per_minute })
            }
            (None, Some(secret)) if !secret.is_empty() => Ok(ApiKey::from_secret(&k.name, &secret, k.rate_per_minute)),
            _ => bail!("{}: API key `{}` needs exactly one of `sha256` (64 hex digits) or `secret`", path.display(), k.name),
        })
        .collect()
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut keys: Vec<ApiKey> = args.api_keys.iter().map(|k| parse_key(k)).collect::<Result<_>>()?;
    if let Some(path) = &args.config {
        keys.extend(keys_from_file(path)?);
    }
    if let Ok(env) = std::env::var("EASEL_API_KEYS") {
        for k in env.split(',').filter(|s| !s.trim().is_empty()) {
            keys.push(parse_key(k.trim())?);
        }
    }
    if keys.is_empty() && !args.listen.ip().is_loopback() && !args.allow_unauthenticated {
        bail!("refusing to listen on {} without API keys; add --api-key NAME:SECRET or --allow-unauthenticated", args.listen);
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(crate::bundled::data_dir);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;

    let dtype = easel_engine::parse_dtype(&args.dtype)?;
    let device = easel_engine::parse_device(&args.device)?;
    let mut models = vec![];
    if args.models.is_empty() {
        models.push((crate::bundled::NAME.to_string(), crate::bundled::model_dir()?));
    }
    for m in &args.models {
        let (name, spec) = match m.split_once('=') {
            Some((n, s)) => (n.to_string(), s.to_string()),
            None => (m.trim_end_matches('/').rsplit('/').next().unwrap_or(m).to_string(), m.clone()),
        };
        let dir = easel_engine::source::resolve_model(&spec, dtype != easel_engine::DType::F32, ())?;
        models.push((name, dir));
    }
    let executor = Arc::new(EngineExecutor::new(
        models,
        LoadOptions { device, dtype },
        Duration::from_secs(args.idle_timeout),
        args.memory_budget_mb.saturating_mul(1 << 20),
    )?);
    let queue = Arc::new(SqliteQueue::open(&data_dir.join("queue.db"), args.queue_cap, args.max_attempts)?);
    let store = LocalStore::new(&data_dir.join("images"))?;
    let bus = EventBus::default();
    let metrics = Arc::new(Metrics::default());
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        api_keys: (!keys.is_empty()).then_some(keys),
        allow_private_webhooks: args.allow_private_webhooks,
        max_jobs_per_key: args.max_jobs_per_key.max(1),
        ..Default::default()
    };
    let webhook_secret = args.webhook_secret.clone().or_else(|| std::env::var("EASEL_WEBHOOK_SECRET").ok()).unwrap_or_else(|| {
        eprintln!("warning: no --webhook-secret or EASEL_WEBHOOK_SECRET; webhooks are signed with a random per-run key");
        uuid_like()
    });
    let webhooks = easel_server::webhooks::WebhookConfig {
        secret: webhook_secret,
        allow_private: args.allow_private_webhooks,
        max_attempts: 5,
        first_backoff: Duration::from_millis(500),
    };

    let stop = Arc::new(AtomicBool::new(false));
    let services = easel_server::Services { queue: queue.clone(), executor, store, bus: bus.clone(), metrics, doorbell: Default::default() };
    let worker = Worker {
        services: services.clone(),
        config: WorkerConfig { max_batch: args.max_batch.max(1), lease: Duration::from_secs(args.lease.max(1)), ..Default::default() },
    };
    let worker_stop = stop.clone();
    let worker_thread = std::thread::Builder::new().name("easel-worker".into()).spawn(move || worker.run(&worker_stop))?;

    let webhook_task = (bus.clone(), queue.clone());
    let state = AppState::new(services, config);
    let app = easel_server::router(state);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        tokio::spawn(easel_server::webhooks::deliver(webhook_task.0, webhook_task.1, webhooks));
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("easel listening on http://{addr}");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })?;
    stop.store(true, Ordering::Relaxed);
    let _ = worker_thread.join();
    Ok(())
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}
