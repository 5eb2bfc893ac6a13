//! The embedded queue: one SQLite database in WAL mode.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use easel_api::{Job, JobResult, JobSpec, JobStatus, ModelInfo};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{Delivery, Enqueued, Idempotency, IdempotentJob, JobQueue, Lease, QueueError, Result, MAX_CRASHES, WORKER_CRASHED};

/// SQLite-backed [`JobQueue`].
pub struct SqliteQueue {
    conn: Mutex<Connection>,
    max_queued: usize,
    max_attempts: u32,
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

const COLUMNS: &str = "id, status, spec, result, error, attempts, created_at, started_at, finished_at, cache_key, cache_hit";

fn row_to_job(r: &rusqlite::Row) -> rusqlite::Result<Job> {
    let status: String = r.get(1)?;
    let spec: String = r.get(2)?;
    let result: Option<String> = r.get(3)?;
    let bad = |e: serde_json::Error| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e));
    Ok(Job {
        id: r.get(0)?,
        status: JobStatus::parse(&status).unwrap_or(JobStatus::Failed),
        spec: serde_json::from_str(&spec).map_err(bad)?,
        result: result.map(|s| serde_json::from_str(&s)).transpose().map_err(bad)?,
        error: r.get(4)?,
        attempts: r.get(5)?,
        created_at: r.get(6)?,
        started_at: r.get(7)?,
        finished_at: r.get(8)?,
        cache_key: r.get(9)?,
        cache_hit: r.get(10)?,
    })
}

impl SqliteQueue {
    /// Opens (or creates) the queue database at `path`.
    pub fn open(path: &Path, max_queued: usize, max_attempts: u32) -> Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT NOT NULL UNIQUE,
                status TEXT NOT NULL,
                priority INTEGER NOT NULL,
                model TEXT NOT NULL,
                batch_key TEXT NOT NULL,
                spec TEXT NOT NULL,
                result TEXT,
                error TEXT,
                attempts INTEGER NOT NULL DEFAULT 0,
                created_at REAL NOT NULL,
                started_at REAL,
                finished_at REAL,
                lease_until REAL,
                worker TEXT,
                cancel_requested INTEGER NOT NULL DEFAULT 0,
                idempotency_key TEXT UNIQUE,
                cache_key TEXT,
                cache_hit INTEGER NOT NULL DEFAULT 0,
                api_key TEXT
            );
            CREATE INDEX IF NOT EXISTS jobs_queued ON jobs(status, priority DESC, seq);
            CREATE INDEX IF NOT EXISTS jobs_cache ON jobs(cache_key, status);
            CREATE TABLE IF NOT EXISTS workers (
                name TEXT PRIMARY KEY,
                models TEXT NOT NULL,
                warm TEXT NOT NULL,
                expires_at REAL NOT NULL
            );
            CREATE TABLE IF NOT EXISTS deliveries (
                id TEXT PRIMARY KEY,
                job_id TEXT NOT NULL,
                url TEXT NOT NULL,
                due_at REAL NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(due_at);",
        )?;
        // Columns added after the first release: databases made before them gain them here.
        for (column, decl) in [("crashes", "INTEGER NOT NULL DEFAULT 0"), ("idempotency_fingerprint", "TEXT")] {
            let has: bool = conn.query_row("SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = ?1", [column], |r| r.get(0))?;
            if !has {
                conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(Self { conn: Mutex::new(conn), max_queued, max_attempts })
    }

    /// Queues the webhook delivery of a job that just ended, if it asked for one (same
    /// transaction as the transition, so an ended job's webhook is never forgotten).
    fn queue_delivery(conn: &Connection, id: &str) -> Result<()> {
        conn.execute(
            "INSERT OR IGNORE INTO deliveries (id, job_id, url, due_at)
             SELECT ?2, id, json_extract(spec, '$.webhook_url'), ?3 FROM jobs
             WHERE id = ?1 AND status IN ('succeeded', 'failed', 'canceled') AND json_extract(spec, '$.webhook_url') IS NOT NULL",
            params![id, Delivery::id_for(id), now()],
        )?;
        Ok(())
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_with(conn: &Connection, id: &str) -> Result<Option<Job>> {
        Ok(conn.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), [id], row_to_job).optional()?)
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| QueueError::Storage(e.to_string()))
}

impl JobQueue for SqliteQueue {
    fn enqueue(&self, spec: &JobSpec, cache_key: Option<&str>, idempotency: Option<Idempotency<'_>>) -> Result<Enqueued> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(idem) = idempotency {
            let existing: Option<(String, Option<String>)> =
                tx.query_row("SELECT id, idempotency_fingerprint FROM jobs WHERE idempotency_key = ?1", [idem.key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
            if let Some((id, fingerprint)) = existing {
                if fingerprint.as_deref().is_some_and(|f| f != idem.fingerprint) {
                    return Err(QueueError::IdempotencyKeyReused { job_id: id });
                }
                let job = Self::get_with(&tx, &id)?.ok_or_else(|| QueueError::Storage("idempotent job vanished".into()))?;
                return Ok(Enqueued { job, existing: true });
            }
        }
        let queued: usize = tx.query_row("SELECT COUNT(*) FROM jobs WHERE status = 'queued'", [], |r| r.get(0))?;
        if queued >= self.max_queued {
            return Err(QueueError::Full(queued));
        }
        let id = format!("job_{}", uuid::Uuid::new_v4().simple());
        tx.execute(
            "INSERT INTO jobs (id, status, priority, model, batch_key, spec, created_at, idempotency_key, idempotency_fingerprint, cache_key, api_key)
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![id, spec.priority, spec.queue_model(), spec.batch_key(), json(spec)?, now(), idempotency.map(|i| i.key), idempotency.map(|i| i.fingerprint), cache_key, spec.user],
        )?;
        let job = Self::get_with(&tx, &id)?.ok_or_else(|| QueueError::Storage("inserted job vanished".into()))?;
        tx.commit()?;
        Ok(Enqueued { job, existing: false })
    }

    fn get(&self, id: &str) -> Result<Option<Job>> {
        Self::get_with(&self.conn(), id)
    }

    fn position(&self, id: &str) -> Result<Option<usize>> {
        let conn = self.conn();
        let row: Option<(String, i64, i64)> =
            conn.query_row("SELECT status, priority, seq FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()?;
        match row {
            Some((status, priority, seq)) if status == "queued" => {
                let ahead: usize = conn.query_row(
                    "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ?1 OR (priority = ?1 AND seq < ?2))",
                    params![priority, seq],
                    |r| r.get(0),
                )?;
                Ok(Some(ahead))
            }
            _ => Ok(None),
        }
    }

    fn claim(&self, worker: &str, models: &[String], prefer: &[String], max_batch: usize, lease: Duration) -> Result<Vec<Job>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let list = |names: &[String]| json(&names);
        // json_each keeps the statement fixed whatever the number of models.
        let head: Option<(String, String)> = tx
            .query_row(
                "SELECT id, batch_key FROM jobs
                 WHERE status = 'queued' AND model IN (SELECT value FROM json_each(?1))
                 ORDER BY priority DESC,
                          (model IN (SELECT value FROM json_each(?2)) OR created_at < ?3) DESC,
                          seq
                 LIMIT 1",
                params![list(models)?, list(prefer)?, now() - crate::PREFERENCE_WINDOW.as_secs_f64()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((head_id, batch_key)) = head else { return Ok(vec![]) };
        let mut ids = vec![head_id.clone()];
        if max_batch > 1 {
            let mut stmt = tx.prepare(
                "SELECT id FROM jobs WHERE status = 'queued' AND batch_key = ?1 AND id != ?2 ORDER BY priority DESC, seq LIMIT ?3",
            )?;
            let more = stmt.query_map(params![batch_key, head_id, (max_batch - 1) as i64], |r| r.get::<_, String>(0))?;
            for id in more {
                ids.push(id?);
            }
        }
        let t = now();
        let lease_until = t + lease.as_secs_f64();
        let mut jobs = vec![];
        for id in &ids {
            tx.execute(
                "UPDATE jobs SET status = 'running', worker = ?2, attempts = attempts + 1, started_at = ?3, lease_until = ?4 WHERE id = ?1",
                params![id, worker, t, lease_until],
            )?;
            if let Some(j) = Self::get_with(&tx, id)? {
                jobs.push(j);
            }
        }
        tx.commit()?;
        Ok(jobs)
    }

    fn heartbeat(&self, leases: &[Lease], lease: Duration) -> Result<Vec<String>> {
        let conn = self.conn();
        let until = now() + lease.as_secs_f64();
        let mut lost = vec![];
        for l in leases {
            let n = conn.execute("UPDATE jobs SET lease_until = ?3 WHERE id = ?1 AND attempts = ?2 AND status = 'running'", params![l.job_id, l.attempt, until])?;
            if n == 0 {
                lost.push(l.job_id.clone());
            }
        }
        Ok(lost)
    }

    fn complete(&self, lease: &Lease, result: &JobResult) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE jobs SET status = 'succeeded', result = ?3, finished_at = ?4, lease_until = NULL WHERE id = ?1 AND attempts = ?2 AND status = 'running'",
            params![lease.job_id, lease.attempt, json(result)?, now()],
        )?;
        // Only the transition itself queues the webhook: a stale holder's refused completion
        // must not re-queue a delivery that was already sent and removed.
        if n == 1 {
            Self::queue_delivery(&tx, &lease.job_id)?;
        }
        tx.commit()?;
        Ok(n == 1)
    }

    fn fail(&self, lease: &Lease, reason: &str, retryable: bool) -> Result<JobStatus> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held: bool = tx
            .query_row("SELECT COUNT(*) > 0 FROM jobs WHERE id = ?1 AND attempts = ?2 AND status = 'running'", params![lease.job_id, lease.attempt], |r| r.get(0))?;
        if !held {
            return Ok(Self::get_with(&tx, &lease.job_id)?.map(|j| j.status).unwrap_or(JobStatus::Failed));
        }
        let status = if retryable && lease.attempt < self.max_attempts {
            tx.execute("UPDATE jobs SET status = 'queued', error = ?2, lease_until = NULL, worker = NULL WHERE id = ?1", params![lease.job_id, reason])?;
            JobStatus::Queued
        } else {
            tx.execute(
                "UPDATE jobs SET status = 'failed', error = ?2, finished_at = ?3, lease_until = NULL WHERE id = ?1",
                params![lease.job_id, reason, now()],
            )?;
            Self::queue_delivery(&tx, &lease.job_id)?;
            JobStatus::Failed
        };
        tx.commit()?;
        Ok(status)
    }

    fn cancel(&self, id: &str) -> Result<Option<JobStatus>> {
        let conn = self.conn();
        let Some(job) = Self::get_with(&conn, id)? else { return Ok(None) };
        match job.status {
            JobStatus::Queued => {
                if conn.execute("UPDATE jobs SET status = 'canceled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'", params![id, now()])? == 1 {
                    Self::queue_delivery(&conn, id)?;
                }
                Ok(Some(JobStatus::Canceled))
            }
            JobStatus::Running => {
                conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [id])?;
                Ok(Some(JobStatus::Running))
            }
            s => Ok(Some(s)),
        }
    }

    fn cancel_requested(&self, id: &str) -> Result<bool> {
        let conn = self.conn();
        Ok(conn.query_row("SELECT cancel_requested FROM jobs WHERE id = ?1", [id], |r| r.get::<_, bool>(0)).optional()?.unwrap_or(false))
    }

    fn mark_canceled(&self, lease: &Lease) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE jobs SET status = 'canceled', finished_at = ?3, lease_until = NULL WHERE id = ?1 AND attempts = ?2 AND status = 'running'",
            params![lease.job_id, lease.attempt, now()],
        )?;
        if n == 1 {
            Self::queue_delivery(&tx, &lease.job_id)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn find_idempotent(&self, key: &str) -> Result<Option<IdempotentJob>> {
        let conn = self.conn();
        let found: Option<(String, Option<String>)> =
            conn.query_row("SELECT id, idempotency_fingerprint FROM jobs WHERE idempotency_key = ?1", [key], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
        let Some((id, fingerprint)) = found else { return Ok(None) };
        Ok(Self::get_with(&conn, &id)?.map(|job| IdempotentJob { job, fingerprint: fingerprint.unwrap_or_default() }))
    }

    fn cached(&self, cache_key: &str) -> Result<Option<Job>> {
        let conn = self.conn();
        Ok(conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM jobs WHERE cache_key = ?1 AND status = 'succeeded' ORDER BY seq LIMIT 1"),
                [cache_key],
                row_to_job,
            )
            .optional()?)
    }

    fn depth(&self) -> Result<usize> {
        Ok(self.conn().query_row("SELECT COUNT(*) FROM jobs WHERE status = 'queued'", [], |r| r.get(0))?)
    }

    fn active_for(&self, key: &str) -> Result<usize> {
        Ok(self.conn().query_row(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running') AND api_key = ?1",
            [key],
            |r| r.get(0),
        )?)
    }

    fn list(&self, owner: Option<&str>, limit: usize, before: Option<&str>) -> Result<Vec<Job>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM jobs WHERE (?1 IS NULL OR api_key = ?1)
             AND (?2 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?2)) ORDER BY seq DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![owner, before, limit as i64], row_to_job)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    fn recover_expired(&self) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let t = now();
        let expired: Vec<(String, u32)> = {
            let mut stmt = tx.prepare("SELECT id, crashes FROM jobs WHERE status = 'running' AND lease_until < ?1")?;
            let rows = stmt.query_map([t], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let (mut requeued, mut failed) = (0, 0);
        for (id, crashes) in expired {
            if crashes + 1 >= MAX_CRASHES {
                let reason = format!("{WORKER_CRASHED}: the worker running this job stopped {MAX_CRASHES} times (its lease expired); not retried again");
                tx.execute(
                    "UPDATE jobs SET status = 'failed', crashes = crashes + 1, finished_at = ?2, error = ?3, lease_until = NULL WHERE id = ?1",
                    params![id, t, reason],
                )?;
                Self::queue_delivery(&tx, &id)?;
                failed += 1;
            } else {
                tx.execute("UPDATE jobs SET status = 'queued', crashes = crashes + 1, worker = NULL, lease_until = NULL WHERE id = ?1", [&id])?;
                requeued += 1;
            }
        }
        tx.commit()?;
        if failed + requeued > 0 {
            tracing::warn!(requeued, failed, "recovered jobs whose worker stopped");
        }
        Ok(requeued)
    }

    fn claim_deliveries(&self, max: usize, lease: Duration) -> Result<Vec<Delivery>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let t = now();
        let due: Vec<Delivery> = {
            let mut stmt = tx.prepare("SELECT id, job_id, url, attempts FROM deliveries WHERE due_at <= ?1 ORDER BY due_at LIMIT ?2")?;
            let rows = stmt.query_map(params![t, max as i64], |r| Ok(Delivery { id: r.get(0)?, job_id: r.get(1)?, url: r.get(2)?, attempt: r.get::<_, u32>(3)? + 1 }))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for d in &due {
            tx.execute("UPDATE deliveries SET due_at = ?2, attempts = attempts + 1 WHERE id = ?1", params![d.id, t + lease.as_secs_f64()])?;
        }
        tx.commit()?;
        Ok(due)
    }

    fn delivery_done(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM deliveries WHERE id = ?1", [id])?;
        Ok(())
    }

    fn delivery_retry(&self, id: &str, after: Duration) -> Result<()> {
        self.conn().execute("UPDATE deliveries SET due_at = ?2 WHERE id = ?1", params![id, now() + after.as_secs_f64()])?;
        Ok(())
    }

    fn reroute(&self, lease: &Lease, spec: &JobSpec) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE jobs SET status = 'queued', spec = ?3, model = ?4, batch_key = ?5, worker = NULL, lease_until = NULL
             WHERE id = ?1 AND attempts = ?2 AND status = 'running'",
            params![lease.job_id, lease.attempt, json(spec)?, spec.queue_model(), spec.batch_key()],
        )?;
        Ok(n == 1)
    }

    fn advertise(&self, worker: &str, models: &[ModelInfo], warm: &[String], ttl: Duration) -> Result<()> {
        let t = now();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO workers (name, models, warm, expires_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET models = ?2, warm = ?3, expires_at = ?4",
            params![worker, json(&models)?, json(&warm)?, t + ttl.as_secs_f64()],
        )?;
        conn.execute("DELETE FROM workers WHERE expires_at < ?1", params![t])?;
        Ok(())
    }

    fn live_models(&self) -> Result<Vec<ModelInfo>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT models FROM workers WHERE expires_at >= ?1 ORDER BY name")?;
        let rows = stmt.query_map(params![now()], |r| r.get::<_, String>(0))?;
        crate::merge_advertised(rows.collect::<rusqlite::Result<Vec<String>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path, max: usize) -> Box<dyn JobQueue> {
        Box::new(SqliteQueue::open(path, max, 3).expect("opens"))
    }

    #[test]
    fn passes_the_queue_conformance_suite() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut n = 0;
        crate::conformance::run_all(&mut |max| {
            n += 1;
            open(&d.path().join(format!("q{n}.db")), max)
        });
    }

    #[test]
    fn survives_reopening() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("q.db");
        let ids = crate::conformance::persistence_before(&*open(&path, 10));
        crate::conformance::persistence_after(&*open(&path, 10), &ids);
    }
}
