//! When bytes last moved on a connection, and the idle timeout that watches it: shared by
//! spliced tunnels and intercepted ones. A timestamp store per I/O call instead of re-arming a
//! timer on every read and write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Activity {
    start: Instant,
    /// Milliseconds since `start` when bytes last moved.
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new(start: Instant) -> Activity {
        Activity {
            start,
            last_ms: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once no bytes have moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            let deadline = self.start + Duration::from_millis(last) + timeout;
            tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
            if self.last_ms.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}
