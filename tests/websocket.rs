//! WebSocket through the proxy: `ws://` in absolute form on the plain listener and `wss://`
//! inside an intercepted tunnel, to a real WebSocket echo origin (tungstenite) on 127.0.0.1,
//! decided, relayed both ways and audited as one record when the WebSocket closes.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The key of RFC 6455 §1.3's example.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const GREETING: &str = "welcome from the origin";

// ---------------------------------------------------------------------------------------------
// The origin

/// What the origin saw of one handshake.
#[derive(Debug, Clone)]
struct Handshake {
    /// The request line.
    line: String,
    /// Field names lowercased, values as sent.
    fields: Vec<(String, String)>,
    /// The ALPN protocol the TLS origin agreed on.
    alpn: Option<String>,
}

impl Handshake {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A WebSocket echo origin: it answers `101`, sends [`GREETING`] at once, then echoes every
/// text and binary message until the client closes. `/missing` gets a 404 and `/refused` a
/// 400 instead of the switch.
struct WsOrigin {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Handshake>>>,
}

impl WsOrigin {
    async fn plain() -> WsOrigin {
        WsOrigin::start(None).await
    }

    /// TLS with the test CA's leaf, offering h2 as well as http/1.1: a proxy that offered h2
    /// would get it, and no upgrade.
    async fn tls() -> WsOrigin {
        let mut cfg = (*certs().server).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        WsOrigin::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start(tls: Option<tokio_rustls::TlsAcceptor>) -> WsOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, log) = (accepted.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => echo(tcp, None, log).await,
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let alpn = s
                                .get_ref()
                                .1
                                .alpn_protocol()
                                .map(|p| String::from_utf8_lossy(p).into_owned());
                            echo(s, alpn, log).await
                        }
                    }
                });
            }
        });
        WsOrigin {
            addr,
            accepted,
            seen,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.seen.lock().expect("origin log").clone()
    }
}

/// Reads a message head (up to the blank line) byte by byte, so nothing after it is consumed.
async fn head_of<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.ok()?);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

async fn echo<S>(mut s: S, alpn: Option<String>, log: Arc<Mutex<Vec<Handshake>>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(head) = head_of(&mut s).await else {
        return;
    };
    let mut lines = head.lines();
    let line = lines.next().unwrap_or_default().to_string();
    let fields: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let hs = Handshake {
        line: line.clone(),
        fields,
        alpn,
    };
    log.lock().expect("origin log").push(hs.clone());
    let path = line.split(' ').nth(1).unwrap_or_default();
    if path.starts_with("/missing") || path.starts_with("/refused") {
        let (status, body) = match path.starts_with("/missing") {
            true => ("404 Not Found", "no such socket"),
            false => ("400 Bad Request", "upgrade refused"),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-origin: ws\r\n\r\n{body}",
            body.len()
        );
        let _ = s.write_all(answer.as_bytes()).await;
        return;
    }
    let Some(key) = hs.field("sec-websocket-key") else {
        let _ = s
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await;
        return;
    };
    if path.starts_with("/slow") {
        // Long enough for a test to reload the proxy while this handshake is in flight.
        tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    }
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nX-Origin: ws\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if s.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
    if ws.send(Message::text(GREETING)).await.is_err() {
        return;
    }
    // tungstenite answers a close (and pings) by itself.
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The client

/// A stream that counts what its user wrote and read, to compare with the audit record.
struct Tally<S> {
    inner: S,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<S> Tally<S> {
    fn new(inner: S) -> Tally<S> {
        Tally {
            inner,
            read: Arc::default(),
            written: Arc::default(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tally<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.read
            .fetch_add((buf.filled().len() - before) as u64, Ordering::SeqCst);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tally<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.written.fetch_add(*n as u64, Ordering::SeqCst);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Sends a WebSocket handshake for `target` (absolute form) to the proxy; returns the answer's
/// head and the connection, positioned just after it.
async fn handshake(proxy: SocketAddr, target: &str, extra: &[&str]) -> (u16, String, TcpStream) {
    within("websocket handshake", async {
        let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
        let host = target
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .expect("authority");
        let mut req = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n"
        );
        for h in extra {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write handshake");
        let (status, head) = read_head(&mut s).await;
        (status, head, s)
    })
    .await
}

/// Reads the next text or binary message.
async fn next_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within("a websocket message", async {
        loop {
            match ws.next().await {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
                Some(Ok(_)) => continue,
                other => panic!("the websocket ended instead: {other:?}"),
            }
        }
    })
    .await
}

/// Reads `ws` until it ends (a close, a reset or the end of the stream).
async fn until_closed<S>(ws: &mut WebSocketStream<S>, what: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    within(what, async {
        while let Some(m) = ws.next().await {
            if m.is_err() {
                break;
            }
        }
    })
    .await;
}

/// The greeting, then a text and a 70,000-byte binary message echoed, then a clean close.
async fn converse<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    assert_eq!(next_data(ws).await, Message::text(GREETING));
    ws.send(Message::text("hello through the proxy"))
        .await
        .expect("send text");
    assert_eq!(
        next_data(ws).await,
        Message::text("hello through the proxy")
    );
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(big.clone()))
        .await
        .expect("send binary");
    assert_eq!(next_data(ws).await, Message::binary(big));
    within("the close handshake", ws.close(None))
        .await
        .expect("close");
    // The origin answers the close and the proxy passes its end on.
    until_closed(ws, "the websocket to end").await;
}

fn assert_switched(head: &str) {
    let field = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    assert!(
        field("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{head}"
    );
    assert!(
        field("connection").is_some_and(|v| v.eq_ignore_ascii_case("upgrade")),
        "{head}"
    );
    assert_eq!(
        field("sec-websocket-accept").as_deref(),
        Some(derive_accept_key(KEY.as_bytes()).as_str()),
        "{head}"
    );
    assert_eq!(field("x-origin").as_deref(), Some("ws"), "{head}");
    assert!(field("via").is_some(), "{head}");
}

/// The audit records for `path`: waits for the first, then makes sure no second follows.
async fn only_record(proxy: &Proxy, path: &str) -> Value {
    let rec = proxy.audit_path(path).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let all: Vec<Value> = proxy
        .audit_records()
        .into_iter()
        .filter(|r| r["path"] == path)
        .collect();
    assert_eq!(all.len(), 1, "one record per exchange: {all:?}");
    rec
}

// ---------------------------------------------------------------------------------------------
// ws:// on the plain listener

#[tokio::test]
async fn ws_through_the_plain_listener_relays_both_ways_and_is_audited_once_at_close() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let (status, head, s) = handshake(
        proxy.addr,
        "ws://api.openai.com/v1/realtime?model=gpt-4o-realtime",
        &[
            "Authorization: Bearer sk-test-websocket-0001",
            "Origin: http://example.test",
        ],
    )
    .await;
    assert_eq!(status, 101, "{head}");
    assert_switched(&head);

    let tally = Tally::new(s);
    let (read, written) = (tally.read.clone(), tally.written.clone());
    let mut ws = WebSocketStream::from_raw_socket(tally, Role::Client, None).await;
    // Not written until the WebSocket has closed.
    assert!(proxy
        .audit_records()
        .iter()
        .all(|r| r["path"] != "/v1/realtime?model=gpt-4o-realtime"));
    converse(&mut ws).await;

    let rec = only_record(&proxy, "/v1/realtime?model=gpt-4o-realtime").await;
    assert_eq!(rec["status"], 101, "{rec}");
    assert_eq!(rec["method"], "GET");
    assert_eq!(rec["scheme"], "http");
    assert_eq!(rec["host"], "api.openai.com");
    assert_eq!(rec["port"], 80);
    assert_eq!(rec["vendor"], "openai");
    assert_eq!(rec["action"], "allow");
    assert_eq!(rec["tls"], "none");
    assert!(
        rec["key_id"].as_str().is_some_and(|k| k.starts_with("k_")),
        "{rec}"
    );
    // Exactly what crossed the relay: the client's frames out, the origin's frames in.
    assert_eq!(rec["bytes_out"], written.load(Ordering::SeqCst), "{rec}");
    assert_eq!(rec["bytes_in"], read.load(Ordering::SeqCst), "{rec}");
    assert!(rec["bytes_out"].as_u64().unwrap() > 70_000, "{rec}");
    assert!(rec["bytes_in"].as_u64().unwrap() > 70_000, "{rec}");
    assert!(rec["duration_ms"].as_f64().unwrap() > 0.0, "{rec}");
    assert!(
        !rec["reason"].as_str().unwrap_or("").contains("closed:"),
        "a clean close: {rec}"
    );

    // The origin was asked for the upgrade, in origin form, with the end-to-end fields.
    let hs = origin.handshakes();
    assert_eq!(hs.len(), 1, "{hs:?}");
    let hs = &hs[0];
    assert_eq!(
        hs.line, "GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1",
        "{hs:?}"
    );
    assert_eq!(hs.field("host"), Some("api.openai.com"));
    assert!(hs
        .field("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
    assert!(hs
        .field("connection")
        .is_some_and(|v| v.eq_ignore_ascii_case("upgrade")));
    assert_eq!(hs.field("sec-websocket-key"), Some(KEY));
    assert_eq!(hs.field("sec-websocket-version"), Some("13"));
    assert_eq!(
        hs.field("authorization"),
        Some("Bearer sk-test-websocket-0001")
    );
    assert_eq!(hs.field("origin"), Some("http://example.test"));
    assert!(hs.field("via").is_some(), "{hs:?}");
}

#[tokio::test]
async fn an_http_target_asking_for_websocket_is_relayed_too() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let (status, head, s) = handshake(proxy.addr, "http://api.openai.com/socket", &[]).await;
    assert_eq!(status, 101, "{head}");
    assert_switched(&head);
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    converse(&mut ws).await;
    let rec = only_record(&proxy, "/socket").await;
    assert_eq!(rec["status"], 101);
}

#[tokio::test]
async fn a_blocked_vendors_websocket_is_refused_before_any_upstream_connection() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.deepseek.com", origin.addr)).await;
    let (status, head, mut s) = handshake(proxy.addr, "ws://api.deepseek.com/v1/stream", &[]).await;
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("length"))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    within("refusal body", s.read_exact(&mut body))
        .await
        .expect("body");
    let r = Raw {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    assert_blocked(&r, "block-deepseek", "deepseek");
    let rec = only_record(&proxy, "/v1/stream").await;
    assert_eq!(rec["status"], 403);
    assert_eq!(rec["action"], "block");
    assert_eq!(origin.accepted(), 0, "the origin was contacted");
}

#[tokio::test]
async fn an_origin_refusing_the_upgrade_is_answered_with_its_own_status() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    for (path, status, body) in [
        ("/missing", 404, "no such socket"),
        ("/refused", 400, "upgrade refused"),
    ] {
        let (got, head, mut s) =
            handshake(proxy.addr, &format!("ws://api.openai.com{path}"), &[]).await;
        assert_eq!(got, status, "{head}");
        assert!(head.to_ascii_lowercase().contains("x-origin: ws"), "{head}");
        let mut text = vec![0u8; body.len()];
        within("the origin's body", s.read_exact(&mut text))
            .await
            .expect("body");
        assert_eq!(text, body.as_bytes());
        let rec = only_record(&proxy, path).await;
        assert_eq!(rec["status"], status, "{rec}");
        assert_eq!(rec["bytes_in"], body.len(), "{rec}");
    }
    // Each handshake reached the origin, with the upgrade asked for.
    let hs = origin.handshakes();
    assert_eq!(hs.len(), 2, "{hs:?}");
    assert!(hs.iter().all(|h| h.field("upgrade") == Some("websocket")));
}

#[tokio::test]
async fn other_upgrades_are_still_stripped() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let r = raw_get(
        proxy.addr,
        "http://api.openai.com/h2c",
        &[
            "Upgrade: h2c",
            "Connection: Upgrade, HTTP2-Settings",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = origin.request("/h2c").await;
    assert!(seen.headers.get("upgrade").is_none(), "{seen:?}");
    assert!(seen.headers.get("http2-settings").is_none(), "{seen:?}");
}

#[tokio::test]
async fn a_silent_websocket_is_closed_after_the_idle_timeout() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("idle_timeout = \"1s\""),
    )
    .await;
    let (status, head, mut s) = handshake(proxy.addr, "ws://api.openai.com/idle", &[]).await;
    assert_eq!(status, 101, "{head}");
    // Only the greeting comes, then nothing moves until the proxy closes.
    read_until_closed(&mut s).await;
    let rec = only_record(&proxy, "/idle").await;
    assert_eq!(rec["status"], 101);
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .ends_with("closed: idle_timeout"),
        "{rec}"
    );
    assert_eq!(rec["bytes_in"], 2 + GREETING.len(), "{rec}");
}

#[tokio::test]
async fn shutdown_closes_an_open_websocket_and_writes_its_record() {
    let origin = WsOrigin::plain().await;
    let mut proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("shutdown_grace = \"1s\""),
    )
    .await;
    let (status, head, s) = handshake(proxy.addr, "ws://api.openai.com/open", &[]).await;
    assert_eq!(status, 101, "{head}");
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    assert_eq!(next_data(&mut ws).await, Message::text(GREETING));
    proxy.stop().await;
    let rec = only_record(&proxy, "/open").await;
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .ends_with("closed: shutdown"),
        "{rec}"
    );
}

/// A reload decides open WebSockets again, as it does opaque tunnels: one that blocks the
/// vendor closes its Realtime-style sessions, and the record says why. An unrelated change
/// leaves them open.
#[tokio::test]
async fn a_reload_that_blocks_the_vendor_closes_its_open_websockets() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let (status, head, s) = handshake(proxy.addr, "ws://api.openai.com/realtime", &[]).await;
    assert_eq!(status, 101, "{head}");
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
    assert_eq!(next_data(&mut ws).await, Message::text(GREETING));
    // Its connection is open, and counted as such, though hyper let go of it at the switch.
    let open = proxy.metrics().await;
    assert_eq!(
        metric(&open, "portcullis_connections_active", &[]),
        1.0,
        "{open}"
    );

    let rule = |id: &str, vendor: &str| {
        format!("\n[[rule]]\nid = \"{id}\"\nvendor = \"{vendor}\"\naction = \"block\"\n")
    };
    assert_eq!(
        proxy
            .reload_edited(|t| t + &rule("no-claude", "anthropic"))
            .await,
        200
    );
    ws.send(Message::text("still open")).await.expect("send");
    assert_eq!(next_data(&mut ws).await, Message::text("still open"));

    assert_eq!(
        proxy
            .reload_edited(|t| t + &rule("no-openai", "openai"))
            .await,
        200
    );
    until_closed(&mut ws, "the websocket to be closed").await;
    let rec = only_record(&proxy, "/realtime").await;
    assert_eq!(
        (rec["action"].as_str(), rec["rule"].as_str()),
        (Some("block"), Some("no-openai")),
        "{rec}"
    );
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .contains("closed: policy_reloaded"),
        "{rec}"
    );
    // A reload while the origin is still answering the handshake counts too: the WebSocket
    // it then opens is closed at once.
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let opening = tokio::spawn(handshake(proxy.addr, "ws://api.openai.com/slow", &[]));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        proxy
            .reload_edited(|t| t + &rule("no-openai", "openai"))
            .await,
        200
    );
    let (status, head, mut s) = opening.await.expect("handshake task");
    assert_eq!(status, 101, "{head}");
    read_until_closed(&mut s).await;
    let rec = only_record(&proxy, "/slow").await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .contains("closed: policy_reloaded"),
        "{rec}"
    );
}

/// OpenAI's Realtime WebSocket names its model in the query string, and has no body. With a
/// model rule for the vendor, every handshake used to be refused for a query naming a model
/// the body did not. The query's model now decides: another model is relayed, the rule's is
/// refused, and a reload that blocks the open WebSocket's model closes it.
#[tokio::test]
async fn a_websocket_is_decided_on_the_model_its_query_names() {
    let origin = WsOrigin::plain().await;
    let rule = |id: &str, model: &str| {
        format!("\n[[rule]]\nid = \"{id}\"\nvendor = \"openai\"\nmodel = \"{model}\"\naction = \"block\"\n")
    };
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&rule("no-gpt-4o", "gpt-4o*")),
    )
    .await;
    let refused = "/v1/realtime?model=GPT-4o-realtime-preview";
    let (status, head, _) =
        handshake(proxy.addr, &format!("ws://api.openai.com{refused}"), &[]).await;
    assert_eq!(status, 403, "{head}");
    let rec = only_record(&proxy, refused).await;
    assert_eq!(
        (rec["rule"].as_str(), rec["model"].as_str()),
        (Some("no-gpt-4o"), Some("gpt-4o-realtime-preview")),
        "{rec}"
    );

    // Open at the handshake, then closed by a reload that blocks its model: with a model rule
    // at the handshake (which read its model then), and with none (nothing read it then).
    let allowed = "/v1/realtime?model=gpt-realtime";
    let unruled = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    for (proxy, inspected) in [(proxy, true), (unruled, false)] {
        let (status, head, s) =
            handshake(proxy.addr, &format!("ws://api.openai.com{allowed}"), &[]).await;
        assert_eq!(status, 101, "{head}");
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
        assert_eq!(next_data(&mut ws).await, Message::text(GREETING));
        assert_eq!(
            proxy
                .reload_edited(|t| t + &rule("no-realtime-models", "gpt-realtime*"))
                .await,
            200
        );
        until_closed(&mut ws, "the websocket to be closed").await;
        let rec = only_record(&proxy, allowed).await;
        assert_eq!(
            (rec["action"].as_str(), rec["rule"].as_str()),
            (Some("block"), Some("no-realtime-models")),
            "{rec}"
        );
        if inspected {
            assert_eq!(rec["model"], "gpt-realtime", "{rec}");
        }
    }
}

/// The second decision at a reload covers everything that decided the handshake: the paths and
/// methods its override fields named, and the account fields a tenant restriction reads. A
/// WebSocket that would not be let through now is closed; one that would stays open.
#[tokio::test]
async fn a_reload_decides_an_open_websocket_on_all_its_handshake_asked() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let mut open = Vec::new();
    for (path, extra) in [
        ("/renamed", "X-Original-URL: /v1/realtime"),
        ("/deleting", "X-HTTP-Method-Override: DELETE"),
        ("/personal", "OpenAI-Organization: org-personal"),
        ("/company", "OpenAI-Organization: org-company"),
    ] {
        let target = format!("ws://api.openai.com{path}");
        let (status, head, s) = handshake(proxy.addr, &target, &[extra]).await;
        assert_eq!(status, 101, "{path}: {head}");
        let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
        assert_eq!(next_data(&mut ws).await, Message::text(GREETING));
        open.push((path, ws));
    }
    let rules = "\n[[rule]]\nid = \"no-realtime\"\nvendor = \"openai\"\npath = \"/v1/realtime\"\n\
                 action = \"block\"\n\n[[rule]]\nid = \"no-deletes\"\nvendor = \"openai\"\n\
                 method = \"DELETE\"\naction = \"block\"\n\n[[rule]]\nid = \"company-only\"\n\
                 vendor = \"openai\"\naction = \"allow\"\nrequire_org = [\"org-company\"]\n";
    assert_eq!(proxy.reload_edited(|t| t + rules).await, 200);

    for (path, mut ws) in open {
        let rec = match path {
            "/company" => {
                ws.send(Message::text("still open")).await.expect("send");
                assert_eq!(next_data(&mut ws).await, Message::text("still open"));
                continue;
            }
            _ => {
                until_closed(&mut ws, "the websocket to be closed").await;
                only_record(&proxy, path).await
            }
        };
        let (rule, why) = match path {
            "/renamed" => ("no-realtime", "closed: policy_reloaded"),
            "/deleting" => ("no-deletes", "closed: policy_reloaded"),
            _ => ("company-only", "closed: policy_reloaded: org_not_allowed"),
        };
        assert_eq!(rec["action"], "block", "{path}: {rec}");
        assert_eq!(rec["rule"], rule, "{path}: {rec}");
        assert!(
            rec["reason"].as_str().unwrap_or("").contains(why),
            "{path}: {rec}"
        );
    }
}

/// A byte limit overdrawn by what the origin sends ends the WebSocket, and the read that
/// overdrew it is dropped, not relayed: the record counts exactly what the client got.
#[tokio::test]
async fn a_byte_limit_ends_a_websocket_and_its_record_counts_only_what_was_relayed() {
    let origin = WsOrigin::plain().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"cap\"\nvendor = \"openai\"\naction = \"limit\"\n\
         limit = { bytes = \"40KiB\", per = \"1h\" }\n",
    ))
    .await;
    let (status, head, s) = handshake(proxy.addr, "ws://api.openai.com/capped", &[]).await;
    assert_eq!(status, 101, "{head}");
    let tally = Tally::new(s);
    let (read, written) = (tally.read.clone(), tally.written.clone());
    let mut ws = WebSocketStream::from_raw_socket(tally, Role::Client, None).await;
    assert_eq!(next_data(&mut ws).await, Message::text(GREETING));
    // 30,000 bytes out fit; their echo overdraws the 40 KiB on the way back (charged every
    // 16 KiB: at 48 KiB).
    ws.send(Message::binary(vec![7u8; 30_000]))
        .await
        .expect("send");
    until_closed(&mut ws, "the websocket to be cut").await;
    let rec = only_record(&proxy, "/capped").await;
    assert_eq!(rec["action"], "limit", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .contains("closed: byte_limit_exceeded"),
        "{rec}"
    );
    assert_eq!(rec["bytes_out"], written.load(Ordering::SeqCst), "{rec}");
    assert_eq!(rec["bytes_in"], read.load(Ordering::SeqCst), "{rec}");
    assert!(read.load(Ordering::SeqCst) < 30_000, "the echo was cut");
}

// ---------------------------------------------------------------------------------------------
// wss:// inside an intercepted tunnel

/// An org CA made the way operators make it.
struct OrgCa {
    dir: TempDir,
}

impl OrgCa {
    fn new() -> OrgCa {
        let dir = TempDir::new().expect("tempdir");
        portcullis::ca::init(dir.path(), "portcullis test org CA").expect("ca init");
        OrgCa { dir }
    }
    fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }
    fn section(&self) -> String {
        format!(
            "[intercept]\nca_cert = \"{}\"\nca_key = \"{}\"\nvendors = [\"openai\"]\n",
            self.cert().display(),
            self.dir.path().join("ca.key").display()
        )
    }
    /// A client trusting only this CA, offering `alpn`.
    fn client(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let pem = std::fs::read_to_string(self.cert()).expect("ca.pem");
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
            roots.add(c.expect("pem")).expect("root");
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

#[tokio::test]
async fn wss_inside_an_intercepted_tunnel_relays_both_ways() {
    let ca = OrgCa::new();
    let origin = WsOrigin::tls().await;
    let roots = TempDir::new().expect("tempdir");
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .upstream(&format!(
                "ca_file = \"{}\"",
                ca_file(roots.path()).display()
            ))
            .tail(&ca.section()),
    )
    .await;
    let (status, head, tcp) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200, "{head}");
    let name = rustls::pki_types::ServerName::try_from("api.openai.com").expect("name");
    // As browsers and SDKs do for wss://, whatever else they would speak.
    let tls = within(
        "TLS to the proxy",
        ca.client(&[b"http/1.1"]).connect(name, tcp),
    )
    .await
    .expect("handshake with the org CA's leaf");
    let tally = Tally::new(tls);
    let (read, written) = (tally.read.clone(), tally.written.clone());
    let request = "wss://api.openai.com/v1/realtime?model=gpt-4o-realtime";
    let (mut ws, resp) = within(
        "wss handshake",
        tokio_tungstenite::client_async(request, tally),
    )
    .await
    .expect("websocket handshake through interception");
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["x-origin"], "ws");
    // Bytes of the exchange itself, not of the tunnel's TLS: measured as the client's
    // plaintext, after its handshake.
    let (read0, written0) = (read.load(Ordering::SeqCst), written.load(Ordering::SeqCst));
    converse(&mut ws).await;

    let path = "/v1/realtime?model=gpt-4o-realtime";
    let rec = proxy
        .audit_where(path, |r| r["path"] == path && r["tls"] == "intercept")
        .await;
    let rec_again = only_record(&proxy, path).await;
    assert_eq!(rec, rec_again);
    assert_eq!(rec["status"], 101, "{rec}");
    assert_eq!(rec["scheme"], "https");
    assert_eq!(rec["port"], 443);
    assert_eq!(rec["vendor"], "openai");
    assert_eq!(rec["sni"], "api.openai.com");
    let handshake_in = read.load(Ordering::SeqCst);
    assert!(handshake_in > read0);
    assert_eq!(
        rec["bytes_out"],
        written.load(Ordering::SeqCst) - written0,
        "{rec}"
    );
    // tungstenite reads ahead of the 101's end: what it read then was part of the relay.
    let bytes_in = rec["bytes_in"].as_u64().unwrap();
    let after_head = read.load(Ordering::SeqCst) - read0;
    assert!(
        bytes_in >= after_head && bytes_in <= read.load(Ordering::SeqCst),
        "{rec} read {after_head} after the handshake"
    );
    assert!(bytes_in > 70_000, "{rec}");

    let hs = origin.handshakes();
    assert_eq!(hs.len(), 1, "{hs:?}");
    assert_eq!(hs[0].alpn.as_deref(), Some("http/1.1"), "{hs:?}");
    assert_eq!(
        hs[0].line,
        "GET /v1/realtime?model=gpt-4o-realtime HTTP/1.1"
    );
    assert!(hs[0]
        .field("upgrade")
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
}

#[tokio::test]
async fn a_blocked_path_inside_an_intercepted_tunnel_gets_no_websocket() {
    let ca = OrgCa::new();
    let origin = WsOrigin::tls().await;
    let roots = TempDir::new().expect("tempdir");
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .upstream(&format!("ca_file = \"{}\"", ca_file(roots.path()).display()))
            .tail(
                "[[rule]]\nid = \"no-realtime\"\nvendor = \"openai\"\npath = \"/v1/realtime\"\naction = \"block\"\n",
            )
            .tail(&ca.section()),
    )
    .await;
    let (status, _, tcp) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    let name = rustls::pki_types::ServerName::try_from("api.openai.com").expect("name");
    let tls = within(
        "TLS to the proxy",
        ca.client(&[b"http/1.1"]).connect(name, tcp),
    )
    .await
    .expect("handshake");
    let refused = within(
        "wss handshake",
        tokio_tungstenite::client_async("wss://api.openai.com/v1/realtime", tls),
    )
    .await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            assert_eq!(resp.headers()["x-portcullis-rule"], "no-realtime");
        }
        other => panic!("expected a 403: {other:?}"),
    }
    let rec = only_record(&proxy, "/v1/realtime").await;
    assert_eq!(rec["action"], "block");
    assert_eq!(rec["tls"], "intercept");
    assert_eq!(origin.accepted(), 0, "the origin was contacted");
}
