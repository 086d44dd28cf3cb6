//! Streaming bodies that count their bytes, and the pending audit record that is written when
//! the response body ends (or the client goes away) so `bytes_*` and `duration_ms` are true.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use super::head_wait::Busy;
use super::stall::{ClientBodyStalled, IdleTimer};
use super::State;
use crate::audit::Record;
use crate::error::ProxyError;

/// What the proxy answers with: a small generated body, or an origin's body streamed through.
pub type ProxyBody = Either<Full<Bytes>, Counted<OriginBody>>;

/// An origin's body: from hyper's client, or read by the request's task
/// ([`crate::upstream::direct`]).
pub type OriginBody = Either<Incoming, crate::upstream::direct::DirectBody>;

/// An audit record waiting for its body to end.
pub struct Pending {
    pub state: Arc<State>,
    pub record: Box<Record>,
    pub start: Instant,
    /// The request body's progress: the record is written once both bodies have ended.
    pub uploaded: Arc<Upload>,
    /// In-flight slots of `concurrent` limits, released when the exchange ends.
    pub permits: Vec<crate::limits::Permit>,
    /// The client's slot for a request inside an intercepted tunnel
    /// ([`super::State::inner_streams`]): held until the response has ended.
    pub stream_slot: Option<super::per_client::ClientSlot>,
    /// Byte limits charged as the response streams.
    pub meter: Option<super::limit::ByteMeter>,
    /// The plain-HTTP upstream connection, back to its pool once the body has ended.
    pub lease: Option<UpstreamHold>,
}

pub type UpstreamLease = crate::upstream::pool::Lease<Counted<RequestBody>>;

/// What an exchange holds of its upstream connection until the response body has ended.
pub enum UpstreamHold {
    /// A plain-HTTP connection, back to its pool once the body has ended as framed.
    Pooled(UpstreamLease),
    /// An intercepted tunnel's place on an origin that may speak only HTTP/1.1
    /// ([`super::tunnel_upstream`]), given to the next request queued for one.
    TunnelSlot(super::tunnel_upstream::ConnectionSlot),
}

impl UpstreamHold {
    /// The response body ended as framed: the connection may carry another exchange.
    pub fn release(self) {
        match self {
            UpstreamHold::Pooled(lease) => lease.release(),
            UpstreamHold::TunnelSlot(_) => {}
        }
    }
}

/// The upload of one exchange, shared by its request body (which counts and ends it) and its
/// response body. An origin may answer before it has read the whole upload (a 401 up front)
/// while the client goes on sending and the origin on reading: the exchange, its audit record
/// (`bytes_out`) and its `concurrent` slots last until both bodies have ended.
#[derive(Default)]
pub struct Upload {
    sent: AtomicU64,
    /// Response body bytes handed to the client's connection so far: the upload is not idle
    /// while they move.
    answered: AtomicU64,
    /// Per exchange, so never contended but by its own two bodies.
    state: Mutex<UploadState>,
}

#[derive(Default)]
struct UploadState {
    done: bool,
    /// When the upload ended: the origin's time to answer counts from then.
    ended_at: Option<Instant>,
    /// The record of a response that ended first, written when the upload ends.
    parked: Option<Box<Pending>>,
}

impl Upload {
    /// Request body bytes sent upstream so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The request body ended (or was dropped): a record waiting for it is written now.
    fn ended(&self) {
        let parked = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.done = true;
            s.ended_at = Some(Instant::now());
            s.parked.take()
        };
        if let Some(p) = parked {
            p.write();
        }
    }

    /// Resolves when the origin is late to answer: `timeout` after the upload ended, or after
    /// the last upload byte it took if it stopped taking them. An upload still moving is never
    /// cut by it (a 100 MB file over a slow link), and a client that stops sending is
    /// `body_timeout`'s. Wakes once per `timeout` while the upload goes on.
    pub async fn answer_late(&self, timeout: std::time::Duration) {
        let mut seen = self.sent();
        let mut deadline = tokio::time::Instant::now() + timeout;
        loop {
            tokio::time::sleep_until(deadline).await;
            let ended_at = self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ended_at;
            let now = tokio::time::Instant::now();
            match ended_at {
                Some(at) => {
                    let due = tokio::time::Instant::from_std(at) + timeout;
                    if due <= now {
                        return;
                    }
                    deadline = due;
                }
                None => {
                    let sent = self.sent();
                    if sent == seen {
                        // Not one byte of the upload went on for `timeout`.
                        return;
                    }
                    seen = sent;
                    deadline = now + timeout;
                }
            }
        }
    }

    /// Writes `p` now if the upload is over, or parks it until it is.
    fn after_upload(&self, p: Box<Pending>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.done {
            drop(s);
            p.write();
        } else {
            s.parked = Some(p);
        }
    }
}

impl Pending {
    /// The response has ended (or the client went away): write the record, once the upload
    /// has ended too.
    fn finish(mut self: Box<Self>, downloaded: u64) {
        if let Some(m) = &mut self.meter {
            m.flush();
        }
        self.record.bytes_in = downloaded;
        let upload = self.uploaded.clone();
        upload.after_upload(self);
    }

    fn write(self: Box<Self>) {
        let Pending {
            state,
            mut record,
            start,
            uploaded,
            ..
        } = *self;
        record.bytes_out = uploaded.sent();
        state.finish(record, start);
    }

    /// The origin's body failed or stalled mid-way: the record and the metric say which.
    fn upstream_failed(&mut self, e: &ProxyError) {
        self.state
            .metrics
            .upstream_errors
            .with_label_values(&[e.kind()])
            .inc();
        self.record.reason = format!("{}: {e}; response cut", e.kind()).into();
    }

    /// True (and the record says why) once a byte limit is overdrawn: the body is cut.
    fn over_limit(&mut self, n: u64) -> bool {
        let Some(m) = &mut self.meter else {
            return false;
        };
        m.add(n);
        if !m.over() {
            return false;
        }
        let limit = m.tripped().unwrap_or_else(|| "bytes".into());
        let vendor = self.record.vendor.as_deref().unwrap_or("none");
        let rule = self.record.rule.as_deref().unwrap_or("default");
        self.state
            .metrics
            .rate_limited
            .with_label_values(&[vendor, rule])
            .inc();
        self.record.action = "limit";
        self.record.reason = format!("byte_limit_exceeded: {limit}; response cut").into();
        true
    }
}

/// A body that counts its data bytes and, if it carries a [`Pending`] record, writes it at end
/// of stream or on drop, whichever comes first.
pub struct Counted<B> {
    inner: B,
    count: u64,
    /// Where a request body publishes its count for the response side to read.
    shared: Option<Arc<Upload>>,
    /// Boxed: a body moves several times on its way through hyper, and most of its size
    /// would otherwise be this record of the exchange.
    pending: Option<Box<Pending>>,
    /// `[proxy] body_timeout`: the longest wait for the next chunk.
    idle: Option<IdleTimer>,
    /// A request body keeps its client connection from awaiting the next head until it ends.
    busy: Option<Busy>,
    /// A response body's length as its head announced it (0 when it has none: HEAD, 204,
    /// 304, or an empty body; [`UNANNOUNCED`] when not known). Dropped at any other count
    /// before its end, the client did not get all of it. hyper drops a body unpolled once it
    /// has written the announced length, and an HTTP/2 origin's body does not say it ended
    /// until its END_STREAM arrives. (A sentinel, not an `Option`: the body moves several
    /// times per exchange.)
    whole: u64,
}

impl<B> Counted<B> {
    /// A request body whose count the response side reads.
    pub fn shared(inner: B, counter: Arc<Upload>) -> Counted<B> {
        Counted {
            inner,
            count: 0,
            shared: Some(counter),
            pending: None,
            idle: None,
            busy: None,
            whole: UNANNOUNCED,
        }
    }

    /// Holds `busy` until the body ends or is dropped (see [`Busy`]).
    pub fn holding(mut self, busy: Option<Busy>) -> Counted<B> {
        self.busy = busy;
        self
    }

    /// Fails the body once the next chunk has been awaited for `timeout`.
    pub fn idle_timeout(mut self, timeout: std::time::Duration) -> Counted<B> {
        self.idle = Some(IdleTimer::new(timeout));
        self
    }

    /// A response body that writes `pending` when it ends; `announced` is its length as the
    /// head says (`Some(0)` for an answer that has no body).
    /// The origin's body is cut once it stalls for `[proxy] body_timeout`.
    pub fn finishing(inner: B, pending: Pending, announced: Option<u64>) -> Counted<B>
    where
        B: Body,
    {
        let idle = IdleTimer::new(pending.state.settings.proxy.body_timeout);
        // An empty body is never polled: its drop is its end.
        let whole = match inner.is_end_stream() {
            true => 0,
            false => announced.unwrap_or(UNANNOUNCED),
        };
        Counted {
            inner,
            count: 0,
            shared: None,
            pending: Some(Box::new(pending)),
            idle: Some(idle),
            busy: None,
            whole,
        }
    }

    fn complete(&mut self) {
        self.busy = None;
        if let Some(p) = self.pending.take() {
            p.finish(self.count);
        }
        if let Some(u) = self.shared.take() {
            u.ended();
        }
    }

    /// The origin's body ended as framed: its connection can carry another exchange. (On
    /// any other ending the lease is dropped with the record, closing the connection.)
    fn ended(&mut self) {
        if let Some(lease) = self.pending.as_mut().and_then(|p| p.lease.take()) {
            lease.release();
        }
        self.complete();
    }
}

impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        let delivered = self.whole == self.count;
        if let Some(p) = self.pending.as_mut().filter(|_| !delivered) {
            // Not ended, failed or cut by us: hyper let go of it because the client went
            // away, stopped reading (`send_timeout`) or shutdown closed the connection. The
            // status stays what the client was sent; the reason says it did not get it all.
            p.record.reason =
                super::records::cut_reason(&p.state, "the response ended; response cut");
        }
        self.complete();
    }
}

/// [`Counted`]'s `whole` when the head announced no length.
const UNANNOUNCED: u64 = u64::MAX;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let res: Poll<Option<Result<Frame<Bytes>, BoxError>>> = Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map(|o| o.map(|r| r.map_err(Into::into)));
        if let Some(idle) = &mut this.idle {
            if res.is_pending() {
                // The exchange is idle only when neither direction moves.
                let other = match (&this.shared, &this.pending) {
                    (Some(upload), _) => upload.answered.load(Ordering::Relaxed),
                    (None, Some(p)) => p.uploaded.sent(),
                    (None, None) => 0,
                };
                if idle.waiting_beside(cx, other) {
                    // A stalled request body is the client's; a stalled response, the origin's.
                    return Poll::Ready(Some(Err(match this.pending.as_mut() {
                        Some(p) => {
                            p.upstream_failed(&ProxyError::UpstreamBodyTimeout);
                            this.complete();
                            "body_timeout".into()
                        }
                        None => Box::new(ClientBodyStalled),
                    })));
                }
            } else {
                idle.progressed();
            }
        }
        match &res {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    this.count += n;
                    if let Some(c) = &this.shared {
                        c.sent.fetch_add(n, Ordering::Relaxed);
                    }
                    if let Some(p) = &this.pending {
                        p.uploaded.answered.fetch_add(n, Ordering::Relaxed);
                    }
                    if this.pending.as_mut().is_some_and(|p| p.over_limit(n)) {
                        // This frame is replaced by the error: the client never gets it.
                        this.count -= n;
                        this.complete();
                        // An error frame makes hyper cut the response: the client sees a
                        // truncated body, as HTTP requires when a response cannot finish.
                        return Poll::Ready(Some(Err("byte limit exceeded".into())));
                    }
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(p) = this.pending.as_mut() {
                    p.upstream_failed(&ProxyError::UpstreamBody(e.to_string()));
                }
                this.complete();
            }
            Poll::Ready(None) => this.ended(),
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

/// A request body on its way upstream: what inspection held back (if anything), then the rest
/// of the client's body, streamed.
pub struct RequestBody {
    /// Boxed, and absent unless the body was inspected: the request moves through several
    /// futures on every exchange, and this is the rare case.
    held: Option<Box<HeldPrefix>>,
    rest: Option<Incoming>,
}

struct HeldPrefix {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    /// The held bytes' share of the inspection budget, given back once they are sent.
    _budget: Option<super::budget::Held>,
}

impl RequestBody {
    pub fn streamed(body: Incoming) -> RequestBody {
        RequestBody {
            held: None,
            rest: Some(body),
        }
    }

    /// `held` frames first, then `rest` (None when the body already ended).
    pub fn resumed(
        held: std::collections::VecDeque<Frame<Bytes>>,
        budget: Option<super::budget::Held>,
        rest: Option<Incoming>,
    ) -> RequestBody {
        let held = (!held.is_empty()).then(|| {
            Box::new(HeldPrefix {
                frames: held,
                _budget: budget,
            })
        });
        RequestBody { held, rest }
    }
}

/// How long, and how much, a dropped upload is still read: see `Drop for RequestBody`.
const DISCARD_FOR: std::time::Duration = std::time::Duration::from_secs(10);
const DISCARD_GAP: std::time::Duration = std::time::Duration::from_secs(2);
const DISCARD_MAX: usize = 256 << 20;

/// An upload let go of before its end (refused by a rule or a limit, or the origin stopped
/// taking it) is read on and thrown away, for [`DISCARD_FOR`] at most: the client, still
/// sending, gets to finish and read the answer. Dropped at once, it would cut the connection
/// (HTTP/1.1) or end the stream with `RST_STREAM` (HTTP/2), which curl, httpx and Java's
/// client report as an error in place of the 403.
impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(rest) = self.rest.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(discard(rest));
        }
    }
}

async fn discard(mut body: Incoming) {
    use http_body_util::BodyExt;
    let until = tokio::time::Instant::now() + DISCARD_FOR;
    let mut left = DISCARD_MAX;
    loop {
        let gap = (tokio::time::Instant::now() + DISCARD_GAP).min(until);
        match tokio::time::timeout_at(gap, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n >= left {
                    return;
                }
                left -= n;
            }
            _ => return,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(h) = &mut this.held {
            if let Some(f) = h.frames.pop_front() {
                if h.frames.is_empty() {
                    // Gives the budget share back.
                    this.held = None;
                }
                return Poll::Ready(Some(Ok(f)));
            }
        }
        match &mut this.rest {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let held: u64 = self
            .held
            .iter()
            .flat_map(|h| h.frames.iter())
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let mut hint = match &self.rest {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        };
        // Raise the upper bound first: SizeHint asserts lower <= upper at every step.
        if let Some(u) = hint.upper() {
            hint.set_upper(u + held);
        }
        hint.set_lower(hint.lower() + held);
        hint
    }
}
