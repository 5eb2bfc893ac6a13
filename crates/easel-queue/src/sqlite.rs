//! The embedded queue: one SQLite database in WAL mode.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use easel_api::{Job, JobResult, JobSpec, JobStatus};
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
            CREATE INDEX IF NOT EXISTS jobs_cache ON jobs(cache_key, status);",
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

    fn claim(&self, worker: &str, models: &[String], max_batch: usize, lease: Duration) -> Result<Vec<Job>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let placeholders = vec!["?"; models.len().max(1)].join(",");
        let model_params: Vec<&dyn rusqlite::ToSql> = if models.is_empty() {
            vec![&"" as &dyn rusqlite::ToSql]
        } else {
            models.iter().map(|m| m as &dyn rusqlite::ToSql).collect()
        };
        let head: Option<(String, String)> = tx
            .query_row(
                &format!("SELECT id, batch_key FROM jobs WHERE status = 'queued' AND model IN ({placeholders}) ORDER BY priority DESC, seq LIMIT 1"),
                model_params.as_slice(),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_api::{OutputFormat, StoredImage, Timings};

    fn spec(model: &str, priority: i32, steps: usize) -> JobSpec {
        JobSpec {
            model: model.into(),
            prompt: "p".into(),
            negative_prompt: None,
            width: 64,
            height: 64,
            n: 1,
            steps,
            guidance: 4.0,
            seed: 1,
            seed_explicit: true,
            scheduler: None,
            output_format: OutputFormat::Png,
            output_compression: None,
            priority,
            user: None,
            webhook_url: None,
        }
    }

    fn result() -> JobResult {
        JobResult { images: vec![StoredImage { key: "k".into(), seed: 1 }], timings: Timings::default(), batch_size: 1 }
    }

    fn queue(max: usize) -> (tempfile::TempDir, SqliteQueue) {
        let d = tempfile::tempdir().unwrap();
        let q = SqliteQueue::open(&d.path().join("q.db"), max, 3).unwrap();
        (d, q)
    }

    #[test]
    fn priority_then_fifo_and_positions() {
        let (_d, q) = queue(10);
        let a = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
        let b = q.enqueue(&spec("m", 5, 21), None, None).unwrap().job;
        let c = q.enqueue(&spec("m", 0, 22), None, None).unwrap().job;
        assert_eq!(q.position(&b.id).unwrap(), Some(0));
        assert_eq!(q.position(&a.id).unwrap(), Some(1));
        assert_eq!(q.position(&c.id).unwrap(), Some(2));
        let order: Vec<String> = (0..3).map(|_| q.claim("w", &["m".into()], 1, Duration::from_secs(60)).unwrap()[0].id.clone()).collect();
        assert_eq!(order, vec![b.id, a.id, c.id]);
    }

    #[test]
    fn cap_idempotency_and_batches() {
        let (_d, q) = queue(2);
        let a = q.enqueue(&spec("m", 0, 20), None, Some("key")).unwrap();
        let again = q.enqueue(&spec("m", 0, 20), None, Some("key")).unwrap();
        assert!(again.existing && again.job.id == a.job.id);
        q.enqueue(&spec("m", 0, 20), None, None).unwrap();
        assert!(matches!(q.enqueue(&spec("m", 0, 20), None, None), Err(QueueError::Full(2))));
        let batch = q.claim("w", &["m".into()], 4, Duration::from_secs(60)).unwrap();
        assert_eq!(batch.len(), 2, "compatible jobs run together");
        assert!(q.claim("w", &["other".into()], 4, Duration::from_secs(60)).unwrap().is_empty());
    }

    #[test]
    fn expired_leases_requeue_then_fail_after_max_attempts() {
        let (_d, q) = queue(10);
        let j = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
        for attempt in 1..=3 {
            let got = q.claim("w", &["m".into()], 1, Duration::from_millis(0)).unwrap();
            assert_eq!(got[0].attempts, attempt);
            std::thread::sleep(Duration::from_millis(5));
            q.recover_expired().unwrap();
        }
        let j = q.get(&j.id).unwrap().unwrap();
        assert_eq!(j.status, JobStatus::Failed);
        assert!(j.error.unwrap().contains("lease expired"));
    }

    #[test]
    fn complete_cancel_cache_and_persistence() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("q.db");
        let (done, canceled, running) = {
            let q = SqliteQueue::open(&path, 10, 3).unwrap();
            let s = spec("m", 0, 20);
            let j = q.enqueue(&s, Some("ck"), None).unwrap().job;
            q.claim("w", &["m".into()], 1, Duration::from_secs(60)).unwrap();
            assert!(q.complete(&j.id, &result()).unwrap());
            assert!(!q.complete(&j.id, &result()).unwrap(), "completes once");
            let c = q.enqueue(&s, None, None).unwrap().job;
            assert_eq!(q.cancel(&c.id).unwrap(), Some(JobStatus::Canceled));
            let r = q.enqueue(&s, None, None).unwrap().job;
            q.claim("w", &["m".into()], 1, Duration::from_secs(60)).unwrap();
            assert_eq!(q.cancel(&r.id).unwrap(), Some(JobStatus::Running));
            assert!(q.cancel_requested(&r.id).unwrap());
            (j.id, c.id, r.id)
        };
        let q = SqliteQueue::open(&path, 10, 3).unwrap();
        assert_eq!(q.get(&done).unwrap().unwrap().status, JobStatus::Succeeded);
        assert_eq!(q.cached("ck").unwrap().unwrap().id, done);
        assert_eq!(q.get(&canceled).unwrap().unwrap().status, JobStatus::Canceled);
        assert_eq!(q.get(&running).unwrap().unwrap().status, JobStatus::Running);
    }
}
