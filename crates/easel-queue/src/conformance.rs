//! The behaviour every [`JobQueue`] must have, as functions over `&dyn JobQueue`, so the
//! embedded and the Redis queue run exactly the same checks. Used by tests; panics on failure.

use std::time::Duration;

use easel_api::{JobResult, JobSpec, JobStatus, ModelInfo, OutputFormat, StoredImage, Timings};

use crate::{Delivery, Idempotency, JobQueue, Lease, QueueError, WORKER_CRASHED};

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
        private: false,
        route: None,
        preview_every: None,
        webhook_format: None,
        skip_layer_guidance: None,
        step_cache: None,
        controlnets: vec![],
        ip_adapter: None,
        init_image: None,
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
    rerouted_jobs_wait_for_the_next_candidates_executor(&*make(10));
    a_stale_lease_cannot_finish_renew_or_cancel_the_job(&*make(10));
    a_job_whose_worker_dies_twice_fails_as_worker_crashed(&*make(10));
    idempotency_keys_refuse_a_different_request(&*make(10));
    ended_jobs_with_a_webhook_queue_one_delivery_each(&*make(10));
    listings_are_newest_first_per_owner_and_paged(&*make(10));
}

pub fn listings_are_newest_first_per_owner_and_paged(q: &dyn JobQueue) {
    let mut ids = vec![];
    for (i, owner) in ["alice", "bob", "alice", "alice"].iter().enumerate() {
        let mut s = spec("m", 0, 20 + i);
        s.user = Some(owner.to_string());
        ids.push(q.enqueue(&s, None, None).unwrap().job.id);
    }
    let names = |jobs: Vec<easel_api::Job>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(names(q.list(Some("alice"), 10, None).unwrap()), [ids[3].clone(), ids[2].clone(), ids[0].clone()]);
    assert_eq!(names(q.list(Some("alice"), 2, None).unwrap()), [ids[3].clone(), ids[2].clone()]);
    assert_eq!(names(q.list(Some("alice"), 2, Some(&ids[2])).unwrap()), [ids[0].clone()], "the next page");
    assert_eq!(names(q.list(None, 10, None).unwrap()).len(), 4, "everyone's");
    assert!(q.list(Some("carol"), 10, None).unwrap().is_empty());
    assert!(q.list(Some("alice"), 10, Some("job_nope")).unwrap().is_empty());
}

/// Claims the next job of model `m` (one), for a minute.
fn claim_one(q: &dyn JobQueue, lease: Duration) -> Lease {
    let got = q.claim("w", &["m".into()], &[], 1, lease).unwrap();
    Lease::of(&got[0])
}

pub fn a_stale_lease_cannot_finish_renew_or_cancel_the_job(q: &dyn JobQueue) {
    let mut hooked = spec("m", 0, 20);
    hooked.webhook_url = Some("http://hooks.example/x".into());
    let j = q.enqueue(&hooked, None, None).unwrap().job;
    let first = claim_one(q, Duration::from_millis(0));
    std::thread::sleep(Duration::from_millis(5));
    q.recover_expired().unwrap();
    let second = claim_one(q, MINUTE);
    assert_eq!((first.attempt, second.attempt), (1, 2));
    assert_eq!(q.heartbeat(&[first.clone(), second.clone()], MINUTE).unwrap(), vec![j.id.clone()], "the first holder learns it lost the job");
    assert!(!q.complete(&first, &result()).unwrap(), "the stale holder cannot record a result");
    assert_eq!(q.fail(&first, "late", false).unwrap(), JobStatus::Running, "nor fail it");
    q.mark_canceled(&first).unwrap();
    assert_eq!(q.get(&j.id).unwrap().unwrap().status, JobStatus::Running, "nor cancel it");
    assert!(q.complete(&second, &result()).unwrap(), "the current holder can");
    assert_eq!(q.heartbeat(std::slice::from_ref(&second), MINUTE).unwrap(), vec![j.id.clone()], "a finished job's lease is gone too");
    // Its webhook is queued once; a stale holder's late attempts do not queue it again.
    let sent = q.claim_deliveries(10, MINUTE).unwrap();
    assert_eq!(sent.len(), 1);
    q.delivery_done(&sent[0].id).unwrap();
    assert!(!q.complete(&first, &result()).unwrap());
    q.mark_canceled(&first).unwrap();
    assert!(q.claim_deliveries(10, Duration::ZERO).unwrap().is_empty(), "no second delivery");
    assert_eq!(q.cancel(&j.id).unwrap(), Some(JobStatus::Succeeded));
    assert!(q.claim_deliveries(10, Duration::ZERO).unwrap().is_empty());
}

pub fn a_job_whose_worker_dies_twice_fails_as_worker_crashed(q: &dyn JobQueue) {
    let j = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    claim_one(q, Duration::from_millis(0));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(q.recover_expired().unwrap(), 1, "the first crash requeues");
    claim_one(q, Duration::from_millis(0));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(q.recover_expired().unwrap(), 0, "the second does not");
    let j = q.get(&j.id).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert!(j.error.unwrap().starts_with(WORKER_CRASHED));
    assert!(q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap().is_empty(), "never claimed again");
}

pub fn idempotency_keys_refuse_a_different_request(q: &dyn JobQueue) {
    let idem = |fingerprint| Some(Idempotency { key: "alice\u{1f}k1", fingerprint });
    let a = q.enqueue(&spec("m", 0, 20), None, idem("f1")).unwrap();
    let again = q.enqueue(&spec("m", 0, 20), None, idem("f1")).unwrap();
    assert!(again.existing && again.job.id == a.job.id, "the same request gets the same job");
    match q.enqueue(&spec("m", 0, 21), None, idem("f2")) {
        Err(QueueError::IdempotencyKeyReused { job_id }) => assert_eq!(job_id, a.job.id),
        other => panic!("expected IdempotencyKeyReused, got {other:?}"),
    }
    let found = q.find_idempotent("alice\u{1f}k1").unwrap().expect("the key's job");
    assert_eq!((found.job.id.as_str(), found.fingerprint.as_str()), (a.job.id.as_str(), "f1"));
    assert!(q.find_idempotent("alice\u{1f}k9").unwrap().is_none());
    let bob = q.enqueue(&spec("m", 0, 21), None, Some(Idempotency { key: "bob\u{1f}k1", fingerprint: "f2" })).unwrap();
    assert!(!bob.existing && bob.job.id != a.job.id, "keys are scoped by the caller");
}

pub fn ended_jobs_with_a_webhook_queue_one_delivery_each(q: &dyn JobQueue) {
    let mut s = spec("m", 0, 20);
    s.webhook_url = Some("http://hooks.example/x".into());
    let done = q.enqueue(&s, None, None).unwrap().job;
    let canceled = q.enqueue(&s, None, None).unwrap().job;
    q.enqueue(&spec("m", 0, 20), None, None).unwrap(); // no webhook: no delivery
    assert!(q.claim_deliveries(10, MINUTE).unwrap().is_empty(), "nothing ended yet");
    let lease = claim_one(q, MINUTE);
    assert_eq!(lease.job_id, done.id);
    assert!(q.complete(&lease, &result()).unwrap());
    q.cancel(&canceled.id).unwrap();
    let plain = claim_one(q, MINUTE);
    q.complete(&plain, &result()).unwrap();
    let mut got = q.claim_deliveries(10, Duration::from_millis(0)).unwrap();
    got.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let mut want = vec![done.id.clone(), canceled.id.clone()];
    want.sort();
    assert_eq!(got.iter().map(|d| d.job_id.clone()).collect::<Vec<_>>(), want);
    assert!(got.iter().all(|d| d.attempt == 1 && d.url == "http://hooks.example/x" && d.id == Delivery::id_for(&d.job_id)));
    std::thread::sleep(Duration::from_millis(5));
    // A claimed delivery whose lease lapsed is due again (its deliverer died), with the same id.
    let again = q.claim_deliveries(10, MINUTE).unwrap();
    assert_eq!(again.len(), 2);
    assert!(again.iter().all(|d| d.attempt == 2));
    assert!(q.claim_deliveries(10, MINUTE).unwrap().is_empty(), "claimed deliveries are not handed out twice");
    q.delivery_done(&again[0].id).unwrap();
    q.delivery_retry(&again[1].id, Duration::from_millis(0)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let last = q.claim_deliveries(10, MINUTE).unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!((last[0].id.clone(), last[0].attempt), (again[1].id.clone(), 3));
}

pub fn rerouted_jobs_wait_for_the_next_candidates_executor(q: &dyn JobQueue) {
    let mut s = spec("bfl:flux-pro-1.1", 0, 20);
    s.route = Some(easel_api::RoutePlan {
        candidates: vec![
            easel_api::RouteCandidate { provider: "bfl".into(), model: "flux-pro-1.1".into(), reason: "first".into() },
            easel_api::RouteCandidate { provider: "local".into(), model: "m".into(), reason: "fallback".into() },
        ],
        current: 0,
        failures: vec![],
        quality: None,
        style: None,
    });
    let j = q.enqueue(&s, None, None).unwrap().job;
    assert!(q.claim("w", &["m".into(), "bfl:flux-pro-1.1".into()], &[], 1, MINUTE).unwrap().is_empty(), "queued under @bfl");
    let got = q.claim("w", &["@bfl".into()], &[], 1, MINUTE).unwrap();
    assert_eq!(got[0].id, j.id);
    let lease = Lease::of(&got[0]);
    let next = got[0].spec.next_candidate("bfl: 503").unwrap();
    assert!(!q.reroute(&Lease { attempt: 9, ..lease.clone() }, &next).unwrap(), "only the holder reroutes");
    assert!(q.reroute(&lease, &next).unwrap());
    assert!(q.claim("w", &["@bfl".into()], &[], 1, MINUTE).unwrap().is_empty());
    let local = q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap();
    assert_eq!(local[0].id, j.id);
    assert_eq!(local[0].spec.model, "m");
    assert_eq!(local[0].spec.route.as_ref().unwrap().failures, ["bfl: 503"]);
    assert!(local[0].spec.next_candidate("x").is_none(), "the last candidate");
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
    let key = Some(Idempotency { key: "key", fingerprint: "f" });
    let a = q.enqueue(&spec("m", 0, 20), None, key).unwrap();
    let again = q.enqueue(&spec("m", 0, 20), None, key).unwrap();
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
    let got = q.claim("w", &["m".into()], &[], 1, Duration::from_millis(0)).unwrap();
    assert_eq!(got[0].attempts, 1);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(q.recover_expired().unwrap(), 1);
    // Transient failures count against max_attempts (3): the crash was attempt 1.
    let second = claim_one(q, MINUTE);
    assert_eq!(q.fail(&second, "oom", true).unwrap(), JobStatus::Queued);
    let third = claim_one(q, MINUTE);
    assert_eq!(third.attempt, 3);
    assert_eq!(q.fail(&third, "oom again", true).unwrap(), JobStatus::Failed, "out of attempts");
    let j = q.get(&j.id).unwrap().unwrap();
    assert_eq!(j.status, JobStatus::Failed);
    assert_eq!(j.error.as_deref(), Some("oom again"));
    // A job whose lease is renewed is not recovered.
    let k = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    let lease = claim_one(q, Duration::from_millis(0));
    assert!(q.heartbeat(std::slice::from_ref(&lease), MINUTE).unwrap().is_empty());
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(q.recover_expired().unwrap(), 0);
    assert_eq!(q.get(&k.id).unwrap().unwrap().status, JobStatus::Running);
}

pub fn complete_cancel_and_cache(q: &dyn JobQueue) {
    let s = spec("m", 0, 20);
    let j = q.enqueue(&s, Some("ck"), None).unwrap().job;
    assert!(q.cached("ck").unwrap().is_none(), "only succeeded jobs are cache hits");
    let lease = claim_one(q, MINUTE);
    assert!(q.complete(&lease, &result()).unwrap());
    assert!(!q.complete(&lease, &result()).unwrap(), "completes once");
    let done = q.get(&j.id).unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.result.unwrap().images[0].key, "k");
    assert_eq!(q.cached("ck").unwrap().unwrap().id, j.id);
    let c = q.enqueue(&s, None, None).unwrap().job;
    assert_eq!(q.cancel(&c.id).unwrap(), Some(JobStatus::Canceled));
    assert!(q.claim("w", &["m".into()], &[], 1, MINUTE).unwrap().is_empty(), "a canceled job never runs");
    let r = q.enqueue(&s, None, None).unwrap().job;
    let lease = claim_one(q, MINUTE);
    assert!(!q.cancel_requested(&r.id).unwrap());
    assert_eq!(q.cancel(&r.id).unwrap(), Some(JobStatus::Running));
    assert!(q.cancel_requested(&r.id).unwrap());
    q.mark_canceled(&lease).unwrap();
    assert_eq!(q.get(&r.id).unwrap().unwrap().status, JobStatus::Canceled);
    assert_eq!(q.cancel("job_nope").unwrap(), None);
    assert!(q.get("job_nope").unwrap().is_none());
}

pub fn failures_retry_then_fail(q: &dyn JobQueue) {
    let j = q.enqueue(&spec("m", 0, 20), None, None).unwrap().job;
    let lease = claim_one(q, MINUTE);
    assert_eq!(q.fail(&lease, "oom", true).unwrap(), JobStatus::Queued);
    let lease = claim_one(q, MINUTE);
    assert_eq!(q.fail(&lease, "bad weights", false).unwrap(), JobStatus::Failed);
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
    let info = |id: &str| ModelInfo { id: id.into(), default_steps: 20, default_guidance: 4.0, default_size: 64, max_side: 2048, size_multiple: 8, schedulers: vec![], default_scheduler: None, memory: None, closed: false, skippable_layers: None, cache_kind: None, default_cache: None, image_inputs: easel_api::ImageInputs::None, controlnet_family: None, ip_adapter_fit: None };
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
    let lease = claim_one(q, MINUTE);
    assert_eq!(lease.job_id, a.id);
    q.complete(&lease, &result()).unwrap();
    assert_eq!(q.active_for("alice").unwrap(), 1);
}

/// First half of a restart check: leaves one succeeded, one canceled and one running job.
pub fn persistence_before(q: &dyn JobQueue) -> [String; 3] {
    let s = spec("m", 0, 20);
    let j = q.enqueue(&s, Some("ck"), None).unwrap().job;
    let lease = claim_one(q, MINUTE);
    assert!(q.complete(&lease, &result()).unwrap());
    let mut hooked = s.clone();
    hooked.webhook_url = Some("http://hooks.example/x".into());
    let c = q.enqueue(&hooked, None, None).unwrap().job;
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
    let pending = q.claim_deliveries(10, MINUTE).unwrap();
    assert_eq!(pending.iter().map(|d| d.job_id.as_str()).collect::<Vec<_>>(), [canceled.as_str()], "a pending webhook survives the restart");
}
