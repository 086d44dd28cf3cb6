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
