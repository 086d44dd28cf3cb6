//! Body inspection against tricks that hide a body from it, end to end: bodies that hide a
//! second `model` key behind a lone surrogate escape or past `[inspect] max_body`, spell a
//! secret with escapes, come in UTF-16 or UTF-32, or name the model in a form field or the
//! query string, sent by a real client through the real proxy (plain HTTP, and TLS
//! interception over HTTP/2) to a fake OpenAI origin, are refused or decided on what the
//! vendor would read, before the origin sees them.

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
async fn second_model_keys_do_not_hide_the_model() {
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
        // Go's encoding/json (Ollama, many gateways) matches keys regardless of case and
        // reads the last: gpt-4o, where an exact reader sees gpt-4o-mini or no model.
        ("other-case", r#"{"Model":"gpt-4o"}"#),
        (
            "other-case-second",
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#,
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

/// POSTs `body` to `path` (with its query tag) as `content_type`.
async fn post(proxy: &Proxy, path: &str, content_type: &str, body: Vec<u8>) -> Raw {
    fetch(
        proxy
            .client()
            .post(format!("http://api.openai.com{path}"))
            .header("content-type", content_type)
            .body(body),
    )
    .await
}

/// A refusal the client and the audit log both call `body_not_inspectable`.
async fn assert_not_inspectable(proxy: &Proxy, path: &str, r: &Raw) -> String {
    assert_eq!(r.status, 403, "{path}: {r:?}");
    assert_eq!(r.json()["error"], "blocked_by_policy", "{path}: {r:?}");
    let rec = proxy.audit_path(path).await;
    assert_reason(&rec, "body_not_inspectable");
    assert_eq!(rec["action"], "block", "{rec}");
    rec["reason"].as_str().unwrap_or_default().to_owned()
}

/// A chat body naming `model`, padded with prompt text to `len` bytes, optionally with a
/// second `model` after the padding.
fn padded_chat(model: &str, len: usize, second: Option<&str>) -> Vec<u8> {
    let head = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":""#);
    let tail = match second {
        Some(m) => format!(r#""}}],"model":"{m}"}}"#),
        None => r#""}]}"#.to_owned(),
    };
    let pad = len - head.len() - tail.len();
    let mut body = head.into_bytes();
    body.extend((0..pad).map(|i| b"lorem ipsum "[i % 12]));
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), len);
    body
}

/// An allow-list for the model, then a block on OpenAI chat; file uploads are allowed before
/// either, so no model rule is in play for them.
const ALLOW_LIST: &str = "\
[[rule]]\nid = \"files-ok\"\nvendor = \"openai\"\nendpoint = \"files\"\naction = \"allow\"\n\n\
[[rule]]\nid = \"gpt35-ok\"\nvendor = \"openai\"\nmodel = \"gpt-3.5*\"\naction = \"allow\"\n\n\
[[rule]]\nid = \"openai-chat\"\nvendor = \"openai\"\nendpoint = \"chat\"\naction = \"block\"\n\n\
[inspect]\nmax_body = \"64KiB\"\n";

/// Finding 1: `{"model":"gpt-3.5-turbo", …70 KB…, "model":"gpt-4o"}` with a 64 KiB cap was
/// forwarded on the first model while Python and JavaScript read the last. A body longer than
/// `max_body` cannot be vouched for where a model rule could decide it: refused, fail closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_past_max_body_cannot_slip_through_an_allow_list() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(ALLOW_LIST),
    )
    .await;
    let json = "application/json";

    for (tag, second) in [("second-model", Some("gpt-4o")), ("one-model", None)] {
        let p = path(tag);
        let body = padded_chat("gpt-3.5-turbo", 70 * 1024, second);
        let r = post(&proxy, &p, json, body).await;
        let reason = assert_not_inspectable(&proxy, &p, &r).await;
        assert!(reason.contains("max_body"), "{reason}");
        assert!(reason.contains("65536 bytes inspected"), "{reason}");
        assert!(
            r.json()["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("max_body"),
            "the client is told why: {r:?}"
        );
    }

    // Within the cap, to the byte, the allow-list applies as before: Content-Length, and
    // chunked (whose end is only seen on one more read).
    let tag = "exactly-max-body";
    let body = padded_chat("gpt-3.5-turbo", 64 * 1024, None);
    let r = post(&proxy, &path(tag), json, body.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let tag = "exactly-max-body-chunked";
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(7000).map(|c| Ok(c.to_vec())).collect();
    let r = fetch(
        proxy
            .client()
            .post(format!("http://api.openai.com{}", path(tag)))
            .header("content-type", json)
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            ))),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.request(&path(tag)).await.body_len, body.len() as u64);
    let rec = proxy.audit_path(&path(tag)).await;
    assert_eq!(rec["model"], "gpt-3.5-turbo");
    assert!(
        !rec["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("inspected first"),
        "read whole: {rec}"
    );

    // Where no model rule can decide (uploads are allowed before the model rules), a long
    // body is not held back nor read: it streams on whole, and no model is taken from it.
    let p = "/v1/files?large";
    let upload = padded_chat("gpt-4o", 200 * 1024, Some("gpt-4o"));
    let r = post(&proxy, p, json, upload.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = origin.request(p).await;
    assert_eq!(seen.body_len, upload.len() as u64);
    assert_eq!(seen.body_fnv, fnv1a(FNV_START, &upload));
    let rec = proxy.audit_path(p).await;
    let reason = rec["reason"].as_str().unwrap_or_default();
    assert!(!reason.contains("inspected"), "{rec}");
    assert_eq!(rec["model"], serde_json::Value::Null, "{rec}");
    assert_eq!(rec["rule"], "files-ok");

    for seen in origin.requests() {
        assert!(
            !seen.uri.contains("model"),
            "origin saw a refused body: {}",
            seen.uri
        );
    }
}

/// The same with a block list: the blocked model after the cap was never seen, and the body
/// went through (the README recommended allow-lists instead). Now refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_model_past_max_body_is_refused() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-gpt4o\"\nvendor = \"openai\"\nmodel = \"gpt-4o*\"\naction = \"block\"\n\n\
         [inspect]\nmax_body = \"1KiB\"\n",
    ))
    .await;
    let mut body = br#"{"messages":[{"role":"user","content":""#.to_vec();
    body.extend_from_slice(&[b'a'; 4000]);
    body.extend_from_slice(br#""}],"model":"gpt-4o"}"#);
    let p = path("model-last");
    let r = post(&proxy, &p, "application/json", body).await;
    let reason = assert_not_inspectable(&proxy, &p, &r).await;
    assert!(reason.contains("1024 bytes inspected"), "{reason}");
    assert!(origin.requests().is_empty(), "nothing reached the origin");
}

fn utf16(s: &str, le: bool) -> Vec<u8> {
    s.encode_utf16()
        .flat_map(|u| if le { u.to_le_bytes() } else { u.to_be_bytes() })
        .collect()
}

fn utf32(s: &str, le: bool) -> Vec<u8> {
    s.chars()
        .flat_map(|c| {
            if le {
                (c as u32).to_le_bytes()
            } else {
                (c as u32).to_be_bytes()
            }
        })
        .collect()
}

/// Finding 2: Python's `json.loads(bytes)` reads UTF-16 and UTF-32 (with or without a
/// byte-order mark); the scanners read bytes as UTF-8 and saw no `model` and no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_utf16_or_utf32_are_refused() {
    let (origin, proxy) = setup().await;
    let json = r#"{"model":"gpt-4o"}"#;
    let bom = format!("\u{FEFF}{json}");
    let spaced = format!(" \n{json}");
    for (tag, body) in [
        ("utf16le-bom", utf16(&bom, true)),
        ("utf16be-bom", utf16(&bom, false)),
        ("utf16le", utf16(json, true)),
        ("utf16be", utf16(json, false)),
        ("utf16le-spaced", utf16(&spaced, true)),
        ("utf32le", utf32(json, true)),
        ("utf32be-bom", utf32(&bom, false)),
    ] {
        let p = path(tag);
        let r = post(&proxy, &p, "application/json", body).await;
        let reason = assert_not_inspectable(&proxy, &p, &r).await;
        assert!(reason.contains("not UTF-8"), "{reason}");
    }
    // UTF-8 bytes declared as another charset, and raw NUL bytes in a JSON body.
    for (tag, ct, body) in [
        (
            "charset",
            "application/json; charset=utf-16",
            br#"{"model":"gpt-4o-mini"}"#.to_vec(),
        ),
        (
            "charset-quoted",
            "application/json; charset=\"UTF-32\"",
            br#"{"model":"gpt-4o-mini"}"#.to_vec(),
        ),
        (
            "nul",
            "application/json",
            b"{\"model\":\"gpt-4o-mini\",\"x\":\"a\0b\"}".to_vec(),
        ),
    ] {
        let p = path(tag);
        let r = post(&proxy, &p, ct, body).await;
        assert_not_inspectable(&proxy, &p, &r).await;
    }
    // UTF-8, declared or not, with or without its byte-order mark, passes as before.
    for (tag, ct, body) in [
        (
            "utf8-declared",
            "application/json; charset=UTF-8",
            br#"{"model":"gpt-4o-mini"}"#.to_vec(),
        ),
        (
            "utf8-bom",
            "application/json",
            "\u{FEFF}{\"model\":\"gpt-4o-mini\"}".as_bytes().to_vec(),
        ),
    ] {
        let r = post(&proxy, &path(tag), ct, body).await;
        assert_eq!(r.status, 200, "{tag}: {r:?}");
    }
    origin_saw_only(&origin, &["utf8-declared", "utf8-bom"]);
}

/// DLP alone: a secret in a UTF-16 body is refused; a long clean body streams on (the rest
/// past `max_body` unread, as documented) and its audit record says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlp_refuses_utf16_and_records_partial_inspection() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-secrets\"\nvendor = \"openai\"\ndlp = \"all\"\naction = \"block\"\n\n\
         [inspect]\nmax_body = \"1KiB\"\n",
    ))
    .await;
    // Built at run time so that the source holds nothing a secret scanner would flag.
    let key = format!("AKIA{}", "IOSFODNN7EXAMPLE");
    let text = format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{key}"}}]}}"#);
    let tag = "utf8-secret";
    let r = post(
        &proxy,
        &path(tag),
        "application/json",
        text.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.header("x-portcullis-rule"), Some("no-secrets"), "{r:?}");
    for (tag, body) in [
        ("utf16-secret", utf16(&text, true)),
        ("utf16-bom-secret", utf16(&format!("\u{FEFF}{text}"), false)),
    ] {
        let p = path(tag);
        let r = post(&proxy, &p, "application/json", body).await;
        assert_not_inspectable(&proxy, &p, &r).await;
    }

    let tag = "long-clean";
    let body = padded_chat("gpt-4o", 5000, None);
    let r = post(&proxy, &path(tag), "application/json", body.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.request(&path(tag)).await.body_len, body.len() as u64);
    let rec = proxy.audit_path(&path(tag)).await;
    let reason = rec["reason"].as_str().unwrap_or_default();
    assert!(
        reason.ends_with("; inspected first 1024 bytes only"),
        "{rec}"
    );
    origin_saw_only(&origin, &["long-clean"]);
}

/// `dlp_past_max_body = "block"`: DLP fails closed as model rules do. A body longer than
/// `max_body` where a DLP rule could decide it is refused; one no DLP rule covers streams on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlp_can_refuse_what_it_cannot_read_whole() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-secrets\"\nvendor = \"openai\"\nendpoint = \"chat\"\ndlp = \"all\"\naction = \"block\"\n\n\
         [inspect]\nmax_body = \"1KiB\"\ndlp_past_max_body = \"block\"\n",
    ))
    .await;
    let p = path("long");
    let r = post(
        &proxy,
        &p,
        "application/json",
        padded_chat("gpt-4o", 5000, None),
    )
    .await;
    let reason = assert_not_inspectable(&proxy, &p, &r).await;
    assert!(reason.contains("dlp_past_max_body"), "{reason}");
    // Whole within the cap: scanned and passed.
    let r = post(
        &proxy,
        &path("short"),
        "application/json",
        padded_chat("gpt-4o", 900, None),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // No DLP rule covers embeddings: not read, not refused.
    let long = padded_chat("text-embedding-3-small", 5000, None);
    let r = post(&proxy, "/v1/embeddings?long", "application/json", long).await;
    assert_eq!(r.status, 200, "{r:?}");
    let uris: Vec<String> = origin.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, [path("short"), "/v1/embeddings?long".to_owned()]);
}

/// A multipart form body with these (name, value) text fields and a binary file part.
fn multipart(fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "----portcullis7MA4YWxkTrZu0gW";
    let mut b = Vec::new();
    for (name, value) in fields {
        b.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    b.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\nRIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\r\n--{boundary}--\r\n"
        )
        .as_bytes(),
    );
    (format!("multipart/form-data; boundary={boundary}"), b)
}

/// A multipart body whose file part holds a `model` part behind a delimiter after
/// `line_break` (not CRLF): (tag, Content-Type, body).
fn multipart_smuggled(tag: &'static str, line_break: &str) -> (&'static str, String, Vec<u8>) {
    let (ct, b) = multipart(&[]);
    let boundary = ct.rsplit('=').next().expect("boundary");
    let smuggled = format!(
        "RIFF{line_break}--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o"
    );
    let b = String::from_utf8_lossy(&b)
        .replacen("RIFF", &smuggled, 1)
        .into_bytes();
    (tag, ct, b)
}

/// Finding 2, continued: OpenAI's audio and image endpoints take `model` as a form field, and
/// some servers read `?model=`. Both are read (or refused when they disagree).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_of_a_form_or_query_is_read() {
    let (origin, proxy) = setup().await;
    let form = "application/x-www-form-urlencoded";
    let audio = "/v1/audio/transcriptions";

    // Blocked as a JSON body naming it would be.
    for (tag, ct, body) in [
        ("form", form.to_owned(), b"prompt=hi&model=gpt-4o".to_vec()),
        (
            "form-escaped",
            form.to_owned(),
            b"mod%65l=gpt%2D4o".to_vec(),
        ),
        {
            let (ct, b) = multipart(&[("model", "gpt-4o"), ("language", "en")]);
            ("multipart", ct, b)
        },
    ] {
        let p = format!("{audio}?{tag}");
        let r = post(&proxy, &p, &ct, body).await;
        assert_eq!(r.status, 403, "{tag}: {r:?}");
        assert_eq!(
            r.header("x-portcullis-rule"),
            Some("no-gpt4o"),
            "{tag}: {r:?}"
        );
        assert_eq!(proxy.audit_path(&p).await["model"], "gpt-4o");
    }
    // Named twice, or in a spelling parsers differ on: refused.
    for (tag, ct, body) in [
        (
            "form-twice",
            form.to_owned(),
            b"model=gpt-4o-mini&model=gpt-4o".to_vec(),
        ),
        (
            "form-case",
            form.to_owned(),
            b"model=gpt-4o-mini&Model=gpt-4o".to_vec(),
        ),
        {
            let (ct, b) = multipart(&[("model", "gpt-4o-mini"), ("model", "gpt-4o")]);
            ("multipart-twice", ct, b)
        },
        {
            let (ct, b) = multipart(&[("model", "gpt-4o-mini"), ("MODEL", "gpt-4o")]);
            ("multipart-case", ct, b)
        },
        {
            let (_, b) = multipart(&[("model", "gpt-4o-mini")]);
            ("multipart-no-boundary", "multipart/form-data".to_owned(), b)
        },
        // Two boundaries, the second framing a body of its own in front: Werkzeug and
        // python-multipart take the last boundary and read `gpt-4o`.
        {
            let (ct, b) = multipart(&[("model", "gpt-4o-mini")]);
            let mut body = b"--BBB\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--BBB--\r\n\r\n".to_vec();
            body.extend_from_slice(&b);
            (
                "multipart-two-boundaries",
                format!("{ct}; boundary=BBB"),
                body,
            )
        },
        {
            let (ct, b) = multipart(&[("model", "gpt-4o-mini")]);
            ("multipart-boundary-list", format!("{ct}, x"), b)
        },
        // A delimiter after a bare LF, or a bare CR, inside the file part: Werkzeug ends the
        // part there and reads the `model` part after it.
        multipart_smuggled("multipart-bare-lf", "\n"),
        multipart_smuggled("multipart-bare-cr", "\r"),
        // Protocol buffers (Google's proto transport): the model is in there, unread.
        (
            "protobuf",
            "application/x-protobuf".to_owned(),
            b"\n\x06gpt-4o\x12\x02hi".to_vec(),
        ),
    ] {
        let p = format!("{audio}?{tag}");
        let r = post(&proxy, &p, &ct, body).await;
        assert_not_inspectable(&proxy, &p, &r).await;
    }
    // `?model=` that the body does not agree with: refused; one that agrees: decided as usual.
    let p = format!("{}&model=gpt-4o", path("query"));
    let r = post(
        &proxy,
        &p,
        "application/json",
        br#"{"model":"gpt-4o-mini"}"#.to_vec(),
    )
    .await;
    let reason = assert_not_inspectable(&proxy, &p, &r).await;
    assert!(reason.contains("query"), "{reason}");

    // The approved model, in each form, with binary file contents (NUL bytes) beside it.
    let ok = format!("{}&model=gpt-4o-mini", path("query-ok"));
    let r = post(
        &proxy,
        &ok,
        "application/json",
        br#"{"model":"gpt-4o-mini"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = post(
        &proxy,
        &format!("{audio}?form-ok"),
        form,
        b"model=gpt-4o-mini".to_vec(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let (ct, body) = multipart(&[("model", "gpt-4o-mini"), ("language", "en")]);
    let r = post(&proxy, &format!("{audio}?multipart-ok"), &ct, body.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = origin.request(&format!("{audio}?multipart-ok")).await;
    assert_eq!(seen.body_fnv, fnv1a(FNV_START, &body));

    let allowed = [
        ok,
        format!("{audio}?form-ok"),
        format!("{audio}?multipart-ok"),
    ];
    for seen in origin.requests() {
        assert!(allowed.contains(&seen.uri), "origin saw {}", seen.uri);
    }
}

/// Finding 1 over TLS interception and HTTP/2, where a streamed body's end comes in a frame
/// of its own: a second model past the cap is refused, a body exactly at the cap is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_h2_bodies_past_max_body_are_refused() {
    let ca = tempfile::TempDir::new().expect("tempdir");
    portcullis::ca::init(ca.path(), "portcullis test org CA").expect("ca init");
    let roots = tempfile::TempDir::new().expect("tempdir");
    let origin = Origin::https_h2().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .upstream(&format!(
                "ca_file = \"{}\"",
                ca_file(roots.path()).display()
            ))
            .tail(&ALLOW_LIST.replace("64KiB", "16KiB"))
            .tail(&format!(
                "[intercept]\nca_cert = \"{}\"\nca_key = \"{}\"\nvendors = [\"openai\"]\n",
                ca.path().join("ca.pem").display(),
                ca.path().join("ca.key").display()
            )),
    )
    .await;
    let pem = std::fs::read(ca.path().join("ca.pem")).expect("ca.pem");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy"))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .timeout(DEADLINE)
        .build()
        .expect("client");
    let send = |tag: &str, body: Vec<u8>, streamed: bool| {
        let req = client
            .post(format!("https://api.openai.com{}", path(tag)))
            .header("content-type", "application/json");
        let req = match streamed {
            true => {
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                    body.chunks(5000).map(|c| Ok(c.to_vec())).collect();
                req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                    chunks,
                )))
            }
            false => req.body(body),
        };
        fetch(req)
    };

    for (tag, streamed) in [("h2-second", false), ("h2-second-streamed", true)] {
        let body = padded_chat("gpt-3.5-turbo", 20 * 1024, Some("gpt-4o"));
        let r = send(tag, body, streamed).await;
        assert_eq!(r.status, 403, "{tag}: {r:?}");
        let rec = proxy
            .audit_where(tag, |r| r["path"] == path(tag) && r["tls"] == "intercept")
            .await;
        assert_reason(&rec, "body_not_inspectable");
    }
    for (tag, streamed) in [("h2-exact", false), ("h2-exact-streamed", true)] {
        let body = padded_chat("gpt-3.5-turbo", 16 * 1024, None);
        let r = send(tag, body.clone(), streamed).await;
        assert_eq!(r.status, 200, "{tag}: {r:?}");
        let seen = origin.request(&path(tag)).await;
        assert_eq!(seen.body_fnv, fnv1a(FNV_START, &body), "{tag}");
    }
    origin_saw_only(&origin, &["h2-exact", "h2-exact-streamed"]);
}

/// A method-override field lets the request be decided under another rule too (here an audit
/// rule on `DELETE`, before the model and DLP rules): that must not take the model and DLP
/// rules out of play, or an ambiguous body and an unreadable one pass just by naming the
/// method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_does_not_take_body_rules_out_of_play() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&format!(
                "[[rule]]\nid = \"audit-deletes\"\nvendor = \"openai\"\nmethod = \"DELETE\"\n\
         action = \"audit\"\n\n{RULES}"
            )),
    )
    .await;
    let send = |tag: &str, content_type: &str, body: Vec<u8>| {
        let req = proxy
            .client()
            .post(format!("http://api.openai.com/v1/chat/completions?{tag}"))
            .header("content-type", content_type)
            .header("x-http-method-override", "DELETE")
            .body(body);
        fetch(req)
    };
    let r = send(
        "twice",
        "application/json",
        br#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#.to_vec(),
    )
    .await;
    assert_not_inspectable(&proxy, &path("twice"), &r).await;
    let r = send(
        "utf16",
        "application/json; charset=utf-16le",
        utf16(r#"{"model":"gpt-4o-mini","messages":[]}"#, true),
    )
    .await;
    assert_not_inspectable(&proxy, &path("utf16"), &r).await;
    origin_saw_only(&origin, &[]);
}

/// A `model` named with a value too long for the scanner (or, in a form, not UTF-8) was taken
/// for "no model", so `gpt-4o-` and 300 more bytes passed a `gpt-4o*` block. It cannot be
/// vouched for, so it is refused where a model rule is in play.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_long_to_read_is_not_a_body_without_a_model() {
    let (origin, proxy) = setup().await;
    let long = format!(r#"{{"model":"gpt-4o-{}"}}"#, "x".repeat(300));
    let r = chat(&proxy, "long-json", &long).await;
    assert_not_inspectable(&proxy, &path("long-json"), &r).await;

    let form = format!("model=gpt-4o-{}", "x".repeat(300)).into_bytes();
    let p = "/v1/audio/transcriptions?long-form";
    let r = post(&proxy, p, "application/x-www-form-urlencoded", form).await;
    assert_not_inspectable(&proxy, p, &r).await;
    let p = "/v1/audio/transcriptions?latin1-form";
    let r = post(
        &proxy,
        p,
        "application/x-www-form-urlencoded",
        b"model=gpt-4o%FF".to_vec(),
    )
    .await;
    assert_not_inspectable(&proxy, p, &r).await;

    // A readable model still decides.
    let r = chat(&proxy, "mini", r#"{"model":"gpt-4o-mini"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    origin_saw_only(&origin, &["mini"]);
}

/// A key pasted into `model` is refused by DLP like one anywhere in the body, and the audit
/// record names the pattern, never the text: its `model` field is `[redacted]`, where it used
/// to hold the key (lowercased).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_the_model_field_is_not_written_to_the_audit_log() {
    let (origin, proxy) = setup().await;
    for (tag, key, status) in [
        (
            "openai",
            "sk-proj-ZQXmodelkeyabcdefghijklmnopqrstuvwxyz0123456789",
            403,
        ),
        ("aws", "AKIAIOSFODNN7EXAMPLE", 403),
        // No DLP pattern for it, so not refused; still a key by its shape.
        ("hf", "hf_ZQXmodelkeyabcdefghijklmnop", 200),
    ] {
        let r = chat(&proxy, tag, &format!(r#"{{"model":"{key}"}}"#)).await;
        assert_eq!(r.status, status, "{tag}: {r:?}");
        let rec = proxy.audit_path(&path(tag)).await;
        assert_eq!(rec["model"], "[redacted]", "{rec}");
        let log = proxy.audit_text().to_ascii_lowercase();
        assert!(!log.contains(&key.to_ascii_lowercase()), "{tag}: {log}");
    }
    // A model name stays on record.
    let r = chat(&proxy, "named", r#"{"model":"gpt-4o-mini"}"#).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        proxy.audit_path(&path("named")).await["model"],
        "gpt-4o-mini"
    );
    origin_saw_only(&origin, &["named", "hf"]);
}

/// Body rules scoped to an endpoint leave the vendor's other requests alone: their bodies are
/// not held back nor read, so a compressed body (which inspection would refuse as hiding
/// content from DLP) passes, and no `model` is taken from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_read_only_where_a_body_rule_could_apply() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-secrets-in-chat\"\nvendor = \"openai\"\nendpoint = \"chat\"\n\
         dlp = \"all\"\naction = \"block\"\n\n\
         [[rule]]\nid = \"no-gpt4o-chat\"\nvendor = \"openai\"\nendpoint = \"chat\"\n\
         model = \"gpt-4o*\"\naction = \"block\"\n",
    ))
    .await;
    let post = |path: &str, encoding: Option<&str>| {
        let mut req = proxy
            .client()
            .post(format!("http://api.openai.com{path}"))
            .header("content-type", "application/json")
            .body(r#"{"model":"gpt-4o","input":"hello"}"#);
        if let Some(e) = encoding {
            req = req.header("content-encoding", e);
        }
        fetch(req)
    };
    let r = post("/v1/embeddings?plain", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        proxy.audit_path("/v1/embeddings?plain").await["model"],
        serde_json::Value::Null
    );
    let r = post("/v1/embeddings?gzip", Some("gzip")).await;
    assert_eq!(r.status, 200, "no body rule applies to embeddings: {r:?}");
    // Where the rules apply, the body is read and decided on.
    let r = post("/v1/chat/completions?plain", None).await;
    assert_eq!(r.status, 403, "{r:?}");
    let rec = proxy.audit_path("/v1/chat/completions?plain").await;
    assert_eq!(
        (rec["rule"].as_str(), rec["model"].as_str()),
        (Some("no-gpt4o-chat"), Some("gpt-4o")),
        "{rec}"
    );
    let r = post("/v1/chat/completions?gzip", Some("gzip")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_reason(
        &proxy.audit_path("/v1/chat/completions?gzip").await,
        "body_not_inspectable",
    );
    // An override naming chat makes the body matter again.
    let r = fetch(
        proxy
            .client()
            .post("http://api.openai.com/v1/embeddings?renamed")
            .header("x-original-url", "/v1/chat/completions")
            .body(r#"{"model":"gpt-4o"}"#),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
}

/// Gemini names the model in the path (`/v1beta/models/gemini-2.5-pro:generateContent`), and
/// its API reads no `model` in the body: model rules read the path's, the audit records it, and
/// a body held back for DLP cannot make the model doubtful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_the_path_is_read_there() {
    let origin = Origin::http().await;
    let host = "generativelanguage.googleapis.com";
    let proxy = Proxy::start(Config::new().vendor(host, origin.addr).tail(
        "[[rule]]\nid = \"no-secrets\"\nvendor = \"google-gemini\"\ndlp = \"all\"\naction = \"block\"\n\n\
         [[rule]]\nid = \"no-pro\"\nvendor = \"google-gemini\"\nmodel = \"gemini-2.5-pro*\"\naction = \"block\"\n\n\
         [inspect]\nmax_body = \"1KiB\"\n",
    ))
    .await;
    let send = |path: &'static str, body: String| {
        fetch(
            proxy
                .client()
                .post(format!("http://{host}{path}"))
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let pro = "/v1beta/models/gemini-2.5-pro:generateContent";
    let r = send(pro, "{}".into()).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-portcullis-rule"), Some("no-pro"), "{r:?}");
    assert_eq!(proxy.audit_path(pro).await["model"], "gemini-2.5-pro");

    // The body's `model` is not what Gemini serves: the path's is.
    let flash = "/v1beta/models/gemini-2.5-flash:generateContent?named";
    let r = send(flash, r#"{"model":"gemini-2.5-pro","contents":[]}"#.into()).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(proxy.audit_path(flash).await["model"], "gemini-2.5-flash");

    // Past max_body, read for DLP only: it streams on, as DLP-only bodies do.
    let long = "/v1beta/models/gemini-2.5-flash:generateContent?long";
    let body = format!(r#"{{"contents":"{}"}}"#, "a".repeat(4096));
    let r = send(long, body.clone()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let rec = proxy.audit_path(long).await;
    assert_eq!(rec["model"], "gemini-2.5-flash", "{rec}");
    let seen = origin.request(long).await;
    assert_eq!(seen.body_fnv, fnv1a(FNV_START, body.as_bytes()));
    let uris: Vec<String> = origin.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris.len(), 2, "{uris:?}");
}

/// A batch naming several models is decided on each (Anthropic's Message Batches over plain
/// HTTP here). A shadow rule on any of them marks the record, whichever request of the batch
/// names it; two models under two different limit rules cannot be charged as one request,
/// so that batch is refused and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_of_a_batch_is_decided_and_marks_its_record() {
    let origin = Origin::http().await;
    let rules = "\
[[rule]]\nid = \"shadow-opus\"\nvendor = \"anthropic\"\nmodel = \"*opus*\"\naction = \"block\"\nmode = \"shadow\"\n\n\
[[rule]]\nid = \"lim-sonnet\"\nvendor = \"anthropic\"\nmodel = \"*sonnet*\"\naction = \"limit\"\nlimit = { requests = 100, per = \"1h\" }\n\n\
[[rule]]\nid = \"lim-haiku\"\nvendor = \"anthropic\"\nmodel = \"*haiku*\"\naction = \"limit\"\nlimit = { requests = 100, per = \"1h\" }\n";
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.anthropic.com", origin.addr)
            .tail(rules),
    )
    .await;
    let batch = |tag: &str, models: &[&str]| {
        let requests: Vec<String> = models
            .iter()
            .map(|m| format!(r#"{{"custom_id":"x","params":{{"model":"{m}"}}}}"#))
            .collect();
        proxy
            .client()
            .post(format!(
                "http://api.anthropic.com/v1/messages/batches?{tag}"
            ))
            .header("content-type", "application/json")
            .body(format!(r#"{{"requests":[{}]}}"#, requests.join(",")))
    };
    for (tag, models, status, rule, action, mode) in [
        (
            "first",
            &["claude-opus-4-1", "claude-x"][..],
            200,
            Some("shadow-opus"),
            "block",
            "shadow",
        ),
        (
            "second",
            &["claude-x", "claude-opus-4-1"][..],
            200,
            Some("shadow-opus"),
            "block",
            "shadow",
        ),
        (
            "one-limit",
            &["claude-sonnet-4-5"][..],
            200,
            Some("lim-sonnet"),
            "allow",
            "enforce",
        ),
        (
            "two-limits",
            &["claude-sonnet-4-5", "claude-haiku-4-5"][..],
            403,
            None,
            "block",
            "enforce",
        ),
    ] {
        let r = fetch(batch(tag, models)).await;
        assert_eq!(r.status, status, "{tag}: {}", r.body);
        let rec = proxy
            .audit_path(&format!("/v1/messages/batches?{tag}"))
            .await;
        assert_eq!(
            (
                rec["rule"].as_str(),
                rec["action"].as_str(),
                rec["mode"].as_str()
            ),
            (rule, Some(action), Some(mode)),
            "{tag}: {rec}"
        );
        if tag == "two-limits" {
            assert_reason(&rec, "ambiguous_request: the body names models");
        }
    }
    // The record lists the models with commas, so a comma inside one is escaped.
    let r = fetch(batch("comma", &["a,b", "claude-x"])).await;
    assert_eq!(r.status, 200);
    let rec = proxy.audit_path("/v1/messages/batches?comma").await;
    assert_eq!(rec["model"], "a%2Cb,claude-x", "{rec}");
}

/// A Batch API input file is read line by line: uploading a file whose requests name a
/// blocked model is blocked like the request itself would be, whether the file is the body
/// or a multipart form's file part, and a file a line splitter could read otherwise (a CR
/// inside a line) is refused. A file naming only allowed models goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_file_naming_a_blocked_model_is_blocked_at_upload() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-o1-pro\"\nvendor = \"openai\"\nmodel = \"o1-pro*\"\naction = \"block\"\n",
    ))
    .await;
    let line = |id: &str, m: &str| {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{m}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
        )
    };
    let upload = |tag: &str, file: String| {
        let body = format!(
            "--b0undary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{file}\r\n--b0undary--\r\n"
        );
        proxy
            .client()
            .post(match tag {
                "elsewhere" => "http://api.openai.com/v1/other".to_string(),
                _ => format!("http://api.openai.com/v1/files?{tag}"),
            })
            .header("content-type", "multipart/form-data; boundary=b0undary")
            .body(body)
    };
    let allowed = [line("a", "gpt-4o-mini"), line("b", "gpt-4o-mini")].join("\n");
    let blocked = [line("a", "gpt-4o-mini"), line("b", "o1-pro-2025-03-19")].join("\n");
    let split = format!("{}\r{}", line("a", "gpt-4o-mini"), line("b", "o1-pro"));
    for (tag, file, status, reason) in [
        ("allowed", allowed, 200, None),
        ("blocked", blocked.clone(), 403, None),
        ("split", split, 403, Some("body_not_inspectable")),
    ] {
        let r = fetch(upload(tag, file)).await;
        assert_eq!(r.status, status, "{tag}: {}", r.body);
        let rec = proxy.audit_path(&format!("/v1/files?{tag}")).await;
        if let Some(reason) = reason {
            assert_reason(&rec, reason);
        }
        if tag == "blocked" {
            assert_eq!(rec["rule"], "no-o1-pro", "{rec}");
            assert_eq!(rec["model"], "gpt-4o-mini,o1-pro-2025-03-19", "{rec}");
        }
    }
    // The file alone as the body (an upload part's bytes, or a client posting JSON Lines).
    let r = fetch(
        proxy
            .client()
            .post("http://api.openai.com/v1/files?raw")
            .header("content-type", "application/jsonl")
            .body(blocked.clone()),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // A part the vendor decodes (base64) cannot be vouched for; a PDF for an assistant is
    // no batch input and goes through as sent.
    let form = |tag: &str, purpose: &str, head: &str, file: &[u8]| {
        let mut body = format!(
            "--b0undary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n{head}\r\n"
        )
        .into_bytes();
        body.extend_from_slice(file);
        body.extend_from_slice(b"\r\n--b0undary--\r\n");
        proxy
            .client()
            .post(format!("http://api.openai.com/v1/files?{tag}"))
            .header("content-type", "multipart/form-data; boundary=b0undary")
            .body(body)
    };
    let coded = "Content-Transfer-Encoding: base64\r\n";
    let r = fetch(form(
        "b64",
        "batch",
        coded,
        b"eyJib2R5Ijp7Im1vZGVsIjoibzEtcHJvIn19",
    ))
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("body_not_inspectable"), "{}", r.body);
    let pdf = b"%PDF-1.7\n{\x00\x01\xc2\x85\r\x0b}\nFinal disposition\n\xff\xfe{\x00\n%%EOF";
    let r = fetch(form(
        "pdf",
        "assistants",
        "Content-Type: application/pdf\r\n",
        pdf,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Sent elsewhere, but to an origin that routes on X-Original-URL it is the same upload.
    let r = fetch(upload("elsewhere", blocked.clone()).header("x-original-url", "/v1/files")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    // A boundary with a backslash escape frames other parts for Werkzeug and python-multipart
    // than for RFC 9110; a type with a non-ASCII space is multipart to Werkzeug only.
    for (tag, ctype) in [
        ("escaped", "multipart/form-data; boundary=\"b0und\\ary\""),
        ("nbsp", "multipart/form-data\u{a0}; boundary=b0undary"),
        // A second boundary inside a quoted value for us, a parameter to python-multipart
        // (which counts quotes) or to Werkzeug (which quotes only right after `key=`).
        (
            "quotes",
            "multipart/form-data; boundary=b0undary; x=\"a\\\\\"; y=\"; boundary=FAKE; z=\"",
        ),
        (
            "space",
            "multipart/form-data; boundary=b0undary; y= \"; boundary=FAKE; z=\"",
        ),
    ] {
        let r = fetch(
            proxy
                .client()
                .post(format!("http://api.openai.com/v1/audio/transcriptions?{tag}"))
                .header("content-type", reqwest::header::HeaderValue::from_bytes(ctype.as_bytes()).unwrap())
                .body("--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--b0undary--\r\n"),
        )
        .await;
        assert_eq!(r.status, 403, "{tag}: {}", r.body);
    }
    // A file name with `;` and `\` in quotes, as httpx writes it, is read alike by every
    // parser: no doubt.
    let r = fetch(
        proxy
            .client()
            .post("http://api.openai.com/v1/files?filename")
            .header("content-type", "multipart/form-data; boundary=b0undary")
            .body(format!(
                "--b0undary\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
                 --b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a; b\\\\c.jsonl\"\r\n\r\n{}\r\n--b0undary--\r\n",
                line("a", "gpt-4o-mini")
            )),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A key pasted as one model is hidden in the record; the others still show.
    let pasted = [
        line("a", "gpt-4o-mini"),
        line("b", "sk-proj-AAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
    ]
    .join("\n");
    let r = fetch(upload("pasted", pasted)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rec = proxy.audit_path("/v1/files?pasted").await;
    assert_eq!(rec["model"], "gpt-4o-mini,[redacted]", "{rec}");
    // An eval run samples the model its data source names.
    let r = post_json(
        &proxy,
        "http://api.openai.com/v1/evals/eval_1/runs?eval",
        r#"{"name":"r","data_source":{"type":"completions","model":"o1-pro"}}"#,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // So does a grader run on its own.
    let r = post_json(
        &proxy,
        "http://api.openai.com/v1/fine_tuning/alpha/graders/run?grader",
        r#"{"grader":{"type":"score_model","model":"o1-pro"},"model_sample":"x"}"#,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // And each grader of a multi-grader, keyed by a name the client picks, run on its own
    // or as a reinforcement fine-tuning job's.
    let multi = |judge: &str| {
        format!(
            r#"{{"type":"multi","graders":{{"exact":{{"type":"string_check","name":"e"}},"judge":{{"type":"score_model","model":"{judge}"}}}},"calculate_output":"judge"}}"#
        )
    };
    // The shapes OpenAI's own reference and SDK write `graders` in: an array, one grader.
    let listed = |judge: &str| {
        format!(
            r#"{{"type":"multi","graders":[{{"type":"score_model","name":"j","model":"{judge}"}}],"calculate_output":"j"}}"#
        )
    };
    let single = |judge: &str| {
        format!(
            r#"{{"type":"multi","graders":{{"type":"score_model","name":"j","model":"{judge}"}},"calculate_output":"j"}}"#
        )
    };
    for (tag, path, body, models) in [
        (
            "multi-run",
            "/v1/fine_tuning/alpha/graders/run",
            format!(r#"{{"grader":{},"model_sample":"x"}}"#, multi("o1-pro")),
            "o1-pro",
        ),
        (
            "multi-job",
            "/v1/fine_tuning/jobs",
            format!(
                r#"{{"model":"o4-mini","training_file":"file-1","method":{{"type":"reinforcement","reinforcement":{{"grader":{}}}}}}}"#,
                multi("o1-pro")
            ),
            "o4-mini,o1-pro",
        ),
        (
            "listed-run",
            "/v1/fine_tuning/alpha/graders/run",
            format!(r#"{{"grader":{},"model_sample":"x"}}"#, listed("o1-pro")),
            "o1-pro",
        ),
        (
            "single-job",
            "/v1/fine_tuning/jobs",
            format!(
                r#"{{"model":"o4-mini","training_file":"file-1","method":{{"type":"reinforcement","reinforcement":{{"grader":{}}}}}}}"#,
                single("o1-pro")
            ),
            "o4-mini,o1-pro",
        ),
        (
            "listed-eval",
            "/v1/evals",
            format!(
                r#"{{"name":"e","testing_criteria":[{}]}}"#,
                listed("o1-pro")
            ),
            "o1-pro",
        ),
    ] {
        let r = post_json(&proxy, format!("http://api.openai.com{path}?{tag}"), body).await;
        assert_eq!(r.status, 403, "{tag}: {}", r.body);
        let rec = proxy.audit_path(&format!("{path}?{tag}")).await;
        assert_eq!(rec["model"], models, "{tag}: {rec}");
    }
    let r = post_json(
        &proxy,
        "http://api.openai.com/v1/fine_tuning/alpha/graders/run?multi-allowed",
        format!(
            r#"{{"grader":{},"model_sample":"x"}}"#,
            multi("gpt-4o-mini")
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The Uploads API sends a file in parts that cut its lines anywhere: a batch input cannot
    // be read that way, so creating one is refused; other purposes pass.
    let r = post_json(
        &proxy,
        "http://api.openai.com/v1/uploads?batch-in-parts",
        r#"{"purpose":"batch","filename":"in.jsonl","bytes":1000000,"mime_type":"application/jsonl"}"#,
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("body_not_inspectable"), "{}", r.body);
    let r = post_json(
        &proxy,
        "http://api.openai.com/v1/uploads?assistants",
        r#"{"purpose":"assistants","filename":"a.pdf","bytes":1000000,"mime_type":"application/pdf"}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        origin.requests().len(),
        6,
        "only the allowed uploads and grader run reached the origin"
    );
}

/// The check that refuses a body model rules cannot vouch for reads the path as sent, not
/// the record's: a key-shaped segment is redacted in the record, and `sk-…%2F..%2Fchat%2F…`
/// redacted is no longer the chat path the decision read it as. Found by the red team: a
/// body naming `model` twice reached a chat rule's origin that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_shaped_segment_does_not_hide_the_path_from_the_body_check() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-gpt4o-chat\"\nvendor = \"openai\"\nendpoint = \"chat\"\nmodel = \"gpt-4o*\"\naction = \"block\"\n",
    ))
    .await;
    let twice = r#"{"model":"gpt-4.1","model":"gpt-4o","messages":[]}"#;
    for (tag, path) in [
        ("plain", "/v1/chat/completions"),
        ("dotted", "/v1/xx%2F..%2Fchat%2Fcompletions"),
        (
            "key-shaped",
            "/v1/sk-proj-aaaaaaaaaaaaaaaaaaaaaaaa%2F..%2Fchat%2Fcompletions",
        ),
    ] {
        let r = post_json(&proxy, format!("http://api.openai.com{path}?{tag}"), twice).await;
        assert_eq!(r.status, 403, "{tag}: {}", r.body);
        assert!(r.body.contains("body_not_inspectable"), "{tag}: {}", r.body);
    }
    assert!(origin.requests().is_empty());
    // Let through, it is recorded as the chat request an origin routing on the decoded path
    // serves, not as an unknown path.
    let path = "/v1/sk-proj-aaaaaaaaaaaaaaaaaaaaaaaa%2F..%2Fchat%2Fcompletions?allowed";
    let r = post_json(
        &proxy,
        format!("http://api.openai.com{path}"),
        r#"{"model":"gpt-4.1","messages":[]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let rec = proxy.audit_path("/v1/REDACTED?allowed").await;
    assert_eq!(rec["endpoint"], "chat", "{rec}");
}

/// OpenRouter falls back to the other models a request lists (`models`, and `fallbacks` on
/// its Messages route): each is decided, so a blocked one cannot ride behind an allowed one.
/// Found by the red team.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_model_list_is_decided_on_each_model() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("openrouter.ai", origin.addr).tail(
        "[[rule]]\nid = \"no-deepseek-models\"\nmodel = \"*deepseek*\"\naction = \"block\"\n",
    ))
    .await;
    for (tag, path, body, status) in [
        (
            "models",
            "/api/v1/chat/completions",
            r#"{"models":["deepseek/deepseek-r1"],"messages":[]}"#,
            403,
        ),
        (
            "behind",
            "/api/v1/chat/completions",
            r#"{"model":"openai/gpt-4o","models":["openai/gpt-4o","deepseek/deepseek-r1"],"messages":[]}"#,
            403,
        ),
        (
            "fallbacks",
            "/api/v1/messages",
            r#"{"model":"anthropic/claude-haiku-4.5","fallbacks":[{"model":"deepseek/deepseek-r1"}]}"#,
            403,
        ),
        (
            "auto",
            "/api/v1/chat/completions",
            r#"{"model":"openrouter/auto","plugins":[{"id":"auto-router","allowed_models":["deepseek/*"]}]}"#,
            403,
        ),
        (
            "allowed",
            "/api/v1/chat/completions",
            r#"{"models":["openai/gpt-4o","anthropic/claude-haiku-4.5"],"messages":[]}"#,
            200,
        ),
    ] {
        let r = post_json(&proxy, format!("http://openrouter.ai{path}?{tag}"), body).await;
        assert_eq!(r.status, status, "{tag}: {}", r.body);
        let rec = proxy.audit_path(&format!("{path}?{tag}")).await;
        if status == 403 {
            assert_eq!(rec["rule"], "no-deepseek-models", "{tag}: {rec}");
        }
    }
    assert_eq!(origin.requests().len(), 1);
}

/// Bedrock names the model in the body where no path does: a batch job, an asynchronous
/// invocation, a customization job. Each is decided on it, as an invocation is on its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bedrock_jobs_are_decided_on_the_model_their_body_names() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("bedrock.us-east-1.amazonaws.com", origin.addr)
            .vendor("bedrock-runtime.us-east-1.amazonaws.com", origin.addr)
            .tail("[[rule]]\nid = \"no-deepseek-models\"\nmodel = \"*deepseek*\"\naction = \"block\"\n"),
    )
    .await;
    let deepseek = "arn:aws:bedrock:us-east-1::foundation-model/deepseek.r1-v1:0";
    for (tag, host, path, body, status) in [
        (
            "batch",
            "bedrock",
            "/model-invocation-job",
            format!(r#"{{"jobName":"j","modelId":"{deepseek}","roleArn":"r"}}"#),
            403,
        ),
        (
            "async",
            "bedrock-runtime",
            "/async-invoke",
            format!(r#"{{"modelId":"{deepseek}","modelInput":{{}}}}"#),
            403,
        ),
        (
            "tune",
            "bedrock",
            "/model-customization-jobs",
            r#"{"jobName":"t","baseModelIdentifier":"deepseek.r1-v1:0"}"#.into(),
            403,
        ),
        (
            "allowed",
            "bedrock",
            "/model-invocation-job",
            r#"{"jobName":"j","modelId":"amazon.nova-lite-v1:0","roleArn":"r"}"#.into(),
            200,
        ),
    ] {
        let r = post_json(
            &proxy,
            format!("http://{host}.us-east-1.amazonaws.com{path}?{tag}"),
            body,
        )
        .await;
        assert_eq!(r.status, status, "{tag}: {}", r.body);
    }
    assert_eq!(origin.requests().len(), 1);
}

/// A JSON POST through the proxy.
async fn post_json(
    proxy: &Proxy,
    url: impl reqwest::IntoUrl,
    body: impl Into<reqwest::Body>,
) -> Raw {
    fetch(
        proxy
            .client()
            .post(url)
            .header("content-type", "application/json")
            .body(body),
    )
    .await
}
