//! The behaviour every [`JobQueue`] must have, as functions over `&dyn JobQueue`, so the
//! embedded and the Redis queue run exactly the same checks. Used by tests; panics on failure.

use std::time::Duration;

use easel_api::{JobResult, JobSpec, JobStatus, ModelInfo, OutputFormat, StoredImage, Timings};

use crate::{JobQueue, QueueError};

/// A job spec for `model` at `priority`; `steps` changes its batch key.
pub fn spec(model: &str, priority: i32, steps: usize) -> JobSpec {
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
        loras: vec![],
    }
}

fn result() -> JobResult {
    JobResult { images: vec![StoredImage { key: "k".into(), seed: 1 }], timings: Timings::default(), batch_size: 1, cost_usd: 0.0, provider: "local".into(), route_reason: None, vendor_id: None }
}

const MINUTE: Duration = Duration::from_secs(60);

/// Runs every check; `make(max_queued)` returns a fresh, empty queue with 3 attempts per job.
pub fn run_all(make: &mut dyn FnMut(usize) -> Box<dyn JobQueue>) {
    priority_then_fifo_and_positions(&*make(10));
    cap_idempotency_and_batches(&*make(2));
    expired_leases_requeue_then_fail_after_max_attempts(&*make(10));
    complete_cancel_and_cache(&*make(10));
    failures_retry_then_fail(&*make(10));
    warm_models_first_within_a_priority(&*make(10));
    advertised_models_expire(&*make(10));
    per_key_accounting(&*make(10));
    externally_finished_jobs_have_records(&*make(10));
}

pub fn externally_finished_jobs_have_records(q: &dyn JobQueue) {
    let mut r = result();
    r.provider = "bfl".into();
    r.cost_usd = 0.04;
    let j = q.insert_finished(&spec("bfl:flux-pro-1.1", 0, 1), &r).unwrap();
    let got = q.get(&j.id).unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Succeeded);
    assert_eq!(got.result.unwrap().provider, "bfl");
    assert_eq!(q.depth().unwrap(), 0, "never queued");
    assert!(q.claim("w", &["bfl:flux-pro-1.1".into()], &[], 1, MINUTE).unwrap().is_empty());
}

pub fn priority_then_fifo_and_positions(q: &dyn JobQueue) {
    let a = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    let b = q.enqueue(&spec("m", 5, 21), None, None).unwrap().job;
    let c = q.enqueue(&spec("m", 0, 22), None, None).unwrap().job;
    assert_eq!(q.position(&b.id).unwrap(), Some(0));
    assert_eq!(q.position(&a.id).unwrap(), Some(1));
    assert_eq!(q.position(&c.id).unwrap(), Some(2));
    assert_eq!(q.depth().unwrap(), 3);
    let order: Vec<String> = (0..3).map(|_| q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap()[0].id.clone()).collect();
    assert_eq!(order, vec![b.id.clone(), a.id, c.id]);
    assert_eq!(q.position(&b.id).unwrap(), None, "running jobs have no position");
    assert_eq!(q.depth().unwrap(), 0);
}

pub fn cap_idempotency_and_batches(q: &dyn JobQueue) {
    let a = q.enqueue(&spec("m", 0, 20), None, Some("key")).unwrap();
    let again = q.enqueue(&spec("m", 0, 20), None, Some("key")).unwrap();
    assert!(again.existing && again.job.id == a.job.id);
    q.enqueue(&spec("m", 0, 20), None, None).unwrap();
    assert!(matches!(q.enqueue(&spec("m", 0, 20), None, None), Err(QueueError::Full(2))));
    assert!(q.claim("w", &["other".into()], &[], 4, MINUTE).unwrap().is_empty());
    let batch = q.claim("w", &["m".into()], &[], 4, MINUTE).unwrap();
    assert_eq!(batch.len(), 2, "compatible jobs run together");
    assert!(batch.iter().all(|j| j.status == JobStatus::Running && j.attempts == 1));
}

pub fn expired_leases_requeue_then_fail_after_max_attempts(q: &dyn JobQueue) {
    let j = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    for attempt in 1..=3 {
        let got = q.claim("w", &["m".into()], &[], 1, Duration::from_millis(0)).unwrap();
        assert_eq!(got[0].attempts, attempt);
        std::thread::sleep(Duration::from_millis(5));
        q.recover_expired().unwrap();
    }
    let j = q.get(&j.id).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.error.unwrap().contains("lease expired"));
    // A job whose lease is renewed is not recovered.
    let k = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    q.claim("w", &["m".into()], &[], 1, Duration::from_millis(0)).unwrap();
    q.heartbeat(std::slice::from_ref(&k.id), MINUTE).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(q.recover_expired().unwrap(), 0);
    assert_eq!(q.get(&k.id).unwrap().unwrap().status, JobStatus::Running);
}

pub fn complete_cancel_and_cache(q: &dyn JobQueue) {
    let s = spec("m", 0, 20);
    let j = q.enqueue(&s, Some("ck"), None).unwrap().job;
    assert!(q.cached("ck").unwrap().is_none(), "only succeeded jobs are cache hits");
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert!(q.complete(&j.id, &result()).unwrap());
    assert!(!q.complete(&j.id, &result()).unwrap(), "completes once");
    let done = q.get(&j.id).unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.result.unwrap().images[0].key, "k");
    assert_eq!(q.cached("ck").unwrap().unwrap().id, j.id);
    let c = q.enqueue(&s, None, None).unwrap().job;
    assert_eq!(q.cancel(&c.id).unwrap(), Some(JobStatus::Canceled));
    assert!(q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap().is_empty(), "a canceled job never runs");
    let r = q.enqueue(&s, None, None).unwrap().job;
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert!(!q.cancel_requested(&r.id).unwrap());
    assert_eq!(q.cancel(&r.id).unwrap(), Some(JobStatus::Running));
    assert!(q.cancel_requested(&r.id).unwrap());
    q.mark_canceled(&r.id).unwrap();
    assert_eq!(q.get(&r.id).unwrap().unwrap().status, JobStatus::Canceled);
    assert_eq!(q.cancel("job_nope").unwrap(), None);
    assert!(q.get("job_nope").unwrap().is_none());
}

pub fn failures_retry_then_fail(q: &dyn JobQueue) {
    let j = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert_eq!(q.fail(&j.id, "oom", true).unwrap(), JobStatus::Queued);
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert_eq!(q.fail(&j.id, "bad weights", false).unwrap(), JobStatus::Failed);
    let j = q.get(&j.id).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.error.as_deref(), Some("bad weights"));
}

pub fn warm_models_first_within_a_priority(q: &dyn JobQueue) {
    let cold = q.enqueue(&spec("cold", 0, 20), None, None).unwrap().job;
    let warm = q.enqueue(&spec("warm", 0, 20), None, None).unwrap().job;
    let urgent = q.enqueue(&spec("cold", 9, 20), None, None).unwrap().job;
    let models = ["cold".to_string(), "warm".to_string()];
    let prefer = ["warm".to_string()];
    let order: Vec<String> = (0..3).map(|_| q.claim("w", &models, &prefer, 1, MINUTE).unwrap()[0].id.clone()).collect();
    assert_eq!(order, vec![urgent.id, warm.id, cold.id], "priority first, then warm models, then FIFO");
}

pub fn advertised_models_expire(q: &dyn JobQueue) {
    assert!(q.live_models().unwrap().is_empty());
    let info = |id: &str| ModelInfo { id: id.into(), default_steps: 20, default_guidance: 4.0, default_size: 64, max_side: 2048, size_multiple: 8, schedulers: vec![], memory: None };
    q.advertise("w1", &[info("a"), info("b")], &["a".into()], Duration::from_millis(300)).unwrap();
    q.advertise("w2", &[info("b")], &[], MINUTE).unwrap();
    let mut live: Vec<String> = q.live_models().unwrap().into_iter().map(|m| m.id).collect();
    live.sort();
    assert_eq!(live, ["a", "b"]);
    std::thread::sleep(Duration::from_millis(400));
    let live: Vec<String> = q.live_models().unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(live, ["b"], "a worker that stops advertising stops counting");
}

pub fn per_key_accounting(q: &dyn JobQueue) {
    let mut s = spec("m", 0, 20);
    s.user = Some("alice".into());
    let a = q.enqueue(&s, None, None).unwrap().job;
    q.enqueue(&s, None, None).unwrap();
    assert_eq!(q.active_for("alice").unwrap(), 2);
    assert_eq!(q.active_for("bob").unwrap(), 0);
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    q.complete(&a.id, &result()).unwrap();
    assert_eq!(q.active_for("alice").unwrap(), 1);
}

/// First half of a restart check: leaves one succeeded, one canceled and one running job.
pub fn persistence_before(q: &dyn JobQueue) -> [String; 3] {
    let s = spec("m", 0, 20);
    let j = q.enqueue(&s, Some("ck"), None).unwrap().job;
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert!(q.complete(&j.id, &result()).unwrap());
    let c = q.enqueue(&s, None, None).unwrap().job;
    q.cancel(&c.id).unwrap();
    let r = q.enqueue(&s, None, None).unwrap().job;
    q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    q.cancel(&r.id).unwrap();
    [j.id, c.id, r.id]
}

/// Second half: the same queue reopened still has them.
pub fn persistence_after(q: &dyn JobQueue, [done, canceled, running]: &[String; 3]) {
    assert_eq!(q.get(done).unwrap().unwrap().status, JobStatus::Succeeded);
    assert_eq!(q.cached("ck").unwrap().unwrap().id, *done);
    assert_eq!(q.get(canceled).unwrap().unwrap().status, JobStatus::Canceled);
    assert_eq!(q.get(running).unwrap().unwrap().status, JobStatus::Running);
    assert!(q.cancel_requested(running).unwrap());
}
