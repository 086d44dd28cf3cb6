//! Bulk-extraction signals: key sprawl behind one client raises one audit record, a metric
//! without the principal, and an entry in /top.

mod common;

use common::*;

/// A proxy to a fake OpenAI with `[bulk] max_distinct_keys`.
async fn with_max_keys(max: u32) -> (Origin, Proxy) {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&format!(
                "[bulk]\nwindow = \"1h\"\nmax_distinct_keys = {max}\n"
            )),
    )
    .await;
    (origin, proxy)
}

/// `n` requests, the `i`th with Bearer `{key}{i}` and these other fields; all pass.
async fn send_keys(proxy: &Proxy, n: usize, key: &str, other: &[(&str, &str)]) {
    let client = proxy.client();
    for i in 0..n {
        let mut req = client
            .get("http://api.openai.com/v1/models")
            .bearer_auth(format!("{key}{i}"));
        for (name, value) in other {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 200, "signals never block");
    }
}

async fn bulk_alert(proxy: &Proxy) -> serde_json::Value {
    proxy
        .audit_where("bulk alert", |r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("bulk_extraction_suspected"))
        })
        .await
}

#[tokio::test]
async fn key_sprawl_is_flagged_once_with_figures() {
    let (_origin, proxy) = with_max_keys(2).await;
    send_keys(&proxy, 5, "sk-test-KEY-NUMBER-", &[]).await;
    let alert = bulk_alert(&proxy).await;
    assert_eq!(alert["vendor"], "openai");
    assert_eq!(alert["action"], "audit");
    let reason = alert["reason"].as_str().expect("reason");
    assert!(reason.contains("distinct_keys=3"), "{reason}");

    let records = proxy.audit_at_least(6).await;
    let alerts = records
        .iter()
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("bulk_extraction"))
        })
        .count();
    assert_eq!(alerts, 1, "one record per episode, not per request");

    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "portcullis_bulk_suspected_total",
            &[("vendor", "openai")]
        ),
        1.0,
        "{m}"
    );
    assert!(!m.contains("127.0.0.1"), "no principal in a label");
    assert!(
        !proxy.audit_text().contains("KEY-NUMBER"),
        "keys never logged"
    );

    let (status, top) = proxy.admin_get("/top?vendor=openai").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&top).expect("json");
    let first = &v["vendors"]["openai"][0];
    assert_eq!(first["principal"], "127.0.0.1");
    assert_eq!(first["requests"], 5);
    assert_eq!(
        first["distinct_keys"], 3,
        "counted exactly up to the threshold + 1"
    );
}

/// A second, junk key on every request makes its `key_id` `k_ambiguous`; the rotated keys
/// behind it still count, each one, so rotation is not hidden from `max_distinct_keys`.
#[tokio::test]
async fn key_sprawl_behind_an_ambiguous_key_id_is_still_counted() {
    let (_origin, proxy) = with_max_keys(3).await;
    send_keys(&proxy, 3, "sk-test-ROTATED-", &[("x-api-key", "junk")]).await;
    let alert = bulk_alert(&proxy).await;
    let reason = alert["reason"].as_str().expect("reason");
    // The junk key and the first three rotated ones: four, over three.
    assert!(reason.contains("distinct_keys=4"), "{reason}");
    assert_eq!(proxy.audit_at_least(4).await[0]["key_id"], "k_ambiguous");
    assert!(!proxy.audit_text().contains("ROTATED"), "keys never logged");
}

/// What the proxy refused itself pulled nothing from the vendor: blocked requests and
/// CONNECTs and a limit's 429s, however many, raise no bulk signal (a scanner could otherwise page on-call at will).
/// The requests it let through do, and the alert carries no bytes of its own: the request's
/// record has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_raise_no_bulk_signal() {
    let (openai, deepseek) = (Origin::http().await, Origin::http().await);
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .vendor("api.deepseek.com", deepseek.addr)
            .tail(
                "[[rule]]\nid = \"cap\"\nvendor = \"openai\"\npath = \"/v1/capped\"\n\
                 action = \"limit\"\nlimit = { requests = 1, per = \"1h\", by = \"client\" }\n\n\
                 [bulk]\nwindow = \"1h\"\nmax_requests = 5\n",
            ),
    )
    .await;
    let client = proxy.client();
    for i in 0..8 {
        let r = fetch(client.get(format!("http://api.deepseek.com/v1/blocked-{i}"))).await;
        assert_eq!(r.status, 403, "{r:?}");
        let r = fetch(client.get(format!("http://api.openai.com/v1/capped?{i}"))).await;
        assert_eq!(r.status, if i == 0 { 200 } else { 429 }, "{r:?}");
        let (status, head, _s) = raw_connect(proxy.addr, "api.deepseek.com:443", &[]).await;
        assert_eq!(status, 403, "{head}");
    }
    assert_eq!(proxy.audit_at_least(24).await.len(), 24);
    let m = proxy.metrics().await;
    assert!(
        !samples(&m)
            .iter()
            .any(|(name, _, value)| name == "portcullis_bulk_suspected_total" && *value > 0.0),
        "{m}"
    );
    // Six more that reach OpenAI trip `max_requests = 5` (with the one the cap let through).
    for i in 0..6 {
        let r = fetch(client.get(format!("http://api.openai.com/v1/models?{i}"))).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let alert = bulk_alert(&proxy).await;
    assert_eq!(alert["vendor"], "openai", "{alert}");
    assert!(
        alert["reason"].as_str().unwrap().contains("requests=6"),
        "{alert}"
    );
    assert_eq!(
        (alert["bytes_in"].as_u64(), alert["bytes_out"].as_u64()),
        (Some(0), Some(0))
    );
}
