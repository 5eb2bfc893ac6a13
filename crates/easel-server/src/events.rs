//! In-process job events, fanned out to SSE subscribers.

use easel_api::Event;
use tokio::sync::broadcast;

/// Publishes job events to every subscriber in this process.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0 }
    }
}

impl EventBus {
    pub fn publish(&self, e: Event) {
        // No subscribers is fine: events are a live view, the queue is the record.
        let _ = self.tx.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
