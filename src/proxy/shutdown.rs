//! Graceful shutdown: a stop signal every long-lived task watches, and a tracker that says when
//! the last of them has finished (so the audit log is flushed only after the last record).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{watch, Notify};

/// Where the proxy is in its life. One watch for both steps: a connection task polls its
/// shutdown watcher every time it wakes, so one watcher per connection costs half of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// Close now.
    Stopping,
}

pub struct Shutdown {
    phase: watch::Sender<Phase>,
    /// The phase as a word, stored before the watch wakes anyone: see [`Signal::past`].
    now: Arc<AtomicU8>,
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
            now: Arc::new(AtomicU8::new(Phase::Serving as u8)),
            live: Arc::default(),
        }
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        // The watch's receivers see its sender gone as stopping; so must the word.
        self.now.store(Phase::Stopping as u8, Ordering::Release);
    }
}

/// A task's view of the proxy's phase.
pub struct Signal(watch::Receiver<Phase>, Arc<AtomicU8>);

impl Signal {
    /// The phase once it is past `seen` (a dropped sender counts as stopping).
    ///
    /// A connection task polls this every time it wakes, twice a request, and polling the
    /// watch takes the lock of its waiter list each time. So the watch is polled once, which
    /// registers the task's waker, and again only once the phase word has moved since.
    pub fn past(&mut self, seen: Phase) -> impl Future<Output = Phase> + '_ {
        let Signal(rx, now) = self;
        let changed = async move {
            match rx.wait_for(|p| *p > seen).await {
                Ok(p) => *p,
                Err(_) => Phase::Stopping,
            }
        };
        Gated {
            changed,
            now,
            registered_at: None,
        }
    }

    /// Resolves when tasks must stop now.
    pub async fn stopping(&mut self) {
        self.past(Phase::Draining).await;
    }
}

pin_project_lite::pin_project! {
    /// [`Signal::past`]'s future: polls the watch only when the phase word says it moved.
    struct Gated<'a, F> {
        #[pin]
        changed: F,
        now: &'a AtomicU8,
        // The word when the watch last took this task's waker.
        registered_at: Option<u8>,
    }
}

impl<F: Future<Output = Phase>> Future for Gated<'_, F> {
    type Output = Phase;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Phase> {
        let this = self.project();
        // Once polled, the watch holds this task's waker (a task's waker does not change) and
        // wakes it when the phase moves, after the word is stored. That wake-up uses the
        // registration up: a move that is not yet past `seen` (draining, for `stopping()`)
        // must poll the watch again, or the next move would wake nobody.
        let now = this.now.load(Ordering::Acquire);
        if *this.registered_at == Some(now) {
            return Poll::Pending;
        }
        // Out of cooperative budget the watch registers nothing (and has the task polled
        // again): only a poll with budget left counts.
        *this.registered_at = tokio::task::coop::has_budget_remaining().then_some(now);
        this.changed.poll(cx)
    }
}

impl Shutdown {
    pub fn token(&self) -> Token {
        self.live.count.fetch_add(1, Ordering::AcqRel);
        Token(self.live.clone())
    }

    pub fn signal(&self) -> Signal {
        Signal(self.phase.subscribe(), self.now.clone())
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub fn start_drain(&self) {
        self.phase.send_if_modified(|p| {
            let was = *p;
            *p = was.max(Phase::Draining);
            // Inside the closure: stored before the watch wakes its receivers; the greater
            // phase wins should `stop_now` run meanwhile.
            self.now.fetch_max(*p as u8, Ordering::Release);
            *p != was
        });
    }

    pub fn stop_now(&self) {
        self.now.fetch_max(Phase::Stopping as u8, Ordering::Release);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A task that wakes for other reasons in between (as a connection does on every read)
    /// still sees each phase once it moves, and a dropped `Shutdown` counts as stopping.
    #[tokio::test]
    async fn a_signal_sees_every_move_however_often_its_task_wakes() {
        let shutdown = Shutdown::default();
        let mut signal = shutdown.signal();
        let watcher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut seen = vec![Phase::Serving];
            let mut ticks = 0u32;
            while *seen.last().expect("a phase") != Phase::Stopping {
                // One future across the ticks, as a connection task keeps its own.
                let past = signal.past(*seen.last().expect("a phase"));
                tokio::pin!(past);
                loop {
                    tokio::select! {
                        _ = tick.tick() => ticks += 1,
                        p = &mut past => {
                            seen.push(p);
                            break;
                        }
                    }
                }
            }
            (seen, ticks)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.start_drain();
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.stop_now();
        let (seen, ticks) = tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the signal saw the phase move")
            .unwrap();
        assert_eq!(seen, [Phase::Serving, Phase::Draining, Phase::Stopping]);
        assert!(ticks > 2, "the task woke for its ticks too ({ticks})");

        // Waiting for stopping from the start, with nothing else to wake the task: draining
        // wakes it first, and stopping must still reach it (a silent tunnel's watcher).
        let shutdown = Shutdown::default();
        let mut signal = shutdown.signal();
        let watcher = tokio::spawn(async move { signal.stopping().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        shutdown.start_drain();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!watcher.is_finished(), "draining is not stopping");
        shutdown.stop_now();
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("stopping reached a task that draining woke first")
            .unwrap();

        let shutdown = Shutdown::default();
        let mut signal = shutdown.signal();
        let watcher = tokio::spawn(async move { signal.past(Phase::Serving).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(shutdown);
        let last = tokio::time::timeout(Duration::from_secs(5), watcher).await;
        assert_eq!(
            last.expect("the signal saw the drop").unwrap(),
            Phase::Stopping
        );
    }
}
