//! Body inspection against JSON escape tricks, end to end: bodies that hide a second `model`
//! key behind a lone surrogate escape, or spell a secret with escapes, sent by a real client
//! through the real proxy to a fake OpenAI origin, are refused before the origin sees them.

mod common;

use common::*;

/// DLP first so a secret is refused whatever the model; then an approved model and a
/// blocked family that would otherwise include it.
const RULES: &str = "\
[[rule]]\nid = \"no-secrets\"\nvendor = \"openai\"\ndlp = \"all\"\naction = \"block\"\n\n\
[[rule]]\nid = \"mini-ok\"\nvendor = \"openai\"\nmodel = \"gpt-4o-mini\"\naction = \"allow\"\n\n\
[[rule]]\nid = \"no-gpt4o\"\nvendor = \"openai\"\nmodel = \"gpt-4o*\"\naction = \"block\"\n";

async fn setup() -> (Origin, Proxy) {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(RULES),
    )
    .await;
    (origin, proxy)
}

/// POSTs `body` as a chat completion; `tag` (the query) tells the requests apart.
async fn chat(proxy: &Proxy, tag: &str, body: &str) -> Raw {
    fetch(
        proxy
            .client()
            .post(format!("http://api.openai.com/v1/chat/completions?{tag}"))
            .header("content-type", "application/json")
            .body(body.to_owned()),
    )
    .await
}

fn path(tag: &str) -> String {
    format!("/v1/chat/completions?{tag}")
}

/// Only the requests tagged in `allowed` reached the origin.
fn origin_saw_only(origin: &Origin, allowed: &[&str]) {
    let allowed: Vec<String> = allowed.iter().map(|t| path(t)).collect();
    for seen in origin.requests() {
        assert!(allowed.contains(&seen.uri), "origin saw {}", seen.uri);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogate_keys_do_not_hide_the_model() {
    let (origin, proxy) = setup().await;

    // Python's json.loads and JavaScript's JSON.parse accept the lone surrogate and read the
    // last "model": gpt-4o, which must not pass as the approved gpt-4o-mini.
    for (tag, body) in [
        (
            "second-model",
            r#"{"model":"gpt-4o-mini","\ud800":0,"model":"gpt-4o"}"#,
        ),
        (
            "low-surrogate",
            r#"{"model":"gpt-4o-mini","messages":[],"\udfff":{"a":1},"model":"gpt-4o"}"#,
        ),
        // Malformed after the first model: a lenient parser may still read a second one.
        (
            "bad-escape",
            r#"{"model":"gpt-4o-mini","\x":0,"model":"gpt-4o"}"#,
        ),
    ] {
        let r = chat(&proxy, tag, body).await;
        assert_eq!(r.status, 403, "{tag}: {r:?}");
        assert_reason(&proxy.audit_path(&path(tag)).await, "body_not_inspectable");
    }

    // A lone surrogate key before the only "model": the model is still found and blocked.
    let tag = "model-after-surrogate";
    let r = chat(
        &proxy,
        tag,
        r#"{"\ud800":0,"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o"}"#,
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-portcullis-rule"), Some("no-gpt4o"), "{r:?}");
    let rec = proxy.audit_path(&path(tag)).await;
    assert_eq!(rec["model"], "gpt-4o");
    assert_eq!(rec["action"], "block");

    // The same shape naming only the approved model goes through, body intact.
    let tag = "ok";
    let body =
        r#"{"\ud800":0,"model":"gpt-4o-mini","messages":[{"role":"user","content":"caf\u00e9"}]}"#;
    let r = chat(&proxy, tag, body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, format!("origin saw {} bytes", body.len()));
    assert_eq!(origin.request(&path(tag)).await.body_len, body.len() as u64);
    origin_saw_only(&origin, &[tag]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_spelled_with_json_escapes_are_refused() {
    let (origin, proxy) = setup().await;
    // Built at run time so that the source holds nothing a secret scanner would flag.
    let pem = format!(
        "\\u002d{}BEGIN PRIVATE KEY{}\\n{}",
        "-".repeat(4),
        "-".repeat(5),
        "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC".repeat(2)
    );
    let sk = format!("sk\\u002dproj-{}", "Ab3dE5fG7hJ9kLmN2pQr".repeat(8));
    // `\/` is what PHP's json_encode writes for `/` by default.
    let aws = "aws_secret_access_key = wJalrXUtnFEMI\\/K7MDENG\\/bPxRfiCYEXAMPLEKEY".to_owned();
    for (tag, secret, pattern) in [
        ("pem", pem, "private_key"),
        ("openai", sk, "openai_key"),
        ("aws", aws, "aws_secret_key"),
    ] {
        let body = format!(
            r#"{{"model":"gpt-3.5-turbo","messages":[{{"role":"user","content":"fix this:\n{secret}\nthanks"}}]}}"#
        );
        let r = chat(&proxy, tag, &body).await;
        assert_eq!(r.status, 403, "{tag}: {r:?}");
        assert_eq!(r.header("x-portcullis-rule"), Some("no-secrets"), "{r:?}");
        let rec = proxy.audit_path(&path(tag)).await;
        assert_eq!(rec["action"], "block");
        let reason = rec["reason"].as_str().expect("reason");
        assert!(reason.contains(&format!("dlp: {pattern}")), "{reason}");
    }

    // Escapes in an innocent prompt change nothing.
    let tag = "clean";
    let body = r#"{"model":"gpt-3.5-turbo","messages":[{"role":"user","content":"caf\u00e9 \ud83d\ude00 a\/b \"quoted\"\nnext line"}]}"#;
    let r = chat(&proxy, tag, body).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.request(&path(tag)).await.body_len, body.len() as u64);
    origin_saw_only(&origin, &[tag]);
}
