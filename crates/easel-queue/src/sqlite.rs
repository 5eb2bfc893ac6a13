//! The embedded queue: one SQLite database in WAL mode.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use easel_api::{Job, JobResult, JobSpec, JobStatus, ModelInfo};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{Enqueued, JobQueue, QueueError, Result};

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
            );",
        )?;
        Ok(Self { conn: Mutex::new(conn), max_queued, max_attempts })
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
    fn enqueue(&self, spec: &JobSpec, cache_key: Option<&str>, idempotency_key: Option<&str>) -> Result<Enqueued> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if let Some(key) = idempotency_key {
            let existing: Option<String> = tx.query_row("SELECT id FROM jobs WHERE idempotency_key = ?1", [key], |r| r.get(0)).optional()?;
            if let Some(id) = existing {
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
            "INSERT INTO jobs (id, status, priority, model, batch_key, spec, created_at, idempotency_key, cache_key, api_key)
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![id, spec.priority, spec.model, spec.batch_key(), json(spec)?, now(), idempotency_key, cache_key, spec.user],
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

    fn heartbeat(&self, ids: &[String], lease: Duration) -> Result<()> {
        let conn = self.conn();
        let until = now() + lease.as_secs_f64();
        for id in ids {
            conn.execute("UPDATE jobs SET lease_until = ?2 WHERE id = ?1 AND status = 'running'", params![id, until])?;
        }
        Ok(())
    }

    fn complete(&self, id: &str, result: &JobResult) -> Result<bool> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE jobs SET status = 'succeeded', result = ?2, finished_at = ?3, lease_until = NULL WHERE id = ?1 AND status = 'running'",
            params![id, json(result)?, now()],
        )?;
        Ok(n == 1)
    }

    fn fail(&self, id: &str, reason: &str, retryable: bool) -> Result<JobStatus> {
        let conn = self.conn();
        let attempts: Option<u32> = conn.query_row("SELECT attempts FROM jobs WHERE id = ?1 AND status = 'running'", [id], |r| r.get(0)).optional()?;
        let Some(attempts) = attempts else {
            return Ok(Self::get_with(&conn, id)?.map(|j| j.status).unwrap_or(JobStatus::Failed));
        };
        if retryable && attempts < self.max_attempts {
            conn.execute("UPDATE jobs SET status = 'queued', error = ?2, lease_until = NULL, worker = NULL WHERE id = ?1", params![id, reason])?;
            Ok(JobStatus::Queued)
        } else {
            conn.execute(
                "UPDATE jobs SET status = 'failed', error = ?2, finished_at = ?3, lease_until = NULL WHERE id = ?1",
                params![id, reason, now()],
            )?;
            Ok(JobStatus::Failed)
        }
    }

    fn cancel(&self, id: &str) -> Result<Option<JobStatus>> {
        let conn = self.conn();
        let Some(job) = Self::get_with(&conn, id)? else { return Ok(None) };
        match job.status {
            JobStatus::Queued => {
                conn.execute("UPDATE jobs SET status = 'canceled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'", params![id, now()])?;
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

    fn mark_canceled(&self, id: &str) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "UPDATE jobs SET status = 'canceled', finished_at = ?2, lease_until = NULL WHERE id = ?1 AND status = 'running'",
            params![id, now()],
        )?;
        Ok(())
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

    fn recover_expired(&self) -> Result<usize> {
        let conn = self.conn();
        let t = now();
        // Jobs out of attempts fail with the reason; the rest run again.
        let failed = conn.execute(
            "UPDATE jobs SET status = 'failed', finished_at = ?2, error = COALESCE(error, 'worker died') || ' (lease expired after the last attempt)'
             WHERE status = 'running' AND lease_until < ?2 AND attempts >= ?1",
            params![self.max_attempts, t],
        )?;
        let requeued = conn.execute(
            "UPDATE jobs SET status = 'queued', worker = NULL, lease_until = NULL WHERE status = 'running' AND lease_until < ?1",
            params![t],
        )?;
        if failed + requeued > 0 {
            tracing::warn!(requeued, failed, "recovered jobs whose worker stopped");
        }
        Ok(requeued)
    }

    fn insert_finished(&self, spec: &JobSpec, result: &JobResult) -> Result<Job> {
        let conn = self.conn();
        let id = format!("job_{}", uuid::Uuid::new_v4().simple());
        let t = now();
        conn.execute(
            "INSERT INTO jobs (id, status, priority, model, batch_key, spec, result, attempts, created_at, started_at, finished_at, api_key)
             VALUES (?1, 'succeeded', ?2, ?3, ?4, ?5, ?6, 1, ?7, ?7, ?7, ?8)",
            params![id, spec.priority, spec.model, spec.batch_key(), json(spec)?, json(result)?, t, spec.user],
        )?;
        Self::get_with(&conn, &id)?.ok_or_else(|| QueueError::Storage("inserted job vanished".into()))
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
