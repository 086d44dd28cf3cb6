//! Request smuggling and framing (issue 6, part 1): hostile framing sent as raw bytes, with
//! what the client got and what the origins saw — both as the origin parsed it
//! (`Origin::requests`) and byte for byte on the wire between the proxy and the origin (a
//! recording relay, [`Tap`], sits in front of each origin).
//!
//! The rule every case checks: nothing the policy forbids reaches an origin, and every byte
//! the proxy sends upstream is framed one way only (CRLF lines, no obs-fold, no NUL, never
//! Content-Length together with Transfer-Encoding, at most one Content-Length, and a
//! Transfer-Encoding that is exactly `chunked`), so no origin can read it differently from
//! how the proxy read it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------
// A recording relay in front of an origin

/// A TCP relay to an origin that records, per connection, every byte the proxy sent.
struct Tap {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<TapConn>>>>,
}

/// One proxy-to-origin connection: the bytes the proxy sent, and whether it has closed.
#[derive(Default)]
struct TapConn {
    bytes: Mutex<Vec<u8>>,
    closed: AtomicBool,
}

impl Tap {
    async fn start(to: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
        let addr = listener.local_addr().expect("tap addr");
        let conns: Arc<Mutex<Vec<Arc<TapConn>>>> = Arc::default();
        let all = conns.clone();
        tokio::spawn(async move {
            while let Ok((from_proxy, _)) = listener.accept().await {
                let log = Arc::new(TapConn::default());
                all.lock().expect("tap log").push(log.clone());
                tokio::spawn(async move {
                    let Ok(to_origin) = TcpStream::connect(to).await else {
                        log.closed.store(true, Ordering::SeqCst);
                        return;
                    };
                    let (mut pr, mut pw) = from_proxy.into_split();
                    let (mut or, mut ow) = to_origin.into_split();
                    let up = async move {
                        let mut buf = [0u8; 8192];
                        while let Ok(n @ 1..) = pr.read(&mut buf).await {
                            log.bytes
                                .lock()
                                .expect("tap log")
                                .extend_from_slice(&buf[..n]);
                            if ow.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        log.closed.store(true, Ordering::SeqCst);
                        let _ = ow.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut or, &mut pw).await;
                        let _ = pw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Tap { addr, conns }
    }

    /// Connections the proxy opened to this origin.
    fn accepted(&self) -> usize {
        self.conns.lock().expect("tap log").len()
    }

    /// The bytes of each connection so far.
    fn streams(&self) -> Vec<Vec<u8>> {
        self.conns
            .lock()
            .expect("tap log")
            .iter()
            .map(|c| c.bytes.lock().expect("tap log").clone())
            .collect()
    }

    /// Whether every connection whose bytes contain `needle` has been closed by the proxy.
    fn all_closed_with(&self, needle: &str) -> bool {
        self.conns.lock().expect("tap log").iter().all(|c| {
            let bytes = c.bytes.lock().expect("tap log");
            find(&bytes, needle.as_bytes()).is_none() || c.closed.load(Ordering::SeqCst)
        })
    }

    /// Every request on the wire, each checked for unambiguous framing.
    fn requests(&self) -> Vec<Wire> {
        self.streams()
            .iter()
            .flat_map(|s| wire_requests(s))
            .collect()
    }

    fn contains(&self, needle: &str) -> bool {
        let needle = needle.to_ascii_lowercase();
        self.streams().iter().any(|s| {
            String::from_utf8_lossy(s)
                .to_ascii_lowercase()
                .contains(&needle)
        })
    }
}

/// One request as the proxy framed it on the wire.
#[derive(Debug)]
struct Wire {
    line: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The whole body (to its Content-Length or last chunk) was sent.
    complete: bool,
}

impl Wire {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits what the proxy sent on one upstream connection into requests, failing the test on
/// anything an origin could frame differently from the proxy.
fn wire_requests(mut s: &[u8]) -> Vec<Wire> {
    let mut out = Vec::new();
    while !s.is_empty() {
        let Some(end) = find(s, b"\r\n\r\n") else {
            panic!(
                "upstream bytes end inside a request head: {:?}",
                String::from_utf8_lossy(s)
            );
        };
        let head = &s[..end + 2];
        assert!(!head.contains(&0), "NUL sent upstream: {head:?}");
        let text = std::str::from_utf8(head).expect("upstream head is not UTF-8");
        for (i, b) in head.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && head[i - 1] == b'\r', "bare LF upstream: {text:?}");
            }
            if *b == b'\r' {
                assert!(
                    head.get(i + 1) == Some(&b'\n'),
                    "bare CR upstream: {text:?}"
                );
            }
        }
        let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
        let line = lines.next().expect("request line").to_string();
        let mut headers = Vec::new();
        for l in lines {
            assert!(
                !l.starts_with([' ', '\t']),
                "obs-fold upstream: {l:?} in {text:?}"
            );
            let (k, v) = l.split_once(':').expect("header line without a colon");
            assert!(
                !k.is_empty()
                    && k.bytes()
                        .all(|c| c.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&c)),
                "header name is not a token: {k:?} in {text:?}"
            );
            headers.push((k.to_string(), v.trim().to_string()));
        }
        s = &s[end + 4..];
        let mut w = Wire {
            line,
            headers,
            body: Vec::new(),
            complete: true,
        };
        let cl = w.header("content-length");
        let te = w.header("transfer-encoding");
        assert!(
            cl.is_empty() || te.is_empty(),
            "Content-Length and Transfer-Encoding sent together upstream: {w:?}"
        );
        assert!(cl.len() <= 1, "several Content-Length upstream: {w:?}");
        if let Some(te) = te.first() {
            assert!(
                te.eq_ignore_ascii_case("chunked") && w.header("transfer-encoding").len() == 1,
                "Transfer-Encoding other than one `chunked` upstream: {w:?}"
            );
            // Chunked: sizes in hex, data, then the last chunk and an empty trailer.
            loop {
                let Some(eol) = find(s, b"\r\n") else {
                    w.complete = false;
                    s = &[];
                    break;
                };
                let size_text = std::str::from_utf8(&s[..eol]).expect("chunk size line");
                let size_hex = size_text.split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_hex, 16)
                    .unwrap_or_else(|e| panic!("bad chunk size upstream {size_text:?}: {e}"));
                s = &s[eol + 2..];
                if size == 0 {
                    if s.starts_with(b"\r\n") {
                        s = &s[2..];
                    } else if let Some(t) = find(s, b"\r\n\r\n") {
                        s = &s[t + 4..];
                    } else {
                        w.complete = false;
                        s = &[];
                    }
                    break;
                }
                if s.len() < size + 2 {
                    w.body.extend_from_slice(&s[..size.min(s.len())]);
                    w.complete = false;
                    s = &[];
                    break;
                }
                assert_eq!(
                    &s[size..size + 2],
                    b"\r\n",
                    "chunk not ended by CRLF: {w:?}"
                );
                w.body.extend_from_slice(&s[..size]);
                s = &s[size + 2..];
            }
        } else if let Some(cl) = cl.first() {
            assert!(
                !cl.is_empty() && cl.bytes().all(|c| c.is_ascii_digit()),
                "Content-Length upstream is not one number: {w:?}"
            );
            let n: usize = cl.parse().expect("content-length");
            let take = n.min(s.len());
            w.body = s[..take].to_vec();
            w.complete = take == n;
            s = &s[take..];
        }
        out.push(w);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The setup: OpenAI allowed, DeepSeek blocked, each behind a tap

struct Env {
    openai: Origin,
    openai_wire: Tap,
    deepseek: Origin,
    deepseek_wire: Tap,
    proxy: Proxy,
}

async fn env() -> Env {
    let openai = Origin::http().await;
    let deepseek = Origin::http().await;
    let openai_wire = Tap::start(openai.addr).await;
    let deepseek_wire = Tap::start(deepseek.addr).await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai_wire.addr)
            .vendor("api.deepseek.com", deepseek_wire.addr),
    )
    .await;
    Env {
        openai,
        openai_wire,
        deepseek,
        deepseek_wire,
        proxy,
    }
}

impl Env {
    /// The blocked vendor was never dialled, and no DeepSeek request went to OpenAI's origin
    /// in any form (as a request, a header or smuggled body bytes).
    fn assert_deepseek_untouched(&self, case: &str) {
        assert!(
            self.deepseek.requests().is_empty(),
            "{case}: DeepSeek's origin saw {:?}",
            self.deepseek.requests()
        );
        assert_eq!(
            self.deepseek_wire.accepted(),
            0,
            "{case}: the proxy dialled DeepSeek"
        );
        assert!(
            !self.openai_wire.contains("deepseek"),
            "{case}: DeepSeek bytes went to OpenAI's origin: {:?}",
            self.openai_wire
                .streams()
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
        );
    }

    /// Nothing at all reached either origin (a request refused before forwarding).
    fn assert_nothing_forwarded(&self, case: &str) {
        self.assert_deepseek_untouched(case);
        assert!(
            self.openai.requests().is_empty(),
            "{case}: OpenAI's origin saw {:?}",
            self.openai.requests()
        );
        assert!(
            self.openai_wire.streams().iter().all(|s| s.is_empty()),
            "{case}: bytes went upstream: {:?}",
            self.openai_wire.requests()
        );
    }

    /// The requests OpenAI's origin saw with this path.
    fn openai_saw(&self, path: &str) -> Vec<Seen> {
        self.openai
            .requests()
            .into_iter()
            .filter(|s| s.uri == path)
            .collect()
    }

    /// The requests on the wire to OpenAI whose request line names this path.
    fn openai_wire_for(&self, path: &str) -> Vec<Wire> {
        self.openai_wire
            .requests()
            .into_iter()
            .filter(|w| w.line.split(' ').nth(1) == Some(path))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client that reads every response on its connection

/// Parses one response off the front of `buf`: `None` until it is complete (or, at end of
/// stream, a close-delimited body).
fn parse_response(buf: &[u8], eof: bool) -> Option<(Raw, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let mut r = Raw {
        status,
        head,
        body: String::new(),
    };
    let rest = &buf[end + 4..];
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let (body, used) = if (100..200).contains(&status) || status == 204 || status == 304 {
        (Vec::new(), 0)
    } else if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let eol = find(&rest[at..], b"\r\n")?;
            let line = String::from_utf8_lossy(&rest[at..at + eol]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|e| panic!("bad chunk size in a response {line:?}: {e}"));
            at += eol + 2;
            if size == 0 {
                let t = if rest[at..].starts_with(b"\r\n") {
                    2
                } else {
                    find(&rest[at..], b"\r\n\r\n")? + 4
                };
                at += t;
                break;
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        (body, at)
    } else if let Some(n) = r.header("content-length") {
        let n: usize = n.parse().expect("response content-length");
        if rest.len() < n {
            return None;
        }
        (rest[..n].to_vec(), n)
    } else if eof {
        (rest.to_vec(), rest.len())
    } else {
        return None;
    };
    r.body = String::from_utf8_lossy(&body).into_owned();
    Some((r, end + 4 + used))
}

/// A raw client connection to the proxy.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = within("connect to the proxy", TcpStream::connect(addr))
            .await
            .expect("connect proxy");
        Client {
            s,
            buf: Vec::new(),
            eof: false,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write to the proxy", self.s.write_all(bytes))
            .await
            .expect("write request");
    }

    /// The next response, or `None` once the proxy closed the connection (a reset counts as
    /// closed: it may come when the proxy drops a connection with unread bytes).
    async fn next(&mut self) -> Option<Raw> {
        within("a response or the connection closing", async {
            loop {
                if let Some((r, used)) = parse_response(&self.buf, self.eof) {
                    self.buf.drain(..used);
                    return Some(r);
                }
                if self.eof {
                    assert!(
                        self.buf.is_empty(),
                        "connection closed inside a response: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
                let mut chunk = [0u8; 8192];
                match self.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => self.eof = true,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// Every response until the proxy closes the connection.
    async fn all(&mut self) -> Vec<Raw> {
        let mut out = Vec::new();
        while let Some(r) = self.next().await {
            out.push(r);
        }
        out
    }
}

/// Sends `bytes` on a new connection; every response until the proxy closes it.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<Raw> {
    let mut c = Client::connect(addr).await;
    c.send(bytes).await;
    c.all().await
}

/// Refused before forwarding: one 400 and the connection closed (or closed straight away,
/// which a client also cannot mistake for success).
fn assert_refused(case: &str, got: &[Raw]) {
    let statuses: Vec<u16> = got.iter().map(|r| r.status).collect();
    assert!(
        statuses.is_empty() || statuses == [400],
        "{case}: expected 400 then close, got {got:?}"
    );
}

/// The proxy's answer to an allowed request that reached the origin: 200 from the fake origin.
fn assert_forwarded(case: &str, r: &Raw, body_len: usize) {
    assert_eq!(r.status, 200, "{case}: {r:?}");
    assert_eq!(r.header("x-origin"), Some("fake"), "{case}: {r:?}");
    assert_eq!(
        r.body,
        format!("origin saw {body_len} bytes"),
        "{case}: {r:?}"
    );
}

fn statuses(got: &[Raw]) -> Vec<u16> {
    got.iter().map(|r| r.status).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Content-Length with Transfer-Encoding

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_never_smuggles_a_second_request() {
    let e = env().await;
    let smuggled_deepseek =
        "0\r\n\r\nGET http://api.deepseek.com/x HTTP/1.1\r\nHost: api.deepseek.com\r\n\r\n";
    let smuggled_openai =
        "0\r\n\r\nGET http://api.openai.com/smuggled HTTP/1.1\r\nHost: api.openai.com\r\n\r\n";
    for (i, (body, te_first)) in [
        (smuggled_deepseek, false),
        (smuggled_deepseek, true),
        (smuggled_openai, false),
        (smuggled_openai, true),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/v1/cl-te-{i}");
        let (a, b) = (
            format!("Content-Length: {}\r\n", body.len()),
            "Transfer-Encoding: chunked\r\n".to_string(),
        );
        let (first, second) = if te_first { (b, a) } else { (a, b) };
        let req = format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
             {first}{second}\r\n{body}"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        let case = format!("CL+TE {path} (TE first: {te_first})");
        // Handled per RFC 9112 §6.3: Transfer-Encoding wins (the body is the empty chunked
        // body), Content-Length is dropped, and the connection is closed after the response,
        // so the bytes after the last chunk are never read as a request (§6.3 ¶3: a server
        // MUST close after responding to a message with both).
        match statuses(&got).as_slice() {
            [400] => assert!(e.openai_saw(&path).is_empty(), "{case}"),
            [200] => {
                assert_forwarded(&case, &got[0], 0);
                let seen = e.openai_saw(&path);
                assert_eq!(seen.len(), 1, "{case}: {seen:?}");
                assert_eq!(seen[0].body_len, 0, "{case}: {seen:?}");
                let wire = e.openai_wire_for(&path);
                assert_eq!(wire.len(), 1, "{case}: {wire:?}");
                assert!(
                    wire[0].body.is_empty() && wire[0].complete,
                    "{case}: {wire:?}"
                );
            }
            other => panic!("{case}: expected one 400 or one 200 then close, got {other:?}"),
        }
        assert!(
            e.openai_saw("/smuggled").is_empty() && !e.openai_wire.contains("/smuggled"),
            "{case}: the smuggled request was forwarded"
        );
        e.assert_deepseek_untouched(&case);
    }

    // TE.CL the other way round: a chunked body longer than the Content-Length. The origin
    // must get the chunked body (8 bytes), never a Content-Length of 3 followed by the rest.
    let req = "POST http://api.openai.com/v1/te-cl HTTP/1.1\r\nHost: api.openai.com\r\n\
               Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n\
               8\r\nSMUGGLED\r\n0\r\n\r\n";
    let got = exchange(e.proxy.addr, req.as_bytes()).await;
    match statuses(&got).as_slice() {
        [400] => assert!(e.openai_saw("/v1/te-cl").is_empty()),
        [200] => {
            assert_forwarded("TE.CL", &got[0], 8);
            let wire = e.openai_wire_for("/v1/te-cl");
            assert_eq!(wire.len(), 1, "{wire:?}");
            assert_eq!(wire[0].body, b"SMUGGLED", "{wire:?}");
        }
        other => panic!("TE.CL: expected one 400 or one 200, got {other:?}"),
    }
    e.assert_deepseek_untouched("TE.CL");
}

// ---------------------------------------------------------------------------------------------
// 2. Conflicting Content-Length

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_400_and_never_forwarded() {
    let e = env().await;
    for (case, headers) in [
        ("two CLs", "Content-Length: 5\r\nContent-Length: 6\r\n"),
        ("CL list", "Content-Length: 5, 6\r\n"),
        ("CL list 6,5", "Content-Length: 6, 5\r\n"),
        ("CL signed", "Content-Length: +6\r\n"),
        ("CL hex", "Content-Length: 0x6\r\n"),
    ] {
        let req = format!(
            "POST http://api.openai.com/v1/cl HTTP/1.1\r\nHost: api.openai.com\r\n{headers}\
             Connection: close\r\n\r\nhello!"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_refused(case, &got);
        e.assert_nothing_forwarded(case);
    }

    // The same value twice is one length (RFC 9110 §8.6 lets a recipient accept it); it must
    // go upstream as a single Content-Length.
    let req = "POST http://api.openai.com/v1/cl-same HTTP/1.1\r\nHost: api.openai.com\r\n\
               Content-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let got = exchange(e.proxy.addr, req.as_bytes()).await;
    match statuses(&got).as_slice() {
        [400] => assert!(e.openai_saw("/v1/cl-same").is_empty()),
        [200] => {
            assert_forwarded("equal CLs", &got[0], 5);
            let wire = e.openai_wire_for("/v1/cl-same");
            assert_eq!(wire.len(), 1, "{wire:?}");
            assert_eq!(wire[0].body, b"hello", "{wire:?}");
        }
        other => panic!("equal CLs: expected 400 or 200, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// 3. obs-fold

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold_is_400_and_never_forwarded() {
    let e = env().await;
    for (case, head) in [
        ("fold in a header", "X-A: a\r\n b\r\n"),
        ("fold with a tab", "X-A: a\r\n\tb\r\n"),
        (
            "fold hiding Transfer-Encoding",
            "Content-Length: 5\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n",
        ),
        (
            "fold of Host",
            "Host: api.openai.com\r\n api.deepseek.com\r\n",
        ),
    ] {
        let req = format!(
            "POST http://api.openai.com/v1/fold HTTP/1.1\r\nHost: api.openai.com\r\n{head}\
             Connection: close\r\n\r\nhello"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_refused(case, &got);
        e.assert_nothing_forwarded(case);
    }
    // A fold right after the request line.
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.openai.com/v1/fold HTTP/1.1\r\n Host: api.openai.com\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert_refused("fold after the request line", &got);
    e.assert_nothing_forwarded("fold after the request line");
}

// ---------------------------------------------------------------------------------------------
// 4. Bad chunk sizes and chunk extensions

/// After a client's bad chunked body: the client got an error or a closed connection (never
/// a 200), nothing went to DeepSeek, and whatever went upstream for `path` is an unfinished
/// chunked body on a connection the proxy then closed — an origin sees an aborted request,
/// never a complete one.
async fn assert_bad_body_cut(e: &Env, case: &str, path: &str, got: &[Raw]) {
    // The proxy streams, so the head may be upstream before the bad chunk line is read; the
    // upstream request then fails because the client's body did, and the client is told so:
    // 400 `bad_request_body` (or the connection closes), never a 502 blaming the origin.
    assert!(
        got.len() <= 1 && got.iter().all(|r| r.status == 400),
        "{case}: expected 400 or close, got {got:?}"
    );
    if let Some(r) = got.first() {
        assert!(r.body.contains("bad_request_body"), "{case}: {r:?}");
    }
    for w in e.openai_wire_for(path) {
        assert!(
            !w.complete,
            "{case}: a complete request with a bad chunked body went upstream: {w:?}"
        );
    }
    eventually(
        &format!("{case}: upstream connections for {path} closed"),
        || e.openai_wire.all_closed_with(path).then_some(()),
    )
    .await;
    e.assert_deepseek_untouched(case);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunks_never_reach_the_origin_as_a_complete_request() {
    let e = env().await;
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a=b;".repeat(8 * 1024));
    let cases: Vec<(&str, String)> = vec![
        ("non-hex size", "zz\r\nhello\r\n0\r\n\r\n".into()),
        ("negative size", "-5\r\nhello\r\n0\r\n\r\n".into()),
        ("0x prefix", "0x5\r\nhello\r\n0\r\n\r\n".into()),
        ("plus sign", "+5\r\nhello\r\n0\r\n\r\n".into()),
        (
            "overflowing size",
            "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("empty size", "\r\nhello\r\n0\r\n\r\n".into()),
        ("size shorter than data", "3\r\nhello\r\n0\r\n\r\n".into()),
        ("space inside size", "5 5\r\nhello\r\n0\r\n\r\n".into()),
        ("32 KiB of chunk extensions", long_ext),
        (
            "bare LF in a chunk extension",
            "5;a\nb\r\nhello\r\n0\r\n\r\n".into(),
        ),
        ("bare LF after chunk data", "5\r\nhello\n0\r\n\r\n".into()),
        (
            "bad last chunk, then a request",
            "5\r\nhello\r\nz\r\n\r\nGET http://api.deepseek.com/x HTTP/1.1\r\n\
             Host: api.deepseek.com\r\n\r\n"
                .into(),
        ),
    ];
    for (i, (case, body)) in cases.into_iter().enumerate() {
        let path = format!("/v1/chunk-{i}");
        let req = format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_bad_body_cut(&e, case, &path, &got).await;
    }

    // The chunk size line is well formed but the extension holds a NUL. Extensions carry no
    // framing and hyper skips their contents (RFC 9112 §7.1.1: a recipient MUST ignore
    // unrecognised extensions); the proxy re-chunks the body without them, so the origin gets
    // a clean `5 hello 0` body and never sees the NUL. Accepting is safe; in the second case
    // the bytes after the last chunk are not read as a request because of Connection: close.
    for (i, (case, body)) in [
        ("NUL in a chunk extension", "5;a=\0\r\nhello\r\n0\r\n\r\n"),
        (
            "NUL in the last chunk's extension, then a request",
            "5\r\nhello\r\n0;\0\r\n\r\nGET http://api.deepseek.com/x HTTP/1.1\r\n\
             Host: api.deepseek.com\r\n\r\n",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/v1/chunk-ext-{i}");
        let req = format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{body}"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        match statuses(&got).as_slice() {
            [] | [400] => assert_bad_body_cut(&e, case, &path, &got).await,
            [200] => {
                assert_forwarded(case, &got[0], 5);
                let wire = e.openai_wire_for(&path);
                assert_eq!(wire.len(), 1, "{case}: {wire:?}");
                assert!(
                    wire[0].complete && wire[0].body == b"hello",
                    "{case}: {wire:?}"
                );
                assert!(!e.openai_wire.contains("\0"), "{case}: NUL went upstream");
            }
            other => panic!("{case}: expected 200/400/502, got {other:?}"),
        }
        e.assert_deepseek_untouched(case);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_chunk_size_is_streamed_as_data_and_cut_when_the_client_goes() {
    let e = env().await;
    // 2^64 - 1 is a valid chunk size. What follows it is chunk data, not a last chunk and
    // not a second request: the origin must get it re-framed as data of an unfinished body.
    let tail = "hello\r\n0\r\n\r\nGET http://api.deepseek.com/x HTTP/1.1\r\n\
                Host: api.deepseek.com\r\n\r\n";
    let mut c = Client::connect(e.proxy.addr).await;
    c.send(
        format!(
            "POST http://api.openai.com/v1/chunk-huge HTTP/1.1\r\nHost: api.openai.com\r\n\
             Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n{tail}"
        )
        .as_bytes(),
    )
    .await;
    let wire = eventually("the chunk's data upstream", || {
        let w = e.openai_wire_for("/v1/chunk-huge");
        w.first()
            .is_some_and(|w| w.body.len() == tail.len())
            .then_some(w)
    })
    .await;
    assert_eq!(wire.len(), 1, "{wire:?}");
    assert_eq!(wire[0].body, tail.as_bytes(), "{wire:?}");
    assert!(!wire[0].complete, "{wire:?}");
    assert!(e.deepseek.requests().is_empty() && e.deepseek_wire.accepted() == 0);
    // The client gives up: the upstream body must be cut, not finished.
    drop(c);
    eventually("the upstream connection closed", || {
        e.openai_wire
            .all_closed_with("/v1/chunk-huge")
            .then_some(())
    })
    .await;
    let wire = e.openai_wire_for("/v1/chunk-huge");
    assert!(wire.len() == 1 && !wire[0].complete, "{wire:?}");
    assert!(e.deepseek.requests().is_empty() && e.deepseek_wire.accepted() == 0);
}

// ---------------------------------------------------------------------------------------------
// 5. Bare LF

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_is_normalised_to_crlf_upstream_or_refused() {
    let e = env().await;
    // RFC 9112 §2.2 lets a recipient accept a bare LF as a line terminator. Accepting is safe
    // here only because the proxy re-serialises the head: the origin gets CRLF lines and the
    // header fields exactly as the proxy parsed them (checked on the wire).
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.openai.com/v1/lf HTTP/1.1\nHost: api.openai.com\nConnection: close\n\n",
    )
    .await;
    match statuses(&got).as_slice() {
        [400] => assert!(e.openai.requests().is_empty()),
        [200] => {
            assert_forwarded("bare LF", &got[0], 0);
            let seen = e.openai_saw("/v1/lf");
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(seen[0].headers["host"], "api.openai.com");
            assert_eq!(e.openai_wire_for("/v1/lf").len(), 1);
        }
        other => panic!("bare LF: expected 400 or 200, got {other:?}"),
    }

    // A bare LF inside what a CRLF-only parser reads as one header value: the proxy and the
    // origin must agree on the fields, and a Transfer-Encoding hidden this way must not leave
    // the body open to two readings.
    let req = b"POST http://api.openai.com/v1/lf-te HTTP/1.1\r\nHost: api.openai.com\r\n\
                X-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: close\r\n\
                \r\n0\r\n\r\n";
    let got = exchange(e.proxy.addr, req).await;
    match statuses(&got).as_slice() {
        [400] => assert!(e.openai_saw("/v1/lf-te").is_empty()),
        [200] => {
            let wire = e.openai_wire_for("/v1/lf-te");
            assert_eq!(wire.len(), 1, "{wire:?}");
            let seen = e.openai_saw("/v1/lf-te");
            assert_eq!(seen.len(), 1, "{seen:?}");
            assert_eq!(
                seen[0].body_len as usize,
                wire[0].body.len(),
                "origin and wire disagree: {seen:?} {wire:?}"
            );
        }
        other => panic!("bare LF + TE: expected 400 or 200, got {other:?}"),
    }

    // Bare LF between two requests, the second to the blocked vendor: it is either refused or
    // parsed as a request (and then blocked) — never forwarded.
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.openai.com/v1/lf-first HTTP/1.1\nHost: api.openai.com\n\n\
          GET http://api.deepseek.com/x HTTP/1.1\nHost: api.deepseek.com\nConnection: close\n\n",
    )
    .await;
    let s = statuses(&got);
    assert!(
        s.is_empty() || s == [400] || s == [200, 403],
        "bare LF pipeline: {got:?}"
    );
    if s == [200, 403] {
        assert_blocked(&got[1], "block-deepseek", "deepseek");
    }
    e.assert_deepseek_untouched("bare LF");
}

// ---------------------------------------------------------------------------------------------
// 6. NUL bytes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_header_or_target_is_400_and_never_forwarded() {
    let e = env().await;
    for (case, req) in [
        (
            "NUL in a header value",
            &b"GET http://api.openai.com/v1/nul HTTP/1.1\r\nHost: api.openai.com\r\n\
               X-A: a\0b\r\nConnection: close\r\n\r\n"[..],
        ),
        (
            "NUL in a header name",
            b"GET http://api.openai.com/v1/nul HTTP/1.1\r\nHost: api.openai.com\r\n\
              X-\0A: b\r\nConnection: close\r\n\r\n",
        ),
        (
            "NUL in Host",
            b"GET http://api.openai.com/v1/nul HTTP/1.1\r\nHost: api.openai.com\0.deepseek\r\n\
              Connection: close\r\n\r\n",
        ),
        (
            "NUL in the path",
            b"GET http://api.openai.com/v1/a\0b HTTP/1.1\r\nHost: api.openai.com\r\n\
              Connection: close\r\n\r\n",
        ),
        (
            "NUL in the target host",
            b"GET http://api.deepseek.com\0.openai.com/v1/nul HTTP/1.1\r\n\
              Host: api.openai.com\r\nConnection: close\r\n\r\n",
        ),
        (
            "NUL after the target host",
            b"GET http://api.openai.com\0/v1/nul HTTP/1.1\r\nHost: api.openai.com\r\n\
              Connection: close\r\n\r\n",
        ),
    ] {
        let got = exchange(e.proxy.addr, req).await;
        assert_refused(case, &got);
        e.assert_nothing_forwarded(case);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Absolute-form with a conflicting Host

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_target_wins_over_a_conflicting_host() {
    let e = env().await;
    // RFC 9112 §3.2.2: with an absolute-form target the Host field is ignored and replaced by
    // the target's authority.
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.openai.com/v1/host-conflict HTTP/1.1\r\nHost: api.deepseek.com\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&got), [200], "{got:?}");
    assert_forwarded("openai target, deepseek Host", &got[0], 0);
    let seen = e.openai_saw("/v1/host-conflict");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let hosts: Vec<_> = seen[0].headers.get_all("host").iter().collect();
    assert_eq!(hosts, ["api.openai.com"], "{seen:?}");
    let wire = e.openai_wire_for("/v1/host-conflict");
    assert_eq!(wire.len(), 1, "{wire:?}");
    assert_eq!(wire[0].header("host"), ["api.openai.com"], "{wire:?}");
    let rec = e.proxy.audit_path("/v1/host-conflict").await;
    assert_eq!(rec["host"], "api.openai.com", "{rec}");
    assert_eq!(rec["vendor"], "openai", "{rec}");

    // And the other way round: the target names the blocked vendor.
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.deepseek.com/v1/host-conflict-2 HTTP/1.1\r\nHost: api.openai.com\r\n\
          Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&got), [403], "{got:?}");
    assert_blocked(&got[0], "block-deepseek", "deepseek");
    assert!(e.openai_saw("/v1/host-conflict-2").is_empty());

    // Two Host fields (RFC 9112 §3.2: 400), with either target.
    for target in ["http://api.openai.com", "http://api.deepseek.com"] {
        let req = format!(
            "GET {target}/v1/two-hosts HTTP/1.1\r\nHost: api.openai.com\r\n\
             Host: api.deepseek.com\r\nConnection: close\r\n\r\n"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        let s = statuses(&got);
        assert_eq!(s, [400], "two Hosts, {target}: {got:?}");
        assert!(got[0].body.contains("duplicate_host"), "{got:?}");
        for w in e.openai_wire_for("/v1/two-hosts") {
            assert_eq!(w.header("host"), ["api.openai.com"], "{w:?}");
        }
    }
    e.assert_deepseek_untouched("conflicting Host");
}

// ---------------------------------------------------------------------------------------------
// 8. CONNECT with a body

/// Reads a response head off `s` byte by byte; empty if the connection closed first.
async fn head_or_closed(s: &mut TcpStream) -> String {
    within("a CONNECT answer", async {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            match s.read_u8().await {
                Ok(b) => head.push(b),
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&head).into_owned()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_a_body_forwards_nothing_odd() {
    let openai = Origin::https().await;
    let openai_wire = Tap::start(openai.addr).await;
    let deepseek = Sink::start().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai_wire.addr)
            .vendor("api.deepseek.com", deepseek.addr)
            .proxy("client_hello_timeout = \"1s\""),
    )
    .await;

    // RFC 9110 §9.3.6: a CONNECT request's content has no defined semantics. Observed: the
    // proxy answers 200 and hyper reads the 10 bytes as the request's body and drops them, so
    // the tunnel starts clean after them; a client that then speaks TLS reaches the origin,
    // whose first byte is the ClientHello's (0x16), never the body's. Had the bytes become
    // tunnel bytes instead, the ClientHello peek would refuse them (not_tls): safe either way.
    let mut s = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect proxy");
    s.write_all(
        b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\
          Content-Length: 10\r\n\r\n0123456789",
    )
    .await
    .expect("write");
    let head = head_or_closed(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "CONNECT with a body: {head:?}"
    );
    match within("TLS in the tunnel", tls_handshake(s, "api.openai.com")).await {
        Ok(mut tls) => {
            tls.write_all(
                b"GET /v1/after-connect-body HTTP/1.1\r\nHost: api.openai.com\r\n\
                  Connection: close\r\n\r\n",
            )
            .await
            .expect("write in the tunnel");
            let mut answer = Vec::new();
            let _ = within("answer in the tunnel", tls.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert_eq!(openai.request("/v1/after-connect-body").await.body_len, 0);
            let streams = openai_wire.streams();
            assert_eq!(streams.len(), 1, "one tunnel, one upstream connection");
            assert_eq!(
                streams[0].first(),
                Some(&0x16),
                "the tunnel did not start with the ClientHello: {:?}",
                &streams[0][..streams[0].len().min(16)]
            );
            assert!(find(&streams[0], b"0123456789").is_none());
        }
        Err(_) => {
            let rec = proxy.audit_connect("api.openai.com").await;
            assert_reason(&rec, "not_tls");
            assert!(openai_wire.streams().iter().all(|s| s.is_empty()));
        }
    }

    // A CONNECT whose body is a CONNECT to the blocked vendor: the body is not a second
    // request, and the tunnel after it is not spliced until a ClientHello arrives (here none:
    // the tunnel times out).
    let inner = "CONNECT api.deepseek.com:443 HTTP/1.1\r\nHost: api.deepseek.com:443\r\n\r\n";
    let req = format!(
        "CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\
         Content-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let mut s = within("connect", TcpStream::connect(proxy.addr))
        .await
        .expect("connect proxy");
    s.write_all(req.as_bytes()).await.expect("write");
    let head = head_or_closed(&mut s).await;
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.1 400"),
        "CONNECT with a CONNECT body: {head:?}"
    );
    let more = read_until_closed(&mut s).await;
    assert_eq!(
        more, 0,
        "a second answer (to the body's CONNECT?) came back"
    );
    let blocked = proxy.audit_records();
    assert!(
        blocked.iter().all(|r| r["host"] != "api.deepseek.com"),
        "the body was read as a CONNECT: {blocked:?}"
    );
    assert_eq!(
        deepseek.accepted(),
        0,
        "the body's CONNECT dialled DeepSeek"
    );
    let streams = openai_wire.streams();
    assert!(
        streams.iter().all(|s| find(s, b"deepseek").is_none()),
        "the CONNECT body was spliced upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// 9. HTTP/1.0 keep-alive

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keep_alive_second_request_is_decided_on_its_own() {
    let e = env().await;
    let mut c = Client::connect(e.proxy.addr).await;
    c.send(
        b"GET http://api.openai.com/v1/ten-a HTTP/1.0\r\nHost: api.openai.com\r\n\
          Connection: keep-alive\r\n\r\n",
    )
    .await;
    let first = c.next().await.expect("answer to the HTTP/1.0 request");
    assert_forwarded("HTTP/1.0 keep-alive", &first, 0);
    assert!(first.head.starts_with("HTTP/1."), "{first:?}");
    assert!(
        first.header("transfer-encoding").is_none(),
        "chunked answer to HTTP/1.0: {first:?}"
    );
    let seen = e.openai_saw("/v1/ten-a");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].headers.get("connection").is_none() && seen[0].headers.get("keep-alive").is_none(),
        "hop-by-hop keep-alive forwarded: {seen:?}"
    );

    // The client may keep the connection only if the proxy said keep-alive.
    let kept = first
        .header("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("keep-alive"));
    if kept {
        c.send(
            b"GET http://api.deepseek.com/v1/ten-b HTTP/1.0\r\nHost: api.deepseek.com\r\n\
              Connection: keep-alive\r\n\r\n",
        )
        .await;
        let second = c.next().await.expect("answer to the second request");
        assert_blocked(&second, "block-deepseek", "deepseek");
        c.send(b"GET http://api.openai.com/v1/ten-c HTTP/1.0\r\nHost: api.openai.com\r\n\r\n")
            .await;
        let third = c.next().await.expect("answer to the third request");
        assert_forwarded("HTTP/1.0 third", &third, 0);
        assert!(
            c.next().await.is_none(),
            "HTTP/1.0 without keep-alive stays open"
        );
        assert_eq!(e.openai_saw("/v1/ten-c").len(), 1);
    } else {
        assert!(
            c.next().await.is_none(),
            "no keep-alive but the connection stays open"
        );
    }
    e.assert_deepseek_untouched("HTTP/1.0 keep-alive");

    // HTTP/1.0 cannot carry Transfer-Encoding (RFC 9112 §6.1): 400, not forwarded.
    let got = exchange(
        e.proxy.addr,
        b"POST http://api.openai.com/v1/ten-te HTTP/1.0\r\nHost: api.openai.com\r\n\
          Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_refused("HTTP/1.0 with Transfer-Encoding", &got);
    assert!(e.openai_saw("/v1/ten-te").is_empty());
    assert!(e.openai_wire_for("/v1/ten-te").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 10. Pipelining

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_to_a_blocked_vendor_is_blocked() {
    let e = env().await;
    let got = exchange(
        e.proxy.addr,
        b"GET http://api.openai.com/v1/pipe-a HTTP/1.1\r\nHost: api.openai.com\r\n\r\n\
          GET http://api.deepseek.com/v1/pipe-b HTTP/1.1\r\nHost: api.deepseek.com\r\n\r\n\
          POST http://api.openai.com/v1/pipe-c HTTP/1.1\r\nHost: api.openai.com\r\n\
          Content-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(statuses(&got), [200, 403, 200], "{got:?}");
    assert_forwarded("pipelined first", &got[0], 0);
    assert_blocked(&got[1], "block-deepseek", "deepseek");
    assert_forwarded("pipelined third", &got[2], 5);
    assert_eq!(e.openai_saw("/v1/pipe-a").len(), 1);
    assert_eq!(e.openai_saw("/v1/pipe-c").len(), 1);
    assert!(e.openai_saw("/v1/pipe-b").is_empty());
    e.assert_deepseek_untouched("pipelined");

    // A request line inside a body is body: forwarded as bytes of the one request, framed by
    // its Content-Length, never as a second request.
    let inner = "GET http://api.deepseek.com/v1/inner HTTP/1.1\r\nHost: api.deepseek.com\r\n\r\n";
    let req = format!(
        "POST http://api.openai.com/v1/pipe-body HTTP/1.1\r\nHost: api.openai.com\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{inner}",
        inner.len()
    );
    let got = exchange(e.proxy.addr, req.as_bytes()).await;
    assert_eq!(statuses(&got), [200], "{got:?}");
    assert_forwarded("request in a body", &got[0], inner.len());
    let wire = e.openai_wire_for("/v1/pipe-body");
    assert_eq!(wire.len(), 1, "{wire:?}");
    assert_eq!(wire[0].body, inner.as_bytes());
    assert!(e.deepseek.requests().is_empty() && e.deepseek_wire.accepted() == 0);
    assert!(e.openai_saw("/v1/inner").is_empty());
}

// ---------------------------------------------------------------------------------------------
// 11. Transfer-Encoding other than chunked

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_final_chunked_are_400() {
    let e = env().await;
    for (case, te) in [
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        ("xchunked", "Transfer-Encoding: xchunked\r\n"),
        ("chunkedx", "Transfer-Encoding: chunkedx\r\n"),
        ("identity", "Transfer-Encoding: identity\r\n"),
        ("gzip alone", "Transfer-Encoding: gzip\r\n"),
        (
            "chunked then identity on two lines",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        ),
        ("empty", "Transfer-Encoding: \r\n"),
        ("quoted", "Transfer-Encoding: \"chunked\"\r\n"),
        ("vertical tab", "Transfer-Encoding: \x0bchunked\r\n"),
    ] {
        let req = format!(
            "POST http://api.openai.com/v1/te HTTP/1.1\r\nHost: api.openai.com\r\n{te}\
             Content-Length: 5\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_refused(case, &got);
        e.assert_nothing_forwarded(case);
    }

    // `chunked` last after another coding is framed as chunked (RFC 9112 §6.3 ¶4), but the
    // proxy strips Transfer-Encoding as hop-by-hop and would not decode gzip: forwarding would
    // change the content, so another coding is 501 (RFC 9112 §6.1). Case does not matter.
    for te in [
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let req = format!(
            "POST http://api.openai.com/v1/te-gzip HTTP/1.1\r\nHost: api.openai.com\r\n{te}\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_eq!(statuses(&got), [501], "{te}: {got:?}");
        assert!(
            got[0].body.contains("unsupported_transfer_coding"),
            "{got:?}"
        );
    }
    assert!(e.openai_saw("/v1/te-gzip").is_empty());
    for (i, te) in ["Transfer-Encoding: CHUNKED\r\n"].into_iter().enumerate() {
        let path = format!("/v1/te-ok-{i}");
        let req = format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n{te}\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        match statuses(&got).as_slice() {
            [400] | [501] | [] => assert!(e.openai_saw(&path).is_empty(), "{te}"),
            [200] => {
                assert_forwarded(te, &got[0], 5);
                let wire = e.openai_wire_for(&path);
                assert_eq!(wire.len(), 1, "{te}: {wire:?}");
                assert!(wire[0].complete, "{te}: {wire:?}");
                assert_eq!(wire[0].body, b"hello", "{te}: {wire:?}");
            }
            other => panic!("{te}: expected 200/400/501, got {other:?}"),
        }
    }
    e.assert_deepseek_untouched("transfer codings");
}

// ---------------------------------------------------------------------------------------------
// 12. Whitespace before the colon

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whitespace_before_a_header_colon_is_400() {
    let e = env().await;
    for (case, head, body) in [
        ("Content-Length :", "Content-Length : 5\r\n", "hello"),
        ("Content-Length<tab>:", "Content-Length\t: 5\r\n", "hello"),
        (
            "Transfer-Encoding :",
            "Content-Length: 5\r\nTransfer-Encoding : chunked\r\n",
            "0\r\n\r\n",
        ),
        ("Host :", "Host : api.deepseek.com\r\n", ""),
        ("X-A :", "X-A : 1\r\n", ""),
    ] {
        let req = format!(
            "POST http://api.openai.com/v1/colon HTTP/1.1\r\nHost: api.openai.com\r\n{head}\
             Connection: close\r\n\r\n{body}"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_refused(case, &got);
        e.assert_nothing_forwarded(case);
    }
}

/// hyper refuses some heads before the handler runs (it answers 400, 414 or 431 itself); those
/// attempts, a blocked vendor's name among them, still leave an audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_hyper_refuses_are_audited() {
    let e = env().await;
    let huge = format!("X-Big: {}\r\n", "a".repeat(128 * 1024));
    let cases = [
        (
            "Host :",
            "Host : api.deepseek.com\r\n",
            400,
            "malformed_request",
        ),
        ("a huge head", huge.as_str(), 431, "request_head_too_large"),
        ("a huge target", "", 414, "uri_too_long"),
    ];
    for (i, (case, head, status, reason)) in cases.into_iter().enumerate() {
        let path = match status {
            414 => format!("/chat/{}", "a".repeat(70_000)),
            _ => "/chat".to_string(),
        };
        let req = format!(
            "GET http://api.deepseek.com{path} HTTP/1.1\r\nHost: api.deepseek.com\r\n{head}\
             Connection: close\r\n\r\n"
        );
        let got = exchange(e.proxy.addr, req.as_bytes()).await;
        assert_eq!(
            got.first().map(|r| r.status),
            Some(status),
            "{case}: {got:?}"
        );
        let rec = e.proxy.audit_at_least(i + 1).await[i].clone();
        assert_eq!(rec["action"], "reject", "{case}: {rec}");
        assert_eq!(rec["status"], status, "{case}: {rec}");
        assert_reason(&rec, reason);
        assert_eq!(
            rec["client"].as_str().map(|c| c.starts_with("127.0.0.1:")),
            Some(true)
        );
        e.assert_nothing_forwarded(case);
    }
}

// ---------------------------------------------------------------------------------------------
// The wire checker itself

#[test]
fn the_wire_checker_catches_ambiguous_framing() {
    let ok = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\
               host: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let w = wire_requests(ok);
    assert_eq!(w.len(), 2);
    assert!(w.iter().all(|w| w.complete && w.body == b"hi"));
    let cut = wire_requests(b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n");
    assert!(!cut[0].complete);
    for bad in [
        &b"POST /a HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        b"POST /a HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nhi",
        b"POST /a HTTP/1.1\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nx: a\r\n b\r\n\r\n",
        b"GET /a HTTP/1.1\nhost: x\r\n\r\n",
        b"GET /a HTTP/1.1\r\nx : a\r\n\r\n",
        b"GET /a HTTP/1.1\r\nx: a\0\r\n\r\n",
    ] {
        let caught = std::panic::catch_unwind(|| wire_requests(bad)).is_err();
        assert!(caught, "not caught: {:?}", String::from_utf8_lossy(bad));
    }
}
