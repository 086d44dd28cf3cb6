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

/// A CONNECT that names no vendor (an address) with a ClientHello naming one: the tunnel is
/// that vendor's, and an audit or shadow rule on the name is what its record shows over the
/// address's plain allow (a CONNECT by address would otherwise hide the use such a rule
/// exists to see). A limit that admitted the CONNECT keeps its rule on the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_or_shadow_rule_on_the_server_name_is_what_the_tunnel_records() {
    let origin = Origin::https().await;
    let cases = [
        (
            "action = \"audit\"\n",
            "",
            "audit",
            "enforce",
            "watch-anthropic",
        ),
        (
            "action = \"block\"\nmode = \"shadow\"\n",
            "",
            "block",
            "shadow",
            "watch-anthropic",
        ),
        (
            "action = \"audit\"\n",
            "[[rule]]\nid = \"address-cap\"\nhost = \"127.0.0.1\"\naction = \"limit\"\n\
             limit = { requests = 100, per = \"1h\" }\n",
            "allow",
            "enforce",
            "address-cap",
        ),
    ];
    for (watch, before, action, mode, rule) in cases {
        let proxy = Proxy::start(
            Config::new()
                .vendor("api.anthropic.com", origin.addr)
                .resolve("127.0.0.1:443", origin.addr)
                .tail(&format!(
                    "{before}[[rule]]\nid = \"watch-anthropic\"\nvendor = \"anthropic\"\n{watch}"
                )),
        )
        .await;
        let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
        assert_eq!(status, 200);
        let tls = within(
            "TLS naming an allowed vendor",
            tls_handshake(tunnel, "api.anthropic.com"),
        )
        .await
        .expect("the name is allowed");
        drop(tls);
        let rec = proxy.audit_connect("127.0.0.1").await;
        assert_eq!(rec["sni"], "api.anthropic.com", "{rec}");
        assert_eq!(rec["vendor"], "anthropic", "{rec}");
        assert_eq!(
            (&rec["action"], &rec["mode"], &rec["rule"]),
            (&action.into(), &mode.into(), &rule.into()),
            "{rec}"
        );
        let m = proxy.metrics().await;
        assert_eq!(
            metric(
                &m,
                "portcullis_requests_total",
                &[("vendor", "anthropic"), ("rule", rule)]
            ),
            1.0,
            "{m}"
        );
    }
}

/// A CONNECT to an address whose ClientHello names a vendor host that does not resolve to
/// that address is fronting too: refused. Let through, it was put on the record, metrics and
/// bulk signals of a vendor the client picked (found by the red team: a blocked vendor's
/// address with SNI api.openai.com, recorded as OpenAI's); let through unattributed, it would
/// dodge that vendor's audit and shadow rules by address. A name that leads there passes and
/// is the vendor's (see above); a blocked name is refused by its rule, wherever it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_that_leads_elsewhere_is_refused() {
    let elsewhere = Origin::https().await;
    let reached = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", elsewhere.addr)
            .vendor("api.anthropic.com", elsewhere.addr)
            .resolve("127.0.0.1:443", reached.addr)
            .tail(
                "[[rule]]\nid = \"watch-openai\"\nvendor = \"openai\"\naction = \"audit\"\n\n\
                   [[rule]]\nid = \"no-anthropic\"\nvendor = \"anthropic\"\naction = \"block\"\n",
            ),
    )
    .await;
    let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
    assert_eq!(status, 200);
    let handshake = within("TLS naming OpenAI", tls_handshake(tunnel, "api.openai.com")).await;
    assert!(handshake.is_err(), "the fronted handshake completed");
    let rec = proxy.audit_connect("127.0.0.1").await;
    assert_eq!(rec["sni"], "api.openai.com", "{rec}");
    assert_eq!(rec["vendor"], "openai", "{rec}");
    assert_eq!(rec["action"], "block", "{rec}");
    assert_reason(&rec, "sni_mismatch");
    assert_eq!(
        reached.connections(),
        1,
        "dialled, then closed before the hello went on"
    );
    assert_eq!(reached.requests().len(), 0);
    // A blocked name is refused by its rule.
    let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
    assert_eq!(status, 200);
    let handshake = within(
        "TLS naming Anthropic",
        tls_handshake(tunnel, "api.anthropic.com"),
    )
    .await;
    assert!(handshake.is_err());
    let rec = proxy
        .audit_where("the blocked name", |r| {
            r["method"] == "CONNECT" && r["sni"] == "api.anthropic.com"
        })
        .await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_eq!(rec["rule"], "no-anthropic", "{rec}");
    // A name no vendor has passes unattributed, as before.
    let (status, _, tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
    assert_eq!(status, 200);
    let _ = within(
        "TLS naming no vendor",
        tls_handshake(tunnel, "www.example.org"),
    )
    .await;
    let rec = proxy
        .audit_where("the unknown name", |r| {
            r["method"] == "CONNECT" && r["sni"] == "www.example.org"
        })
        .await;
    assert!(rec["vendor"].is_null(), "{rec}");
    assert_ne!(rec["action"], "block", "{rec}");
    assert_eq!(elsewhere.connections(), 0);

    // A tunnel whose name a reload gives to a vendor is not put on that vendor's record: its
    // address was never checked against the name (found by the red team).
    let (status, _, mut tunnel) = raw_connect(proxy.addr, "127.0.0.1:443", &[]).await;
    assert_eq!(status, 200);
    tunnel
        .write_all(&client_hello("foo.example"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let status = proxy
        .reload_edited(|t| {
            format!(
                "{t}\n[[vendor]]\nid = \"fooco\"\nhosts = [\"foo.example\"]\n\n\
                 [[rule]]\nid = \"watch-fooco\"\nvendor = \"fooco\"\naction = \"audit\"\n"
            )
        })
        .await;
    assert_eq!(status, 200);
    drop(tunnel);
    let rec = proxy
        .audit_where("the tunnel open across the reload", |r| {
            r["method"] == "CONNECT" && r["sni"] == "foo.example"
        })
        .await;
    assert!(rec["vendor"].is_null(), "{rec}");
    assert!(rec["rule"].is_null(), "{rec}");
}

/// A ClientHello as rustls sends it for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), server).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("hello");
    }
    out
}

/// One vendor's host with another vendor's name in the ClientHello is fronting: no client
/// does it otherwise, and let through, the client would choose which vendor's limits, record
/// and bulk signals the tunnel is charged to. A limit shared by both vendors (`by = "vendor"`
/// counts each apart) is no exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_of_another_vendor_closes_the_tunnel() {
    let origin = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.anthropic.com", origin.addr)
            .tail(
                "[[rule]]\nid = \"budget\"\nvendor = [\"openai\", \"anthropic\"]\n\
                 action = \"limit\"\nlimit = { requests = 5, per = \"1h\", by = \"vendor\" }\n",
            ),
    )
    .await;
    let (status, _, tunnel) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    let handshake = within(
        "TLS naming another vendor",
        tls_handshake(tunnel, "api.anthropic.com"),
    )
    .await;
    assert!(handshake.is_err(), "the fronted handshake completed");
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_eq!(rec["sni"], "api.anthropic.com", "{rec}");
    assert_reason(&rec, "sni_mismatch");
    assert!(
        rec["reason"].as_str().unwrap().contains("another vendor"),
        "{rec}"
    );
}

/// A rule changed in place by a reload (the same id, `audit` made `limit`) is a limit the open
/// tunnel was never charged: the tunnel is closed, as under a new rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_made_a_limit_by_a_reload_closes_the_tunnels_it_never_charged() {
    let openai = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .tail("[[rule]]\nid = \"watch\"\nvendor = \"openai\"\naction = \"audit\"\n"),
    )
    .await;
    let (status, _, tcp) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    let mut tls = tls_handshake(tcp, "api.openai.com")
        .await
        .expect("TLS through the tunnel");
    tls.write_all(b"GET /v1/before HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .await
        .unwrap();
    openai.request("/v1/before").await;
    let reloaded = proxy
        .reload_edited(|t| {
            t.replacen(
                "action = \"audit\"\n",
                "action = \"limit\"\nlimit = { requests = 100, per = \"1h\" }\n",
                1,
            )
        })
        .await;
    assert_eq!(reloaded, 200);
    within("the tunnel's close", read_until_closed(&mut tls)).await;
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(
        (&rec["action"], &rec["rule"]),
        (&"block".into(), &"watch".into()),
        "{rec}"
    );
    assert_reason(&rec, "policy_reloaded");
    assert!(
        rec["reason"].as_str().unwrap().contains("needs limits"),
        "{rec}"
    );
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
    // Answered 200, then refused: not an allowed tunnel on the dashboard.
    assert_eq!(rec["action"], "reject");
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

/// A ClientHello (TLS 1.3, x25519 offered) naming `sni`, with or without a key share: without
/// one, a server must answer with a HelloRetryRequest.
fn hello(sni: Option<&str>, key_share: bool) -> Vec<u8> {
    fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u16).to_be_bytes());
        e.extend_from_slice(data);
        e
    }
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let mut list = ((n.len() + 3) as u16).to_be_bytes().to_vec();
        list.push(0);
        list.extend_from_slice(&(n.len() as u16).to_be_bytes());
        list.extend_from_slice(n);
        exts.extend(ext(0, &list));
    }
    exts.extend(ext(10, &[0, 2, 0, 0x1d]));
    exts.extend(ext(13, &[0, 2, 8, 4]));
    exts.extend(ext(43, &[2, 3, 4]));
    let share: Vec<u8> = match key_share {
        true => [&[0, 36, 0, 0x1d, 0, 32][..], &[7; 32]].concat(),
        false => vec![0, 0],
    };
    exts.extend(ext(51, &share));
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]); // one suite, null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// RFC 8446 §4.1.4: a ServerHello whose random is the HelloRetryRequest value, asking for x25519.
fn hello_retry_request() -> Vec<u8> {
    const HRR: [u8; 32] = [
        0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8,
        0x91, 0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8,
        0x33, 0x9C,
    ];
    let mut body = vec![3, 3];
    body.extend_from_slice(&HRR);
    body.extend_from_slice(&[0, 0x13, 0x01, 0]); // session id, suite, compression
    body.extend_from_slice(&[0, 12, 0, 43, 0, 2, 3, 4, 0, 51, 0, 2, 0, 0x1d]);
    let mut hs = vec![2, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut rec = vec![0x16, 3, 3];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// A TLS 1.3 origin that answers every first ClientHello with a HelloRetryRequest and reports
/// what it received after that (the second hello, if the proxy let it through).
async fn retrying_origin() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut first = vec![0u8; 5];
                s.read_exact(&mut first).await.unwrap();
                let len = usize::from(u16::from_be_bytes([first[3], first[4]]));
                let mut rest = vec![0u8; len];
                s.read_exact(&mut rest).await.unwrap();
                s.write_all(&hello_retry_request()).await.unwrap();
                let mut after = Vec::new();
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    s.read_to_end(&mut after),
                )
                .await;
                let _ = tx.send(after);
            });
        }
    });
    (addr, rx)
}

/// A HelloRetryRequest makes the client send a second ClientHello. It must name the server the
/// first one named (RFC 8446 §4.1.2), but a front end that routes on SNI may honour a new name:
/// naming an allowed host first and DeepSeek second must not get DeepSeek's name through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_hello_after_a_retry_request_must_name_the_same_server() {
    use tokio::io::AsyncReadExt;
    let (origin, mut received) = retrying_origin().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin)
            .vendor("api.deepseek.com", origin)
            .resolve("127.0.0.1:443", origin),
    )
    .await;
    let ccs: &[u8] = &[0x14, 3, 3, 0, 1, 1];
    let cases: [(&str, Option<&str>, Option<&str>, bool); 5] = [
        // CONNECT to, first SNI, second SNI, let through
        (
            "api.openai.com",
            Some("api.openai.com"),
            Some("api.openai.com"),
            true,
        ),
        (
            "api.openai.com",
            Some("api.openai.com"),
            Some("api.deepseek.com"),
            false,
        ),
        ("127.0.0.1", None, Some("api.deepseek.com"), false),
        ("127.0.0.1", None, None, true),
        ("api.openai.com", Some("api.openai.com"), None, false),
    ];
    for (i, (connect_host, first, second, through)) in cases.into_iter().enumerate() {
        let (status, _, mut tunnel) =
            raw_connect(proxy.addr, &format!("{connect_host}:443"), &[]).await;
        assert_eq!(status, 200, "case {i}");
        tunnel.write_all(&hello(first, false)).await.unwrap();
        let mut hrr = vec![0u8; hello_retry_request().len()];
        within("the retry request", tunnel.read_exact(&mut hrr))
            .await
            .unwrap();
        assert_eq!(hrr, hello_retry_request(), "case {i}");
        let second_hello = hello(second, true);
        // Middlebox-compatibility mode: a change_cipher_spec record first.
        let _ = tunnel.write_all(&[ccs, &second_hello].concat()).await;
        let after = within("the origin's report", received.recv())
            .await
            .unwrap();
        drop(tunnel);
        // One record per tunnel, written as it closes; the cases run one after another.
        let rec = proxy.audit_at_least(i + 1).await[i].clone();
        assert_eq!(rec["host"], connect_host, "case {i}: {rec}");
        if through {
            assert_eq!(after, [ccs, &second_hello].concat(), "case {i}: {rec}");
        } else {
            assert!(
                after.is_empty(),
                "case {i}: the renamed hello reached the origin"
            );
            assert_eq!(rec["action"], "block", "case {i}: {rec}");
            assert_reason(&rec, "sni_mismatch");
            if second == Some("api.deepseek.com") {
                assert_eq!(rec["vendor"], "deepseek", "case {i}: {rec}");
            }
        }
    }
}

/// A tunnel answered 200 before a reload, whose ClientHello comes after it, is decided on the
/// new policy: holding tunnels open between their 200 and their hello must not carry them
/// past a block rolled out meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_hello_comes_after_a_reload_is_decided_again() {
    let origin = Sink::start().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let (status, _, mut tunnel) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);

    let path = proxy.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let tmp = proxy.dir.path().join("portcullis.toml.new");
    std::fs::write(
        &tmp,
        text + "[[rule]]\nid = \"block-openai\"\nvendor = \"openai\"\naction = \"block\"\n",
    )
    .expect("write config");
    std::fs::rename(&tmp, &path).expect("replace config");
    let reload = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .post(format!("http://{}/reload", proxy.admin))
        .send()
        .await
        .expect("POST /reload");
    assert_eq!(reload.status(), 200);

    tunnel
        .write_all(&hello(Some("api.openai.com"), true))
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut tunnel).await, 0);
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_eq!(rec["rule"], "block-openai", "{rec}");
    assert_reason(&rec, "policy_reloaded");
    assert_eq!(origin.received(), 0, "the hello reached the origin");
}

/// A client may send its second ClientHello before the origin's HelloRetryRequest, in the
/// same write as the first. Those bytes must wait for the origin's answer like any other:
/// forwarded at once, a renamed hello would reach an origin that (leniently) reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_hello_sent_ahead_of_the_retry_request_is_checked_too() {
    use tokio::io::AsyncReadExt;
    let (origin, mut received) = retrying_origin().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin)
            .vendor("api.deepseek.com", origin),
    )
    .await;
    let ccs: &[u8] = &[0x14, 3, 3, 0, 1, 1];
    for (i, (ahead, through)) in [("api.deepseek.com", false), ("api.openai.com", true)]
        .into_iter()
        .enumerate()
    {
        let (status, _, mut tunnel) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
        assert_eq!(status, 200, "case {i}");
        let second_hello = hello(Some(ahead), true);
        tunnel
            .write_all(&[&hello(Some("api.openai.com"), false), ccs, &second_hello].concat())
            .await
            .unwrap();
        let mut hrr = vec![0u8; hello_retry_request().len()];
        within("the retry request", tunnel.read_exact(&mut hrr))
            .await
            .unwrap();
        let after = within("the origin's report", received.recv())
            .await
            .unwrap();
        drop(tunnel);
        let rec = proxy.audit_at_least(i + 1).await[i].clone();
        if through {
            assert_eq!(after, [ccs, &second_hello].concat(), "case {i}: {rec}");
            assert_eq!(rec["action"], "allow", "case {i}: {rec}");
        } else {
            assert!(
                after.is_empty(),
                "case {i}: the renamed hello reached the origin"
            );
            assert_eq!(rec["action"], "block", "case {i}: {rec}");
            assert_reason(&rec, "sni_mismatch");
        }
    }
}

/// A ServerHello's first record, not a HelloRetryRequest: enough for the proxy to splice.
fn server_hello() -> Vec<u8> {
    let mut r = vec![0x16, 3, 3, 0, 44, 2, 0, 0, 40, 3, 3];
    r.extend_from_slice(&[0x5a; 32]);
    r.extend_from_slice(&[0, 0xc0, 0x2f, 0, 0, 0]);
    r
}

/// A client that leaves a tunnel whose origin stays silent frees the tunnel, and the
/// `concurrent` slot it holds, within seconds: not when the origin next writes, nor at
/// `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_client_left_ends_though_the_origin_stays_silent() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(&server_hello()).await;
            held.push(s);
        }
    });
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin).tail(
        "[[rule]]\nid = \"one-tunnel\"\nvendor = \"openai\"\naction = \"limit\"\n\
         limit = { concurrent = 1 }\n",
    ))
    .await;
    let (status, _, mut first) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    first
        .write_all(&hello(Some("api.openai.com"), true))
        .await
        .unwrap();
    let mut answer = vec![0u8; server_hello().len()];
    within("the origin's hello", first.read_exact(&mut answer))
        .await
        .unwrap();
    let (status, _, _) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 429, "the slot is held while the tunnel is open");

    drop(first);
    let left = std::time::Instant::now();
    within("the slot to come back", async {
        loop {
            let (status, _, _) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(left.elapsed() < std::time::Duration::from_secs(15));
}

/// Some clients send the ClientHello right behind the CONNECT, in the same write, without
/// waiting for the 200. Those bytes were read with the CONNECT's head: the SNI check must still
/// see them, and the origin must get them once, in order, if they pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_with_the_connect_is_checked_and_passed_on() {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let expected = hello(Some("api.openai.com"), true).len();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut got = vec![0u8; expected];
                if s.read_exact(&mut got).await.is_ok() {
                    let _ = tx.send(got);
                    let _ = s.write_all(&server_hello()).await;
                }
            });
        }
    });
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin)
            .vendor("api.deepseek.com", origin),
    )
    .await;
    for (i, (named, through)) in [("api.openai.com", true), ("api.deepseek.com", false)]
        .into_iter()
        .enumerate()
    {
        let client_hello = hello(Some(named), true);
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let connect = b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n";
        s.write_all(&[&connect[..], &client_hello].concat())
            .await
            .unwrap();
        let (status, _) = within("the 200", read_head(&mut s)).await;
        assert_eq!(status, 200, "case {i}");
        if through {
            let got = within("the hello at the origin", received.recv())
                .await
                .unwrap();
            assert_eq!(got, client_hello, "case {i}");
            let mut answer = vec![0u8; server_hello().len()];
            within("the origin's answer", s.read_exact(&mut answer))
                .await
                .unwrap();
            assert_eq!(answer, server_hello(), "case {i}");
        } else {
            assert_eq!(read_until_closed(&mut s).await, 0, "case {i}");
        }
        drop(s);
        let rec = proxy.audit_at_least(i + 1).await[i].clone();
        match through {
            true => assert_eq!(rec["action"], "allow", "case {i}: {rec}"),
            false => {
                assert_eq!(rec["action"], "block", "case {i}: {rec}");
                assert_reason(&rec, "sni_mismatch");
            }
        }
    }
    assert!(
        received.try_recv().is_err(),
        "the blocked hello reached the origin"
    );
}

/// A reload that takes a port out of `connect_ports` ends the tunnels open to it, as it
/// refuses new ones: a port closed by the operator stays open to no one who got in before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_closes_a_tunnels_port_ends_the_tunnel() {
    let openai = Origin::https().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", openai.addr)).await;
    let (status, _, tcp) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 200);
    let mut tls = tls_handshake(tcp, "api.openai.com")
        .await
        .expect("TLS through the tunnel");
    tls.write_all(b"GET /v1/before HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .await
        .unwrap();
    openai.request("/v1/before").await;

    let reloaded = proxy
        .reload_edited(|t| t.replacen("[proxy]\n", "[proxy]\nconnect_ports = [8443]\n", 1))
        .await;
    assert_eq!(reloaded, 200);
    read_until_closed(&mut tls).await;
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_eq!(rec["rule"], serde_json::Value::Null, "{rec}");
    assert_reason(&rec, "policy_reloaded: port_not_allowed");
}
