//! Exchanges an ordinary request/response origin never produces: an answer before the upload
//! has been read, framing the proxy cannot pass on, a protocol switch nobody asked for, and a
//! GET that carries a chunked body. Each origin here is a raw socket, so the test sees the bytes.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Reads up to the end of a head; returns the head and whatever was read past it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = s.read(&mut chunk).await.expect("read a head");
        assert!(n > 0, "closed before a whole head: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
    }
}

/// An origin for one connection: `serve` gets the socket once the request head is in, and
/// what it returns comes back on the receiver.
async fn origin<T, F, Fut>(serve: F) -> (SocketAddr, oneshot::Receiver<T>)
where
    T: Send + 'static,
    F: FnOnce(TcpStream, String, Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let (head, rest) = read_head(&mut s).await;
        let _ = tx.send(serve(s, head, rest).await);
    });
    (addr, rx)
}

async fn proxy_for(origin: SocketAddr) -> Proxy {
    Proxy::start(Config::new().vendor("api.openai.com", origin)).await
}

/// The origin answers 401 on the head and goes on reading the upload, as servers that reject
/// early but drain the body do. The upload still crossed the proxy: the record must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_outlasts_its_answer_is_counted_in_the_record() {
    const SIZE: usize = 4 << 20;
    let (addr, received) = origin(|mut s, _head, rest| async move {
        s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
            .await
            .expect("answer");
        let mut total = rest.len();
        let mut chunk = vec![0u8; 64 * 1024];
        while total < SIZE {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        total
    })
    .await;
    let proxy = proxy_for(addr).await;

    let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
    c.write_all(
        format!(
            "POST http://api.openai.com/v1/files HTTP/1.1\r\nhost: api.openai.com\r\n\
             content-length: {SIZE}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("head");
    let (answer, _) = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // Only now the body, all of it, after the answer.
    let block = vec![b'u'; 64 * 1024];
    for _ in 0..SIZE / block.len() {
        c.write_all(&block).await.expect("upload");
    }
    let got = tokio::time::timeout(Duration::from_secs(20), received)
        .await
        .expect("origin done in time")
        .expect("origin result");
    assert_eq!(got, SIZE, "the origin read the whole upload");

    let rec = proxy.audit_path("/v1/files").await;
    assert_eq!(rec["status"], 401);
    assert_eq!(rec["bytes_out"], SIZE as u64, "{rec}");
    drop(c);
}

/// `Transfer-Encoding: gzip, chunked`: hyper takes off the chunked framing only. Passing the
/// rest on without the field would hand the client gzip bytes as if they were the content.
#[tokio::test]
async fn a_response_transfer_coding_besides_chunked_is_a_502() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n5\r\nabcde\r\n0\r\n\r\n"[..],
        &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\nabcde"[..],
    ] {
        let (addr, _done) = origin(move |mut s, _, _| async move {
            let _ = s.write_all(answer).await;
            let _ = s.shutdown().await;
        })
        .await;
        let proxy = proxy_for(addr).await;
        let r = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
        assert_eq!(
            r.status,
            502,
            "{}: {}",
            String::from_utf8_lossy(answer),
            r.body
        );
        assert_eq!(r.json()["error"], "upstream");
        let rec = proxy.audit_path("/v1/models").await;
        assert_eq!(rec["status"], 502);
        assert!(
            rec["reason"].as_str().unwrap().contains("\"gzip\""),
            "{rec}"
        );
    }
}

/// The proxy forwards no `Upgrade` but a WebSocket handshake's (`tests/websocket.rs`), so a 101
/// to any other request (here one asking for h2c) is an origin switching protocols unasked:
/// the bytes after it are not HTTP, and the client gets a 502 rather than a bare 101.
#[tokio::test]
async fn an_unasked_protocol_switch_is_a_502() {
    let (addr, _done) = origin(|mut s, _, _| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nnot http",
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    let proxy = proxy_for(addr).await;
    let r = fetch(
        proxy
            .client()
            .get("http://api.openai.com/v1/realtime")
            .header("upgrade", "h2c")
            .header("connection", "upgrade"),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body);
    let rec = proxy.audit_path("/v1/realtime").await;
    assert_eq!(rec["status"], 502);
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("switched protocols"),
        "{rec}"
    );
}

/// A GET with a chunked body reaches the origin with its body, as one with `Content-Length`
/// does (hyper drops a GET body of unknown length unless told to frame it).
#[tokio::test]
async fn a_chunked_get_body_reaches_the_origin() {
    let (addr, received) = origin(|mut s, head, mut body| async move {
        let mut chunk = [0u8; 1024];
        while !body.ends_with(b"0\r\n\r\n") {
            match tokio::time::timeout(Duration::from_secs(3), s.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        (head, String::from_utf8_lossy(&body).into_owned())
    })
    .await;
    let proxy = proxy_for(addr).await;
    let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
    c.write_all(
        b"GET http://api.openai.com/v1/search HTTP/1.1\r\nhost: api.openai.com\r\n\
          transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await
    .expect("request");
    let (answer, _) = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (head, body) = received.await.expect("origin result");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(body.contains("hello"), "the body was sent on: {body:?}");
    let rec = proxy.audit_path("/v1/search").await;
    assert_eq!(rec["bytes_out"], 5, "{rec}");
}

/// `http://host?q` (no path at all) is the path `/` with a query: a rule on `/` meets it, the
/// record says `/?q`, and the origin is sent `/?q` (RFC 9112 §3.2.1), by either upstream path.
#[tokio::test]
async fn an_empty_path_is_the_root() {
    let (addr, _done) = origin(|mut s, _, _| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let mut config = Config::new().vendor("api.openai.com", addr);
    let mut sent = Vec::new();
    for (host, method) in [("api.mistral.ai", "GET"), ("api.cohere.com", "POST")] {
        let (addr, head) = origin(|mut s, head, _| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            head
        })
        .await;
        config = config.vendor(host, addr);
        sent.push((host, method, head));
    }
    let proxy = Proxy::start(config.tail(
        "[[rule]]\nid = \"no-root\"\nhost = \"api.openai.com\"\npath = \"/\"\naction = \"block\"\n",
    ))
    .await;
    let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
    c.write_all(b"GET http://api.openai.com?x=1 HTTP/1.1\r\nhost: api.openai.com\r\n\r\n")
        .await
        .expect("request");
    let (answer, _) = read_head(&mut c).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let rec = proxy.audit_path("/?x=1").await;
    assert_eq!(rec["rule"], "no-root");

    // Allowed: a GET without a body goes by the proxy's own exchange, a POST by hyper's client.
    for (host, method, head) in sent {
        let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
        let body = if method == "POST" {
            "content-length: 2\r\n\r\nhi"
        } else {
            "\r\n"
        };
        let request = format!("{method} http://{host}?y=2 HTTP/1.1\r\nhost: {host}\r\n{body}");
        c.write_all(request.as_bytes()).await.expect("request");
        let (answer, _) = read_head(&mut c).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
        let head = within("the origin's head", head).await.expect("head");
        assert!(
            head.starts_with(&format!("{method} /?y=2 HTTP/1.1\r\n")),
            "{host}: {head}"
        );
    }
}

/// A GET goes upstream by the proxy's own exchange (`upstream::direct`), a POST with a body by
/// hyper's client: both must refuse the same broken heads and relay the same odd but valid
/// answers, or which path a request takes would change what a client can be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_upstream_paths_agree_on_what_an_answer_is() {
    let broken: [&'static [u8]; 5] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n folded\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    ];
    let valid: [(&'static [u8], &str); 4] = [
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n\
              3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n",
            "abcde",
        ),
        (b"HTTP/1.0 200 OK\r\n\r\nuntil the close", "until the close"),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "ok",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
            "hello",
        ),
    ];
    for with_body in [false, true] {
        for answer in broken {
            let (_proxy, r) = relayed(answer, with_body).await;
            let case = format!("body {with_body}: {}", String::from_utf8_lossy(answer));
            assert_eq!(r.status, 502, "{case}: {}", r.body);
            assert_eq!(r.json()["error"], "upstream", "{case}");
        }
        for (answer, want) in valid {
            let (proxy, r) = relayed(answer, with_body).await;
            let case = format!("body {with_body}: {}", String::from_utf8_lossy(answer));
            assert_eq!((r.status, r.body.as_str()), (200, want), "{case}");
            let rec = proxy.audit_path("/v1/x").await;
            assert_eq!(rec["bytes_in"], want.len() as u64, "{case}: {rec}");
        }
    }
}

/// What a client got through a fresh proxy from an origin that writes `answer` and closes: a
/// GET, or a POST with a body.
async fn relayed(answer: &'static [u8], with_body: bool) -> (Proxy, Raw) {
    let (addr, _done) = origin(move |mut s, _, _| async move {
        let _ = s.write_all(answer).await;
        let _ = s.shutdown().await;
    })
    .await;
    let proxy = proxy_for(addr).await;
    let c = proxy.client();
    let req = match with_body {
        true => c.post("http://api.openai.com/v1/x").body("up"),
        false => c.get("http://api.openai.com/v1/x"),
    };
    let r = fetch(req).await;
    (proxy, r)
}
