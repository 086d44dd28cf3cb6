//! Peers that stall: a request body that stops arriving, a response body the origin stops
//! sending (`[proxy] body_timeout`, the longest gap between two chunks), and a client that stops
//! reading what we write (`[proxy] send_timeout`, the longest a write may wait). Slow heads are
//! `head_wait.rs`'s (hyper's inside intercepted tunnels); silent tunnels are `client_hello_timeout`
//! and `idle_timeout`.
//!
//! The timers are armed only while the stalled side is being waited on: a body that returned a
//! chunk the slow client has not yet taken is not "idle", and a write that completes disarms.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;

/// A deadline armed when a wait starts and disarmed when it ends.
pub struct IdleTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// The other direction's progress when the deadline was last set.
    other: u64,
}

impl IdleTimer {
    pub fn new(timeout: Duration) -> IdleTimer {
        IdleTimer {
            timeout,
            sleep: None,
            armed: false,
            other: 0,
        }
    }

    /// The wait goes on: arms the deadline if this is its start; true once it has passed.
    /// Registers `cx` to be woken at the deadline.
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> bool {
        self.waiting_beside(cx, 0)
    }

    /// As [`IdleTimer::waiting`], for one direction of an exchange whose other direction has
    /// made `other` progress so far: while that moves, the wait is not idle. A gRPC or
    /// WebSocket-like client that listens while the origin streams, or an origin that reads
    /// a long upload before it says more, is a live exchange. The other side's progress is
    /// looked at when this side is polled (at the latest when the deadline passes), so a
    /// stall is cut between one and two timeouts after the last movement either way.
    pub fn waiting_beside(&mut self, cx: &mut Context<'_>, other: u64) -> bool {
        if !self.armed || other != self.other {
            let deadline = Instant::now() + self.timeout;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
            self.other = other;
        }
        match &mut self.sleep {
            Some(s) => s.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }

    /// The wait ended (progress was made).
    pub fn progressed(&mut self) {
        self.armed = false;
    }
}

/// The error a request body yields when the client stops sending it; the upstream client
/// reports it as a user error, [`classify_hyper`] turns it back into [`ProxyError`].
#[derive(Debug, thiserror::Error)]
#[error("no request body bytes from the client for body_timeout")]
pub struct ClientBodyStalled;

/// What a `hyper::Error` from the upstream client means for the client, when it is not the
/// origin's fault or needs its own kind: a client body that was malformed or stalled, or a
/// response head over the size limit. `None`: look further down the error chain.
pub fn classify_hyper(h: &hyper::Error) -> Option<ProxyError> {
    use std::error::Error as _;
    if h.is_user() {
        let mut src = h.source();
        while let Some(s) = src {
            if s.is::<ClientBodyStalled>() {
                return Some(ProxyError::ClientBodyTimeout);
            }
            if is_reset(s) {
                return Some(ProxyError::ClientAborted);
            }
            src = s.source();
        }
        let cause = h.source().map_or_else(|| h.to_string(), |c| c.to_string());
        return Some(ProxyError::ClientBody(cause));
    }
    if h.is_parse_too_large() {
        return Some(ProxyError::ResponseHeadTooLarge);
    }
    None
}

/// The client reset its connection: it left, and no answer reaches it; a body it was sending
/// was cut, not malformed.
fn is_reset(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
        )
    })
}

/// What an error reading the client's request body means: the client left (a reset), or
/// sent a body that was malformed or cut.
pub fn client_body_error(e: &(dyn std::error::Error + 'static)) -> ProxyError {
    let mut at = Some(e);
    while let Some(s) = at {
        if is_reset(s) {
            return ProxyError::ClientAborted;
        }
        at = s.source();
    }
    ProxyError::ClientBody(e.to_string())
}

/// A client connection whose writes fail once one has waited `send_timeout` for the client to
/// read: hyper then closes the connection, dropping (and auditing) the response in flight and
/// releasing its upstream connection. Memory stays bounded meanwhile: hyper stops pulling the
/// origin's body while its write buffer is full.
pub struct SendTimeout<IO> {
    io: IO,
    timer: IdleTimer,
}

impl<IO> SendTimeout<IO> {
    pub fn new(io: IO, timeout: Duration) -> SendTimeout<IO> {
        SendTimeout {
            io,
            timer: IdleTimer::new(timeout),
        }
    }

    fn on_write<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => {
                if self.timer.waiting(cx) {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "send_timeout: the client stopped reading",
                    )))
                } else {
                    Poll::Pending
                }
            }
            ready => {
                self.timer.progressed();
                ready
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SendTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SendTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.on_write(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.on_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        this.on_write(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        let (a, _b) = tokio::io::duplex(1024);
        let mut w = SendTimeout::new(a, Duration::from_millis(100));
        let err = async {
            loop {
                w.write_all(&[0u8; 512]).await?;
            }
        };
        let r: io::Result<()> = tokio::time::timeout(Duration::from_secs(10), err)
            .await
            .expect("the write fails rather than waiting for ever");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn writes_that_progress_never_time_out() {
        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut n = 0;
            while n < 64 * 40 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                n += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
        });
        let mut w = SendTimeout::new(a, Duration::from_millis(100));
        // 40 slow reads of 64 bytes: far longer than the timeout in total, never idle that long.
        w.write_all(&[1u8; 64 * 40]).await.unwrap();
        reader.await.unwrap();
    }
}
