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
