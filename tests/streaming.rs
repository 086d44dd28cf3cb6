//! 64 MiB each way through the real binary, streamed: the proxy's memory does not grow with
//! the body, and the audit record counts every byte.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;

const SIZE: u64 = 64 * 1024 * 1024;
const MAX_GROWTH_KB: u64 = 32 * 1024;

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Runs `transfer` while sampling the proxy's RSS; returns the peak growth over `base` in kB.
async fn peak_growth<T>(
    pid: u32,
    base: u64,
    transfer: impl std::future::Future<Output = T>,
) -> (T, u64) {
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(base));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let out = within("64 MiB transfer", transfer).await;
    peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
    done.store(true, Ordering::Relaxed);
    sampler.await.unwrap();
    (out, peak.load(Ordering::Relaxed).saturating_sub(base))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_in_bounded_memory() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(Config::new().vendor("api.openai.com", origin.addr)).await;
    let pid = proxy.pid();
    let client = proxy.client();

    // Warm up (pool, buffers, audit writer) before the baseline.
    let warm = fetch(client.get("http://api.openai.com/download/1048576")).await;
    assert_eq!(warm.body.len(), 1 << 20);
    let base = rss_kb(pid);

    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = (SIZE / chunk.len() as u64) as usize;
    let upload = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let (r, growth) = peak_growth(
        pid,
        base,
        fetch(
            client
                .post("http://api.openai.com/v1/files")
                .body(reqwest::Body::wrap_stream(upload)),
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, format!("origin saw {SIZE} bytes"));
    eprintln!("upload: proxy RSS {base} kB, peak growth {growth} kB");
    assert!(growth < MAX_GROWTH_KB, "upload: proxy RSS grew {growth} kB");

    let download = async {
        let mut resp = client
            .get(format!("http://api.openai.com/download/{SIZE}"))
            .send()
            .await
            .expect("download");
        assert_eq!(resp.status(), 200);
        let mut n = 0u64;
        while let Some(c) = resp.chunk().await.expect("chunk") {
            n += c.len() as u64;
        }
        n
    };
    let (n, growth) = peak_growth(pid, base, download).await;
    assert_eq!(n, SIZE);
    eprintln!("download: peak growth {growth} kB");
    assert!(
        growth < MAX_GROWTH_KB,
        "download: proxy RSS grew {growth} kB"
    );

    let up = proxy.audit_path("/v1/files").await;
    assert_eq!(up["bytes_out"], SIZE);
    let down = proxy.audit_path(&format!("/download/{SIZE}")).await;
    assert_eq!(down["bytes_in"], SIZE);
    assert_eq!(proxy.stop().await.map(|s| s.success()), Some(true));
}

/// A raw HTTP/1.1 origin for full-duplex exchanges. `/listen` answers at once and sends a
/// tick every 250 ms for 2 s without reading the upload; `/collect` answers one chunk at once,
/// reads the whole (chunked) upload, then sends the last chunk.
async fn duplex_origin() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).into_owned();
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n4\r\nsent\r\n")
                    .await;
                if head.contains(" /listen ") {
                    for _ in 0..8 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        let _ = s.write_all(b"4\r\ntick\r\n").await;
                    }
                } else {
                    while !got.windows(5).any(|w| w == b"0\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(b"4\r\ndone\r\n").await;
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
                let _ = read_to_close(&mut s).await;
            });
        }
    });
    addr
}

async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all).await;
    all
}

/// `body_timeout` is for an exchange where nothing moves, not for one direction of a live
/// one: a client that listens while the origin streams (its upload open and quiet), and an
/// origin that reads a long upload before it says more, are not cut. Each direction's timer
/// used to fire on its own: the first was cut as the origin's fault (`upstream_body`), the
/// second as `body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_duplex_exchange_is_not_idle_while_either_direction_moves() {
    use tokio::io::AsyncWriteExt;
    let origin = duplex_origin().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin)
            .proxy("body_timeout = \"1s\""),
    )
    .await;
    let head = |path: &str| {
        format!(
            "POST http://api.openai.com{path} HTTP/1.1\r\nHost: api.openai.com\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n"
        )
    };

    // The client listens, its upload open, while the origin streams for 2 s.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(head("/listen").as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    let mut body = Vec::new();
    within("the ticks", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        while !body.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "cut after {:?}", String::from_utf8_lossy(&body));
            body.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&body).matches("tick").count(), 8);
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let rec = proxy.audit_path("/listen").await;
    assert_eq!(rec["status"], 200, "{rec}");
    assert!(!rec["reason"].as_str().unwrap().contains("cut"), "{rec}");

    // The origin reads an upload that goes on for 2 s before it says more.
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(head("/collect").as_bytes()).await.unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"4\r\nmore\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let rest = within("the rest", read_to_close(&mut s)).await;
    assert!(
        String::from_utf8_lossy(&rest).contains("done\r\n0\r\n\r\n"),
        "{rest:?}"
    );
    let rec = proxy.audit_path("/collect").await;
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["bytes_out"], 5 + 8 * 4, "{rec}");
    assert!(!rec["reason"].as_str().unwrap().contains("cut"), "{rec}");
}
