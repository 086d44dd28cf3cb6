//! Streaming bodies that count their bytes, and the pending audit record that is written when
//! the response body ends (or the client goes away) so `bytes_*` and `duration_ms` are true.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::State;
use crate::audit::Record;

/// What the proxy answers with: a small generated body, or an origin's body streamed through.
pub type ProxyBody = Either<Full<Bytes>, Counted<Incoming>>;

/// An audit record waiting for its body to end.
pub struct Pending {
    pub state: Arc<State>,
    pub record: Record,
    pub start: Instant,
    /// Request body bytes sent upstream, counted by the request body's own [`Counted`].
    pub uploaded: Arc<AtomicU64>,
}

impl Pending {
    fn finish(mut self, downloaded: u64) {
        self.record.bytes_out = self.uploaded.load(Ordering::Relaxed);
        self.record.bytes_in = downloaded;
        self.state.finish(self.record, self.start);
    }
}

/// A body that counts its data bytes and, if it carries a [`Pending`] record, writes it at end
/// of stream or on drop, whichever comes first.
pub struct Counted<B> {
    inner: B,
    count: u64,
    /// Where a request body publishes its count for the response side to read.
    shared: Option<Arc<AtomicU64>>,
    pending: Option<Pending>,
}

impl<B> Counted<B> {
    /// A request body whose count the response side reads.
    pub fn shared(inner: B, counter: Arc<AtomicU64>) -> Counted<B> {
        Counted {
            inner,
            count: 0,
            shared: Some(counter),
            pending: None,
        }
    }

    /// A response body that writes `pending` when it ends.
    pub fn finishing(inner: B, pending: Pending) -> Counted<B> {
        Counted {
            inner,
            count: 0,
            shared: None,
            pending: Some(pending),
        }
    }

    fn complete(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.count);
        }
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        self.complete();
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.count += d.len() as u64;
                    if let Some(c) = &this.shared {
                        c.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                if this.inner.is_end_stream() {
                    this.complete();
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.complete(),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
