//! The cost ledger: one row per finished job (provider, model, images, cost, time), kept in
//! SQLite beside the embedded queue, with the aggregates `GET /v1/usage` serves.
//!
//! Daily budgets cap spending on paid (closed) providers only: a local image's amortised cost
//! is on the record but is not spending. A closed request reserves its estimated cost before it
//! is sent ([`Ledger::reserve`], refused once recorded spend plus open reservations reach the
//! cap) and settles it after ([`Ledger::settle`] or [`Ledger::release`]), so concurrent
//! requests cannot overshoot a cap by more than the one image that reached it.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};
use serde::Serialize;

use crate::RouterError;

/// One finished job's cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerEntry {
    pub job_id: String,
    /// Unix seconds.
    pub at: f64,
    pub api_key: Option<String>,
    pub provider: String,
    pub model: String,
    pub images: u32,
    pub cost_usd: f64,
    /// Engine (or vendor) seconds spent.
    pub seconds: f64,
}

/// One aggregate row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    /// UTC day, YYYY-MM-DD.
    pub day: String,
    pub api_key: Option<String>,
    pub provider: String,
    pub model: String,
    pub jobs: u64,
    pub images: u64,
    pub cost_usd: f64,
    pub seconds: f64,
}

/// A closed-provider job's claim on today's budget.
#[derive(Debug, Clone, Copy)]
pub struct Reservation<'a> {
    pub job_id: &'a str,
    pub api_key: Option<&'a str>,
    /// The job's list price (all its images).
    pub usd: f64,
    /// One image's list price: the most a cap may be passed by.
    pub image_usd: f64,
    pub cap_all: Option<f64>,
    pub cap_key: Option<f64>,
}

/// The persistent ledger.
pub struct Ledger {
    conn: Mutex<Connection>,
}

impl Ledger {
    pub fn open(path: &Path) -> Result<Self, RouterError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS ledger (
                job_id TEXT PRIMARY KEY,
                at REAL NOT NULL,
                day TEXT NOT NULL,
                api_key TEXT,
                provider TEXT NOT NULL,
                model TEXT NOT NULL,
                images INTEGER NOT NULL,
                cost_usd REAL NOT NULL,
                seconds REAL NOT NULL
            );
            CREATE INDEX IF NOT EXISTS ledger_day ON ledger(day);
            CREATE TABLE IF NOT EXISTS reservations (
                job_id TEXT PRIMARY KEY,
                day TEXT NOT NULL,
                api_key TEXT,
                cost_usd REAL NOT NULL
            );",
        )?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    /// Records a job's cost once (a job recorded again, e.g. after a retry, is ignored).
    pub fn record(&self, e: &LedgerEntry) -> Result<(), RouterError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        insert(&conn, e)?;
        Ok(())
    }

    /// Totals per day, key, provider and model, newest day first; optionally only `since`
    /// (a YYYY-MM-DD day) onwards and only one API key.
    pub fn usage(&self, since: Option<&str>, api_key: Option<&str>) -> Result<Vec<UsageRow>, RouterError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = conn.prepare(
            "SELECT day, api_key, provider, model, COUNT(*), SUM(images), SUM(cost_usd), SUM(seconds) FROM ledger
             WHERE day >= COALESCE(?1, '') AND (?2 IS NULL OR api_key = ?2)
             GROUP BY day, api_key, provider, model ORDER BY day DESC, provider, model, api_key",
        )?;
        let rows = stmt.query_map(params![since, api_key], |r| {
            Ok(UsageRow {
                day: r.get(0)?,
                api_key: r.get(1)?,
                provider: r.get(2)?,
                model: r.get(3)?,
                jobs: r.get(4)?,
                images: r.get(5)?,
                cost_usd: r.get(6)?,
                seconds: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Spending on paid providers on UTC day `day` (YYYY-MM-DD; None: today), recorded plus
    /// reserved, for one key or all: what budget caps compare against.
    pub fn spent_on(&self, day: Option<&str>, api_key: Option<&str>) -> Result<f64, RouterError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(paid_spend(&conn, day, api_key)?)
    }

    /// Reserves a closed-provider job's price out of today's paid spending, before the call;
    /// false (nothing reserved) when the spend so far, with this job, would pass a cap by more
    /// than one image, so that concurrent requests overshoot a cap by at most one image.
    pub fn reserve(&self, r: &Reservation<'_>) -> Result<bool, RouterError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let over = |spent: f64, cap: f64| spent >= cap || spent + r.usd > cap + r.image_usd + 1e-9;
        if let Some(cap) = r.cap_all {
            if over(paid_spend(&tx, None, None)?, cap) {
                return Ok(false);
            }
        }
        if let (Some(cap), Some(key)) = (r.cap_key, r.api_key) {
            if over(paid_spend(&tx, None, Some(key))?, cap) {
                return Ok(false);
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO reservations (job_id, day, api_key, cost_usd) VALUES (?1, date('now'), ?2, ?3)",
            params![r.job_id, r.api_key, r.usd],
        )?;
        tx.commit()?;
        Ok(true)
    }

    /// Records a finished job's cost and drops its reservation, together.
    pub fn settle(&self, e: &LedgerEntry) -> Result<(), RouterError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM reservations WHERE job_id = ?1", [&e.job_id])?;
        insert(&tx, e)?;
        tx.commit()?;
        Ok(())
    }

    /// Drops a reservation whose request produced nothing to pay for.
    pub fn release(&self, job_id: &str) -> Result<(), RouterError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute("DELETE FROM reservations WHERE job_id = ?1", [job_id])?;
        Ok(())
    }
}

/// Recorded plus reserved spending on paid providers (`local` is amortised cost, not spending).
fn paid_spend(conn: &Connection, day: Option<&str>, api_key: Option<&str>) -> rusqlite::Result<f64> {
    conn.query_row(
        "SELECT (SELECT COALESCE(SUM(cost_usd), 0) FROM ledger WHERE provider != 'local' AND day = COALESCE(?1, date('now')) AND (?2 IS NULL OR api_key = ?2))
              + (SELECT COALESCE(SUM(cost_usd), 0) FROM reservations WHERE day = COALESCE(?1, date('now')) AND (?2 IS NULL OR api_key = ?2))",
        params![day, api_key],
        |r| r.get(0),
    )
}

fn insert(conn: &Connection, e: &LedgerEntry) -> rusqlite::Result<usize> {
    conn.execute(
        "INSERT OR IGNORE INTO ledger (job_id, at, day, api_key, provider, model, images, cost_usd, seconds)
         VALUES (?1, ?2, date(?2, 'unixepoch'), ?3, ?4, ?5, ?6, ?7, ?8)",
        params![e.job_id, e.at, e.api_key, e.provider, e.model, e.images, e.cost_usd, e.seconds],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, at: f64, key: Option<&str>, provider: &str, cost: f64) -> LedgerEntry {
        LedgerEntry { job_id: id.into(), at, api_key: key.map(Into::into), provider: provider.into(), model: "m".into(), images: 2, cost_usd: cost, seconds: 1.5 }
    }

    #[test]
    fn records_once_and_aggregates_by_day_key_and_provider() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("ledger.db");
        {
            let l = Ledger::open(&path).expect("open");
            let day1 = 1_764_115_200.0; // 2025-11-26 00:00 UTC
            l.record(&entry("a", day1 + 10.0, Some("alice"), "local", 0.001)).unwrap();
            l.record(&entry("a", day1 + 10.0, Some("alice"), "local", 0.001)).unwrap();
            l.record(&entry("b", day1 + 20.0, Some("alice"), "local", 0.002)).unwrap();
            l.record(&entry("c", day1 + 30.0, None, "bfl", 0.04)).unwrap();
            l.record(&entry("d", day1 + 86_400.0, Some("alice"), "local", 0.003)).unwrap();
        }
        let l = Ledger::open(&path).expect("reopens");
        let rows = l.usage(None, None).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].day.as_str(), rows[0].jobs), ("2025-11-27", 1));
        let local = rows.iter().find(|r| r.day == "2025-11-26" && r.provider == "local").unwrap();
        assert_eq!((local.jobs, local.images), (2, 4), "a job recorded twice counts once");
        assert!((local.cost_usd - 0.003).abs() < 1e-12);
        assert_eq!(l.usage(Some("2025-11-27"), None).unwrap().len(), 1);
        assert_eq!(l.usage(None, Some("alice")).unwrap().len(), 2);
        assert!((l.spent_on(Some("2025-11-26"), None).unwrap() - 0.04).abs() < 1e-12, "local cost is not spending");
        assert_eq!(l.spent_on(Some("2025-11-26"), Some("alice")).unwrap(), 0.0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        l.record(&entry("e", now, Some("bob"), "bfl", 0.04)).unwrap();
        assert!((l.spent_on(None, Some("bob")).unwrap() - 0.04).abs() < 1e-12, "today's spend");
    }

    #[test]
    fn concurrent_reservations_overshoot_a_budget_by_at_most_one_image() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = std::sync::Arc::new(Ledger::open(&d.path().join("ledger.db")).expect("open"));
        // Cap 0.10 at 0.04 an image, 16 requests at once: at most 3 may go (0.12 < 0.10 + 0.04).
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let l = l.clone();
                std::thread::spawn(move || l.reserve(&one_image(&format!("j{i}"), Some("alice"), Some(0.10), None)).expect("reserve"))
            })
            .collect();
        let granted: Vec<usize> = threads.into_iter().enumerate().filter_map(|(i, t)| t.join().expect("thread").then_some(i)).collect();
        assert_eq!(granted.len(), 3, "{granted:?}");
        assert!((l.spent_on(None, None).unwrap() - 0.12).abs() < 1e-12, "reservations count as spending");
        // Settling records the real cost in place of the reservation; releasing frees it.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        l.settle(&entry(&format!("j{}", granted[0]), now, Some("alice"), "bfl", 0.03)).unwrap();
        l.release(&format!("j{}", granted[1])).unwrap();
        assert!((l.spent_on(None, None).unwrap() - 0.07).abs() < 1e-12);
        assert!(l.reserve(&one_image("k", None, Some(0.10), None)).unwrap(), "room again under the cap");
        assert!(!l.reserve(&one_image("k2", Some("alice"), None, Some(0.05))).unwrap(), "alice's own cap: 0.03 + 0.04 reserved by her >= 0.05");
    }

    fn one_image<'a>(job_id: &'a str, api_key: Option<&'a str>, cap_all: Option<f64>, cap_key: Option<f64>) -> Reservation<'a> {
        Reservation { job_id, api_key, usd: 0.04, image_usd: 0.04, cap_all, cap_key }
    }

    #[test]
    fn a_request_for_several_images_is_refused_when_it_would_pass_the_cap_by_more_than_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let l = Ledger::open(&d.path().join("ledger.db")).expect("open");
        let four = |id| Reservation { job_id: id, api_key: None, usd: 0.16, image_usd: 0.04, cap_all: Some(0.10), cap_key: None };
        assert!(!l.reserve(&four("a")).unwrap(), "0.16 passes 0.10 by more than one 0.04 image");
        let two = Reservation { usd: 0.08, ..four("b") };
        assert!(l.reserve(&two).unwrap(), "0.08 stays under");
        assert!(l.reserve(&Reservation { usd: 0.04, ..four("c") }).unwrap(), "0.12: one image over");
        assert!(!l.reserve(&Reservation { usd: 0.04, ..four("d") }).unwrap(), "spent reached the cap");
    }
}
