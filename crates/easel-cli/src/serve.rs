//! `easel serve` (the API with in-process workers) and `easel worker` (workers only), over a
//! shared queue and output store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use easel_engine::LoadOptions;
use easel_queue::{JobQueue, RedisQueue, SqliteQueue};
use easel_server::events::EventBus;
use easel_server::http::ApiKey;
use easel_server::metrics::Metrics;
use easel_server::store::{BucketStore, LocalStore, OutputStore};
use easel_server::worker::Worker;
use easel_server::{AppState, ServerConfig, WorkerConfig};

use easel_local::EngineExecutor;

/// What a process that runs jobs needs: models, queue, store, engine knobs. Shared by
/// `easel serve` (API plus in-process workers) and `easel worker` (workers only).
#[derive(Args, Debug)]
pub struct BackendArgs {
    /// Where the queue database and images live (default: easel's data dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A model to serve, as NAME=DIR_OR_HUB_ID or DIR_OR_HUB_ID; repeatable (default: the bundled
    /// model). An SD single-file checkpoint works too: NAME=fine-tune.safetensors.
    #[arg(long = "model")]
    models: Vec<String>,
    /// For single-file --model checkpoints: the diffusers folder or hub repo whose configs and
    /// tokenizers they run with (`easel generate --config`; default: each file's family's
    /// reference repo). Named apart from --config, the server's own config file.
    #[arg(long, value_name = "REPO_OR_DIR")]
    checkpoint_config: Option<String>,
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
    /// Memory one request may need (weights and activations), in MB; larger requests are
    /// refused with a 400 naming `size` or `n` before they are queued (default: 90% of RAM).
    #[arg(long)]
    request_memory_mb: Option<u64>,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// FLUX: keep the text encoders on the CPU, so a 16 GB GPU holds only the transformer and
    /// VAE (see `easel models memory --vram 16`).
    #[arg(long)]
    offload_text_encoders: bool,
    /// Seconds a worker holds a job before another may take it over.
    #[arg(long, default_value_t = 30)]
    lease: u64,
    /// The job queue: `sqlite://PATH` (default: queue.db in the data dir) or `redis://HOST:PORT/DB`.
    #[arg(long)]
    queue: Option<String>,
    /// Where images go: a folder (default: images/ in the data dir) or `s3://BUCKET/PREFIX`,
    /// `gs://…`, `az://…` (credentials and endpoint from the usual AWS_*/GOOGLE_*/AZURE_* variables).
    #[arg(long)]
    store: Option<String>,
    /// Lifetime of presigned image URLs in seconds (0: serve images through the API instead).
    #[arg(long, default_value_t = 3600)]
    url_lifetime: u64,
    /// What this machine costs per hour (USD), busy or idle, for each image's amortised cost.
    #[arg(long, default_value_t = 0.0)]
    gpu_hourly_usd: f64,
    /// Share of paid hours doing useful work (0-1]; the per-image cost is divided by it.
    #[arg(long, default_value_t = 0.5)]
    utilisation: f64,
    /// Fixed cost added to every local image (storage, egress), USD.
    #[arg(long, default_value_t = 0.0)]
    per_image_overhead_usd: f64,
    /// The LoRA registry: a folder of NAME.safetensors files that requests name in `loras`.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// The ControlNet registry: a folder of ControlNet folders (diffusers layout) that requests
    /// name in `controlnets`.
    #[arg(long)]
    controlnet_dir: Option<PathBuf>,
    /// The IP-Adapter registry: a folder of IP-Adapter .safetensors files (at its top or one
    /// folder down, as h94/IP-Adapter's models/ and sdxl_models/), each with its image encoder in
    /// an image_encoder/ folder beside it; requests name them in `ip_adapter`.
    #[arg(long)]
    ip_adapter_dir: Option<PathBuf>,
    /// Also accept hub ids (owner/name) in `loras`, fetched into the hub cache when first used.
    #[arg(long)]
    lora_hub: bool,
    /// The secret that signs webhooks and image URLs; every node of a deployment needs the same
    /// one (default: EASEL_SIGNING_SECRET or EASEL_WEBHOOK_SECRET, else random per run).
    #[arg(long, alias = "webhook-secret")]
    signing_secret: Option<String>,
    /// Allow webhooks to loopback and private-network addresses.
    #[arg(long)]
    allow_private_webhooks: bool,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    backend: BackendArgs,
    /// In-process workers; 0 makes this an API node that leaves jobs to `easel worker` processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Largest request body, in bytes (32 MiB: room for a base64 input image).
    #[arg(long, default_value_t = 32 << 20)]
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
    /// An admin API key as NAME:SECRET[:REQUESTS_PER_MINUTE]: sees every key's jobs, images and
    /// usage; repeatable.
    #[arg(long = "admin-key")]
    admin_keys: Vec<String>,
    /// /metrics answers only admin keys (when keys are configured).
    #[arg(long)]
    metrics_need_admin: bool,
    /// Queued plus running jobs one API key may have at once.
    #[arg(long, default_value_t = 100)]
    max_jobs_per_key: usize,
    /// Threads that run closed-provider jobs (each waits on one vendor request at a time).
    #[arg(long, default_value_t = 8)]
    provider_workers: usize,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// Worker threads in this process (each runs one batch at a time).
    #[arg(long, default_value_t = 1)]
    workers: usize,
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
    /// Closed providers: [{"name", "kind" (openai, openai-compatible, bfl, fal, replicate,
    /// stability), "base_url"?, "api_key_env"?, "timeout_s"?}]. Keys come from the environment.
    #[serde(default)]
    providers: Vec<easel_server::gateway::ProviderEntry>,
    /// Aliases, tiers, strategy, latency budget, circuit breaker, daily budgets.
    #[serde(default)]
    routing: Option<easel_router::routing::RoutingConfig>,
    /// Price overrides: [{"provider", "model", "unit" (image, megapixel), "usd", "quality"?}].
    #[serde(default)]
    prices: Vec<easel_router::Price>,
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
    /// Sees every key's jobs, images and usage.
    #[serde(default)]
    admin: bool,
}

fn default_rate() -> u32 {
    600
}

fn read_config(path: &std::path::Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| anyhow::anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))
}

/// The gateway from the config file, if it configures providers or routing.
fn gateway_from(cfg: &ConfigFile) -> Result<Option<easel_server::gateway::Gateway>> {
    if cfg.providers.is_empty() && cfg.routing.is_none() {
        return Ok(None);
    }
    let g = easel_server::gateway::Gateway::new(easel_server::gateway::GatewayConfig {
        providers: cfg.providers.clone(),
        routing: cfg.routing.clone().unwrap_or_default(),
        prices: cfg.prices.clone(),
    })?;
    for w in &g.warnings {
        eprintln!("warning: {w}");
    }
    Ok(Some(g))
}

fn keys_from_file(path: &std::path::Path, cfg: ConfigFile) -> Result<Vec<ApiKey>> {
    cfg.api_keys
        .into_iter()
        .map(|k| match (k.sha256, k.secret) {
            (Some(h), None) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {
                Ok(ApiKey { name: k.name, sha256: h.to_ascii_lowercase(), rate_per_minute: k.rate_per_minute, admin: k.admin })
            }
            (None, Some(secret)) if !secret.is_empty() => Ok(ApiKey { admin: k.admin, ..ApiKey::from_secret(&k.name, &secret, k.rate_per_minute) }),
            _ => bail!("{}: API key `{}` needs exactly one of `sha256` (64 hex digits) or `secret`", path.display(), k.name),
        })
        .collect()
}

/// The services a job-running process builds from its [`BackendArgs`].
fn services(args: &BackendArgs) -> Result<easel_server::Services> {
    // Flags first: a typo must not wait for the models to load.
    let local_cost = local_cost(args)?;
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
            None => (m.trim_end_matches('/').rsplit('/').next().map(|n| n.trim_end_matches(".safetensors")).unwrap_or(m).to_string(), m.clone()),
        };
        let is_single_file = spec.ends_with(".safetensors");
        let dir = crate::hub::model_dir(&spec, dtype != easel_engine::DType::F32, args.checkpoint_config.as_deref().filter(|_| is_single_file))?;
        models.push((name, dir));
    }
    if let Some(dir) = args.lora_dir.as_ref().filter(|d| !d.is_dir()) {
        bail!("--lora-dir {} is not a folder", dir.display());
    }
    if let Some(dir) = args.controlnet_dir.as_ref().filter(|d| !d.is_dir()) {
        bail!("--controlnet-dir {} is not a folder", dir.display());
    }
    let loras = easel_api::LoraRegistry::new(args.lora_dir.clone()).with_hub(args.lora_hub);
    if let Some(dir) = args.ip_adapter_dir.as_ref().filter(|d| !d.is_dir()) {
        bail!("--ip-adapter-dir {} is not a folder", dir.display());
    }
    let controlnets = easel_api::ControlNetRegistry::new(args.controlnet_dir.clone());
    let ip_adapters = easel_api::IpAdapterRegistry::new(args.ip_adapter_dir.clone());
    let executor = Arc::new(EngineExecutor::new(
        models,
        LoadOptions { device, dtype, offload_text_encoders: args.offload_text_encoders, ..Default::default() },
        Duration::from_secs(args.idle_timeout),
        args.memory_budget_mb.saturating_mul(1 << 20),
        args.request_memory_mb.map(|mb| mb.saturating_mul(1 << 20)).unwrap_or_else(easel_local::default_request_memory),
        loras.clone(),
    )?
    .with_controlnets(controlnets.clone())
    .with_ip_adapters(ip_adapters.clone()));
    let (queue, bus): (Arc<dyn JobQueue>, EventBus) = match args.queue.as_deref() {
        Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let redis = Arc::new(RedisQueue::open(url, args.queue_cap, args.max_attempts)?);
            (redis.clone(), EventBus::relayed(redis))
        }
        Some(url) => {
            let path = url.strip_prefix("sqlite://").with_context(|| format!("--queue `{url}`: use sqlite://PATH or redis://HOST:PORT/DB"))?;
            (Arc::new(SqliteQueue::open(std::path::Path::new(path), args.queue_cap, args.max_attempts)?), EventBus::default())
        }
        None => (Arc::new(SqliteQueue::open(&data_dir.join("queue.db"), args.queue_cap, args.max_attempts)?), EventBus::default()),
    };
    let store: Arc<dyn OutputStore> = match args.store.as_deref() {
        Some(url) if url.contains("://") => Arc::new(BucketStore::open(url, Duration::from_secs(args.url_lifetime))?),
        Some(dir) => Arc::new(LocalStore::new(std::path::Path::new(dir)).with_context(|| format!("creating {dir}"))?),
        None => Arc::new(LocalStore::new(&data_dir.join("images")).with_context(|| format!("creating {}", data_dir.join("images").display()))?),
    };
    Ok(easel_server::Services {
        queue,
        executor,
        store,
        bus,
        metrics: Arc::new(Metrics::default()),
        doorbell: Default::default(),
        ledger: Some(Arc::new(easel_router::Ledger::open(&data_dir.join("ledger.db")).context("opening the cost ledger")?)),
        local_cost,
        loras,
        controlnets,
        ip_adapters,
        image_urls: easel_server::image_urls::ImageUrls::new(&signing_secret(args), Duration::from_secs(if args.url_lifetime == 0 { 3600 } else { args.url_lifetime })),
        webhook_signing: easel_server::webhooks::WebhookSigning::new(&signing_secret(args)),
    })
}

/// The deployment's signing secret (webhooks, image URLs).
fn signing_secret(args: &BackendArgs) -> String {
    let from_env = || std::env::var("EASEL_SIGNING_SECRET").or_else(|_| std::env::var("EASEL_WEBHOOK_SECRET")).ok().filter(|s| !s.is_empty());
    static RANDOM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    args.signing_secret.clone().or_else(from_env).unwrap_or_else(|| {
        RANDOM
            .get_or_init(|| {
                eprintln!("warning: no --signing-secret or EASEL_SIGNING_SECRET; webhooks and image URLs are signed with a random per-run key (URLs stop working at restart and on other nodes)");
                uuid_like()
            })
            .clone()
    })
}

/// Webhook delivery for a process that runs jobs or serves the API: both deliver from the outbox.
fn webhook_config(args: &BackendArgs, services: &easel_server::Services) -> (Arc<dyn JobQueue>, easel_server::image_urls::ImageUrls, easel_server::webhooks::WebhookConfig) {
    let config = easel_server::webhooks::WebhookConfig {
        signing: services.webhook_signing.clone(),
        allow_private: args.allow_private_webhooks,
        // 0.5 s doubling to 15 min between tries: about 4 hours before a delivery is given up.
        max_attempts: 25,
        first_backoff: Duration::from_millis(500),
    };
    (services.queue.clone(), services.image_urls.clone(), config)
}

fn local_cost(args: &BackendArgs) -> Result<easel_router::LocalCost> {
    let finite = |name: &str, v: f64| if v.is_finite() && v >= 0.0 { Ok(v) } else { bail!("--{name} must be a finite number >= 0, got {v}") };
    if !(args.utilisation > 0.0 && args.utilisation <= 1.0) {
        bail!("--utilisation must be in (0, 1], got {}", args.utilisation);
    }
    Ok(easel_router::LocalCost {
        hourly_usd: finite("gpu-hourly-usd", args.gpu_hourly_usd)?,
        utilisation: args.utilisation,
        per_image_overhead_usd: finite("per-image-overhead-usd", args.per_image_overhead_usd)?,
    })
}

/// Starts `n` worker threads; each has advertised its models before this returns.
fn start_workers(services: &easel_server::Services, args: &BackendArgs, n: usize, stop: &Arc<AtomicBool>) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = vec![];
    for i in 0..n {
        let worker = Worker {
            services: services.clone(),
            config: WorkerConfig {
                name: format!("{}-{}-{i}", hostname(), std::process::id()),
                max_batch: args.max_batch.max(1),
                lease: Duration::from_secs(args.lease.max(1)),
                ..Default::default()
            },
        };
        // Advertise before accepting requests, so the first request finds its model served.
        worker.advertise(&services.executor.models(), easel_server::worker::ADVERTISE_TTL);
        let stop = stop.clone();
        threads.push(std::thread::Builder::new().name(format!("easel-worker-{i}")).spawn(move || worker.run(&stop))?);
    }
    Ok(threads)
}

/// Starts `n` worker threads that run queued closed-provider jobs (`@provider`) on this node's
/// gateway: the same loop, leases, storing and ledger as local jobs.
fn start_provider_workers(
    services: &easel_server::Services,
    gateway: &Arc<easel_server::gateway::Gateway>,
    runtime: &tokio::runtime::Handle,
    n: usize,
    lease: u64,
    stop: &Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let executor = Arc::new(easel_server::provider_executor::ProviderExecutor::new(gateway.clone(), services.ledger.clone(), runtime.clone()));
    let mut threads = vec![];
    for i in 0..n {
        let worker = Worker {
            services: easel_server::Services { executor: executor.clone(), ..services.clone() },
            config: WorkerConfig { name: format!("{}-{}-providers-{i}", hostname(), std::process::id()), max_batch: 1, lease: Duration::from_secs(lease.max(1)), ..Default::default() },
        };
        let stop = stop.clone();
        threads.push(std::thread::Builder::new().name(format!("easel-providers-{i}")).spawn(move || worker.run(&stop))?);
    }
    Ok(threads)
}

fn hostname() -> String {
    std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "easel".into())
}

/// `easel worker`: runs jobs from the shared queue until interrupted.
pub fn run_worker(args: WorkerArgs) -> Result<()> {
    let services = services(&args.backend)?;
    let stop = Arc::new(AtomicBool::new(false));
    let threads = start_workers(&services, &args.backend, args.workers.max(1), &stop)?;
    println!("easel worker running {} worker(s) for {}", threads.len(), services.executor.models().iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", "));
    let (queue, urls, webhooks) = webhook_config(&args.backend, &services);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        tokio::spawn(easel_server::webhooks::deliver(queue, urls, webhooks));
        let _ = tokio::signal::ctrl_c().await;
    });
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    let mut keys: Vec<ApiKey> = args.api_keys.iter().map(|k| parse_key(k)).collect::<Result<_>>()?;
    for k in &args.admin_keys {
        keys.push(ApiKey { admin: true, ..parse_key(k)? });
    }
    let mut gateway = None;
    if let Some(path) = &args.config {
        let cfg = read_config(path)?;
        gateway = gateway_from(&cfg)?;
        keys.extend(keys_from_file(path, cfg)?);
    }
    if let Ok(env) = std::env::var("EASEL_API_KEYS") {
        for k in env.split(',').filter(|s| !s.trim().is_empty()) {
            keys.push(parse_key(k.trim())?);
        }
    }
    if keys.is_empty() && !args.listen.ip().is_loopback() && !args.allow_unauthenticated {
        bail!("refusing to listen on {} without API keys; add --api-key NAME:SECRET or --allow-unauthenticated", args.listen);
    }
    let services = services(&args.backend)?;
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        api_keys: (!keys.is_empty()).then_some(keys),
        allow_private_webhooks: args.backend.allow_private_webhooks,
        max_jobs_per_key: args.max_jobs_per_key.max(1),
        metrics_need_admin: args.metrics_need_admin,
        ..Default::default()
    };
    let webhook_task = webhook_config(&args.backend, &services);

    let stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Runtime::new()?;
    let mut worker_threads = start_workers(&services, &args.backend, args.workers, &stop)?;
    let mut state = AppState::new(services.clone(), config);
    if let Some(g) = gateway {
        let g = Arc::new(g);
        worker_threads.extend(start_provider_workers(&services, &g, rt.handle(), args.provider_workers, args.backend.lease, &stop)?);
        state = state.with_gateway(g);
    }
    let app = easel_server::router(state);
    rt.block_on(async move {
        tokio::spawn(easel_server::webhooks::deliver(webhook_task.0, webhook_task.1, webhook_task.2));
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
    for t in worker_threads {
        let _ = t.join();
    }
    Ok(())
}

fn uuid_like() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}
