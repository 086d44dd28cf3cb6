//! Target normalisation (no spelling of a blocked host escapes its rule) and the upstream
//! address guard (loopback refused unless allowed; the proxy's own listeners always).
//!
//! The blocked-spelling tests run with `[defaults] action = "block"`: if normalisation ever
//! failed, the request would be refused by the default (rule "default") instead of leaving the
//! machine, and the assertion on rule "block-deepseek" would catch it.

mod common;

use common::*;

/// Origins for both vendors, everything but the rules blocked by default.
async fn strict_proxy() -> (Origin, Proxy) {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.deepseek.com", origin.addr)
            .vendor("api.openai.com", origin.addr)
            .default_block(),
    )
    .await;
    (origin, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_blocked_host_is_blocked() {
    let (origin, proxy) = strict_proxy().await;
    for target in [
        "http://api.deepseek.com/models",
        "http://API.DEEPSEEK.COM/models",
        "http://Api.DeepSeek.Com/models",
        "http://api.deepseek.com./models",
        "http://api.deepseek.com:80/models",
        "http://API.deepseek.com.:080/models",
        "http://deepseek.com/",
        "http://CHAT.DEEPSEEK.COM./",
    ] {
        let r = raw_get(proxy.addr, target, &[]).await;
        assert_eq!(r.status, 403, "{target}: {r:?}");
        assert_eq!(
            r.header("x-portcullis-rule"),
            Some("block-deepseek"),
            "{target}: {r:?}"
        );
        assert_eq!(
            r.header("x-portcullis-vendor"),
            Some("deepseek"),
            "{target}"
        );
    }
    for authority in [
        "API.DEEPSEEK.COM:443",
        "api.deepseek.com.:443",
        "api.deepseek.com.:0443",
    ] {
        let r = connect_refused(proxy.addr, authority, &[]).await;
        assert_eq!(
            r.header("x-portcullis-rule"),
            Some("block-deepseek"),
            "{authority}: {r:?}"
        );
    }
    // Full-width "ａｐｉ", the ideographic full stop and percent-encoding: raw UTF-8 and '%' are
    // not valid in an HTTP/1.1 authority, so they may be refused as malformed or blocked, but
    // never forwarded.
    for target in [
        "http://ａｐｉ.deepseek.com/models",
        "http://api。deepseek。com/models",
        "http://%61pi.deepseek.com/models",
        "http://%EF%BD%81%EF%BD%90%EF%BD%89.deepseek.com/models",
        "http://api%E3%80%82deepseek%E3%80%82com/models",
    ] {
        let r = raw_get(proxy.addr, target, &[]).await;
        assert!(r.status == 403 || r.status == 400, "{target}: {r:?}");
        if r.status == 403 {
            assert_eq!(
                r.header("x-portcullis-rule"),
                Some("block-deepseek"),
                "{target}"
            );
        }
    }
    assert!(
        origin.requests().is_empty(),
        "a spelling reached the origin: {:?}",
        origin.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_is_refused_and_never_logged() {
    let (origin, proxy) = strict_proxy().await;
    let r = raw_get(
        proxy.addr,
        "http://user:pw-Zq81@api.openai.com/v1/models",
        &[],
    )
    .await;
    assert_error(&r, 400, "userinfo_refused");
    if let Some(code) = curl_write_out(
        &proxy,
        "%{http_code}",
        "http://user:pw-Zq81@api.openai.com/",
    )
    .await
    {
        // curl moves userinfo into an Authorization header; the proxy then sees no userinfo.
        assert!(code == "403" || code == "400", "{code}");
    }
    let rec = proxy
        .audit_where("the refusal", |r| r["status"] == 400)
        .await;
    // Refused before any decision, still counted as an attempt at the vendor it named.
    assert_eq!(rec["host"], "api.openai.com", "{rec}");
    assert_eq!(rec["vendor"], "openai", "{rec}");
    assert!(
        !proxy.audit_text().contains("pw-Zq81"),
        "a password reached the audit log"
    );
    assert!(origin.requests().iter().all(|s| s.uri != "/v1/models"));
}

/// A port that is no port is refused, and its record does not claim the scheme's default:
/// it says 0, as for a CONNECT without a port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_port_is_refused_and_logged_as_none() {
    let (origin, proxy) = strict_proxy().await;
    for (i, port) in ["65616", "+80", "", "0"].into_iter().enumerate() {
        let path = format!("/bad-port-{i}");
        let r = raw_get(
            proxy.addr,
            &format!("http://api.openai.com:{port}{path}"),
            &[],
        )
        .await;
        assert_error(&r, 400, "bad_port");
        let rec = proxy.audit_path(&path).await;
        assert_eq!(rec["port"], 0, "{port:?}: {rec}");
        assert_eq!(rec["host"], "api.openai.com", "{rec}");
    }
    let (status, head, _s) = raw_connect(proxy.addr, "api.openai.com:", &[]).await;
    assert_eq!(status, 400, "{head}");
    let rec = proxy
        .audit_where("the CONNECT", |r| r["method"] == "CONNECT")
        .await;
    assert_eq!(rec["port"], 0, "{rec}");
    assert!(origin.requests().is_empty());
}

/// 127.0.0.1 spelled as a browser's URL parser would accept it.
fn loopback_spellings(port: u16) -> Vec<String> {
    [
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "0x7f000001",
        "127.0.0.1",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
    ]
    .iter()
    .map(|h| format!("http://{h}:{port}/ip"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_forms_reach_loopback_when_allowed() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().loopback()).await;
    for target in loopback_spellings(origin.addr.port()) {
        let r = raw_get(proxy.addr, &target, &[]).await;
        assert_eq!(r.status, 200, "{target}: {r:?}");
        assert_eq!(r.header("x-origin"), Some("fake"), "{target}");
    }
    let n = loopback_spellings(0).len();
    assert_eq!(origin.requests().len(), n);
    let records = proxy.audit_at_least(n).await;
    assert!(
        records.iter().all(|r| r["host"] == "127.0.0.1"),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_refused_by_default_in_every_spelling() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new()).await;
    let spellings = loopback_spellings(origin.addr.port());
    for target in &spellings {
        let r = raw_get(proxy.addr, target, &[]).await;
        assert_error(&r, 403, "address_denied");
    }
    assert_eq!(
        proxy.upstream_errors("address_denied").await,
        spellings.len() as f64
    );
    assert!(
        origin.requests().is_empty(),
        "the guard let a request through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_override_is_guarded_like_dns() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().resolve("api.openai.com:80", origin.addr)).await;
    let r = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
    assert_error(&r, 403, "address_denied");
    // The client is not told what the name resolves to; the record keeps it.
    let addr = origin.addr.to_string();
    assert!(!r.body.contains(&addr), "{}", r.body);
    assert!(r.body.contains("loopback"), "{}", r.body);
    let rec = proxy.audit_path("/v1/models").await;
    assert!(rec["reason"].as_str().unwrap().contains(&addr), "{rec}");
    assert_eq!(rec["status"], 403);
    assert_eq!(
        rec["action"], "block",
        "the guard refused it: blocked, whatever the rules said"
    );
    assert_reason(&rec, "address_denied");
    assert_eq!(proxy.upstream_errors("address_denied").await, 1.0);
    assert!(origin.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_listeners_are_refused_even_with_loopback_allowed() {
    let proxy = Proxy::start(Config::new().loopback()).await;
    for target in [
        format!("http://127.0.0.1:{}/loop", proxy.addr.port()),
        format!("http://127.1:{}/loop", proxy.addr.port()),
        format!("http://127.0.0.1:{}/metrics", proxy.admin.port()),
    ] {
        let r = raw_get(proxy.addr, &target, &[]).await;
        assert_error(&r, 403, "address_denied");
    }
    // The only requests the proxy ever served are the three above: no loop happened.
    let records = proxy.audit_at_least(3).await;
    assert_eq!(records.len(), 3, "{records:?}");
}

/// A path rule holds for every spelling of the path an origin might route the same way: dot
/// segments, doubled slashes, escaped letters, `%2F` for `/` (which some origins decode before
/// routing), case, `;params` and backslashes. The request is still forwarded as the client spelled it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_blocked_path_is_blocked() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-batches\"\nvendor = \"openai\"\npath = \"/v1/batches\"\naction = \"block\"\n",
    ))
    .await;
    for target in [
        "http://api.openai.com/v1/batches",
        "http://api.openai.com/v1/./batches",
        "http://api.openai.com//v1//batches",
        "http://api.openai.com/v1/x/../batches",
        "http://api.openai.com/v1/%62atches",
        "http://api.openai.com/v1%2Fbatches",
        "http://api.openai.com/v1%2fbatches?x=1",
        "http://api.openai.com/v1/x%2F..%2Fbatches",
        // What lenient origins route the same: case (ASP.NET, IIS), `;params` and `..;`
        // (servlet containers), backslashes (IIS).
        "http://api.openai.com/V1/Batches",
        "http://api.openai.com/v1/BATCHES",
        "http://api.openai.com/v1/batches;x=1",
        "http://api.openai.com/v1;jsessionid=A/batches",
        "http://api.openai.com/v1/files/..;/batches",
        "http://api.openai.com/v1\\batches",
        "http://api.openai.com/v1%5cbatches",
        // Dot segments after the blocked segment: the normal form resolves them away, but
        // origins that route the path as sent (Express, many gateways) see it under
        // /v1/batches, and it is forwarded as sent.
        "http://api.openai.com/v1/batches/..",
        "http://api.openai.com/v1/batches/%2e%2e",
        "http://api.openai.com/v1/batches/..;x/cancel",
        "http://api.openai.com/v1/batches/.%2E;/b_1",
        "http://api.openai.com/v1/batches%2F..",
    ] {
        let r = raw_get(proxy.addr, target, &[]).await;
        assert_eq!(r.status, 403, "{target}: {r:?}");
    }
    let r = raw_get(proxy.addr, "http://api.openai.com/v1/models%2Fx", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.requests().len(), 1);
    assert_eq!(
        origin.requests()[0].uri,
        "/v1/models%2Fx",
        "forwarded as spelled"
    );
}

/// Google's APIs name the method after a colon (`models/x:generateContent`); origins that
/// decode `%3A` before routing (Go's `net/http`, Express, Werkzeug) read `x%3AgenerateContent`
/// the same, so an endpoint rule holds for that spelling too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_colon_does_not_change_the_endpoint() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("generativelanguage.googleapis.com", origin.addr)
            .tail(
                "[[rule]]\nid = \"no-gemini-chat\"\nvendor = \"google-gemini\"\nendpoint = [\"chat\", \"batches\"]\naction = \"block\"\n",
            ),
    )
    .await;
    let base = "http://generativelanguage.googleapis.com";
    for path in [
        "/v1beta/models/gemini-pro:generateContent",
        "/v1beta/models/gemini-pro%3AgenerateContent",
        "/v1beta/models/gemini-pro%3abatchGenerateContent",
        "/v1beta%2Fmodels/gemini-pro%3AstreamGenerateContent?alt=sse",
    ] {
        let r = raw_get(proxy.addr, &format!("{base}{path}"), &[]).await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
        let rec = proxy.audit_path(path).await;
        assert_eq!(rec["rule"], "no-gemini-chat", "{rec}");
    }
    let r = raw_get(
        proxy.addr,
        &format!("{base}/v1beta/models/gemini-pro%3A"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen: Vec<String> = origin.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(
        seen,
        ["/v1beta/models/gemini-pro%3A"],
        "forwarded as spelled"
    );
}

/// `..` after a blocked endpoint's segment, in every spelling: an origin that does not resolve
/// dot segments routes the request under that endpoint, so the endpoint rule holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_do_not_drop_a_blocked_endpoint() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr).tail(
        "[[rule]]\nid = \"no-files\"\nvendor = \"openai\"\nendpoint = \"files\"\naction = \"block\"\n\
         [[rule]]\nid = \"no-batches\"\nvendor = \"openai\"\nendpoint = \"batches\"\naction = \"block\"\n",
    ))
    .await;
    for (path, rule) in [
        ("/v1/files/..", "no-files"),
        ("/v1/files/%2e%2e", "no-files"),
        ("/v1/files/..;/file-abc/content", "no-files"),
        ("/v1/batches/..;x/cancel", "no-batches"),
    ] {
        let r = raw_get(proxy.addr, &format!("http://api.openai.com{path}"), &[]).await;
        assert_blocked(&r, rule, "openai");
        let rec = proxy.audit_path(path).await;
        assert_eq!(rec["rule"], rule, "{rec}");
        assert_eq!(rec["status"], 403, "{rec}");
    }
    assert!(
        origin.requests().is_empty(),
        "a dot-segment spelling reached the origin: {:?}",
        origin.requests()
    );
    // Dot segments that stay clear of a blocked segment still pass, as sent.
    let r = raw_get(proxy.addr, "http://api.openai.com/v1/models/x/..", &[]).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(origin.requests().len(), 1);
    assert_eq!(
        origin.requests()[0].uri,
        "/v1/models/x/..",
        "forwarded as spelled"
    );
}

/// A method rule holds whatever case the client spells the method in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_of_a_blocked_method_is_blocked() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .default_block()
            .tail(
                "[[rule]]\nid = \"no-post\"\nvendor = \"openai\"\nmethod = \"POST\"\naction = \"block\"\n\
                 [[rule]]\nid = \"openai\"\nvendor = \"openai\"\naction = \"allow\"\n",
            ),
    )
    .await;
    for method in ["POST", "post", "Post", "pOST"] {
        let r = raw(
            proxy.addr,
            format!(
                "{method} http://api.openai.com/v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n\
                 Content-Length: 2\r\nConnection: close\r\n\r\n{{}}"
            )
            .as_bytes(),
        )
        .await;
        assert_blocked(&r, "no-post", "openai");
    }
    assert!(
        origin.requests().is_empty(),
        "a POST reached the origin: {:?}",
        origin.requests()
    );
}
