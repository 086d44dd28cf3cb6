//! The audit line's content and /metrics, as an operator reads them.

mod common;

use common::*;

const FIELDS: &[&str] = &[
    "ts",
    "id",
    "client",
    "user",
    "method",
    "scheme",
    "host",
    "port",
    "path",
    "vendor",
    "endpoint",
    "rule",
    "action",
    "mode",
    "reason",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "tls",
    "sni",
    "key_id",
];

/// `YYYY-MM-DDTHH:MM:SS[.fff]Z`
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && ts.ends_with('Z')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_line_has_every_field_and_no_secret() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let r = fetch(
        proxy
            .client()
            .post("http://api.openai.com/v1/chat/completions?key=SECRET-q7&alt=sse")
            .header("authorization", "Bearer sk-test-SECRET-z9")
            .body("hello"),
    )
    .await;
    assert_eq!(r.status, 200);
    // The origin gets the request as sent: credentials are end to end.
    let seen = origin
        .request("/v1/chat/completions?key=SECRET-q7&alt=sse")
        .await;
    assert_eq!(seen.headers["authorization"], "Bearer sk-test-SECRET-z9");

    let rec = proxy
        .audit_where("the chat request", |r| r["endpoint"] == "chat")
        .await;
    let obj = rec.as_object().unwrap();
    for f in FIELDS {
        assert!(obj.contains_key(*f), "audit record lacks {f}: {rec}");
    }
    assert!(is_rfc3339_utc(rec["ts"].as_str().unwrap()), "{rec}");
    assert!(!rec["id"].as_str().unwrap().is_empty());
    let client: std::net::SocketAddr = rec["client"]
        .as_str()
        .unwrap()
        .parse()
        .expect("client ip:port");
    assert!(client.ip().is_loopback() && client.port() != 0);
    assert_eq!(rec["user"], serde_json::Value::Null);
    assert_eq!(rec["method"], "POST");
    assert_eq!(rec["scheme"], "http");
    assert_eq!(rec["host"], "api.openai.com");
    assert_eq!(rec["port"], 80);
    assert_eq!(rec["path"], "/v1/chat/completions?key=REDACTED&alt=sse");
    assert_eq!(rec["vendor"], "openai");
    assert_eq!(rec["endpoint"], "chat");
    assert_eq!(rec["rule"], serde_json::Value::Null);
    assert_eq!(rec["action"], "allow");
    assert_eq!(rec["mode"], "enforce");
    assert!(rec["reason"].is_string());
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["bytes_out"], 5);
    assert_eq!(rec["bytes_in"], r.body.len() as u64);
    assert!(rec["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(rec["tls"], "none");
    assert_eq!(rec["sni"], serde_json::Value::Null);
    let key_id = rec["key_id"].as_str().unwrap();
    assert!(key_id.starts_with("k_") && key_id.len() > 4, "{key_id}");

    let metrics = proxy.metrics().await;
    for (name, text) in [("audit", proxy.audit_text()), ("metrics", metrics)] {
        for secret in ["SECRET-q7", "sk-test-SECRET-z9", "SECRET-z9"] {
            assert!(!text.contains(secret), "{secret} appears in {name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rule_allows_and_records_what_it_would_have_done() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        r#"
[[rule]]
id = "shadow-openai-files"
vendor = "openai"
endpoint = "files"
action = "block"
mode = "shadow"
"#,
    ))
    .await;
    let r = fetch(proxy.client().get("http://api.openai.com/v1/files")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "origin saw 0 bytes");
    let rec = proxy.audit_path("/v1/files").await;
    assert_eq!(rec["action"], "block");
    assert_eq!(rec["mode"], "shadow");
    assert_eq!(rec["rule"], "shadow-openai-files");
    assert_eq!(rec["status"], 200);
    assert_eq!(origin.requests().len(), 1);
}

/// A shadow rule changes what is recorded, never what happens: a trial `allow` above a block
/// rule, or under `defaults.action = "block"`, must not open the door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_rule_never_lets_through_what_an_enforcing_one_blocks() {
    let origin = Origin::http().await;
    let trial_allow = "[[rule]]\nid = \"trial-allow-openai\"\nvendor = \"openai\"\naction = \"allow\"\nmode = \"shadow\"\n";
    let block = "[[rule]]\nid = \"block-openai\"\nvendor = \"openai\"\naction = \"block\"\nreason = \"paused\"\n";
    for (config, rule) in [
        (
            Config::new()
                .vendor("api.openai.com", origin.addr)
                .tail(&format!("{trial_allow}\n{block}")),
            Some("block-openai"),
        ),
        (
            Config::new()
                .vendor("api.openai.com", origin.addr)
                .default_block()
                .tail(trial_allow),
            None,
        ),
    ] {
        let proxy = Proxy::start(config).await;
        let r = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
        assert_eq!(r.status, 403, "{rule:?}: {r:?}");
        let rec = proxy.audit_path("/v1/models").await;
        assert_eq!(rec["action"], "block", "{rec}");
        assert_eq!(rec["mode"], "enforce", "{rec}");
        assert_eq!(rec["rule"].as_str(), rule, "{rec}");
    }
    assert!(origin.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_decisions_without_addresses_or_users() {
    let (_openai, _deepseek, proxy) = openai_and_deepseek().await;
    let client = proxy.client_as("mallory-user", "pw");
    for _ in 0..2 {
        let r = fetch(
            client
                .post("http://api.deepseek.com/chat/completions")
                .body("x"),
        )
        .await;
        assert_eq!(r.status, 403);
    }
    let r = fetch(
        client
            .post("http://api.openai.com/v1/embeddings")
            .body("12345"),
    )
    .await;
    assert_eq!(r.status, 200);
    // Three records written means the counters below are final.
    proxy.audit_at_least(3).await;

    let text = proxy.metrics().await;
    assert_eq!(
        metric(
            &text,
            "portcullis_requests_total",
            &[
                ("vendor", "deepseek"),
                ("endpoint", "chat"),
                ("action", "block"),
                ("rule", "block-deepseek")
            ]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_requests_total",
            &[
                ("vendor", "openai"),
                ("endpoint", "embeddings"),
                ("action", "allow")
            ]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_bytes_total",
            &[("vendor", "openai"), ("direction", "out")]
        ),
        5.0
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_bytes_total",
            &[("vendor", "openai"), ("direction", "in")]
        ),
        r.body.len() as f64
    );
    assert_eq!(
        metric(&text, "portcullis_audit_records_total", &[]),
        3.0,
        "{text}"
    );
    assert!(has_metric(&text, "portcullis_tunnels_active"), "{text}");
    assert!(
        has_metric(&text, "portcullis_request_duration_seconds_bucket"),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    for (name, labels, _) in samples(&text) {
        for (k, v) in labels {
            assert!(
                !v.contains("127.0.0.1") && !v.contains("mallory-user") && !v.contains('/'),
                "{name}{{{k}=\"{v}\"}} carries a client address, user or path"
            );
        }
    }

    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
}

/// The value of exactly `name{labels}` (no more labels than these), if /metrics shows it.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
}

/// Alert rules use `increase()`, which sees nothing in a series whose first sample is already
/// 1: the first reload failure or bulk-extraction signal of a process would never alert. So
/// the first scrape of a fresh binary, before any traffic, shows every bounded label set of
/// those counters at 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_binary_exposes_every_alerted_series_at_zero() {
    let mut proxy = Proxy::spawn(Config::new().tail(
        "[[rule]]\nid = \"cap-openai\"\nvendor = \"openai\"\naction = \"limit\"\n\
         limit = { requests = 5, per = \"1m\", by = \"client\" }\n",
    ))
    .await;
    let text = proxy.metrics().await;

    for result in ["ok", "error"] {
        assert_eq!(
            series(
                &text,
                "portcullis_config_reloads_total",
                &[("result", result)]
            ),
            Some(0.0),
            "reload result {result}: {text}"
        );
    }
    // The kinds the README documents for portcullis_upstream_errors_total.
    for kind in [
        "dns",
        "connect",
        "connect_timeout",
        "tls",
        "timeout",
        "address_denied",
        "upstream",
        "response_head_too_large",
        "upstream_body",
        "body_timeout",
    ] {
        assert_eq!(
            series(&text, "portcullis_upstream_errors_total", &[("kind", kind)]),
            Some(0.0),
            "upstream error kind {kind}: {text}"
        );
    }
    // One bulk-extraction series per catalog vendor (bulk detection is on by default).
    let (status, policy) = proxy.admin_get("/policy").await;
    assert_eq!(status, 200);
    let policy: serde_json::Value = serde_json::from_str(&policy).expect("policy JSON");
    let vendors: Vec<&str> = policy["vendors"]
        .as_array()
        .expect("vendors")
        .iter()
        .map(|v| v["id"].as_str().expect("vendor id"))
        .collect();
    assert!(
        vendors.contains(&"deepseek") && vendors.len() >= 25,
        "{vendors:?}"
    );
    for vendor in &vendors {
        assert_eq!(
            series(
                &text,
                "portcullis_bulk_suspected_total",
                &[("vendor", vendor)]
            ),
            Some(0.0),
            "bulk signal for {vendor}: {text}"
        );
    }
    let bulk_series = samples(&text)
        .iter()
        .filter(|(n, _, _)| n == "portcullis_bulk_suspected_total")
        .count();
    assert_eq!(bulk_series, vendors.len(), "{text}");
    assert_eq!(
        series(
            &text,
            "portcullis_rate_limited_total",
            &[("vendor", "openai"), ("rule", "cap-openai")]
        ),
        Some(0.0),
        "{text}"
    );
    for name in [
        "portcullis_audit_records_total",
        "portcullis_audit_dropped_total",
        "portcullis_audit_refused_total",
        "portcullis_limit_store_errors_total",
        "portcullis_connections_refused_total",
        "portcullis_connections_refused_per_client_total",
    ] {
        assert_eq!(series(&text, name, &[]), Some(0.0), "{name}: {text}");
    }
    for (name, labels, _) in samples(&text) {
        for (k, v) in labels {
            assert!(
                !v.contains("127.0.0.1") && !v.contains('/'),
                "{name}{{{k}=\"{v}\"}} carries an address or a path"
            );
        }
    }
    assert_eq!(proxy.stop().await.and_then(|s| s.code()), Some(0));
}
