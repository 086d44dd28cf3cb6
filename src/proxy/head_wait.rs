//! The header read timeout (`[proxy] header_read_timeout`: the slowloris guard, and how long
//! an idle keep-alive connection stays open), kept per connection instead of per request.
//!
//! hyper's own allocates, registers and cancels a timer for every request head: 1,400 of the
//! 33,100 user-space instructions a proxied request cost (`benches/instructions.sh`). Here a
//! request costs two counter updates and a clock read, and one timer per connection wakes
//! once per timeout to look. The rule is hyper's: a head must arrive within the timeout of
//! the connection opening or of the previous exchange ending; while an answer is being made
//! or sent, or the request's body is still arriving, no head is awaited (a stalled body or a
//! client that stops reading is `stall.rs`'s).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::client_socket::SocketNotes;

/// Requests whose answer hyper is not done with (low half) and answers ended so far (high
/// half), in one word so ending an answer is one update.
#[derive(Default)]
pub struct HeadWait(AtomicU64);

const ONE_BUSY: u64 = 1;
const ONE_ENDED: u64 = 1 << 32;

impl HeadWait {
    pub fn new() -> Arc<HeadWait> {
        Arc::default()
    }

    /// A head arrived: no head is awaited until the returned guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.0.fetch_add(ONE_BUSY, Ordering::Relaxed);
        Busy(self.clone())
    }
}

/// Held from a request's head until hyper is done with its answer, and by a request body
/// until it ends: an upload the origin answered early is still being read, as it was when
/// hyper's timer only started at the next head.
pub struct Busy(Arc<HeadWait>);

/// Another hold on the same connection (request extensions must be `Clone`).
impl Clone for Busy {
    fn clone(&self) -> Busy {
        self.0.busy()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0 .0.fetch_add(ONE_ENDED - ONE_BUSY, Ordering::Release);
    }
}

/// Resolves once the connection has waited `timeout` for a request head. Polled beside the
/// connection in its task, after it, so it sees an answer end in the same wake-up and starts
/// the wait then; a wake-up while an answer is in hand costs one load. Its timer is re-armed
/// only when it fires (once per timeout on a busy connection), never per request.
pub struct HeadTimer {
    wait: Arc<HeadWait>,
    socket: Arc<SocketNotes>,
    /// The socket's reads when the current wait began: more now means part of a head came.
    reads_at_wait: u64,
    timeout: Duration,
    /// The start of the current wait for a head.
    idle_since: Instant,
    /// `HeadWait`'s word when last looked at while idle.
    seen: u64,
    sleep: Pin<Box<Sleep>>,
    /// The sleep is registered with this task and wakes it at `sleep.deadline()`.
    armed: bool,
}

impl HeadTimer {
    pub fn new(wait: Arc<HeadWait>, timeout: Duration, socket: Arc<SocketNotes>) -> HeadTimer {
        let now = Instant::now();
        HeadTimer {
            wait,
            reads_at_wait: socket.reads(),
            socket,
            timeout,
            idle_since: now,
            seen: 0,
            sleep: Box::pin(tokio::time::sleep_until(now + timeout)),
            armed: false,
        }
    }

    /// Whether bytes arrived during the wait that timed out: a head begun and never finished,
    /// not a quiet keep-alive connection. (Bytes of a pipelined head that came with the end of
    /// the answer before it count as before the wait.)
    pub fn heard_part_of_a_head(&self) -> bool {
        self.socket.reads() != self.reads_at_wait
    }
}

impl Future for HeadTimer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let word = this.wait.0.load(Ordering::Acquire);
        let busy = word & (ONE_ENDED - 1) != 0;
        if busy && this.armed && !this.sleep.is_elapsed() {
            // An exchange in hand. Its end in this task is seen in the wake-up it happens in;
            // an upload that ends in the upstream client's task is seen when the timer next
            // fires, so that wait may last up to twice the timeout.
            return Poll::Pending;
        }
        let now = Instant::now();
        if !busy && word != this.seen {
            this.seen = word;
            this.idle_since = now;
            this.reads_at_wait = this.socket.reads();
        }
        if this.armed && now < this.sleep.deadline() {
            return Poll::Pending;
        }
        let due = match busy {
            // Nothing awaited yet: look again a timeout from now.
            true => now + this.timeout,
            false => this.idle_since + this.timeout,
        };
        if due <= now {
            return Poll::Ready(());
        }
        this.sleep.as_mut().reset(due);
        // Registers the wake-up; not yet due, so pending. Out of cooperative budget (the
        // connection, polled first, may have spent it) the sleep registers nothing and has the
        // task polled again instead: then it is not armed, and is polled again next time.
        this.armed = tokio::task::coop::has_budget_remaining();
        let _ = this.sleep.as_mut().poll(cx);
        Poll::Pending
    }
}

/// An answer's body, holding its request's [`Busy`] until hyper drops it (sent, or the
/// connection gone).
pub struct Held<B> {
    body: B,
    _busy: Busy,
}

impl<B> Held<B> {
    pub fn new(body: B, busy: Busy) -> Held<B> {
        Held { body, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_head_is_awaited_only_while_no_answer_is_in_hand() {
        let timeout = Duration::from_millis(300);
        let wait = HeadWait::new();
        let opened = Instant::now();
        // No head since the connection opened: cut at the timeout, not before.
        HeadTimer::new(wait.clone(), timeout, Arc::default()).await;
        let waited = opened.elapsed();
        assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");

        // An answer that takes twice the timeout is not a wait for a head. The timer is polled
        // by a task that wakes as a connection's would: every 50 ms while the answer is made.
        let started = Instant::now();
        let busy = Some(wait.busy());
        let cut = tokio::spawn(async move {
            let mut busy = busy;
            let mut timer = std::pin::pin!(HeadTimer::new(wait, timeout, Arc::default()));
            loop {
                tokio::select! {
                    biased;
                    _ = tokio::time::sleep(Duration::from_millis(50)), if busy.is_some() => {
                        if started.elapsed() >= timeout * 2 {
                            drop(busy.take());
                            return (started.elapsed(), timer.await, Instant::now());
                        }
                    }
                    () = &mut timer => panic!("cut while an answer was in hand"),
                }
            }
        });
        let (ended, (), at) = cut.await.unwrap();
        // Once it ends the wait starts again: cut a timeout later, not at once.
        let waited = at - (started + ended);
        assert!(waited >= timeout && waited < timeout * 5, "{waited:?}");
    }
}
