//! Graceful shutdown: a stop signal every long-lived task watches, and a tracker that says when
//! the last of them has finished (so the audit log is flushed only after the last record).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{watch, Notify};

/// Where the proxy is in its life. One watch for both steps: a connection task polls its
/// shutdown watcher every time it wakes, so one watcher per connection costs half of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// Close now.
    Stopping,
}

pub struct Shutdown {
    phase: watch::Sender<Phase>,
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
            phase: watch::channel(Phase::Serving).0,
            live: Arc::default(),
        }
    }
}

/// A task's view of the proxy's phase.
pub struct Signal(watch::Receiver<Phase>);

impl Signal {
    /// The phase once it is past `seen` (a dropped sender counts as stopping).
    pub async fn past(&mut self, seen: Phase) -> Phase {
        match self.0.wait_for(|p| *p > seen).await {
            Ok(p) => *p,
            Err(_) => Phase::Stopping,
        }
    }

    /// Resolves when tasks must stop now.
    pub async fn stopping(&mut self) {
        self.past(Phase::Draining).await;
    }
}

impl Shutdown {
    pub fn token(&self) -> Token {
        self.live.count.fetch_add(1, Ordering::AcqRel);
        Token(self.live.clone())
    }

    pub fn signal(&self) -> Signal {
        Signal(self.phase.subscribe())
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn start_drain(&self) {
        self.phase.send_if_modified(|p| {
            let was = *p;
            *p = was.max(Phase::Draining);
            *p != was
        });
    }

    pub fn stop_now(&self) {
        self.phase.send_replace(Phase::Stopping);
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
