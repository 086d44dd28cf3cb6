//! Slow and hostile clients: slowloris, a stalled upload, a client that stops reading a large
//! download, a CONNECT that never sends its ClientHello, thousands of idle sockets, one address
//! opening too many connections. Each is cut by its own limit while a well-behaved client, at
//! the same time, keeps getting answers promptly. (A head that stops entirely is in errors.rs.)

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// "Normal latency" for a request while the proxy is under attack: generous for a noisy 2-core
/// machine, yet far below any of the timeouts the attackers are waiting out.
const PROMPT: Duration = Duration::from_secs(2);

const DOWNLOAD: u64 = 64 * 1024 * 1024;

/// A well-behaved client: `n` requests one after another, each answered 200 within [`PROMPT`].
/// Returns the slowest.
async fn real_client(client: &reqwest::Client, tag: &str, n: usize) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let started = Instant::now();
        let r = tokio::time::timeout(
            PROMPT,
            client
                .get(format!("http://api.openai.com/v1/models?real={tag}-{i}"))
                .send(),
        )
        .await
        .unwrap_or_else(|_| panic!("real client {tag}-{i}: no answer within {PROMPT:?}"))
        .expect("real client request");
        assert_eq!(r.status(), 200, "real client {tag}-{i}");
        r.bytes().await.expect("body");
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_cut_while_a_real_client_is_served() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("header_read_timeout = \"2s\"")
            .proxy("body_timeout = \"1s\"")
            .proxy("send_timeout = \"2s\"")
            .proxy("client_hello_timeout = \"1s\""),
    )
    .await;
    let pid = proxy.pid();
    let client = proxy.client();
    // Warm up (pool, buffers, audit writer) before the memory baseline.
    real_client(&client, "warm", 3).await;
    let base = rss_kb(pid);
    let peak = Arc::new(AtomicU64::new(base));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Slowloris: a request head dripped one byte a second.
    let slowloris = {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            let head = b"GET http://api.openai.com/v1/models?slowloris HTTP/1.1\r\nHost: x\r\n";
            for b in head {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                // Closed yet? (Read with a one-second budget = the drip interval.)
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {
                        read_until_closed(&mut s).await;
                        break;
                    }
                    Err(_) => {}
                }
            }
            started.elapsed()
        })
    };

    // A slow upload: the head and 1 KiB of a 100 KiB body, then nothing.
    let slow_body = {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                b"POST http://api.openai.com/v1/files?slow-body HTTP/1.1\r\nHost: api.openai.com\r\n\
                  Content-Length: 102400\r\n\r\n",
            )
            .await
            .unwrap();
            s.write_all(&[b'b'; 1024]).await.unwrap();
            let (status, head) = within("an answer to the stalled upload", read_head(&mut s)).await;
            read_until_closed(&mut s).await;
            (status, head)
        })
    };

    // A CONNECT that never sends its ClientHello.
    let silent_tunnel = {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let (status, _, mut s) = raw_connect(addr, "api.openai.com:443", &[]).await;
            let started = Instant::now();
            read_until_closed(&mut s).await;
            (status, started.elapsed())
        })
    };

    // A slow reader of a 64 MiB download: reads a little for a while, then stops reading.
    let slow_reader = {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!(
                    "GET http://api.openai.com/download/{DOWNLOAD} HTTP/1.1\r\nHost: api.openai.com\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let (status, _) = read_head(&mut s).await;
            let mut buf = vec![0u8; 16 * 1024];
            let mut got = 0u64;
            for _ in 0..50 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => panic!("cut while still reading"),
                    Ok(n) => got += n as u64,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Now stop reading and hold the socket open.
            (status, got, s)
        })
    };

    // Meanwhile, the real client.
    let slowest = real_client(&client, "under-attack", 20).await;
    eprintln!("real client: slowest answer {slowest:?} while under attack");

    let slowloris_life = within("slowloris to be cut", slowloris).await.unwrap();
    assert!(
        slowloris_life >= Duration::from_millis(1500),
        "slowloris cut before header_read_timeout: {slowloris_life:?}"
    );

    let (status, head) = within("slow upload to be cut", slow_body).await.unwrap();
    assert_eq!(status, 408, "{head}");
    let rec = proxy.audit_path("/v1/files?slow-body").await;
    assert_eq!(rec["status"], 408, "{rec}");
    assert_reason(&rec, "client_body_timeout");
    // The origin may have seen the start of the upload, never a complete one.
    assert!(origin
        .requests()
        .iter()
        .filter(|r| r.uri.contains("slow-body"))
        .all(|r| r.body_len < 102400));

    let (status, life) = within("silent tunnel to be cut", silent_tunnel)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(life >= Duration::from_millis(800), "{life:?}");
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_reason(&rec, "client_hello_timeout");

    let (status, got, mut stalled) = within("slow reader", slow_reader).await.unwrap();
    assert_eq!(status, 200);
    // Cut by send_timeout: the download's audit record is written when the proxy drops it.
    let rec = proxy.audit_path(&format!("/download/{DOWNLOAD}")).await;
    let delivered = rec["bytes_in"].as_u64().unwrap();
    assert!(
        delivered < DOWNLOAD,
        "the proxy delivered the whole download to a client that stopped reading: {rec}"
    );
    let rest = read_until_closed(&mut stalled).await as u64;
    assert!(got + rest < DOWNLOAD, "{got} + {rest}");

    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let growth = peak.load(Ordering::Relaxed).saturating_sub(base);
    eprintln!("proxy RSS {base} kB, peak growth {growth} kB, delivered {delivered} of {DOWNLOAD}");
    assert!(
        growth < 32 * 1024,
        "the proxy buffered for a slow reader: RSS grew {growth} kB"
    );
    // Nothing of slowloris reached the origin.
    assert!(!origin
        .requests()
        .iter()
        .any(|r| r.uri.contains("slowloris")));
    real_client(&client, "after", 3).await;
    assert_eq!(proxy.stop().await.map(|s| s.success()), Some(true));
}

const IDLE_SOCKETS: usize = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_idle_sockets_are_closed_and_do_not_starve_others() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("header_read_timeout = \"10s\"")
            .proxy("max_connections_per_client = 0"),
    )
    .await;
    let client = proxy.client();

    // Open them in batches (the listen backlog is finite); they send nothing.
    let opening = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_SOCKETS);
    within("opening idle sockets", async {
        while idle.len() < IDLE_SOCKETS {
            let batch: Vec<_> = (0..250)
                .map(|_| tokio::spawn(TcpStream::connect(proxy.addr)))
                .collect();
            for c in batch {
                idle.push(c.await.unwrap().expect("idle connect"));
            }
        }
    })
    .await;
    // The proxy holds them all.
    within("the proxy to accept every idle socket", async {
        loop {
            let m = proxy.metrics().await;
            if metric(&m, "portcullis_connections_active", &[]) >= IDLE_SOCKETS as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    eprintln!(
        "{IDLE_SOCKETS} idle sockets open and accepted in {:?}",
        opening.elapsed()
    );
    let slowest = real_client(&client, "idle-5000", 10).await;
    eprintln!("real client: slowest answer {slowest:?} with {IDLE_SOCKETS} idle sockets open");

    // Every idle socket is closed by the proxy once header_read_timeout passes.
    let started = Instant::now();
    let closed: Vec<_> = idle
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
        })
        .collect();
    within("every idle socket to be closed", async {
        for c in closed {
            c.await.unwrap();
        }
    })
    .await;
    eprintln!(
        "all {IDLE_SOCKETS} idle sockets closed {:?} after the real client finished",
        started.elapsed()
    );
    within("connections_active to fall", async {
        loop {
            let m = proxy.metrics().await;
            // The real client's keep-alive connection may still be open.
            if metric(&m, "portcullis_connections_active", &[]) <= 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    real_client(&client, "after-idle", 3).await;
    assert_eq!(proxy.stop().await.map(|s| s.success()), Some(true));
}

/// Opens a connection from `from` and says whether the proxy serves it (a GET answered) or
/// closed it at accept.
async fn served_from(from: IpAddr, proxy: SocketAddr) -> bool {
    let mut s = connect_from(from, proxy).await.expect("connect");
    let req = b"GET http://api.openai.com/v1/models?cap HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = within("an answer or a close", s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_capped_others_are_not() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("max_connections_per_client = 4"),
    )
    .await;
    let greedy: IpAddr = "127.0.0.2".parse().unwrap();
    let other: IpAddr = "127.0.0.3".parse().unwrap();

    // Four idle connections from one address: the cap.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(greedy, proxy.addr).await.unwrap());
    }
    within("the proxy to accept the four", async {
        loop {
            let m = proxy.metrics().await;
            if metric(&m, "portcullis_connections_active", &[]) >= 4.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // A fifth from the same address is closed at accept, unanswered.
    assert!(!served_from(greedy, proxy.addr).await);
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "portcullis_connections_refused_per_client_total", &[]),
        1.0
    );
    assert_eq!(metric(&m, "portcullis_connections_refused_total", &[]), 0.0);
    // Other addresses are served meanwhile.
    assert!(served_from(other, proxy.addr).await);
    let r = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
    assert_eq!(r.status, 200);
    // A connection that closes gives its slot back.
    drop(held.pop());
    let back = within("a freed slot to be reused", async {
        loop {
            if served_from(greedy, proxy.addr).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(back);
    // Only the refused attempt never reached the origin: 3 served requests, 3 seen.
    assert_eq!(
        origin.requests().len(),
        3,
        "{:?}",
        origin.requests().iter().map(|r| &r.uri).collect::<Vec<_>>()
    );
}

/// A tunnel is a connection for as long as it is open: CONNECTs from one address are capped
/// by `max_connections_per_client` like any other connection, not only until their 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_the_per_client_cap() {
    let sink = Sink::start().await;
    let proxy = Proxy::start(
        Config::new()
            .resolve("api.openai.com:443", sink.addr)
            .loopback()
            .proxy("max_connections_per_client = 2"),
    )
    .await;
    let greedy: IpAddr = "127.0.0.2".parse().unwrap();
    let open = |from: IpAddr| async move {
        let mut s = connect_from(from, proxy.addr).await.ok()?;
        s.write_all(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        within("a CONNECT answer or a close", s.read_exact(&mut head))
            .await
            .ok()?;
        head.starts_with(b"HTTP/1.1 200").then_some(s)
    };
    let first = open(greedy).await.expect("the first tunnel");
    let _second = open(greedy).await.expect("the second tunnel");
    assert!(
        open(greedy).await.is_none(),
        "a third tunnel from the same address"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "portcullis_connections_refused_per_client_total", &[]),
        1.0
    );
    // Closing a tunnel gives its place back.
    drop(first);
    let again = within("a freed place to be reused", async {
        loop {
            if let Some(s) = open(greedy).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    drop(again);
}

#[test]
fn new_keys_are_validated_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[proxy]\nmax_connections_per_client = -1\n", 2, ""),
        ("[proxy]\nbody_timeout = \"0s\"\n", 2, "above zero"),
        ("[proxy]\nsend_timeout = \"soon\"\n", 2, "invalid duration"),
        (
            "[audit]\non_full = \"wait\"\n",
            2,
            "unknown on_full \"wait\" (drop, block)",
        ),
    ];
    for (text, line, msg) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let e = portcullis::config::load(&path).unwrap_err().to_string();
        let want = format!("{}:{line}:", path.display());
        assert!(e.starts_with(&want), "{e}");
        assert!(e.contains(msg), "{e}");
    }
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        "[proxy]\nmax_connections_per_client = 0\nbody_timeout = \"30s\"\nsend_timeout = \"45s\"\n\
         [audit]\non_full = \"block\"\n",
    )
    .unwrap();
    let l = portcullis::config::load(&path).unwrap();
    assert_eq!(l.settings.proxy.max_connections_per_client, 0);
    assert_eq!(l.settings.proxy.body_timeout, Duration::from_secs(30));
    assert_eq!(l.settings.proxy.send_timeout, Duration::from_secs(45));
    assert_eq!(l.settings.audit.on_full, portcullis::config::OnFull::Block);
}

/// Bodies held back for inspection share one budget (`[inspect] max_buffered`, of which one
/// client address may hold an eighth or `max_body`): slow uploads that each stall below
/// `max_body` cannot pile up memory without bound. Past the budget a
/// request is refused 503 `inspection_busy` (never forwarded uninspected), and the budget comes
/// back when the stalled uploads go away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_bodies_share_one_budget() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(
                "[[rule]]\nid = \"no-gpt4o\"\nvendor = \"openai\"\nendpoint = \"chat\"\nmodel = \"gpt-4o*\"\naction = \"block\"\n\n\
                 [inspect]\nmax_body = \"1KiB\"\nmax_buffered = \"2KiB\"\ntimeout = \"30s\"\n",
            ),
    )
    .await;
    // Two uploads promise 5,000 bytes, send 1,000 and stall: 2,000 of 2,048 bytes held. Each
    // from its own address: one address may hold only its share (here max_body, 1,024).
    let mut stalled = Vec::new();
    for i in 0..2u8 {
        let from = IpAddr::from([127, 0, 0, 2 + i]);
        let mut s = connect_from(from, proxy.addr).await.expect("connect");
        let head = format!(
            "POST http://api.openai.com/v1/chat/completions?stall={i} HTTP/1.1\r\n\
             Host: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&[b' '; 1000]).await.expect("body");
        stalled.push(s);
    }
    // 100+ bytes: more than the 48 left.
    let body = format!(
        r#"{{"model":"o3-mini","messages":[],"user":"{}"}}"#,
        "u".repeat(80)
    );
    let send = || {
        proxy
            .client()
            .post("http://api.openai.com/v1/chat/completions")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
    };
    let mut refused = None;
    for _ in 0..50 {
        let r = send().await.expect("request");
        if r.status() == 503 {
            refused = Some(r.text().await.expect("body"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = refused.expect("a request past the budget is refused");
    assert!(refused.contains("inspection_busy"), "{refused}");
    assert!(
        origin.requests().is_empty(),
        "nothing was forwarded uninspected"
    );
    let rec = proxy
        .audit_where("the refusal", |r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("inspection_busy"))
        })
        .await;
    assert_eq!(rec["status"], 503, "{rec}");

    drop(stalled);
    let mut served = false;
    for _ in 0..100 {
        let r = send().await.expect("request");
        if r.status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        served,
        "the budget comes back when the stalled uploads go away"
    );

    // A body longer than max_body, in many chunks: the held prefix (cut inside a chunk) and the
    // streamed rest reach the origin as sent, in order.
    let mut long = br#"{"model":"o3","pad":""#.to_vec();
    long.extend((0..5000u32).map(|i| b'a' + (i * 7 % 26) as u8));
    long.extend_from_slice(br#""}"#);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        long.chunks(700).map(|c| Ok(c.to_vec())).collect();
    let r = proxy
        .client()
        .post("http://api.openai.com/v1/embeddings?long")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("long body");
    assert_eq!(r.status(), 200);
    let seen = origin.request("/v1/embeddings?long").await;
    assert_eq!(seen.body_len, long.len() as u64);
    assert_eq!(
        seen.body_fnv,
        fnv1a(FNV_START, &long),
        "bytes changed on the way"
    );
}

/// A body that pauses past `[inspect] timeout` before reaching `max_body` or its end is
/// refused (408): deciding on the part that arrived would let a secret sent after the pause
/// reach the vendor uninspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_paused_past_the_inspection_wait_is_refused() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-secrets\"\nvendor = \"openai\"\ndlp = \"all\"\naction = \"block\"\n\n\
         [inspect]\ntimeout = \"1s\"\n",
    ))
    .await;
    let secret = r#"AKIAIOSFODNN7EXAMPLE"}"#;
    let head_part = r#"{"model":"gpt-4o","k":""#;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = format!(
        "POST http://api.openai.com/v1/chat/completions?paused HTTP/1.1\r\nHost: api.openai.com\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{head_part}",
        head_part.len() + secret.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = s.write_all(secret.as_bytes()).await;
    let (status, _) = within("the refusal", read_head(&mut s)).await;
    assert_eq!(status, 408);
    assert!(origin.requests().is_empty(), "nothing reached the origin");
    // The answer names the wait that ran out: the rules', not `body_timeout`.
    let mut body = Vec::new();
    within("the body", s.read_to_end(&mut body))
        .await
        .expect("body");
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("[inspect] timeout"), "{body}");
    let rec = proxy.audit_path("/v1/chat/completions?paused").await;
    assert_eq!(rec["reason"], "client_body_timeout", "{rec}");
    assert_eq!(rec["port"], 80, "{rec}");
}
