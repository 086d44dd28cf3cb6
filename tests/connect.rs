//! CONNECT tunnels: allow, block, domain fronting by SNI, port and TLS requirements.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_tunnel_reaches_tls_origin_and_is_audited_at_close() {
    let openai = Origin::https().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", openai.addr)).await;
    let client = proxy.client();

    let r = fetch(client.get("https://api.openai.com/v1/models")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "origin saw 0 bytes");
    let seen = openai.request("/v1/models").await;
    assert_eq!(seen.headers["host"], "api.openai.com");
    assert!(seen.headers.get("proxy-authorization").is_none());

    // The pooled connection keeps the tunnel open; dropping the client closes it.
    let open = proxy.metrics().await;
    assert_eq!(
        metric(&open, "portcullis_tunnels_active", &[]),
        1.0,
        "{open}"
    );
    drop(client);
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "allow");
    assert_eq!(rec["vendor"], "openai");
    assert_eq!(rec["tls"], "tunnel");
    assert_eq!(rec["sni"], "api.openai.com");
    assert_eq!(rec["port"], 443);
    assert_eq!(rec["status"], 200);
    assert!(
        rec["bytes_in"].as_u64().unwrap() > 0 && rec["bytes_out"].as_u64().unwrap() > 0,
        "{rec}"
    );
    let closed = proxy.metrics().await;
    assert_eq!(metric(&closed, "portcullis_tunnels_active", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_connect_gets_403_before_any_tunnel() {
    let deepseek = Sink::start().await;
    let proxy = Proxy::start(Config::new().vendor("api.deepseek.com", deepseek.addr)).await;

    let r = connect_refused(proxy.addr, "api.deepseek.com:443", &[]).await;
    assert_blocked(&r, "block-deepseek", "deepseek");

    let page = connect_refused(proxy.addr, "api.deepseek.com:443", &["Accept: text/html"]).await;
    assert_eq!(page.status, 403);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("DeepSeek is not approved"), "{page:?}");

    // A real client gives up on the tunnel.
    let err = within(
        "reqwest",
        proxy.client().get("https://api.deepseek.com/").send(),
    )
    .await
    .expect_err("a blocked CONNECT must fail");
    assert!(
        format!("{err:?}").contains("403") || err.is_connect(),
        "{err:?}"
    );

    if let Some(code) = curl_write_out(&proxy, "%{http_connect}", "https://api.deepseek.com/").await
    {
        assert_eq!(code, "403");
    }

    let rec = proxy.audit_connect("api.deepseek.com").await;
    assert_eq!(rec["action"], "block");
    assert_eq!(rec["status"], 403);
    assert_eq!(rec["tls"], "tunnel");
    assert_eq!(
        deepseek.accepted(),
        0,
        "a blocked CONNECT dialled the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fronting_with_a_blocked_sni_closes_the_tunnel() {
    let origin = Sink::start().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.deepseek.com", origin.addr)
            .resolve("127.0.0.1:443", origin.addr),
    )
    .await;

    // CONNECT to an allowed name or address, then a ClientHello naming a blocked host.
    for connect_host in ["api.openai.com", "127.0.0.1"] {
        let authority = format!("{connect_host}:443");
        let (status, _, tunnel) = raw_connect(proxy.addr, &authority, &[]).await;
        assert_eq!(status, 200, "{authority}");
        let handshake = within(
            "TLS over a fronted tunnel",
            tls_handshake(tunnel, "api.deepseek.com"),
        )
        .await;
        assert!(handshake.is_err(), "the fronted handshake completed");

        let rec = proxy.audit_connect(connect_host).await;
        assert_eq!(rec["action"], "block");
        assert_eq!(rec["sni"], "api.deepseek.com");
        assert_eq!(rec["vendor"], "deepseek");
        assert_eq!(rec["rule"], "block-deepseek");
        assert_reason(&rec, "sni_mismatch");
        assert_eq!(origin.received(), 0, "fronted bytes reached the origin");
    }

    let first = proxy.audit_connect("api.openai.com").await;
    // The same with curl: --connect-to makes it CONNECT to api.openai.com with SNI deepseek.
    let ca = ca_file(proxy.dir.path());
    let Some(out) = curl(&[
        "-x",
        &proxy.url(),
        "--cacert",
        ca.to_str().unwrap(),
        "--connect-to",
        "api.deepseek.com:443:api.openai.com:443",
        "https://api.deepseek.com/chat/completions",
    ])
    .await
    else {
        return;
    };
    assert!(!out.status.success(), "curl got through: {out:?}");
    let rec = proxy
        .audit_where("curl's fronted tunnel", |r| {
            r["host"] == "api.openai.com" && r["id"] != first["id"]
        })
        .await;
    assert_eq!(
        (&rec["action"], &rec["sni"]),
        (&"block".into(), &"api.deepseek.com".into()),
        "{rec}"
    );
    assert_reason(&rec, "sni_mismatch");
    assert_eq!(origin.received(), 0, "fronted bytes reached the origin");
}

/// `CONNECT <bare IP>` (or another allowed name) then the SNI of a vendor under a `limit` or
/// tenant rule: the tunnel was admitted on the other name's decision, so it never charged the
/// vendor's limits nor met its tenant restriction. It must be refused, not spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fronting_a_limited_or_tenant_restricted_vendor_closes_the_tunnel() {
    let origin = Origin::https().await;
    let rules = [
        (
            "openai-bulk",
            "action = \"limit\"\nlimit = { requests = 100, per = \"1h\" }\n",
            "limits",
        ),
        (
            "openai-company",
            "action = \"allow\"\nrequire_key = [\"k_000000000000\"]\n",
            "tenant restriction",
        ),
    ];
    for (id, body, needs) in rules {
        let proxy = Proxy::start(
            Config::new()
                .vendor("api.openai.com", origin.addr)
                .resolve("127.0.0.1:443", origin.addr)
                .tail(&format!(
                    "[[rule]]\nid = \"{id}\"\nvendor = \"openai\"\nreason = \"r\"\n{body}"
                )),
        )
        .await;
        let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
        assert_eq!(status, 200, "{id}: a bare IP is no vendor");
        let handshake = within(
            "TLS with a vendor SNI",
            tls_handshake(tunnel, "api.openai.com"),
        )
        .await;
        assert!(handshake.is_err(), "{id}: the fronted handshake completed");
        let rec = proxy.audit_connect("127.0.0.1").await;
        assert_eq!(rec["action"], "block", "{rec}");
        assert_eq!(rec["vendor"], "openai", "{rec}");
        assert_eq!(rec["rule"], id, "{rec}");
        assert_eq!(rec["sni"], "api.openai.com", "{rec}");
        assert_reason(&rec, "sni_mismatch");
        assert!(rec["reason"].as_str().unwrap().contains(needs), "{rec}");
    }

    // Control: with no rule of its own the vendor's SNI passes, and the tunnel is attributed
    // to the vendor it reaches.
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .resolve("127.0.0.1:443", origin.addr),
    )
    .await;
    let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
    assert_eq!(status, 200);
    let tls = within(
        "TLS with a vendor SNI",
        tls_handshake(tunnel, "api.openai.com"),
    )
    .await
    .expect("an allowed SNI completes its handshake");
    drop(tls);
    let rec = proxy.audit_connect("127.0.0.1").await;
    assert_eq!(rec["action"], "allow", "{rec}");
    assert_eq!(rec["vendor"], "openai", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_port_not_in_connect_ports_is_403() {
    let origin = Sink::start().await;
    let proxy = Proxy::start(
        Config::new()
            .resolve("api.openai.com:8443", origin.addr)
            .loopback(),
    )
    .await;
    let r = connect_refused(proxy.addr, "api.openai.com:8443", &[]).await;
    assert_error(&r, 403, "port_not_allowed");
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["port"], 8443);
    assert_eq!(rec["action"], "block");
    assert_eq!(origin.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_bytes_in_a_tunnel_close_it() {
    let origin = Sink::start().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let (status, _, mut tunnel) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut tunnel).await, 0);
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_reason(&rec, "not_tls");
    assert_eq!(origin.received(), 0, "plain bytes were spliced");
}

/// A tunnel past its first bytes that then goes quiet both ways is closed by `idle_timeout`,
/// and its record says so.
#[tokio::test]
async fn a_quiet_tunnel_is_closed_by_the_idle_timeout() {
    let sink = Sink::start().await;
    let proxy = Proxy::start(
        Config::new()
            .resolve("quiet.test:443", sink.addr)
            .loopback()
            .proxy("idle_timeout = \"1s\"")
            .proxy("tunnel_require_tls = false"),
    )
    .await;
    let (status, _, mut s) = raw_connect(proxy.addr, "quiet.test:443", &[]).await;
    assert_eq!(status, 200);
    s.write_all(b"not TLS, then nothing").await.expect("write");
    let started = std::time::Instant::now();
    within("the idle tunnel to close", read_until_closed(&mut s)).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    let rec = proxy.audit_connect("quiet.test").await;
    let reason = rec["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("closed: idle_timeout"), "{rec}");
    assert_eq!(rec["bytes_out"], 21);
}
