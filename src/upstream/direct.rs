//! Requests without a body to plain-`http` origins, exchanged by the request's own task.
//!
//! hyper's client runs every connection as a task of its own: the request crosses to it over a
//! channel, the response head comes back over a oneshot and each body chunk over another
//! channel, and each crossing wakes a task. On the harness's 128-byte exchange that machinery
//! was a third of the proxy's instructions. A request without a body has nothing to stream
//! while the answer comes back, so here the handler's task writes the head and reads the answer
//! itself: [`httparse`] (hyper's own parser) for the head, and a [`DirectBody`] that reads the
//! body as its framing says and puts the connection back in the pool when it ends. Requests
//! with a body keep hyper's connection ([`super::pool`]), which reads an early answer (a 401, a
//! 413) while the upload goes on.
//!
//! What the response must be to pass is hyper's client's rule: the same parser settings and
//! limits, 1xx answers skipped, framing as RFC 9112 §6.3 orders it, and a connection kept only
//! if the answer was framed and did not ask for a close.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::idle::{IdleSet, Reusable};
use super::Upstream;
use crate::error::ProxyError;
use crate::policy::target::Host;

/// hyper's client limits, kept so both upstream paths accept the same answers: at most 100
/// header fields, and a head that fits its read buffer's ceiling (8 KiB + 100 × 4 KiB).
const MAX_HEADERS: usize = 100;
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Read sizes: a whole small answer in one `recv`; doubled while reads fill them, up to what
/// a loopback or LAN socket hands over at once, so a large body takes few system calls.
const READ_CHUNK: usize = 8192;
const MAX_READ_CHUNK: usize = 128 * 1024;
/// A chunk-size line (size, extensions) longer than this is an attack, not an answer.
const MAX_CHUNK_LINE: usize = 4096;
/// Trailer section bytes read (and dropped) before the answer counts as malformed.
const MAX_TRAILERS: usize = 16 * 1024;
/// A fresh connection's timer, until an exchange sets it (a year: never, in practice).
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct DirectPool {
    idle: IdleSet<Conn>,
    upstream: Arc<Upstream>,
}

/// A keep-alive connection to an origin and what was read from it past the last answer.
pub struct Conn {
    io: TcpStream,
    buf: BytesMut,
    /// The next body read's size (see [`MAX_READ_CHUNK`]).
    read_size: usize,
    /// Wakes an exchange whose answer is late (see [`Conn::late`]).
    timer: Pin<Box<Sleep>>,
}

impl Conn {
    fn new(io: TcpStream, buf: BytesMut) -> Conn {
        Conn {
            io,
            buf,
            read_size: READ_CHUNK,
            timer: Box::pin(tokio::time::sleep(FAR)),
        }
    }

    /// Ready once `deadline` has passed; else pending, with this task woken by then.
    ///
    /// The timer lasts with the connection and is re-armed only when it fires early: a new
    /// one for each request (`tokio::time::timeout`) cost 750 instructions of a request's
    /// 31,000 to make, register and cancel. Each exchange's deadline is later than the last
    /// one's, so the timer, armed for an earlier exchange, fires at most once per timeout
    /// before the one that counts, and is then set to it.
    fn late(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.timer.deadline() > deadline {
            self.timer.as_mut().reset(deadline);
        }
        // Polled even while armed: that registers this task, as the connection moves between
        // clients' tasks.
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.timer.deadline() >= deadline {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    /// Reads more into the buffer: the count read, 0 at end of stream. The read size follows
    /// the answers (see [`MAX_READ_CHUNK`]) and lasts with the connection, as the buffer does.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(self.read_size);
        let room = self.buf.capacity() - self.buf.len();
        // Polled once and dropped: the wake-up is registered with the socket, not the future.
        let read = tokio::io::AsyncReadExt::read_buf(&mut self.io, &mut self.buf);
        let n = ready!(std::pin::pin!(read).poll(cx))?;
        self.read_size = match n {
            n if n >= room => (self.read_size * 2).min(MAX_READ_CHUNK),
            n if n < self.read_size / 4 => (self.read_size / 2).max(READ_CHUNK),
            _ => self.read_size,
        };
        Poll::Ready(Ok(n))
    }
}

impl Reusable for Conn {
    fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        // The reactor's readiness, no system call: reads that drained the socket cleared it,
        // so "readable" now means the origin closed it or sent something unasked. Confirm with
        // one non-blocking read, as readiness can also be left over from a full read.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

/// What [`DirectPool::send`] reports besides the answer: whether it failed on a connection
/// the origin had closed before our request reached it.
enum Failed {
    /// Nothing came back on a reused connection: the origin closed it as we picked it.
    Stale(ProxyError),
    Other(ProxyError),
}

impl DirectPool {
    /// A pool, and the task that closes connections left idle too long (it ends with the pool).
    pub fn new(upstream: Arc<Upstream>, idle_timeout: Duration, max_idle: usize) -> Arc<Self> {
        let pool = Arc::new(DirectPool {
            idle: IdleSet::new(idle_timeout, max_idle),
            upstream,
        });
        IdleSet::sweep_while(&pool, |p: &DirectPool| &p.idle);
        pool
    }

    /// Sends the head of a request without a body (`parts`: origin-form URI, `Host` set) to
    /// `host:port` (`key` is its authority) and returns the answer, its body streaming from the
    /// connection; [`ProxyError::ResponseTimeout`] once `timeout` passes without its head.
    pub async fn send(
        self: &Arc<Self>,
        key: String,
        host: &Host,
        port: u16,
        parts: &request::Parts,
        timeout: Duration,
    ) -> Result<Response<DirectBody>, ProxyError> {
        let deadline = Instant::now() + timeout;
        let head = encode(parts);
        let is_head = parts.method == Method::HEAD;
        loop {
            let (conn, reused) = match self.idle.checkout(&key) {
                Some(c) => (c, true),
                // Boxed: the connect future is large and rare; the send future moves per request.
                None => match Box::pin(tokio::time::timeout_at(deadline, self.connect(host, port)))
                    .await
                {
                    Ok(c) => (c?, false),
                    Err(_) => return Err(ProxyError::ResponseTimeout),
                },
            };
            match exchange(conn, &head, is_head, deadline).await {
                Ok((parts, conn, framing, keep_alive)) => {
                    let mut body = DirectBody {
                        conn: Some(conn),
                        framing,
                        keep_alive,
                        home: Some((Arc::downgrade(self), key)),
                    };
                    if body.is_end_stream() {
                        // hyper never polls a body that has ended (HEAD, 204, 304, length 0):
                        // the connection goes back now.
                        body.done();
                    }
                    return Ok(Response::from_parts(parts, body));
                }
                // Another connection may carry it, if a repeat cannot do harm (RFC 9110
                // §9.2.2); a fresh connection that fails is the origin's answer.
                Err(Failed::Stale(e)) if !(reused && parts.method.is_idempotent()) => {
                    return Err(e)
                }
                Err(Failed::Stale(_)) => continue,
                Err(Failed::Other(e)) => return Err(e),
            }
        }
    }

    async fn connect(&self, host: &Host, port: u16) -> Result<Conn, ProxyError> {
        let (io, _) = self.upstream.connect(host, port).await?;
        Ok(Conn::new(io, BytesMut::new()))
    }
}

/// The request head as HTTP/1.1 puts it on the wire. A request without a body has no framing
/// fields but a `Content-Length` the client sent (`0`).
fn encode(parts: &request::Parts) -> Vec<u8> {
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(64 + pq.len() + parts.headers.len() * 32);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    if !pq.starts_with('/') {
        // `http://host?q`: an empty path is `/` on the wire (RFC 9112 §3.2.1), as it was
        // decided and logged.
        out.push(b'/');
    }
    out.extend_from_slice(pq.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

type Answer = (http::response::Parts, Conn, Framing, bool);

/// Writes `head` and reads the answer's head (past any 1xx).
async fn exchange(
    mut conn: Conn,
    head: &[u8],
    is_head: bool,
    deadline: Instant,
) -> Result<Answer, Failed> {
    let late = || Failed::Other(ProxyError::ResponseTimeout);
    let mut written = 0;
    std::future::poll_fn(|cx| {
        while written < head.len() {
            match Pin::new(&mut conn.io).poll_write(cx, &head[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                Poll::Ready(r) => {
                    let e = r.err().unwrap_or_else(|| io::ErrorKind::WriteZero.into());
                    let e = ProxyError::Upstream(format!("writing the request: {e}"));
                    return Poll::Ready(Err(Failed::Stale(e)));
                }
                Poll::Pending => return conn.late(cx, deadline).map(|()| Err(late())),
            }
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            if let Some((parts, framing, keep_alive)) =
                parse_head(&mut conn.buf, is_head).map_err(Failed::Other)?
            {
                return Ok((parts, conn, framing, keep_alive));
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(Failed::Other(ProxyError::ResponseHeadTooLarge));
            }
        }
        let read = std::future::poll_fn(|cx| match conn.fill(cx) {
            Poll::Pending => conn.late(cx, deadline).map(|()| Err(late())),
            Poll::Ready(r) => Poll::Ready(Ok(r)),
        });
        let closed = match read.await? {
            Ok(0) => None,
            Ok(_) => {
                got_any = true;
                continue;
            }
            Err(e) => Some(e),
        };
        let e = ProxyError::Upstream(match closed {
            None => "connection closed before message completed".into(),
            Some(e) => format!("reading the response: {e}"),
        });
        return Err(match got_any {
            false => Failed::Stale(e),
            true => Failed::Other(e),
        });
    }
}

/// One response head off the front of `buf`: `None` until it is all there. 1xx heads are
/// dropped on the way, as hyper's client drops them; a 101 is returned (the handler refuses
/// it).
fn parse_head(
    buf: &mut BytesMut,
    is_head: bool,
) -> Result<Option<(http::response::Parts, Framing, bool)>, ProxyError> {
    loop {
        // Left uninitialised: httparse writes the fields it finds, and filling a hundred
        // empty ones first was most of what a head with eight fields cost here.
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            buf,
            &mut fields,
        );
        let len = match parsed {
            // A head read in one go can overshoot the ceiling the partial reads are held to:
            // the limit is on the head, however its bytes arrived.
            Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => {
                return Err(ProxyError::ResponseHeadTooLarge)
            }
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(ProxyError::ResponseHeadTooLarge),
            Err(e) => return Err(ProxyError::Upstream(format!("invalid response head: {e}"))),
        };
        let code = res.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ProxyError::Upstream(format!("invalid status code {code}")))?;
        let version = match res.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };
        let reason = res.reason.filter(|r| Some(*r) != status.canonical_reason());
        let reason = reason.map(|r| Bytes::copy_from_slice(r.as_bytes()));
        // Where each field lies in the head, so the values can share its bytes once frozen.
        let base = buf.as_ptr() as usize;
        let mut at = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let n = res.headers.len();
        for (slot, f) in at.iter_mut().zip(res.headers.iter()) {
            let name = f.name.as_ptr() as usize - base;
            let value = f.value.as_ptr() as usize - base;
            *slot = (
                name as u32,
                (name + f.name.len()) as u32,
                value as u32,
                (value + f.value.len()) as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        if (100..200).contains(&code) && code != 101 {
            continue;
        }
        let mut headers = HeaderMap::with_capacity(n);
        let mut facts = Facts {
            keep_alive: version == Version::HTTP_11,
            http10: version == Version::HTTP_10,
            ..Facts::default()
        };
        for &(ns, ne, vs, ve) in &at[..n] {
            let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
                .map_err(|_| ProxyError::Upstream("invalid response header name".into()))?;
            // SAFETY: httparse accepted these bytes as a field value: HTAB, SP, VCHAR and
            // obs-text, which is exactly what `HeaderValue` allows (hyper relies on the same).
            let value = unsafe {
                HeaderValue::from_maybe_shared_unchecked(head.slice(vs as usize..ve as usize))
            };
            facts.note(&name, &value);
            headers.append(name, value);
        }
        let (framing, framed) = facts.framing(status, is_head)?;
        if facts.chunked.is_some() {
            // Beside Transfer-Encoding a length means nothing (RFC 9112 §6.3), and passed on
            // it would frame the decoded body wrongly for the client.
            headers.remove(header::CONTENT_LENGTH);
        }
        let keep_alive = framed && facts.keep_alive;
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        if let Some(r) = reason {
            if let Ok(r) = hyper::ext::ReasonPhrase::try_from(r) {
                parts.extensions.insert(r);
            }
        }
        return Ok(Some((parts, framing, keep_alive)));
    }
}

/// What the framing fields of an answer say, gathered as its head is read.
#[derive(Default)]
struct Facts {
    /// `Some(final coding is chunked)` once a `Transfer-Encoding` is seen.
    chunked: Option<bool>,
    length: Option<u64>,
    /// A `Content-Length` that is not one number: an error only if it would frame the body.
    length_invalid: bool,
    keep_alive: bool,
    close: bool,
    http10: bool,
}

impl Facts {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == header::CONTENT_LENGTH {
            // A list (`5, 5`) or repeated fields are one length only if they all agree.
            for item in value.as_bytes().split(|&b| b == b',') {
                let item = item.trim_ascii();
                let n = match !item.is_empty() && item.iter().all(u8::is_ascii_digit) {
                    true => std::str::from_utf8(item).ok().and_then(|s| s.parse().ok()),
                    false => None,
                };
                match (n, self.length) {
                    (Some(n), None) => self.length = Some(n),
                    (Some(n), Some(l)) if n == l => {}
                    _ => self.length_invalid = true,
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last field's last coding is the one that frames the body (empty list
            // items, as in `chunked, `, count for nothing: RFC 9110 §5.6.1).
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .find(|c| !c.is_empty());
            match last {
                Some(c) => self.chunked = Some(c.eq_ignore_ascii_case(b"chunked")),
                None => _ = self.chunked.get_or_insert(false),
            }
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                }
            }
        }
        if self.close {
            self.keep_alive = false;
        }
    }

    /// How the answer's body ends (RFC 9112 §6.3), and whether that leaves the connection
    /// usable.
    fn framing(&self, status: StatusCode, is_head: bool) -> Result<(Framing, bool), ProxyError> {
        // Before the bodiless cases: a 101 to a HEAD is still a connection that left HTTP.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Ok((Framing::Length(0), false));
        }
        if is_head || matches!(status.as_u16(), 204 | 304) {
            return Ok((Framing::Length(0), true));
        }
        if self.chunked.is_some() && self.http10 {
            return Err(ProxyError::Upstream(
                "Transfer-Encoding in an HTTP/1.0 response".into(),
            ));
        }
        Ok(match (self.chunked, self.length) {
            // A length beside chunked is ignored (RFC 9112 §6.3), but an origin that sends
            // both may be read differently by another hop: its connection is not reused.
            (Some(true), _) => (
                Framing::Chunked(Chunked::Size(0, 0)),
                self.length.is_none() && !self.length_invalid,
            ),
            (Some(false), _) => (Framing::UntilClose, false),
            (None, _) if self.length_invalid => {
                return Err(ProxyError::Upstream("invalid Content-Length".into()))
            }
            (None, Some(n)) => (Framing::Length(n), true),
            (None, None) => (Framing::UntilClose, false),
        })
    }
}

/// How the rest of the body is delimited.
enum Framing {
    /// Bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the origin closes (no length, or a transfer coding other than chunked).
    UntilClose,
    Done,
}

/// Where the chunked decoder is.
#[derive(Clone, Copy)]
enum Chunked {
    /// Reading a chunk-size line: the size so far and the line's length so far.
    Size(u64, usize),
    /// Chunk data still to come.
    Data(u64),
    /// The CRLF after a chunk's data: how many of its two bytes have been read.
    DataEnd(u8),
    /// The trailer section: its bytes so far, and whether the current line is empty so far.
    Trailers(usize, bool),
}

/// An origin's answer body, read straight off its connection.
pub struct DirectBody {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    /// Where the connection goes back when the body ends as framed.
    home: Option<(Weak<DirectPool>, String)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BodyError(&'static str);

impl DirectBody {
    /// The body ended as framed: the connection may carry the next exchange.
    fn done(&mut self) {
        self.framing = Framing::Done;
        let (Some(conn), Some((pool, key))) = (self.conn.take(), self.home.take()) else {
            return;
        };
        if self.keep_alive && conn.buf.is_empty() {
            if let Some(pool) = pool.upgrade() {
                let mut conn = conn;
                if conn.buf.capacity() > 2 * READ_CHUNK {
                    // Idle, a connection keeps its read size but not a large body's buffer:
                    // a thousand idle connections would otherwise hold 128 MiB.
                    conn.buf = BytesMut::new();
                }
                pool.idle.put(key, conn);
            }
        }
    }

    /// Reads more of the connection into its buffer: the count read, 0 at end of stream.
    fn fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        match self.conn.as_mut() {
            Some(conn) => conn.fill(cx),
            None => Poll::Ready(Ok(0)),
        }
    }

    /// The next step of the chunked decoder over what is buffered: data, the end, or a need
    /// for more bytes (`None`).
    fn decode(&mut self) -> Result<Option<Option<Bytes>>, BodyError> {
        let Framing::Chunked(mut st) = self.framing else {
            return Ok(Some(None));
        };
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Some(None));
        };
        let buf = &mut conn.buf;
        loop {
            if buf.is_empty() {
                self.framing = Framing::Chunked(st);
                return Ok(None);
            }
            st = match st {
                Chunked::Data(left) => {
                    let n = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.framing = Framing::Chunked(match left {
                        0 => Chunked::DataEnd(0),
                        _ => Chunked::Data(left),
                    });
                    return Ok(Some(Some(data)));
                }
                Chunked::DataEnd(seen) => {
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if buf[0] != want {
                        return Err(BodyError("invalid chunk end"));
                    }
                    buf.advance(1);
                    match seen {
                        0 => Chunked::DataEnd(1),
                        _ => Chunked::Size(0, 0),
                    }
                }
                Chunked::Size(size, line) => {
                    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
                        if line + buf.len() > MAX_CHUNK_LINE {
                            return Err(BodyError("chunk size line too long"));
                        }
                        // Keep the partial line buffered until its end arrives.
                        self.framing = Framing::Chunked(Chunked::Size(size, line));
                        return Ok(None);
                    };
                    if line + eol > MAX_CHUNK_LINE {
                        return Err(BodyError("chunk size line too long"));
                    }
                    let size = chunk_size(&buf[..eol])?;
                    buf.advance(eol + 1);
                    match size {
                        0 => Chunked::Trailers(0, true),
                        n => Chunked::Data(n),
                    }
                }
                Chunked::Trailers(seen, empty) => {
                    let b = buf[0];
                    buf.advance(1);
                    if seen + 1 > MAX_TRAILERS {
                        return Err(BodyError("trailer section too large"));
                    }
                    match b {
                        b'\n' if empty => {
                            self.framing = Framing::Done;
                            return Ok(Some(None));
                        }
                        b'\n' => Chunked::Trailers(seen + 1, true),
                        b'\r' => Chunked::Trailers(seen + 1, empty),
                        _ => Chunked::Trailers(seen + 1, false),
                    }
                }
            };
        }
    }
}

/// The size on a chunk-size line (`1a;ext=v\r`): hex digits, then extensions, which are
/// dropped.
fn chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(BodyError("bare LF in chunk size line"))?;
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let zeros = line[..digits].iter().take_while(|&&b| b == b'0').count();
    if digits == 0 || digits - zeros > 16 {
        return Err(BodyError("invalid chunk size"));
    }
    // Only blanks (`BWS`) may stand between the size and its extensions.
    let rest = &line[digits..];
    let blanks = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &rest[blanks..];
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(BodyError("invalid chunk size"));
    }
    let hex =
        std::str::from_utf8(&line[zeros..digits]).map_err(|_| BodyError("invalid chunk size"))?;
    match hex.is_empty() {
        true => Ok(0),
        false => u64::from_str_radix(hex, 16).map_err(|_| BodyError("invalid chunk size")),
    }
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let buffered = this.conn.as_ref().map_or(0, |c| c.buf.len());
            match this.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(0) => {
                    this.done();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if buffered > 0 => {
                    let n = left.min(buffered as u64) as usize;
                    let data = this.conn.as_mut().map(|c| c.buf.split_to(n).freeze());
                    this.framing = Framing::Length(left - n as u64);
                    if left == n as u64 {
                        this.done();
                    }
                    return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
                }
                Framing::UntilClose if buffered > 0 => {
                    let data = this.conn.as_mut().map(|c| c.buf.split().freeze());
                    return Poll::Ready(data.map(|d| Ok(Frame::data(d))));
                }
                Framing::Chunked(_) if buffered > 0 => match this.decode() {
                    Err(e) => return Poll::Ready(Some(Err(e))),
                    Ok(Some(Some(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Some(None)) => {
                        this.done();
                        return Poll::Ready(None);
                    }
                    Ok(None) => {}
                },
                _ => {}
            }
            match ready!(this.fill(cx)) {
                Ok(0) => {
                    if matches!(this.framing, Framing::UntilClose) {
                        this.framing = Framing::Done;
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(BodyError(
                        "the origin closed the connection before the body's end",
                    ))));
                }
                Ok(_) => {}
                Err(_) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(BodyError(
                        "the connection failed before the body's end",
                    ))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A body framed as `framing` whose first `split` bytes of `wire` are already buffered and
    /// the rest arrive over a loopback connection, which then closes.
    async fn read_body(framing: Framing, wire: &[u8], split: usize) -> Result<Vec<u8>, String> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rest = wire[split..].to_vec();
        let origin = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            for piece in rest.chunks(3) {
                s.write_all(piece).await.unwrap();
            }
        });
        let io = TcpStream::connect(addr).await.unwrap();
        let body = DirectBody {
            conn: Some(Conn::new(io, BytesMut::from(&wire[..split]))),
            framing,
            keep_alive: false,
            home: None,
        };
        let got = body.collect().await.map(|c| c.to_bytes().to_vec());
        origin.await.unwrap();
        got.map_err(|e| e.to_string())
    }

    fn chunked() -> Framing {
        Framing::Chunked(Chunked::Size(0, 0))
    }

    #[tokio::test]
    async fn chunked_bodies_decode_wherever_the_reads_split_them() {
        let wire =
            b"5;ext=\"a\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..=wire.len() {
            let got = read_body(chunked(), wire, split).await;
            assert_eq!(
                got.as_deref(),
                Ok(&b"helloabcdefghijklmnopqrstuvwxyz"[..]),
                "split {split}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_chunked_bodies_are_errors_not_data() {
        for wire in [
            &b"5\r\nhelloX\r\n0\r\n\r\n"[..], // no CRLF after the data
            b"5\nhello\r\n0\r\n\r\n",         // bare LF after the size
            b"g\r\n",                         // not hex
            b"\r\n",                          // no size at all
            b"5\r\r\nhello\r\n0\r\n\r\n",     // CR is not a blank
            b"5\x0c\r\nhello\r\n0\r\n\r\n",   // nor is form feed
            b"11111111111111111\r\n",         // 17 digits: over u64
            b"5 x\r\nhello\r\n0\r\n\r\n",     // junk after the size
            b"5\r\nhel",                      // cut short
            b"0\r\nX-T: 1\r\n",               // trailers never end
        ] {
            let got = read_body(chunked(), wire, 0).await;
            assert!(
                got.is_err(),
                "{:?} gave {got:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = format!("5;{}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert!(read_body(chunked(), long.as_bytes(), 0).await.is_err());
    }

    #[tokio::test]
    async fn chunk_sizes_may_have_leading_zeros_and_blanks_before_extensions() {
        let wire = b"000000000000000000005 \t;e\r\nhello\r\n00\r\n\r\n";
        let got = read_body(chunked(), wire, 0).await;
        assert_eq!(got.as_deref(), Ok(&b"hello"[..]));
    }

    #[tokio::test]
    async fn length_and_close_delimited_bodies_end_where_framed() {
        let got = read_body(Framing::Length(5), b"hello, and more", 2).await;
        assert_eq!(got.as_deref(), Ok(&b"hello"[..]));
        let got = read_body(Framing::Length(9), b"hello", 1).await;
        assert!(got.is_err(), "a short body is an error: {got:?}");
        let got = read_body(Framing::UntilClose, b"all of it", 4).await;
        assert_eq!(got.as_deref(), Ok(&b"all of it"[..]));
    }

    fn head(
        wire: &str,
        is_head: bool,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, ProxyError> {
        parse_head(&mut BytesMut::from(wire.as_bytes()), is_head)
    }

    fn framed(wire: &str) -> (StatusCode, &'static str, bool) {
        let (parts, framing, keep) = head(wire, false).unwrap().unwrap();
        let kind = match framing {
            Framing::Length(_) => "length",
            Framing::Chunked(_) => "chunked",
            Framing::UntilClose => "close",
            Framing::Done => "done",
        };
        (parts.status, kind, keep)
    }

    #[test]
    fn informational_answers_are_skipped_and_a_partial_head_waits() {
        let wire = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                    HTTP/1.1 201 Made It\r\nContent-Length: 2\r\n\r\nok";
        let mut buf = BytesMut::from(wire.as_bytes());
        let (parts, framing, keep) = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(parts.status, 201);
        assert!(matches!(framing, Framing::Length(2)) && keep);
        assert!(
            !parts.headers.contains_key("link"),
            "the 103's fields leaked"
        );
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Made It");
        assert_eq!(&buf[..], b"ok", "the body stays buffered");
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn framing_follows_rfc_9112_section_6_3() {
        let ok = StatusCode::OK;
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"),
            (ok, "length", true)
        );
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            (ok, "chunked", true)
        );
        // Chunked wins over a length, but an origin that sends both loses its connection.
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"),
            (ok, "chunked", false)
        );
        assert_eq!(
            framed(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, \r\nTransfer-Encoding: ,\r\n\r\n"
            ),
            (ok, "chunked", true)
        );
        // A length that frames nothing is not checked.
        assert_eq!(
            framed("HTTP/1.1 204 No Content\r\nContent-Length: x\r\n\r\n"),
            (StatusCode::NO_CONTENT, "length", true)
        );
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n"),
            (ok, "chunked", false)
        );
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (ok, "close", false)
        );
        assert_eq!(framed("HTTP/1.1 200 OK\r\n\r\n"), (ok, "close", false));
        assert_eq!(
            framed("HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 1\r\n\r\n"),
            (ok, "length", false)
        );
        assert_eq!(
            framed("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (ok, "length", false)
        );
        assert_eq!(
            framed("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n"),
            (ok, "length", true)
        );
        // No body whatever the fields say; 101 is never reused.
        assert_eq!(
            framed("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
            (StatusCode::NOT_MODIFIED, "length", true)
        );
        assert_eq!(
            framed("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n"),
            (StatusCode::SWITCHING_PROTOCOLS, "length", false)
        );
        let (_, f, keep) = head("HTTP/1.1 101 Switching Protocols\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(
            matches!(f, Framing::Length(0)) && !keep,
            "a 101 to a HEAD left HTTP"
        );
        let (_, f, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert!(matches!(f, Framing::Length(0)), "a HEAD answer has no body");
        let (parts, ..) = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!parts.headers.contains_key("content-length"));
    }

    #[test]
    fn unframeable_or_oversized_heads_are_refused() {
        for wire in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\r\n continued\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                matches!(head(wire, false), Err(ProxyError::Upstream(_))),
                "{wire:?} passed"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let wire = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(
            head(&wire, false),
            Err(ProxyError::ResponseHeadTooLarge)
        ));
    }

    #[test]
    fn the_request_head_is_origin_form_http_1_1_without_transfer_coding() {
        let req = http::Request::builder()
            .method("DELETE")
            .uri("/v1/files/f1?x=1")
            .header("host", "api.example")
            .header("transfer-encoding", "chunked")
            .header("x-a", "1")
            .header("x-a", "2")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        assert_eq!(
            String::from_utf8(encode(&parts)).unwrap(),
            "DELETE /v1/files/f1?x=1 HTTP/1.1\r\nhost: api.example\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
        );
    }
}
