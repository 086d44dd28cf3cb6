//! Limiter cost: a memory-store check on one hot key and across 1 M keys, the Redis round trip
//! on loopback (a redis-server started here on an ephemeral port, stopped at the end), and the
//! RSS that 1 M keys cost. CPU-time cross-checks are printed beside criterion's wall-clock
//! medians because the machine is shared.
//!
//!     cargo bench --bench limits

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{black_box, Criterion};
use portcullis::limits::{
    KeyPart, KeyValues, LimitKind, LimitSpec, Limiter, MemoryConfig, RedisConfig,
};

/// The memory store never awaits: poll once, without a runtime's overhead in the figure.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("memory check awaited"),
    }
}

fn spec() -> LimitSpec {
    LimitSpec {
        id: Arc::from("bench"),
        kind: LimitKind::Rate {
            requests: 1_000_000_000,
            per: Duration::from_secs(1),
            burst: 1_000_000_000,
        },
        by: vec![KeyPart::Client],
    }
}

fn kv(i: u32) -> KeyValues<'static> {
    KeyValues {
        client: IpAddr::V4(Ipv4Addr::from(i)),
        user: None,
        key_id: None,
        vendor: Some("openai"),
    }
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// This thread's user+system CPU time from /proc (10 ms ticks; fine over seconds).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    (f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()) * 10_000_000
}

fn main() {
    let spec = spec();
    {
        let before = rss_kib();
        let lim = Limiter::memory(MemoryConfig::default());
        let t = Instant::now();
        for i in 0..1_000_000 {
            assert!(now(lim.check(&spec, &kv(i), 1)).is_allowed());
        }
        let after = rss_kib();
        println!(
            "RSS: before {before} KiB, after 1M keys {after} KiB, delta {} KiB ({} B/key); insert {:?}; key_count {}",
            after - before,
            (after - before) * 1024 / 1_000_000,
            t.elapsed(),
            lim.key_count()
        );
    }

    // CPU-time cross-check: the machine is shared, wall-clock figures include time spent
    // descheduled; this counts only the time this thread ran.
    {
        let hot = Limiter::memory(MemoryConfig::default());
        let n = 5_000_000u64;
        let t0 = thread_cpu_ns();
        for _ in 0..n {
            black_box(now(hot.check(black_box(&spec), black_box(&kv(1)), 1)));
        }
        println!("cpu: hot check {} ns/op", (thread_cpu_ns() - t0) / n);
        let big = Limiter::memory(MemoryConfig::default());
        for i in 0..1_000_000 {
            now(big.check(&spec, &kv(i), 1));
        }
        let mut i: u32 = 0;
        let t0 = thread_cpu_ns();
        for _ in 0..n {
            i = i.wrapping_add(7_919) % 1_000_000;
            black_box(now(big.check(black_box(&spec), &kv(i), 1)));
        }
        println!("cpu: 1M-key check {} ns/op", (thread_cpu_ns() - t0) / n);
        let e = Instant::now();
        let t0 = thread_cpu_ns();
        for _ in 0..n {
            black_box(e.elapsed());
        }
        println!("cpu: Instant::elapsed {} ns/op", (thread_cpu_ns() - t0) / n);
    }

    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));

    let hot = Limiter::memory(MemoryConfig::default());
    c.bench_function("memory_check_one_key", |b| {
        b.iter(|| now(hot.check(black_box(&spec), black_box(&kv(1)), 1)))
    });

    let big = Limiter::memory(MemoryConfig::default());
    for i in 0..1_000_000 {
        now(big.check(&spec, &kv(i), 1));
    }
    let mut i: u32 = 0;
    c.bench_function("memory_check_1m_keys", |b| {
        b.iter(|| {
            // Stride through the 1M keys so consecutive checks hit different cache lines.
            i = i.wrapping_add(7_919) % 1_000_000;
            now(big.check(black_box(&spec), &kv(i), 1))
        })
    });
    assert_eq!(big.key_count(), 1_000_000);

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("redis://127.0.0.1:{port}/");
    let lim = rt
        .block_on(Limiter::redis(&url, RedisConfig::default()))
        .unwrap();
    c.bench_function("redis_check_round_trip", |b| {
        b.iter(|| rt.block_on(lim.check(black_box(&spec), &kv(1), 1)))
    });
    assert_eq!(lim.store_errors(), 0);
    let _ = server.kill();
    let _ = server.wait();
    c.final_summary();
}
