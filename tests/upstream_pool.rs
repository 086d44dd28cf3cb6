//! Keep-alive connections to plain-HTTP origins: reused across requests (also after bodiless
//! answers), retried on a fresh connection when the origin closed an idle one, closed after
//! `pool_idle_timeout`, and not kept at all with `pool_max_idle_per_host = 0`. The origin is a
//! raw socket server that counts the connections it accepts and sees closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    requests: AtomicUsize,
}

/// A keep-alive HTTP/1.1 origin. `/close` answers and closes the connection at once (without
/// saying so: the proxy learns it only from the socket), `/head-only` answers HEAD, `/204` and
/// `/304` have no body, `/hang` is never answered; anything else gets a 5-byte body.
async fn counting_origin() -> (SocketAddr, Arc<Counts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts = Arc::new(Counts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            c.accepted.fetch_add(1, Ordering::SeqCst);
            let c = c.clone();
            tokio::spawn(async move {
                serve(s, &c).await;
                c.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, counts)
}

async fn serve(mut s: TcpStream, c: &Counts) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        c.requests.fetch_add(1, Ordering::SeqCst);
        let mut words = head.split(' ');
        let method = words.next().unwrap_or("");
        let path = words.next().unwrap_or("/");
        let answer: &[u8] = match path {
            "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
            "/304" => b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
            _ if method == "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        };
        if path == "/hang" {
            // Held open, unanswered, until the proxy gives up on it.
            while let Ok(n) = s.read(&mut chunk).await {
                if n == 0 {
                    return;
                }
            }
            return;
        }
        if path == "/close" {
            // Corked, the answer goes out with the FIN of the close in one segment. Written
            // and then closed, a preempted origin would leave a gap between them, in which
            // the proxy could send the next request on the connection: lost at the origin
            // like any request to an origin that dies mid-exchange, which no proxy can tell
            // from one the origin acted on.
            cork(&s);
            let _ = s.write_all(answer).await;
            return;
        }
        if s.write_all(answer).await.is_err() {
            return;
        }
    }
}

async fn proxy_to(origin: SocketAddr, upstream: &[&str]) -> Proxy {
    let mut cfg = Config::new().vendor("api.openai.com", origin);
    for line in upstream {
        cfg = cfg.upstream(line);
    }
    Proxy::start(cfg).await
}

async fn status(client: &reqwest::Client, method: reqwest::Method, path: &str) -> u16 {
    let r = client
        .request(method, format!("http://api.openai.com{path}"))
        .send()
        .await
        .expect("request");
    let s = r.status().as_u16();
    r.bytes().await.expect("body");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_reused_also_after_bodiless_answers() {
    let (origin, counts) = counting_origin().await;
    let proxy = proxy_to(origin, &[]).await;
    let client = proxy.client();
    for i in 0..20 {
        let (method, path, want) = match i % 4 {
            0 => (reqwest::Method::GET, "/v1/models", 200),
            1 => (reqwest::Method::HEAD, "/v1/models", 200),
            2 => (reqwest::Method::GET, "/204", 204),
            _ => (reqwest::Method::GET, "/304", 304),
        };
        assert_eq!(status(&client, method, path).await, want, "request {i}");
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection carries every exchange in turn"
    );
}

/// An origin that closes a keep-alive connection right after answering: the proxy may pick
/// that connection before it notices. A request that never went out is sent again on a
/// fresh connection; the client never sees the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_origin_closed_is_not_a_failure() {
    let (origin, counts) = counting_origin().await;
    let proxy = proxy_to(origin, &[]).await;
    let client = proxy.client();
    // A POST without a body may not be sent twice (RFC 9110 §9.2.2): the closed connection
    // must be noticed before anything is written to it, not by a retry.
    let methods = [
        reqwest::Method::GET,
        reqwest::Method::POST,
        reqwest::Method::DELETE,
    ];
    for i in 0..100 {
        let method = methods[i % 3].clone();
        assert_eq!(status(&client, method, "/close").await, 200, "request {i}");
    }
    assert_eq!(counts.requests.load(Ordering::SeqCst), 100);
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 100);
}

/// A pooled connection keeps its timer from the exchange before, armed for that one's
/// deadline: a late answer on it is still cut at its own `response_timeout`, not at the
/// earlier deadline and not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_on_a_reused_connection_is_cut_at_its_own_deadline() {
    let (origin, counts) = counting_origin().await;
    let proxy = proxy_to(origin, &["response_timeout = \"1s\""]).await;
    let client = proxy.client();
    assert_eq!(
        status(&client, reqwest::Method::GET, "/v1/models").await,
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let r = fetch(client.get("http://api.openai.com/hang")).await;
    let took = started.elapsed();
    assert_error(&r, 504, "timeout");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    assert_eq!(
        counts.accepted.load(Ordering::SeqCst),
        1,
        "the late request went on the reused connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (origin, counts) = counting_origin().await;
    let proxy = proxy_to(origin, &["pool_idle_timeout = \"1s\""]).await;
    let client = proxy.client();
    assert_eq!(
        status(&client, reqwest::Method::GET, "/v1/models").await,
        200
    );
    assert_eq!(counts.closed.load(Ordering::SeqCst), 0);
    eventually("the idle upstream connection to be closed", || {
        (counts.closed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The next request opens a new connection.
    assert_eq!(
        status(&client, reqwest::Method::GET, "/v1/models").await,
        200
    );
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_idle_connections_are_kept_when_the_cap_is_zero() {
    let (origin, counts) = counting_origin().await;
    let proxy = proxy_to(origin, &["pool_max_idle_per_host = 0"]).await;
    let client = proxy.client();
    for _ in 0..5 {
        assert_eq!(
            status(&client, reqwest::Method::GET, "/v1/models").await,
            200
        );
    }
    assert_eq!(counts.accepted.load(Ordering::SeqCst), 5);
    eventually("every upstream connection to be closed", || {
        (counts.closed.load(Ordering::SeqCst) == 5).then_some(())
    })
    .await;
}

/// A client that goes away mid-body leaves a connection in an unknown state: it is closed,
/// never handed to the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_body_was_cut_is_not_reused() {
    let origin = Origin::http().await;
    let proxy = proxy_to(origin.addr, &[]).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        b"GET http://api.openai.com/download/67108864 HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
    )
    .await
    .expect("write");
    let mut first = [0u8; 1024];
    let n = s.read(&mut first).await.expect("read");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    drop(s);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next exchange gets a clean connection and a whole answer.
    let r = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
    assert_eq!(r.status, 200, "{r:?}");
}
