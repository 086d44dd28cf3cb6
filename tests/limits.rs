//! Limits through the real proxy: 429 with Retry-After, recovery, exactness under concurrency,
//! in-flight caps, key kinds, byte quotas cutting a download, tunnel limits, reload keeping
//! state, config errors, and two proxies sharing one real redis-server.

mod common;

use std::time::Duration;

use common::*;

fn limit_rule(limit: &str) -> String {
    format!("[[rule]]\nid = \"openai-bulk\"\nvendor = \"openai\"\naction = \"limit\"\nreason = \"bulk pulls are capped\"\nlimit = {limit}\n")
}

async fn get(client: &reqwest::Client, path: &str) -> reqwest::Response {
    client
        .get(format!("http://api.openai.com{path}"))
        .send()
        .await
        .expect("request through the proxy")
}

#[tokio::test]
async fn over_the_limit_is_429_with_retry_after_and_recovers() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 3, per = \"2s\" }")),
    )
    .await;
    let client = proxy.client();
    for i in 0..3 {
        assert_eq!(
            get(&client, &format!("/v1/models?ok={i}")).await.status(),
            200
        );
    }
    let resp = get(&client, "/v1/models?over=1").await;
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=2).contains(&retry),
        "whole seconds until a request passes: {retry}"
    );
    assert_eq!(resp.headers()["x-portcullis-rule"], "openai-bulk");
    assert_eq!(resp.headers()["x-portcullis-vendor"], "openai");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["limit"], "openai-bulk/requests");
    assert_eq!(
        origin.requests().len(),
        3,
        "the refused request never reached the origin"
    );

    let rec = proxy.audit_path("/v1/models?over=1").await;
    assert_eq!(rec["action"], "limit");
    assert_eq!(rec["status"], 429);
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("openai-bulk/requests"),
        "{rec}"
    );
    let ok = proxy.audit_path("/v1/models?ok=0").await;
    assert_eq!(
        ok["action"], "allow",
        "within its limits a request is allowed"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "portcullis_rate_limited_total",
            &[("vendor", "openai"), ("rule", "openai-bulk")]
        ),
        1.0
    );

    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        get(&client, "/v1/models?again=1").await.status(),
        200,
        "recovered after Retry-After"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_the_limit_passes_under_concurrency() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 50, per = \"10m\" }")),
    )
    .await;
    let client = proxy.client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                get(&c, &format!("/v1/embeddings?n={i}"))
                    .await
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(within("concurrent request", t).await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        50,
        "reserved before forwarding"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 150);
    assert_eq!(origin.requests().len(), 50);
}

/// A request whose upload the test holds open, so the exchange stays in flight.
fn held_upload(
    client: &reqwest::Client,
    path: &str,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<u16>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let body = futures_util::stream::once(async move {
        let _ = rx.await;
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"done"))
    });
    let req = client
        .post(format!("http://api.openai.com{path}"))
        .body(reqwest::Body::wrap_stream(body));
    (
        tx,
        tokio::spawn(async move { req.send().await.expect("held request").status().as_u16() }),
    )
}

#[tokio::test]
async fn in_flight_cap_holds_and_frees() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ concurrent = 2 }")),
    )
    .await;
    let client = proxy.client();
    let (a, ta) = held_upload(&client, "/v1/files?a");
    let (b, tb) = held_upload(&client, "/v1/files?b");
    // Both hold a slot once the proxy has admitted them (their records are not written yet).
    eventually("two exchanges in flight", || {
        let m = std::fs::metadata(&proxy.audit)
            .map(|m| m.len())
            .unwrap_or(0);
        (m == 0).then_some(())
    })
    .await;
    let mut third = 0;
    for _ in 0..100 {
        third = get(&client, "/v1/files?c").await.status().as_u16();
        if third == 429 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(third, 429, "a third exchange while two are in flight");
    a.send(()).unwrap();
    b.send(()).unwrap();
    assert_eq!(within("a", ta).await.unwrap(), 200);
    assert_eq!(within("b", tb).await.unwrap(), 200);
    eventually("slots released", || {
        proxy
            .audit_records()
            .iter()
            .filter(|r| r["status"] == 200)
            .count()
            .ge(&2)
            .then_some(())
    })
    .await;
    assert_eq!(
        get(&client, "/v1/files?d").await.status(),
        200,
        "a freed slot lets the next in"
    );
}

#[tokio::test]
async fn each_key_kind_has_its_own_budget() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 2, per = \"10m\", by = \"key\" }")),
    )
    .await;
    let client = proxy.client();
    let with_key = |key: &'static str| {
        let c = client.clone();
        async move {
            c.get("http://api.openai.com/v1/models")
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let a: Vec<u16> = vec![
        with_key("sk-a").await,
        with_key("sk-a").await,
        with_key("sk-a").await,
    ];
    let b: Vec<u16> = vec![
        with_key("sk-b").await,
        with_key("sk-b").await,
        with_key("sk-b").await,
    ];
    assert_eq!(a, vec![200, 200, 429]);
    assert_eq!(b, vec![200, 200, 429], "another key, another budget");
}

/// A second, junk key beside the real one buys no second budget: every key a request carries
/// is charged. And requests carrying several keys do not share one bucket.
#[tokio::test]
async fn a_junk_second_key_does_not_buy_a_second_budget() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 2, per = \"10m\", by = \"key\" }")),
    )
    .await;
    let client = proxy.client();
    let send = |key: &'static str, junk: Option<String>| {
        let c = client.clone();
        async move {
            let mut r = c.get("http://api.openai.com/v1/models").bearer_auth(key);
            if let Some(j) = junk {
                r = r.header("x-api-key", j);
            }
            r.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send("sk-a", None).await, 200);
    assert_eq!(send("sk-a", None).await, 200);
    assert_eq!(send("sk-a", None).await, 429);
    for i in 0..3 {
        assert_eq!(
            send("sk-a", Some(format!("junk-{i}"))).await,
            429,
            "sk-a's budget is spent, whatever rides along"
        );
    }
    // Two other keys together: both are charged, neither is blocked by sk-a's traffic.
    assert_eq!(send("sk-b", Some("sk-c".into())).await, 200);
    assert_eq!(send("sk-c", None).await, 200);
    assert_eq!(send("sk-c", None).await, 429, "sk-c was charged twice");
    assert_eq!(send("sk-b", None).await, 200);
    assert_eq!(send("sk-b", None).await, 429);

    // The real key after many junk ones is still charged: sk-d's budget runs out.
    let crowd = |c: &reqwest::Client, tag: usize, junk: usize| {
        let mut r = c.get(format!("http://api.openai.com/v1/models?crowd={tag}"));
        for j in 0..junk {
            r = r.header("x-api-key", format!("junk-{tag}-{j}"));
        }
        r.bearer_auth("sk-d").send()
    };
    for (i, want) in [200, 200, 429].into_iter().enumerate() {
        let r = crowd(&client, i, 6).await.unwrap();
        assert_eq!(r.status(), want, "request {i} with sk-d behind 6 junk keys");
    }
    // More different keys than are charged: refused outright.
    let r = crowd(&client, 9, 20).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_reason(
        &proxy.audit_path("/v1/models?crowd=9").await,
        "too_many_keys",
    );
}

/// A key in the query string is the same key as in a header, however the query spells its
/// name (`?API-KEY=`, Azure's `?api-key=`) or pads its value (`+` is a space to a form
/// decoder): one budget. Before, each spelling was a fresh budget beside a junk header key.
#[tokio::test]
async fn a_key_in_the_query_string_is_charged_as_the_same_key() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("res1.openai.azure.com", origin.addr)
            .tail("[[rule]]\nid = \"azure-keys\"\nvendor = \"azure-openai\"\naction = \"limit\"\nlimit = { requests = 2, per = \"10m\", by = \"key\" }\n"),
    )
    .await;
    let client = proxy.client();
    let url = "http://res1.openai.azure.com/openai/v1/chat/completions";
    let mut statuses = Vec::new();
    for (query, header) in [
        ("api-version=1", Some("sk-azure-0001")),
        ("API-KEY=sk-azure-0001", None),
        ("api-key=sk-azure-0001+", Some("junk-key")),
        ("subscription-key=+sk-azure-0001", None),
    ] {
        let mut r = client.get(format!("{url}?{query}"));
        if let Some(h) = header {
            r = r.header("api-key", h);
        }
        statuses.push(r.send().await.expect("request").status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429]);
}

/// Bytes are charged to every key of a request, not only the first.
#[tokio::test]
async fn byte_budgets_charge_every_key() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        &limit_rule("{ bytes = \"1KiB\", per = \"1h\", by = \"key\" }"),
    ))
    .await;
    let client = proxy.client();
    let r = client
        .get("http://api.openai.com/download/4096")
        .bearer_auth("sk-junk")
        .header("x-api-key", "sk-real")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    // The charge lands off the request path: the real key is refused once it has.
    let mut refused = false;
    for _ in 0..50 {
        let r = client
            .get("http://api.openai.com/v1/models")
            .header("x-api-key", "sk-real")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused,
        "sk-real was charged for the bytes it was sent with"
    );
}

#[tokio::test]
async fn byte_quota_cuts_a_streamed_download_then_refuses() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ bytes = \"1MiB\", per = \"1h\" }")),
    )
    .await;
    let client = proxy.client();
    let resp = get(&client, "/download/16777216").await;
    assert_eq!(
        resp.status(),
        200,
        "headers pass; the body is metered as it flows"
    );
    let got = resp.bytes().await;
    // An error is the connection cut mid-body, which is what HTTP requires.
    if let Ok(b) = &got {
        assert!(b.len() < 16 * 1024 * 1024, "cut short: {}", b.len());
    }
    let rec = proxy.audit_path("/download/16777216").await;
    assert_eq!(rec["action"], "limit");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .starts_with("byte_limit_exceeded"),
        "{rec}"
    );
    let bytes_in = rec["bytes_in"].as_u64().unwrap();
    // The README's promise: the body stops within the next 16 KiB charge after the quota
    // (give or take the frame that crossed it).
    assert!(
        ((1 << 20) - (64 << 10)..(1 << 20) + (64 << 10)).contains(&bytes_in),
        "stopped soon after the quota: {bytes_in}"
    );

    let next = get(&client, "/v1/models").await;
    assert_eq!(next.status(), 429, "the spent budget refuses new requests");
    assert_eq!(next.headers()["x-portcullis-rule"], "openai-bulk");
}

#[tokio::test]
async fn tunnels_count_against_rate_limits() {
    let origin = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 1, per = \"10m\" }")),
    )
    .await;
    // A fresh client each time: one tunnel per request.
    let first = proxy
        .client()
        .get("https://api.openai.com/v1/models")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let second = proxy
        .client()
        .get("https://api.openai.com/v1/models")
        .send()
        .await;
    assert!(
        second.is_err(),
        "the second CONNECT is refused before a tunnel exists"
    );
    let rec = proxy
        .audit_where("refused CONNECT", |r| {
            r["method"] == "CONNECT" && r["status"] == 429
        })
        .await;
    assert_eq!(rec["action"], "limit");
    assert_eq!(rec["tls"], "tunnel");
}

#[tokio::test]
async fn tunnel_byte_quota_closes_the_tunnel() {
    let origin = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ bytes = \"256KiB\", per = \"1h\" }")),
    )
    .await;
    let resp = proxy
        .client()
        .get("https://api.openai.com/download/33554432")
        .send()
        .await
        .unwrap();
    let got = resp.bytes().await.map(|b| b.len()).unwrap_or(0);
    assert!(
        got < 32 << 20,
        "tunnel closed before the 32 MiB finished: {got}"
    );
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "limit");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap()
            .contains("byte_limit_exceeded"),
        "{rec}"
    );
}

#[tokio::test]
async fn reload_keeps_state_of_an_unchanged_limit() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&limit_rule("{ requests = 2, per = \"10m\" }")),
    )
    .await;
    let client = proxy.client();
    assert_eq!(get(&client, "/v1/models").await.status(), 200);
    assert_eq!(get(&client, "/v1/models").await.status(), 200);
    let path = proxy.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text + "[[rule]]\nid = \"unrelated\"\nhost = \"example.org\"\naction = \"block\"\n",
    )
    .unwrap();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{}/reload", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        get(&client, "/v1/models").await.status(),
        429,
        "the count survived the reload"
    );
}

#[tokio::test]
async fn nonsense_limits_are_config_errors_and_explain_lists_limits() {
    let dir = tempfile::tempdir().unwrap();
    let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
    let cases = [
        ("{ requests = 5, per = \"0s\" }", "above zero"),
        ("{ requests = 5, per = \"1m\", burst = 0 }", "burst"),
        ("{ requests = 5 }", "needs per"),
        (
            "{ requests = 5, per = \"1m\", by = \"ip\" }",
            "unknown limit key",
        ),
        ("{ requests = 5, per = \"1m\", bogus = 1 }", "bogus"),
        ("\"missing\"", "unknown limit"),
    ];
    for (limit, want) in cases {
        let path = dir.path().join("bad.toml");
        let text = format!("include = [\"{vendors}\"]\n\n{}", limit_rule(limit));
        std::fs::write(&path, &text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{limit}: {err}");
        let line = text.lines().position(|l| l.starts_with("limit =")).unwrap() + 1;
        assert!(
            err.contains(&format!("bad.toml:{line}:")) && err.contains(want),
            "{limit}: {err}"
        );
    }

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "include = [\"{vendors}\"]\n\n[limits.team]\nrequests = 100\nper = \"1h\"\nby = [\"user\", \"vendor\"]\n\n{}",
            limit_rule("[\"team\", { concurrent = 4 }]")
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["explain", "--config"])
        .arg(&good)
        .arg("https://api.openai.com/v1/batches")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["action"], "limit");
    let ids: Vec<&str> = v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["team/requests", "openai-bulk#1/concurrent"]);
}

#[tokio::test]
async fn two_proxies_share_one_redis_limit_and_survive_its_loss() {
    let mut redis = RedisServer::start();
    let origin = Origin::http().await;
    let store = format!(
        "[limit_store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\non_store_error = \"allow\"\ntimeout = \"200ms\"\n",
        redis.port
    );
    let cfg = Config::new()
        .vendor("api.openai.com", origin.addr)
        .tail(&store)
        .tail(&limit_rule(
            "{ requests = 10, per = \"10m\", by = \"vendor\" }",
        ));
    // Two real processes, as two replicas would be.
    let a = Proxy::spawn(cfg.clone()).await;
    let b = Proxy::spawn(cfg).await;
    let (ca, cb) = (a.client(), b.client());
    let mut passed = 0;
    for i in 0..8 {
        for c in [&ca, &cb] {
            if get(c, &format!("/v1/models?i={i}")).await.status() == 200 {
                passed += 1;
            }
        }
    }
    assert_eq!(passed, 10, "one combined limit across both replicas");

    redis.stop();
    let resp = get(&ca, "/v1/models?redis=down").await;
    assert_eq!(resp.status(), 200, "on_store_error = allow keeps serving");
    let m = a.metrics().await;
    assert!(
        metric(&m, "portcullis_limit_store_errors_total", &[]) >= 1.0,
        "{m}"
    );
}

/// `on_store_error = "deny"` fails closed while Redis is down, and says so: a 503 naming the
/// store, not a 429 that reads as the client's own overuse, and no rate-limited count (the
/// alert on that series is about clients, the store has its own).
#[tokio::test]
async fn redis_outage_with_deny_is_503_store_unavailable_not_a_rate_limit() {
    let mut redis = RedisServer::start();
    let origin = Origin::http().await;
    let store = format!(
        "[limit_store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\non_store_error = \"deny\"\ntimeout = \"200ms\"\n",
        redis.port
    );
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&store)
            .tail(&limit_rule("{ requests = 100, per = \"10m\" }")),
    )
    .await;
    let client = proxy.client();
    assert_eq!(get(&client, "/v1/models?up=1").await.status(), 200);

    redis.stop();
    let resp = get(&client, "/v1/models?down=1").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "limit_store_unavailable", "{body}");
    assert_eq!(body["limit"], "openai-bulk/requests");
    assert_eq!(
        origin.requests().len(),
        1,
        "fail closed: nothing more reached the origin"
    );

    let rec = proxy.audit_path("/v1/models?down=1").await;
    assert_eq!(rec["status"], 503);
    let reason = rec["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("limit_store_unavailable: openai-bulk/requests"),
        "{rec}"
    );
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "portcullis_limit_store_errors_total", &[]) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "portcullis_rate_limited_total",
            &[("rule", "openai-bulk")]
        ),
        0.0,
        "{m}"
    );
}
