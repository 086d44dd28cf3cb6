//! A future that is polled only after something it waits on woke it.
//!
//! `tokio::select!` polls every branch on every wake-up of its task. A tunnel's task wakes twice
//! per request it relays, and beside the copy it selects on watchers that almost never fire
//! (the idle timer, shutdown, a policy reload): polling them each time cost about an eighth of
//! what relaying a request costs. Wrapped in [`OnWake`], the watchers get a waker of their own
//! that marks them woken before waking the task, and are skipped while unmarked.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pub struct OnWake<F> {
    inner: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
    /// The flag as a waker, made once: cloning it for each poll would be an atomic add.
    waker: Waker,
}

/// A waker that notes it was used before it wakes the task: lets one task that waits on
/// several things tell which of them is ready.
pub struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl WakeFlag {
    /// Starts woken: whatever it stands for is polled the first time, to register.
    pub fn new() -> Arc<WakeFlag> {
        Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }

    /// Whether it was woken since the last call; to be called after [`WakeFlag::register`], so
    /// a wake in between is not lost.
    pub fn take(&self) -> bool {
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// The task to wake.
    pub fn register(&self, task: &Waker) {
        self.task.register(task);
    }
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> OnWake<F> {
    pub fn new(inner: F) -> OnWake<F> {
        let flag = WakeFlag::new();
        OnWake {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.flag.register(cx.waker());
        if !self.flag.take() {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; ready once `open` is set, and wakes whoever polled it then.
    struct Door {
        polls: Arc<AtomicUsize>,
        open: Arc<AtomicBool>,
        waiter: Arc<AtomicWaker>,
    }

    impl Future for Door {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.waiter.register(cx.waker());
            match self.open.load(Ordering::Acquire) {
                true => Poll::Ready(()),
                false => Poll::Pending,
            }
        }
    }

    #[tokio::test]
    async fn the_inner_future_is_polled_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicBool::new(false));
        let waiter = Arc::new(AtomicWaker::new());
        let door = OnWake::new(Door {
            polls: polls.clone(),
            open: open.clone(),
            waiter: waiter.clone(),
        });
        tokio::pin!(door);
        // The task wakes a hundred times for another reason (a busy copy beside it).
        let mut ticks = tokio::time::interval(Duration::from_millis(1));
        for _ in 0..100 {
            tokio::select! {
                _ = &mut door => panic!("the door is shut"),
                _ = ticks.tick() => {}
            }
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once, to register");

        let opener = {
            let (open, waiter) = (open.clone(), waiter.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                open.store(true, Ordering::Release);
                waiter.wake();
            })
        };
        tokio::time::timeout(Duration::from_secs(5), &mut door)
            .await
            .expect("its own wake reaches it");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        opener.await.unwrap();
    }
}
