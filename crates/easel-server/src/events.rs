//! Job events, fanned out to SSE subscribers in this process, and relayed through Redis when
//! the queue is shared, so any API node can stream any job's events.

use std::sync::Arc;

use easel_api::{Event, Job, JobStatus};
use easel_queue::RedisQueue;
use tokio::sync::broadcast;

/// Publishes job events to every subscriber in this process (and, with a relay, in others).
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    relay: Option<(Arc<RedisQueue>, Arc<str>)>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0, relay: None }
    }
}

impl EventBus {
    /// A bus whose events also travel through `redis`: it starts a thread that delivers other
    /// processes' events to this process's subscribers.
    pub fn relayed(redis: Arc<RedisQueue>) -> Self {
        let origin: Arc<str> = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()).into();
        let bus = Self { tx: broadcast::channel(4096).0, relay: Some((redis.clone(), origin.clone())) };
        let tx = bus.tx.clone();
        let spawned = std::thread::Builder::new().name("easel-events".into()).spawn(move || {
            redis.follow_events(&mut |event| {
                if let Some((from, e)) = event {
                    if from != &*origin {
                        let _ = tx.send(e);
                    }
                }
                true
            })
        });
        if let Err(e) = spawned {
            tracing::error!("starting the event relay: {e}");
        }
        bus
    }

    pub fn publish(&self, e: Event) {
        if let Some((redis, origin)) = &self.relay {
            if let Err(err) = redis.publish_event(origin, &e) {
                tracing::warn!("relaying event: {err}");
            }
        }
        // No subscribers is fine: events are a live view, the queue is the record.
        let _ = self.tx.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

/// The event that ends a job's stream (and its webhook body), or None while it runs.
pub fn final_event(job: &Job, urls: &crate::image_urls::ImageUrls) -> Option<Event> {
    let id = job.id.clone();
    match job.status {
        JobStatus::Succeeded => Some(Event::Completed {
            job_id: id,
            urls: job.result.as_ref().map(|r| r.images.iter().map(|i| urls.path(&i.key)).collect()).unwrap_or_default(),
        }),
        JobStatus::Failed => Some(Event::Failed { job_id: id, reason: job.error.clone().unwrap_or_default() }),
        JobStatus::Canceled => Some(Event::Canceled { job_id: id }),
        _ => None,
    }
}
