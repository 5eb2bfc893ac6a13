//! The scale-out queue: Redis, shared by API nodes and workers on many machines.
//!
//! Every state change is one Lua script, so it is atomic across all clients. Layout under a
//! key prefix (default `easel`):
//! - `job:{id}`: a hash of the job's fields (spec and result as opaque JSON strings);
//! - `queued`: a sorted set of waiting job ids, scored by (-priority, arrival sequence), so
//!   priorities, FIFO, positions (ZRANK) and the cap (ZCARD) are exact;
//! - `running`: a sorted set of claimed job ids scored by lease expiry; expired ones are
//!   reclaimed by any worker (at-least-once), and `complete` records a result only while the
//!   job is still running under a lease (exactly once);
//! - `idem:{key}` (job id and request fingerprint), `cache:{key}`, `active:{api key}`:
//!   idempotency, result cache, per-key jobs;
//! - `outbox`: a sorted set of job ids whose final state awaits its webhook, scored by when the
//!   delivery is next due; the script that ends a job adds it, and deliverers claim it with a
//!   lease (the score moves to the lease's end) like jobs;
//! - `workers` / `workers:expiry`: which models live workers advertise;
//! - the `wake` stream with the consumer group `workers`: every enqueue appends the job id,
//!   and each entry is delivered to one idle worker (XREADGROUP), which wakes at once and
//!   claims from `queued`. The group hands out work signals; the sorted set decides what runs,
//!   because a consumer group delivers in arrival order and cannot skip to a higher priority,
//!   a compatible batch or a warm model's job;
//! - `history` and `history:{api key}`: every job, and each key's, scored by arrival, for
//!   paged listings;
//! - the `events` stream: job events from every node (XADD, capped), read by every API node.
//!
//! Times come from the Redis server's clock (TIME), so leases hold across machines whose
//! clocks disagree.

use std::sync::Mutex;
use std::time::Duration;

use easel_api::{Event, Job, JobResult, JobSpec, JobStatus, ModelInfo};
use redis::{Commands, Script};

use crate::{Delivery, Enqueued, Idempotency, IdempotentJob, JobQueue, Lease, QueueError, Result, MAX_CRASHES, WORKER_CRASHED};

impl From<redis::RedisError> for QueueError {
    fn from(e: redis::RedisError) -> Self {
        Self::Storage(format!("redis: {e}"))
    }
}

/// Redis-backed [`JobQueue`].
pub struct RedisQueue {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    /// One blocking connection per waiting worker (XREADGROUP BLOCK must not hold `conn`).
    waiters: Mutex<std::collections::HashMap<String, redis::Connection>>,
    prefix: String,
    max_queued: usize,
    max_attempts: u32,
}

/// Score of a queued job: higher priority first, then arrival order.
const SCORE: &str = "local function score(priority, seq) return -tonumber(priority) * 1e12 + tonumber(seq) end
local function now() local t = redis.call('TIME') return tonumber(t[1]) + tonumber(t[2]) / 1e6 end
local P = ARGV[1]
";

const ENQUEUE: &str = "
local id, spec, priority, model, batch_key, cache_key, idem, api_key, max, fingerprint, webhook =
  ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12]
if idem ~= '' then
  local existing = redis.call('HMGET', P .. 'idem:' .. idem, 'id', 'fingerprint')
  if existing[1] then
    if existing[2] ~= fingerprint then return {existing[1], 3} end
    return {existing[1], 1}
  end
end
local queued = redis.call('ZCARD', P .. 'queued')
if queued >= max then return {'', 2, queued} end
local seq = redis.call('INCR', P .. 'seq')
redis.call('HSET', P .. 'job:' .. id, 'id', id, 'status', 'queued', 'priority', priority, 'model', model, 'batch_key', batch_key,
  'spec', spec, 'attempts', 0, 'crashes', 0, 'created_at', tostring(now()), 'seq', seq, 'cancel', 0, 'cache_key', cache_key, 'api_key', api_key,
  'webhook', webhook)
redis.call('ZADD', P .. 'queued', score(priority, seq), id)
if api_key ~= '' then redis.call('SADD', P .. 'active:' .. api_key, id) end
redis.call('ZADD', P .. 'history', seq, id)
redis.call('ZADD', P .. 'history:' .. api_key, seq, id)
if idem ~= '' then redis.call('HSET', P .. 'idem:' .. idem, 'id', id, 'fingerprint', fingerprint) end
redis.call('XADD', P .. 'wake', 'MAXLEN', '~', 1000, '*', 'job', id)
return {id, 0}
";

const CLAIM: &str = "
local worker, models, prefer, max_batch, lease, window = ARGV[2], cjson.decode(ARGV[3]), cjson.decode(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local serves, warm = {}, {}
for _, m in ipairs(models) do serves[m] = true end
for _, m in ipairs(prefer) do warm[m] = true end
local t = now()
local ids = redis.call('ZRANGE', P .. 'queued', 0, 999)
local head, head_priority, chosen = nil, nil, nil
for _, id in ipairs(ids) do
  local f = redis.call('HMGET', P .. 'job:' .. id, 'model', 'priority', 'created_at')
  if serves[f[1]] then
    if head == nil then head, head_priority = id, f[2] end
    if f[2] ~= head_priority then break end
    if warm[f[1]] or tonumber(f[3]) < t - window then chosen = id break end
  end
end
chosen = chosen or head
if chosen == nil then return {} end
local batch_key = redis.call('HGET', P .. 'job:' .. chosen, 'batch_key')
local out = {chosen}
if max_batch > 1 then
  for _, id in ipairs(ids) do
    if #out >= max_batch then break end
    if id ~= chosen and redis.call('HGET', P .. 'job:' .. id, 'batch_key') == batch_key then table.insert(out, id) end
  end
end
for _, id in ipairs(out) do
  redis.call('ZREM', P .. 'queued', id)
  redis.call('ZADD', P .. 'running', t + lease, id)
  redis.call('HINCRBY', P .. 'job:' .. id, 'attempts', 1)
  redis.call('HSET', P .. 'job:' .. id, 'status', 'running', 'worker', worker, 'started_at', tostring(t), 'lease_until', tostring(t + lease))
end
return out
";

const HEARTBEAT: &str = "
local lease = tonumber(ARGV[2])
local t = now()
local lost = {}
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  if held(id, ARGV[i + 1]) then
    redis.call('HSET', P .. 'job:' .. id, 'lease_until', tostring(t + lease))
    redis.call('ZADD', P .. 'running', t + lease, id)
  else
    table.insert(lost, id)
  end
end
return lost
";

/// Ends a job: final status, bookkeeping. Shared by the scripts that finish jobs.
const FINISH: &str = "
local function held(id, attempt)
  local f = redis.call('HMGET', P .. 'job:' .. id, 'status', 'attempts')
  return f[1] == 'running' and f[2] == attempt
end
local function finish(id, status, field, value)
  local key = P .. 'job:' .. id
  redis.call('HSET', key, 'status', status, 'finished_at', tostring(now()))
  if field then redis.call('HSET', key, field, value) end
  redis.call('ZREM', P .. 'running', id)
  redis.call('ZREM', P .. 'queued', id)
  local api_key = redis.call('HGET', key, 'api_key')
  if api_key and api_key ~= '' then redis.call('SREM', P .. 'active:' .. api_key, id) end
  local webhook = redis.call('HGET', key, 'webhook')
  if webhook and webhook ~= '' then redis.call('ZADD', P .. 'outbox', 'NX', now(), id) end
end
local function requeue(id, field, value)
  local key = P .. 'job:' .. id
  local f = redis.call('HMGET', key, 'priority', 'seq')
  redis.call('HSET', key, 'status', 'queued', 'worker', '', 'lease_until', '')
  if field then redis.call('HSET', key, field, value) end
  redis.call('ZREM', P .. 'running', id)
  redis.call('ZADD', P .. 'queued', score(f[1], f[2]), id)
end
";

const COMPLETE: &str = "
local id, attempt, result = ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'job:' .. id
if not held(id, attempt) then return 0 end
finish(id, 'succeeded', 'result', result)
local ck = redis.call('HGET', key, 'cache_key')
if ck and ck ~= '' then redis.call('SETNX', P .. 'cache:' .. ck, id) end
return 1
";

const FAIL: &str = "
local id, attempt, reason, retryable, max_attempts = ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1', tonumber(ARGV[6])
local key = P .. 'job:' .. id
if not held(id, attempt) then return redis.call('HGET', key, 'status') or 'failed' end
if retryable and tonumber(redis.call('HGET', key, 'attempts')) < max_attempts then
  requeue(id, 'error', reason)
  return 'queued'
end
finish(id, 'failed', 'error', reason)
return 'failed'
";

const CANCEL: &str = "
local id = ARGV[2]
local key = P .. 'job:' .. id
local status = redis.call('HGET', key, 'status')
if not status then return false end
if status == 'queued' then finish(id, 'canceled') return 'canceled' end
if status == 'running' then redis.call('HSET', key, 'cancel', 1) end
return status
";

const MARK_CANCELED: &str = "
local id = ARGV[2]
if held(id, ARGV[3]) then finish(id, 'canceled') end
return 1
";

const RECOVER: &str = "
local max_crashes, reason = tonumber(ARGV[2]), ARGV[3]
local expired = redis.call('ZRANGEBYSCORE', P .. 'running', '-inf', now())
local requeued = 0
for _, id in ipairs(expired) do
  local crashes = redis.call('HINCRBY', P .. 'job:' .. id, 'crashes', 1)
  if crashes >= max_crashes then
    finish(id, 'failed', 'error', reason)
  else
    requeue(id)
    requeued = requeued + 1
  end
end
return requeued
";

const CLAIM_DELIVERIES: &str = "
local max, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local t = now()
local ids = redis.call('ZRANGEBYSCORE', P .. 'outbox', '-inf', t, 'LIMIT', 0, max)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZADD', P .. 'outbox', t + lease, id)
  local attempt = redis.call('HINCRBY', P .. 'job:' .. id, 'webhook_attempts', 1)
  table.insert(out, {id, redis.call('HGET', P .. 'job:' .. id, 'webhook') or '', attempt})
end
return out
";

const REROUTE: &str = "
local id, attempt, spec, model, batch_key = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not held(id, attempt) then return 0 end
redis.call('HSET', P .. 'job:' .. id, 'spec', spec, 'model', model, 'batch_key', batch_key)
requeue(id)
return 1
";

const ADVERTISE: &str = "
local worker, models, warm, ttl = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local t = now()
redis.call('HSET', P .. 'workers', worker, models)
redis.call('HSET', P .. 'workers:warm', worker, warm)
redis.call('ZADD', P .. 'workers:expiry', t + ttl, worker)
local gone = redis.call('ZRANGEBYSCORE', P .. 'workers:expiry', '-inf', '(' .. t)
for _, w in ipairs(gone) do
  redis.call('HDEL', P .. 'workers', w)
  redis.call('HDEL', P .. 'workers:warm', w)
  redis.call('ZREM', P .. 'workers:expiry', w)
end
return 1
";

const LIVE: &str = "
local live = redis.call('ZRANGEBYSCORE', P .. 'workers:expiry', now(), '+inf')
local out = {}
for _, w in ipairs(live) do
  local m = redis.call('HGET', P .. 'workers', w)
  if m then table.insert(out, m) end
end
return out
";

/// Events kept in the shared stream for late readers.
const EVENTS_KEPT: usize = 10_000;

fn script(body: &str) -> Script {
    Script::new(&format!("{SCORE}{FINISH}{body}"))
}

/// A Redis URL fit for logs: any password replaced by `***`.
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map(|(u, _)| format!("{u}:***")).unwrap_or_else(|| "***".into());
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

/// The job whose final state a delivery carries (see [`Delivery::id_for`]).
fn job_of_delivery(delivery_id: &str) -> String {
    format!("job_{}", delivery_id.strip_prefix("dlv_").unwrap_or(delivery_id))
}

fn opt(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

fn num(s: Option<String>) -> Option<f64> {
    opt(s).and_then(|v| v.parse().ok())
}

impl RedisQueue {
    /// Connects to `url` (`redis://HOST:PORT/DB`), checking the server answers.
    pub fn open(url: &str, max_queued: usize, max_attempts: u32) -> Result<Self> {
        let shown = redacted(url);
        let client = redis::Client::open(url).map_err(|e| QueueError::Storage(format!("redis URL `{shown}`: {e}")))?;
        let q = Self { client, conn: Mutex::new(None), waiters: Default::default(), prefix: "easel:".into(), max_queued, max_attempts };
        q.with(|c| redis::cmd("PING").query::<String>(c)).map_err(|e| QueueError::Storage(format!("cannot reach Redis at {shown}: {e}")))?;
        Ok(q)
    }

    /// Uses `prefix` (plus ':') for every key, so several deployments can share a database.
    pub fn with_prefix(mut self, prefix: &str) -> Self {
        self.prefix = format!("{prefix}:");
        self
    }

    /// Runs `f` on the connection, reconnecting first if the last call failed, so the queue
    /// recovers by itself when Redis comes back.
    fn with<T>(&self, f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            let c = self.client.get_connection_with_timeout(Duration::from_secs(2))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.set_write_timeout(Some(Duration::from_secs(10)))?;
            *guard = Some(c);
        }
        let conn = guard.as_mut().ok_or_else(|| QueueError::Storage("redis: no connection".into()))?;
        match f(conn) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_connection_dropped() || e.is_io_error() || e.is_timeout() || e.is_connection_refusal() {
                    *guard = None;
                }
                Err(e.into())
            }
        }
    }

    fn run<T: redis::FromRedisValue>(&self, body: &str, args: &[String]) -> Result<T> {
        let script = script(body);
        self.with(|c| {
            let mut inv = script.prepare_invoke();
            inv.arg(&self.prefix);
            for a in args {
                inv.arg(a);
            }
            inv.invoke(c)
        })
    }

    fn job_key(&self, id: &str) -> String {
        format!("{}job:{id}", self.prefix)
    }

    fn parse_job(&self, fields: std::collections::HashMap<String, String>) -> Result<Option<Job>> {
        let mut f = fields;
        let Some(id) = f.remove("id") else { return Ok(None) };
        let bad = |what: &str, e: serde_json::Error| QueueError::Storage(format!("job {id}: bad {what}: {e}"));
        let spec: JobSpec = serde_json::from_str(f.get("spec").map(String::as_str).unwrap_or("")).map_err(|e| bad("spec", e))?;
        let result: Option<JobResult> = opt(f.remove("result")).map(|r| serde_json::from_str(&r)).transpose().map_err(|e| bad("result", e))?;
        Ok(Some(Job {
            status: f.get("status").and_then(|s| JobStatus::parse(s)).unwrap_or(JobStatus::Failed),
            spec,
            result,
            error: opt(f.remove("error")),
            attempts: f.get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
            created_at: num(f.remove("created_at")).unwrap_or(0.0),
            started_at: num(f.remove("started_at")),
            finished_at: num(f.remove("finished_at")),
            cache_key: opt(f.remove("cache_key")),
            cache_hit: false,
            id,
        }))
    }

    /// Appends an event to the shared stream every API node reads.
    pub fn publish_event(&self, origin: &str, event: &Event) -> Result<()> {
        let body = serde_json::to_string(event).map_err(|e| QueueError::Storage(e.to_string()))?;
        let key = format!("{}events", self.prefix);
        self.with(|c| {
            redis::cmd("XADD").arg(&key).arg("MAXLEN").arg("~").arg(EVENTS_KEPT).arg("*").arg("origin").arg(origin).arg("event").arg(&body).query::<String>(c)
        })?;
        Ok(())
    }

    /// Blocks reading the events published after this call, handing each to `sink` with its
    /// origin, and `None` about once a second while quiet, until `sink` returns false.
    /// Reconnects by itself after errors.
    pub fn follow_events(&self, sink: &mut dyn FnMut(Option<(&str, Event)>) -> bool) {
        let key = format!("{}events", self.prefix);
        let mut last = "$".to_string();
        let mut conn: Option<redis::Connection> = None;
        loop {
            if conn.is_none() {
                match self.client.get_connection_with_timeout(Duration::from_secs(2)) {
                    Ok(c) => conn = Some(c),
                    Err(_) => {
                        if !sink(None) {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> =
                redis::cmd("XREAD").arg("BLOCK").arg(1000).arg("COUNT").arg(256).arg("STREAMS").arg(&key).arg(&last).query(c);
            match reply {
                Ok(r) => {
                    for stream in r.map(|r| r.keys).unwrap_or_default() {
                        for entry in stream.ids {
                            last = entry.id.clone();
                            let origin: String = entry.get("origin").unwrap_or_default();
                            let body: String = entry.get("event").unwrap_or_default();
                            if let Ok(e) = serde_json::from_str::<Event>(&body) {
                                if !sink(Some((&origin, e))) {
                                    return;
                                }
                            }
                        }
                    }
                }
                Err(_) => {
                    conn = None;
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            if !sink(None) {
                return;
            }
        }
    }

    /// Deletes every key under this queue's prefix (for tests).
    pub fn purge(&self) -> Result<()> {
        let pattern = format!("{}*", self.prefix);
        let keys: Vec<String> = self.with(|c| c.keys(&pattern))?;
        if !keys.is_empty() {
            self.with(|c| c.del::<_, ()>(&keys))?;
        }
        Ok(())
    }
}

impl JobQueue for RedisQueue {
    fn enqueue(&self, spec: &JobSpec, cache_key: Option<&str>, idempotency: Option<Idempotency<'_>>) -> Result<Enqueued> {
        let id = format!("job_{}", uuid::Uuid::new_v4().simple());
        let spec_json = serde_json::to_string(spec).map_err(|e| QueueError::Storage(e.to_string()))?;
        let reply: Vec<redis::Value> = self.run(
            ENQUEUE,
            &[
                id.clone(),
                spec_json,
                spec.priority.to_string(),
                spec.queue_model(),
                spec.batch_key(),
                cache_key.unwrap_or("").to_string(),
                idempotency.map(|i| i.key).unwrap_or("").to_string(),
                spec.user.clone().unwrap_or_default(),
                self.max_queued.to_string(),
                idempotency.map(|i| i.fingerprint).unwrap_or("").to_string(),
                spec.webhook_url.clone().unwrap_or_default(),
            ],
        )?;
        let field = |i: usize| reply.get(i).and_then(|v| redis::from_redis_value::<String>(v).ok()).unwrap_or_default();
        match field(1).as_str() {
            "2" => Err(QueueError::Full(field(2).parse().unwrap_or(self.max_queued))),
            "3" => Err(QueueError::IdempotencyKeyReused { job_id: field(0) }),
            flag => {
                let job = self.get(&field(0))?.ok_or_else(|| QueueError::Storage("enqueued job vanished".into()))?;
                Ok(Enqueued { job, existing: flag == "1" })
            }
        }
    }

    fn get(&self, id: &str) -> Result<Option<Job>> {
        let key = self.job_key(id);
        let fields: std::collections::HashMap<String, String> = self.with(|c| c.hgetall(&key))?;
        self.parse_job(fields)
    }

    fn position(&self, id: &str) -> Result<Option<usize>> {
        let key = format!("{}queued", self.prefix);
        Ok(self.with(|c| c.zrank(&key, id))?)
    }

    fn claim(&self, worker: &str, models: &[String], prefer: &[String], max_batch: usize, lease: Duration) -> Result<Vec<Job>> {
        let list = |v: &[String]| if v.is_empty() { "[]".to_string() } else { serde_json::to_string(v).unwrap_or_else(|_| "[]".into()) };
        let ids: Vec<String> = self.run(
            CLAIM,
            &[worker.to_string(), list(models).to_string(), list(prefer).to_string(), max_batch.max(1).to_string(), lease.as_secs_f64().to_string(), crate::PREFERENCE_WINDOW.as_secs_f64().to_string()],
        )?;
        let mut jobs = vec![];
        for id in ids {
            if let Some(j) = self.get(&id)? {
                jobs.push(j);
            }
        }
        Ok(jobs)
    }

    fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<String>> {
        let mut args = vec![lease.as_secs_f64().to_string()];
        for l in leases {
            args.push(l.job_id.clone());
            args.push(l.attempt.to_string());
        }
        self.run(HEARTBEAT, &args)
    }

    fn complete(&self, lease: &Lease, result: &JobResult) -> Result<bool> {
        let body = serde_json::to_string(result).map_err(|e| QueueError::Storage(e.to_string()))?;
        Ok(self.run::<i64>(COMPLETE, &[lease.job_id.clone(), lease.attempt.to_string(), body])? == 1)
    }

    fn fail(&self, lease: &Lease, reason: &str, retryable: bool) -> Result<JobStatus> {
        let status: String =
            self.run(FAIL, &[lease.job_id.clone(), lease.attempt.to_string(), reason.to_string(), (retryable as i32).to_string(), self.max_attempts.to_string()])?;
        Ok(JobStatus::parse(&status).unwrap_or(JobStatus::Failed))
    }

    fn cancel(&self, id: &str) -> Result<Option<JobStatus>> {
        let status: Option<String> = self.run(CANCEL, &[id.to_string()])?;
        Ok(status.and_then(|s| JobStatus::parse(&s)))
    }

    fn cancel_requested(&self, id: &str) -> Result<bool> {
        let key = self.job_key(id);
        let v: Option<String> = self.with(|c| c.hget(&key, "cancel"))?;
        Ok(v.as_deref() == Some("1"))
    }

    fn mark_canceled(&self, lease: &Lease) -> Result<()> {
        self.run::<i64>(MARK_CANCELED, &[lease.job_id.clone(), lease.attempt.to_string()])?;
        Ok(())
    }

    fn find_idempotent(&self, key: &str) -> Result<Option<IdempotentJob>> {
        let idem = format!("{}idem:{key}", self.prefix);
        let (id, fingerprint): (Option<String>, Option<String>) = self.with(|c| redis::cmd("HMGET").arg(&idem).arg("id").arg("fingerprint").query(c))?;
        let Some(id) = id else { return Ok(None) };
        Ok(self.get(&id)?.map(|job| IdempotentJob { job, fingerprint: fingerprint.unwrap_or_default() }))
    }

    fn cached(&self, cache_key: &str) -> Result<Option<Job>> {
        let key = format!("{}cache:{cache_key}", self.prefix);
        let id: Option<String> = self.with(|c| c.get(&key))?;
        match id {
            Some(id) => Ok(self.get(&id)?.filter(|j| j.status == JobStatus::Succeeded)),
            None => Ok(None),
        }
    }

    fn depth(&self) -> Result<usize> {
        let key = format!("{}queued", self.prefix);
        Ok(self.with(|c| c.zcard(&key))?)
    }

    fn active_for(&self, key: &str) -> Result<usize> {
        let k = format!("{}active:{key}", self.prefix);
        Ok(self.with(|c| c.scard(&k))?)
    }

    fn list(&self, owner: Option<&str>, limit: usize, before: Option<&str>) -> Result<Vec<Job>> {
        let key = match owner {
            Some(o) => format!("{}history:{o}", self.prefix),
            None => format!("{}history", self.prefix),
        };
        let max = match before {
            Some(id) => {
                let seq: Option<String> = self.with(|c| c.hget(self.job_key(id), "seq"))?;
                match seq {
                    Some(s) => format!("({s}"),
                    None => return Ok(vec![]),
                }
            }
            None => "+inf".to_string(),
        };
        let ids: Vec<String> = self.with(|c| redis::cmd("ZREVRANGEBYSCORE").arg(&key).arg(&max).arg("-inf").arg("LIMIT").arg(0).arg(limit).query(c))?;
        let mut jobs = vec![];
        for id in ids {
            if let Some(j) = self.get(&id)? {
                jobs.push(j);
            }
        }
        Ok(jobs)
    }

    fn recover_expired(&self) -> Result<usize> {
        let reason = format!("{WORKER_CRASHED}: the worker running this job stopped {MAX_CRASHES} times (its lease expired); not retried again");
        let n: i64 = self.run(RECOVER, &[MAX_CRASHES.to_string(), reason])?;
        if n > 0 {
            tracing::warn!(requeued = n, "recovered jobs whose worker stopped");
        }
        Ok(n as usize)
    }

    fn claim_deliveries(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let rows: Vec<(String, String, u32)> = self.run(CLAIM_DELIVERIES, &[max.to_string(), lease.as_secs_f64().to_string()])?;
        Ok(rows.into_iter().map(|(job_id, url, attempt)| Delivery { id: Delivery::id_for(&job_id), job_id, url, attempt }).collect())
    }

    fn delivery_done(&self, id: &str) -> Result<()> {
        let key = format!("{}outbox", self.prefix);
        let job = job_of_delivery(id);
        self.with(|c| c.zrem::<_, _, ()>(&key, &job))
    }

    fn delivery_retry(&self, id: &str, after: Duration) -> Result<()> {
        let key = format!("{}outbox", self.prefix);
        let job = job_of_delivery(id);
        // XX: a delivery that was done meanwhile stays done. Due time on the server's clock.
        let script = Script::new("local t = redis.call('TIME') redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1]), ARGV[2]) return 1");
        self.with(|c| script.key(&key).arg(after.as_secs_f64()).arg(&job).invoke::<i64>(c)).map(|_| ())
    }

    fn reroute(&self, lease: &Lease, spec: &JobSpec) -> Result<bool> {
        let body = serde_json::to_string(spec).map_err(|e| QueueError::Storage(e.to_string()))?;
        Ok(self.run::<i64>(REROUTE, &[lease.job_id.clone(), lease.attempt.to_string(), body, spec.queue_model(), spec.batch_key()])? == 1)
    }

    fn advertise(&self, worker: &str, models: &[ModelInfo], warm: &[String], ttl: Duration) -> Result<()> {
        let m = serde_json::to_string(models).map_err(|e| QueueError::Storage(e.to_string()))?;
        let w = serde_json::to_string(warm).map_err(|e| QueueError::Storage(e.to_string()))?;
        self.run::<i64>(ADVERTISE, &[worker.to_string(), m.to_string(), w.to_string(), ttl.as_secs_f64().to_string()])?;
        Ok(())
    }

    fn wait_for_work(&self, worker: &str, timeout: Duration) -> bool {
        let key = format!("{}wake", self.prefix);
        let taken = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(worker);
        let mut conn = match taken {
            Some(c) => c,
            None => match self.client.get_connection_with_timeout(Duration::from_secs(2)) {
                Ok(mut c) => {
                    // The group exists once; creating it again is a harmless BUSYGROUP error.
                    let _: redis::RedisResult<()> = redis::cmd("XGROUP").arg("CREATE").arg(&key).arg("workers").arg("$").arg("MKSTREAM").query(&mut c);
                    c
                }
                Err(_) => {
                    std::thread::sleep(timeout);
                    return true;
                }
            },
        };
        let reply: redis::RedisResult<Option<redis::streams::StreamReadReply>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("workers")
            .arg(worker)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(timeout.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(&key)
            .arg(">")
            .query(&mut conn);
        match reply {
            Ok(r) => {
                // A wake-up is only a hint (the job itself is in `queued`): acknowledge at once.
                for entry in r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                    let _: redis::RedisResult<i64> = redis::cmd("XACK").arg(&key).arg("workers").arg(&entry.id).query(&mut conn);
                }
                self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(worker.to_string(), conn);
            }
            Err(e) => {
                tracing::debug!("waiting for work: {e}");
                std::thread::sleep(timeout.min(Duration::from_millis(500)));
            }
        }
        true
    }

    fn live_models(&self) -> Result<Vec<ModelInfo>> {
        let lists: Vec<String> = self.run(LIVE, &[])?;
        crate::merge_advertised(lists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test Redis (started if none runs); database 13 is this suite's own.
    fn url() -> String {
        std::env::var("EASEL_TEST_REDIS").unwrap_or_else(|_| crate::testing::redis_url(13))
    }

    fn open(prefix: &str, max: usize) -> RedisQueue {
        let q = RedisQueue::open(&url(), max, 3).expect("the test Redis").with_prefix(prefix);
        q.purge().expect("purge");
        q
    }

    #[test]
    fn passes_the_queue_conformance_suite() {
        let mut n = 0;
        let mut made = vec![];
        crate::conformance::run_all(&mut |max| {
            n += 1;
            let prefix = format!("easel-test-{}-{n}", std::process::id());
            made.push(prefix.clone());
            Box::new(open(&prefix, max))
        });
        for p in made {
            open(&p, 1).purge().expect("cleanup");
        }
    }

    #[test]
    fn survives_reconnecting() {
        let prefix = format!("easel-test-{}-persist", std::process::id());
        let ids = crate::conformance::persistence_before(&open(&prefix, 10));
        let again = RedisQueue::open(&url(), 10, 3).expect("reconnects").with_prefix(&prefix);
        crate::conformance::persistence_after(&again, &ids);
        again.purge().expect("cleanup");
    }

    #[test]
    fn an_enqueue_wakes_a_waiting_worker_at_once() {
        let prefix = format!("easel-test-{}-wake", std::process::id());
        let q = std::sync::Arc::new(open(&prefix, 10));
        q.wait_for_work("w", Duration::from_millis(10)); // joins the consumer group
        let producer = q.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            producer.enqueue(&crate::conformance::spec("m", 0, 20), None, None).expect("enqueue");
        });
        let started = std::time::Instant::now();
        assert!(q.wait_for_work("w", Duration::from_secs(10)));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "woke after {waited:?}");
        t.join().expect("producer");
        q.purge().expect("cleanup");
    }

    #[test]
    fn start_up_errors_never_show_the_redis_password() {
        let err = RedisQueue::open("redis://app:hunter2@127.0.0.1:1/0", 10, 3).err().expect("nothing listens on port 1");
        assert!(!err.to_string().contains("hunter2") && err.to_string().contains("redis://app:***@127.0.0.1:1/0"), "{err}");
        assert_eq!(redacted("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redacted("redis://h:6379/0"), "redis://h:6379/0");
    }

    #[test]
    fn unreachable_redis_is_one_clear_error() {
        let err = RedisQueue::open("redis://127.0.0.1:1/0", 10, 3).err().expect("nothing listens on port 1");
        assert!(err.to_string().contains("cannot reach Redis at redis://127.0.0.1:1/0"), "{err}");
    }
}
