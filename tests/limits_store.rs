//! The limit engine against its two stores: memory, and a real redis-server on 127.0.0.1 with
//! an ephemeral port (CI installs `redis-server`; without it the Redis tests fail, on purpose).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::RedisServer;

use portcullis::limits::{
    KeyPart, KeyValues, LimitKind, LimitSpec, Limiter, MemoryConfig, OnStoreError, RedisConfig,
    Verdict,
};

fn rate(id: &str, requests: u64, per: Duration, by: Vec<KeyPart>) -> LimitSpec {
    LimitSpec {
        id: Arc::from(id),
        kind: LimitKind::Rate {
            requests,
            per,
            burst: requests,
        },
        by,
    }
}

fn client(i: u32) -> KeyValues<'static> {
    KeyValues {
        client: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
        user: None,
        key_id: None,
        vendor: Some("openai"),
    }
}

async fn count_allowed(lim: &Limiter, spec: &LimitSpec, keys: &KeyValues<'_>, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        ok += usize::from(lim.check(spec, keys, 1).await.is_allowed());
    }
    ok
}

/// Fires `n` checks as concurrent tasks and counts how many were allowed.
async fn concurrent_allowed(lim: Arc<Limiter>, spec: Arc<LimitSpec>, n: usize) -> usize {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (lim, spec, start) = (lim.clone(), spec.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                lim.check(&spec, &client(1), 1).await.is_allowed()
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_gcra_is_exact_under_concurrency() {
    let lim = Arc::new(Limiter::memory(MemoryConfig::default()));
    let spec = Arc::new(rate(
        "bulk",
        50,
        Duration::from_secs(60),
        vec![KeyPart::Client],
    ));
    assert_eq!(concurrent_allowed(lim, spec, 200).await, 50);
}

#[tokio::test]
async fn memory_recovers_after_retry_after() {
    let lim = Limiter::memory(MemoryConfig::default());
    let spec = rate("r", 5, Duration::from_secs(1), vec![KeyPart::Client]);
    assert_eq!(count_allowed(&lim, &spec, &client(1), 5).await, 5);
    let Verdict::Denied { retry_after } = lim.check(&spec, &client(1), 1).await else {
        panic!("6th request allowed");
    };
    assert_eq!(
        retry_after,
        Duration::from_secs(1),
        "whole seconds, rounded up, at least 1"
    );
    tokio::time::sleep(retry_after).await;
    assert!(lim.check(&spec, &client(1), 1).await.is_allowed());
}

#[tokio::test]
async fn memory_each_key_kind_separates_counters() {
    let lim = Limiter::memory(MemoryConfig::default());
    let per = Duration::from_secs(60);
    let kv = |ip: u32, user, key_id, vendor| KeyValues {
        client: IpAddr::V4(Ipv4Addr::from(ip)),
        user,
        key_id,
        vendor,
    };
    // by client: A and B each get their own 5.
    let s = rate("c", 5, per, vec![KeyPart::Client]);
    for ip in [1, 2] {
        assert_eq!(
            count_allowed(&lim, &s, &kv(ip, None, None, None), 6).await,
            5
        );
    }
    // by user: two users on one address are separate; one user on two addresses is one.
    let s = rate("u", 5, per, vec![KeyPart::User]);
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, Some("ann"), None, None), 3).await,
        3
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(2, Some("ann"), None, None), 3).await,
        2
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, Some("bob"), None, None), 6).await,
        5
    );
    // by key.
    let s = rate("k", 5, per, vec![KeyPart::Key]);
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, None, Some("k1"), None), 6).await,
        5
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, None, Some("k2"), None), 6).await,
        5
    );
    // by vendor: shared by everyone using that vendor.
    let s = rate("v", 5, per, vec![KeyPart::Vendor]);
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, None, None, Some("openai")), 3).await,
        3
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(2, None, None, Some("openai")), 3).await,
        2
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(2, None, None, Some("anthropic")), 6).await,
        5
    );
    // composite user+vendor.
    let s = rate("uv", 5, per, vec![KeyPart::User, KeyPart::Vendor]);
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, Some("ann"), None, Some("openai")), 6).await,
        5
    );
    assert_eq!(
        count_allowed(&lim, &s, &kv(1, Some("ann"), None, Some("deepseek")), 6).await,
        5
    );
    // The same id with other limits' state never mixes: "c" is still used up for address 1.
    let s = rate("c", 5, per, vec![KeyPart::Client]);
    assert!(!lim
        .check(&s, &kv(1, None, None, None), 1)
        .await
        .is_allowed());
}

fn bytes_spec(id: &str) -> LimitSpec {
    LimitSpec {
        id: Arc::from(id),
        kind: LimitKind::Bytes {
            bytes: 1000,
            per: Duration::from_secs(60),
        },
        by: vec![KeyPart::Client],
    }
}

async fn assert_bytes_quota(lim: &Limiter) {
    let spec = bytes_spec("dl");
    assert!(
        lim.check(&spec, &client(1), 0).await.is_allowed(),
        "budget before any bytes"
    );
    assert!(lim.charge_bytes(&spec, &client(1), 400).await.is_allowed());
    assert!(lim.charge_bytes(&spec, &client(1), 400).await.is_allowed());
    let third = lim.charge_bytes(&spec, &client(1), 400).await;
    // 1200 bytes against 1000/min: overdrawn by 200 bytes = 12 s.
    assert_eq!(third.retry_after_secs(), Some(12), "{third:?}");
    // A new request is refused before it starts; another client is untouched.
    assert!(!lim.check(&spec, &client(1), 0).await.is_allowed());
    assert!(lim.check(&spec, &client(2), 0).await.is_allowed());
}

#[tokio::test]
async fn memory_bytes_quota_denies_once_overdrawn() {
    assert_bytes_quota(&Limiter::memory(MemoryConfig::default())).await;
}

fn concurrent_spec(id: &str, max: u32) -> LimitSpec {
    LimitSpec {
        id: Arc::from(id),
        kind: LimitKind::Concurrent { max },
        by: vec![KeyPart::Client],
    }
}

async fn assert_concurrent_cap(lim: &Limiter) {
    let spec = concurrent_spec("inflight", 2);
    let p1 = lim.acquire(&spec, &client(1)).await.expect("first");
    let _p2 = lim.acquire(&spec, &client(1)).await.expect("second");
    let denied = lim.acquire(&spec, &client(1)).await.unwrap_err();
    assert_eq!(denied.retry_after_secs(), Some(1));
    let _other = lim
        .acquire(&spec, &client(2))
        .await
        .expect("another client has its own cap");
    drop(p1);
    // Redis releases on a spawned task: allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match lim.acquire(&spec, &client(1)).await {
            Ok(_p3) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(v) => panic!("slot not released: {v:?}"),
        }
    }
}

#[tokio::test]
async fn memory_concurrent_cap_and_release() {
    assert_concurrent_cap(&Limiter::memory(MemoryConfig::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_flood_stays_under_cap_without_failing_open() {
    let cap = 100_000;
    let lim = Limiter::memory(MemoryConfig {
        max_keys: cap,
        ..MemoryConfig::default()
    });
    let spec = rate("flood", 1, Duration::from_secs(60), vec![KeyPart::Client]);
    let mut allowed = 0usize;
    for i in 0..200_000 {
        allowed += usize::from(lim.check(&spec, &client(i), 1).await.is_allowed());
        assert!(lim.key_count() <= cap);
    }
    assert_eq!(lim.key_count(), cap);
    // Keys past the cap share one overflow bucket (1/min) instead of passing freely.
    assert_eq!(lim.overflowed(), 100_000);
    assert_eq!(allowed, cap + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_idle_keys_are_swept() {
    let lim = Limiter::memory(MemoryConfig {
        max_keys: 100_000,
        sweep_interval: Duration::from_millis(100),
    });
    let spec = rate("idle", 1, Duration::from_millis(100), vec![KeyPart::Client]);
    for i in 0..50_000 {
        assert!(lim.check(&spec, &client(i), 1).await.is_allowed());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while lim.key_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "sweep left {} keys",
            lim.key_count()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lim.check(&spec, &client(7), 1).await.is_allowed());
    assert_eq!(lim.key_count(), 1);
}

#[tokio::test]
async fn memory_reload_keeps_state_of_unchanged_definitions() {
    let lim = Limiter::memory(MemoryConfig::default());
    let per = Duration::from_secs(60);
    let old = Arc::new(rate("openai-bulk", 5, per, vec![KeyPart::Client]));
    assert_eq!(count_allowed(&lim, &old, &client(1), 3).await, 3);
    // Reload: a freshly compiled, equal definition continues the count.
    let same = Arc::new(rate("openai-bulk", 5, per, vec![KeyPart::Client]));
    drop(old);
    assert_eq!(count_allowed(&lim, &same, &client(1), 5).await, 2);
    // A changed definition starts fresh.
    let changed = Arc::new(rate("openai-bulk", 6, per, vec![KeyPart::Client]));
    assert_eq!(count_allowed(&lim, &changed, &client(1), 7).await, 6);
}

// ---------------------------------------------------------------- Redis

fn redis_cfg(on_store_error: OnStoreError) -> RedisConfig {
    RedisConfig {
        on_store_error,
        timeout: Duration::from_millis(250),
        ..RedisConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_two_replicas_share_one_limit() {
    let server = RedisServer::start();
    let a = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let b = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let spec = rate("shared", 10, Duration::from_secs(60), vec![KeyPart::Client]);
    let via_a = count_allowed(&a, &spec, &client(1), 6).await;
    let via_b = count_allowed(&b, &spec, &client(1), 6).await;
    assert_eq!((via_a, via_b), (6, 4));
    assert!(!a.check(&spec, &client(1), 1).await.is_allowed());
    assert!(
        b.check(&spec, &client(2), 1).await.is_allowed(),
        "other client unaffected"
    );
    assert_eq!(a.store_errors() + b.store_errors(), 0);

    // Exact under concurrency across both replicas: 2 x 100 concurrent checks at 50.
    let (a, b) = (Arc::new(a), Arc::new(b));
    let spec = Arc::new(rate(
        "burst",
        50,
        Duration::from_secs(60),
        vec![KeyPart::Client],
    ));
    let (x, y) = tokio::join!(
        concurrent_allowed(a.clone(), spec.clone(), 100),
        concurrent_allowed(b.clone(), spec.clone(), 100)
    );
    assert_eq!(x + y, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_recovery_bytes_concurrent_and_reload() {
    let server = RedisServer::start();
    let lim = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let spec = rate("r", 5, Duration::from_secs(1), vec![KeyPart::Client]);
    assert_eq!(count_allowed(&lim, &spec, &client(1), 5).await, 5);
    let Verdict::Denied { retry_after } = lim.check(&spec, &client(1), 1).await else {
        panic!("6th request allowed");
    };
    assert_eq!(retry_after, Duration::from_secs(1));
    tokio::time::sleep(retry_after).await;
    assert!(lim.check(&spec, &client(1), 1).await.is_allowed());

    assert_bytes_quota(&lim).await;
    assert_concurrent_cap(&lim).await;

    let per = Duration::from_secs(60);
    let old = rate("openai-bulk", 5, per, vec![KeyPart::Client]);
    assert_eq!(count_allowed(&lim, &old, &client(1), 3).await, 3);
    // A restarted or reloaded process with the same definition continues the count.
    let other = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let same = rate("openai-bulk", 5, per, vec![KeyPart::Client]);
    assert_eq!(count_allowed(&other, &same, &client(1), 5).await, 2);
    let changed = rate("openai-bulk", 6, per, vec![KeyPart::Client]);
    assert_eq!(count_allowed(&other, &changed, &client(1), 7).await, 6);
    assert_eq!(lim.store_errors() + other.store_errors(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_applies_on_store_error_within_timeout() {
    let mut server = RedisServer::start();
    let allow = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Allow))
        .await
        .unwrap();
    let deny = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let spec = rate("outage", 2, Duration::from_secs(60), vec![KeyPart::Client]);
    let conc = concurrent_spec("outage-c", 1);
    assert_eq!(count_allowed(&allow, &spec, &client(1), 3).await, 2);
    assert_eq!(count_allowed(&deny, &spec, &client(2), 1).await, 1);

    server.stop();
    // Generous bound over the 250 ms timeout for a loaded CI machine; the point is that a
    // dead store never holds a request for long.
    let bound = Duration::from_millis(250 + 400);
    for i in 0..5 {
        let t = Instant::now();
        assert!(allow.check(&spec, &client(10 + i), 1).await.is_allowed());
        assert!(t.elapsed() < bound, "allow check took {:?}", t.elapsed());
        let t = Instant::now();
        let v = deny.check(&spec, &client(10 + i), 1).await;
        assert_eq!(v, Verdict::Unavailable, "told apart from a rate limit");
        assert_eq!(v.retry_after_secs(), Some(1), "{v:?}");
        assert!(t.elapsed() < bound, "deny check took {:?}", t.elapsed());
    }
    assert!(allow.store_errors() >= 5, "{}", allow.store_errors());
    assert!(deny.store_errors() >= 5, "{}", deny.store_errors());
    assert!(allow.acquire(&conc, &client(1)).await.is_ok());
    assert!(matches!(
        deny.acquire(&conc, &client(1)).await,
        Err(Verdict::Unavailable)
    ));

    // Back up (empty: no persistence), the same limiters reconnect by themselves.
    let port = server.port;
    drop(server);
    let _server = RedisServer::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = deny.store_errors();
    loop {
        if deny.check(&spec, &client(99), 1).await.is_allowed() {
            break;
        }
        assert!(Instant::now() < deadline, "no reconnect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = deny.store_errors();
    assert!(deny.check(&spec, &client(99), 1).await.is_allowed());
    assert!(!deny.check(&spec, &client(99), 1).await.is_allowed());
    assert_eq!(
        deny.store_errors(),
        after,
        "errors stop once reconnected (were {before})"
    );
}

/// Sends one inline command on a raw connection and returns its one-line reply.
async fn redis_line(conn: &mut tokio::net::TcpStream, cmd: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(format!("{cmd}\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = Vec::new();
    while !reply.ends_with(b"\r\n") {
        let mut b = [0u8; 1];
        conn.read_exact(&mut b).await.unwrap();
        reply.push(b[0]);
    }
    String::from_utf8(reply).unwrap().trim_end().to_string()
}

async fn redis_raw(server: &RedisServer) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap()
}

/// Takes `max` slots at once and checks that one more is refused; `None` while it cannot.
async fn whole_cap(
    lim: &Limiter,
    spec: &LimitSpec,
    keys: &KeyValues<'_>,
    max: u32,
) -> Option<Vec<portcullis::limits::Permit>> {
    let mut held = Vec::new();
    for _ in 0..max {
        held.push(lim.acquire(spec, keys).await.ok()?);
    }
    lim.acquire(spec, keys).await.is_err().then_some(held)
}

/// An acquire that times out has already been sent: Redis runs it late, once it answers
/// again. That late slot must not stay counted (it would for the lease TTL, an hour by
/// default, locking the client out) under either `on_store_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_timed_out_acquires_do_not_leak_slots() {
    let server = RedisServer::start();
    let deny = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Deny))
        .await
        .unwrap();
    let allow = Limiter::redis(&server.url(), redis_cfg(OnStoreError::Allow))
        .await
        .unwrap();
    let max = 2;
    let spec = concurrent_spec("stalled", max);
    let (c_deny, c_allow) = (client(1), client(2));
    for (lim, c) in [(&deny, &c_deny), (&allow, &c_allow)] {
        let held = whole_cap(lim, &spec, c, max).await.expect("healthy cap");
        drop(held);
    }
    // Releases run on spawned tasks: wait until they have emptied the store.
    let mut raw = redis_raw(&server).await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while redis_line(&mut raw, "DBSIZE").await != ":0" {
        assert!(Instant::now() < deadline, "slots not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // A stall: the server holds every command for 2 s, then runs them in order (what
    // `DEBUG SLEEP 2` does; Redis 7 refuses DEBUG by default).
    assert_eq!(redis_line(&mut raw, "CLIENT PAUSE 2000").await, "+OK");
    let t = Instant::now();
    let tries = 2 * max as usize;
    let (denied, allowed) = tokio::join!(
        futures_util::future::join_all((0..tries).map(|_| deny.acquire(&spec, &c_deny))),
        futures_util::future::join_all((0..tries).map(|_| allow.acquire(&spec, &c_allow))),
    );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "acquires must time out inside the stall, took {:?}",
        t.elapsed()
    );
    assert!(denied.iter().all(|r| r.is_err()), "{denied:?}");
    assert!(allowed.iter().all(|r| r.is_ok()), "{allowed:?}");
    assert!(deny.store_errors() >= tries as u64);
    assert!(allow.store_errors() >= tries as u64);
    drop(allowed);

    // Redis answers again (this PING waits out the pause) and runs the late acquires: each
    // client gets its whole cap back (and no more) within moments, not after the lease TTL.
    assert_eq!(redis_line(&mut raw, "PING").await, "+PONG");
    let deadline = Instant::now() + Duration::from_secs(5);
    for (lim, c) in [(&deny, &c_deny), (&allow, &c_allow)] {
        loop {
            if whole_cap(lim, &spec, c, max).await.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "slots taken by timed-out acquires are still held after Redis recovered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
