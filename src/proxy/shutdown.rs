//! Graceful shutdown: a stop signal every long-lived task watches, and a tracker that says when
//! the last of them has finished (so the audit log is flushed only after the last record).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

pub struct Shutdown {
    /// Finish what is in flight, take nothing new.
    drain: watch::Sender<bool>,
    /// Close now.
    stop: watch::Sender<bool>,
    live: Arc<Live>,
}

#[derive(Default)]
struct Live {
    count: AtomicUsize,
    idle: Notify,
}

/// Held by a task while it runs.
pub struct Token(Arc<Live>);

impl Drop for Token {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            drain: watch::channel(false).0,
            stop: watch::channel(false).0,
            live: Arc::default(),
        }
    }
}

impl Shutdown {
    pub fn token(&self) -> Token {
        self.live.count.fetch_add(1, Ordering::AcqRel);
        Token(self.live.clone())
    }

    /// Resolves (via `wait_for(|s| *s)`) when tasks must stop now.
    pub fn signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Resolves (via `wait_for(|s| *s)`) when connections should finish their request and close.
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain.subscribe()
    }

    pub fn start_drain(&self) {
        self.drain.send_replace(true);
    }

    pub fn stop_now(&self) {
        self.stop.send_replace(true);
    }

    pub fn live(&self) -> usize {
        self.live.count.load(Ordering::Acquire)
    }

    /// Waits until no task holds a token.
    pub async fn idle(&self) {
        loop {
            let notified = self.live.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.live.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}
