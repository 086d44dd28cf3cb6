//! Upstream failures (502/504 naming the kind, in the audit log and the metric) and the limits
//! on a client connection (431, header read timeout).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_name_their_kind() {
    let hang = Sink::start().await;
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", closed)
            .vendor("api.anthropic.com", hang.addr)
            .upstream("response_timeout = \"1s\""),
    )
    .await;
    let client = proxy.client();

    // (host, path, status, kind); `.invalid` never resolves, so nothing is sent for it.
    let cases = [
        ("api.openai.com", "/v1/models", 502, "connect"),
        ("api.anthropic.com", "/v1/messages", 504, "timeout"),
        ("something.invalid", "/x", 502, "dns"),
    ];
    for (host, path, status, kind) in cases {
        let r = fetch(client.get(format!("http://{host}{path}"))).await;
        assert_error(&r, status, kind);
        let rec = proxy.audit_path(path).await;
        assert_eq!(rec["status"], status, "{rec}");
        assert_reason(&rec, kind);
        assert_eq!(proxy.upstream_errors(kind).await, 1.0, "{kind}");
    }
    assert_eq!(hang.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_gets_431() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("max_header_bytes = 8192"),
    )
    .await;
    let big = format!("X-Big: {}", "a".repeat(16 * 1024));
    let r = raw_get(proxy.addr, "http://api.openai.com/v1/models", &[&big]).await;
    assert_eq!(r.status, 431, "{r:?}");
    // A head under the limit still works.
    let small = format!("X-Small: {}", "a".repeat(1024));
    let r = raw_get(proxy.addr, "http://api.openai.com/v1/models", &[&small]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.requests().len(), 1);
}

/// hyper bounds its read buffer, and a head that arrives in one read can overshoot that
/// bound: the limit must hold for the head however it arrives, just over it as well as far
/// over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_gets_431_however_it_arrives() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("max_header_bytes = 65536"),
    )
    .await;
    for size in [66 * 1024, 90 * 1024] {
        // Several fields, sent in one write.
        let fields: Vec<String> = (0..size / 4096)
            .map(|i| format!("X-Pad-{i}: {}", "a".repeat(4096)))
            .collect();
        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        let r = raw_get(proxy.addr, "http://api.openai.com/v1/models", &fields).await;
        assert_eq!(r.status, 431, "{size}: {r:?}");
    }
    let fields: Vec<String> = (0..12)
        .map(|i| format!("X-Pad-{i}: {}", "a".repeat(4096)))
        .collect();
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    let r = raw_get(proxy.addr, "http://api.openai.com/v1/models", &fields).await;
    assert_eq!(r.status, 200, "48 KiB: {r:?}");
    assert_eq!(origin.requests().len(), 1);
}

/// A head begun and not finished within the timeout is closed and on record (a slowloris, or
/// an attempt at a vendor cut short); a connection that sent nothing, or sits quiet after a
/// whole exchange (and an empty line), is closed as quietly as it sat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_head_is_disconnected_and_audited() {
    // The origin must outlive the exchange on `kept`.
    let (_origin, proxy) = proxy_with_a_1s_head_timeout().await;
    let mut quiet = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut kept = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    kept.write_all(b"GET http://api.openai.com/whole HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_head(&mut kept).await;
    assert_eq!(status, 200);
    // An empty line after a request is to be ignored (RFC 9112 §2.2): it begins no head.
    kept.write_all(b"\r\n").await.unwrap();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET http://api.deepseek.com/ HTTP/1.1\r\nHost: api.deepseek.com\r\nX-Half")
        .await
        .unwrap();
    // The proxy closes the connection without an answer; the test's deadline is the bound.
    let started = std::time::Instant::now();
    read_until_closed(&mut s).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    read_until_closed(&mut quiet).await;
    read_until_closed(&mut kept).await;
    let rec = proxy
        .audit_where("the unfinished head", |r| r["method"] == "-")
        .await;
    assert_eq!(rec["status"], 408, "{rec}");
    assert_eq!(rec["action"], "reject", "{rec}");
    assert_reason(&rec, "header_read_timeout");
    // One record for the whole exchange, one for the unfinished head: none for the quiet two.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let all = proxy.audit_records();
    assert_eq!(all.len(), 2, "{all:?}");
}

/// An origin may answer before it has read the upload (a 401, a 413, or as here a 200): the
/// client is still sending its body, and the header read timeout does not run until that
/// body has ended, as with hyper's own timer, which started only at the next head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_early_is_not_cut_by_the_header_read_timeout() {
    use tokio::io::AsyncReadExt;
    // Answers each request at once, then reads (and drops) what follows.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin)
            .proxy("header_read_timeout = \"1s\""),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST http://api.openai.com/v1/files HTTP/1.1\r\nHost: api.openai.com\r\n\
          Content-Length: 10\r\n\r\n",
    )
    .await
    .unwrap();
    // Three timeouts' worth of upload, a byte at a time (body_timeout is far longer).
    for _ in 0..10 {
        s.write_all(b"a").await.expect("the upload was cut");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    let rec = proxy.audit_path("/v1/files").await;
    assert_eq!(rec["bytes_out"], 10, "{rec}");
    // The upload ended in the upstream client's task: the connection, idle now, is still
    // closed once the timeout has passed (within two, as that end is seen when the timer fires).
    let idle = std::time::Instant::now();
    read_until_closed(&mut s).await;
    assert!(
        idle.elapsed() < Duration::from_secs(4),
        "{:?}",
        idle.elapsed()
    );
}

/// The header read timeout bounds how long a connection waits for a head: from its opening or
/// from the end of the previous answer, never while an answer is still streaming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_waits_for_a_head_only_between_answers() {
    let (origin, proxy) = proxy_with_a_1s_head_timeout().await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let get = |path: &str| {
        format!("GET http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    };
    // An answer that streams for three timeouts: its first event, a pause, then the rest.
    s.write_all(get("/sse").as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    origin.release();
    let mut seen = Vec::new();
    within("the rest of the event stream", async {
        let mut buf = [0u8; 1024];
        // The chunked body's last chunk.
        while !seen.ends_with(b"0\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                .await
                .unwrap();
            assert!(
                n > 0,
                "closed while the answer streamed: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    // Kept alive after it: a second request within the timeout is answered.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(get("/v1/models").as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    // Then, with no further head, it is closed once the timeout has passed since that answer.
    let answered = std::time::Instant::now();
    read_until_closed(&mut s).await;
    let idle = answered.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(5),
        "closed {idle:?} after the last answer"
    );
}

/// The response timeout is the origin's time to answer once it has the request: an upload
/// that keeps moving for longer (a large file over a slow link) is not cut by it, and an
/// origin silent after the upload ended is cut a timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_timeout_counts_from_the_end_of_the_upload() {
    let origin = Origin::http().await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        // Reads whatever comes and never answers.
        while let Ok((mut s, _)) = silent.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {}
            });
        }
    });
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.anthropic.com", silent_addr)
            .upstream("response_timeout = \"1s\""),
    )
    .await;
    for (host, status) in [("api.openai.com", 200), ("api.anthropic.com", 504)] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST http://{host}/v1/files HTTP/1.1\r\nHost: {host}\r\n\
             Transfer-Encoding: chunked\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        // Eight chunks 300 ms apart: the upload lasts more than twice the timeout.
        for _ in 0..8 {
            s.write_all(b"400\r\n").await.unwrap();
            s.write_all(&[b'u'; 0x400]).await.unwrap();
            s.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        s.write_all(b"0\r\n\r\n").await.unwrap();
        let uploaded = started.elapsed();
        let (got, _) = within(host, read_head(&mut s)).await;
        assert_eq!(got, status, "{host}");
        if status == 504 {
            let waited = started.elapsed() - uploaded;
            assert!(
                waited >= Duration::from_millis(900),
                "cut {waited:?} after the upload ended"
            );
        }
    }
    assert_eq!(origin.request("/v1/files").await.body_len, 8 * 0x400);
}

/// A fake origin for api.openai.com, and a proxy whose `header_read_timeout` is 1 s.
async fn proxy_with_a_1s_head_timeout() -> (Origin, Proxy) {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("header_read_timeout = \"1s\""),
    )
    .await;
    (origin, proxy)
}

/// A client that resets its connection halfway through an upload left, and is recorded as
/// such (499 `client_aborted`), not as a client that sent a malformed body (400): it got no
/// answer, and its body was not bad, only cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_upload_is_client_aborted_not_a_bad_body() {
    // Reads the upload and never answers: the request is mid-upload when the client goes.
    let origin = Sink::start().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    for i in 0..3 {
        let path = format!("/v1/files?reset-{i}");
        // Read before sending: the proxy may relay the whole part before the write returns.
        let before = origin.received();
        let mut s = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
             Content-Length: 10000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&vec![b'u'; 100_000])
            .await
            .expect("part of the body");
        // The upload is on its way to the origin when the client goes.
        eventually("the upload to reach the origin", || {
            (origin.received() > before + 50_000).then_some(())
        })
        .await;
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(s);
        let rec = proxy.audit_path(&path).await;
        assert_eq!(rec["status"], 499, "{rec}");
        assert_reason(&rec, "client_aborted");
    }
    // The same while the body is held back for a DLP rule to read.
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-secrets\"\nvendor = \"openai\"\ndlp = \"all\"\naction = \"block\"\n",
    ))
    .await;
    let path = "/v1/chat/completions?reset-while-inspected";
    let mut s = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
         Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&vec![b' '; 100_000])
        .await
        .expect("part of the body");
    tokio::time::sleep(Duration::from_millis(300)).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
    let rec = proxy.audit_path(path).await;
    assert_eq!(rec["status"], 499, "{rec}");
    assert_reason(&rec, "client_aborted");
}
