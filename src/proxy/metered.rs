//! The origin's side of a byte relay (an opaque tunnel, an open WebSocket): bytes counted each
//! way and charged against the rule's byte limits, and the limits' account settled at close.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::activity::Activity;
use super::limit::ByteMeter;
use super::State;
use crate::audit::Record;

/// Bytes relayed each way and when they last moved, shared with the relay's idle watchdog.
pub struct Stats {
    /// Client → origin.
    pub out: AtomicU64,
    /// Origin → client.
    pub inn: AtomicU64,
    pub activity: Activity,
}

impl Stats {
    pub fn new(start: Instant) -> Self {
        Stats {
            out: AtomicU64::new(0),
            inn: AtomicU64::new(0),
            activity: Activity::new(start),
        }
    }

    /// Writes the counts into the relay's record.
    pub fn note(&self, rec: &mut Record) {
        rec.bytes_out = self.out.load(Ordering::Relaxed);
        rec.bytes_in = self.inn.load(Ordering::Relaxed);
    }
}

/// The origin's connection as the relay sees it: what is written to it went client→origin
/// (`bytes_out`), what is read from it origin→client (`bytes_in`). Once a byte limit is
/// overdrawn every read and write fails, which ends the relay.
pub struct Metered<'a, S> {
    inner: S,
    stats: &'a Stats,
    meter: Option<&'a mut ByteMeter>,
}

impl<'a, S> Metered<'a, S> {
    pub fn new(inner: S, stats: &'a Stats, meter: Option<&'a mut ByteMeter>) -> Self {
        Metered {
            inner,
            stats,
            meter,
        }
    }

    /// Charges `n` bytes; Err once a byte limit is overdrawn.
    fn charge(&mut self, n: usize) -> io::Result<()> {
        self.stats.activity.touch();
        if let Some(m) = &mut self.meter {
            m.add(n as u64);
            if m.over() {
                return Err(io::Error::other("byte limit exceeded"));
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            // A read that overdraws a limit is dropped, never relayed: not counted as relayed.
            this.charge(n)?;
            this.stats.inn.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            // Written is relayed, whether or not it overdrew a limit.
            this.stats.out.fetch_add(*n as u64, Ordering::Relaxed);
            this.charge(*n)?;
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Settles a closed relay's byte limits: flushes what the meter holds to the limit store and,
/// when a limit was overdrawn, counts it in `rate_limited`, marks the record `limit` and
/// returns why the relay was closed.
pub fn settle(meter: Option<&mut ByteMeter>, state: &State, rec: &mut Record) -> Option<String> {
    let m = meter?;
    let why = m.over().then(|| {
        let vendor = rec.vendor.as_deref().unwrap_or("none");
        let rule = rec.rule.as_deref().unwrap_or("default");
        state
            .metrics
            .rate_limited
            .with_label_values(&[vendor, rule])
            .inc();
        rec.action = "limit";
        format!(
            "byte_limit_exceeded: {}",
            m.tripped().as_deref().unwrap_or("bytes")
        )
    });
    m.flush();
    why
}
