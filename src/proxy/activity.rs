//! When bytes last moved on a connection, and the idle timeout that watches it: shared by
//! spliced tunnels and intercepted ones. A timestamp store per I/O call instead of re-arming a
//! timer on every read and write.
//!
//! The timestamp is the kernel's coarse monotonic clock (one tick, 1–10 ms): an idle timeout is
//! minutes long, and a tunnel stamps twice per request it relays; the coarse clock is a load
//! from the vDSO page, where the precise one reads and scales the CPU's counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Activity {
    /// Coarse-clock milliseconds when bytes last moved.
    last_ms: AtomicU64,
}

/// Milliseconds on `CLOCK_MONOTONIC_COARSE`.
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write. The only errors are a bad pointer or a clock
    // the kernel lacks, and Linux has had this one since 2.6.32, so the result is not checked.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl Activity {
    /// Counted as active at `start`.
    pub fn new(start: Instant) -> Activity {
        let since = start.elapsed().as_millis() as u64;
        Activity {
            last_ms: AtomicU64::new(coarse_ms().saturating_sub(since)),
        }
    }

    pub fn touch(&self) {
        self.last_ms.store(coarse_ms(), Ordering::Relaxed);
    }

    /// Resolves once no bytes have moved for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let quiet = coarse_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed));
            let left = timeout.saturating_sub(Duration::from_millis(quiet));
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_counts_from_the_last_touch() {
        let a = Activity::new(Instant::now());
        let timeout = Duration::from_millis(300);
        let began = Instant::now();
        // Touched for 600 ms: not idle until 300 ms after the last touch.
        let touching = async {
            while began.elapsed() < Duration::from_millis(600) {
                a.touch();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = a.idle(timeout) => {}
            _ = touching => unreachable!(),
        }
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(850), "idle after {took:?}");
        assert!(took < Duration::from_secs(5), "idle after {took:?}");
    }

    #[tokio::test]
    async fn a_start_in_the_past_counts() {
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let a = Activity::new(start);
        let began = Instant::now();
        // 200 ms left of 1.2 s; counted from now it would be the whole 1.2 s.
        a.idle(Duration::from_millis(1200)).await;
        let took = began.elapsed();
        assert!(took < Duration::from_millis(1000), "idle after {took:?}");
    }
}
