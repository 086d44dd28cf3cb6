//! Plain HTTP through the proxy (absolute-form): block, allow, what the origin sees.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_vendor_gets_403_json_or_html() {
    let (_openai, deepseek, proxy) = openai_and_deepseek().await;
    let client = proxy.client();

    let r = fetch(client.get("http://api.deepseek.com/chat/completions")).await;
    assert_blocked(&r, "block-deepseek", "deepseek");
    assert_eq!(
        r.json()["reason"],
        "DeepSeek is not approved (policy SEC-12)"
    );
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));

    let page = fetch(
        client
            .get("http://api.deepseek.com/html")
            .header("accept", "text/html,application/xhtml+xml"),
    )
    .await;
    assert_eq!(page.status, 403);
    assert!(
        page.header("content-type")
            .unwrap()
            .starts_with("text/html"),
        "{page:?}"
    );
    assert_eq!(page.header("x-portcullis-rule"), Some("block-deepseek"));
    assert!(page.body.contains("<html") && page.body.contains("DeepSeek is not approved"));

    let rec = proxy.audit_path("/chat/completions").await;
    assert_eq!(rec["action"], "block");
    assert_eq!(rec["rule"], "block-deepseek");
    assert_eq!(rec["vendor"], "deepseek");
    assert_eq!(rec["endpoint"], "chat");
    assert_eq!(rec["status"], 403);
    assert!(
        deepseek.requests().is_empty(),
        "a blocked request reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_request_reaches_origin_without_hop_by_hop_headers() {
    let (openai, _deepseek, proxy) = openai_and_deepseek().await;
    // Credentials for the proxy that the proxy (without [auth]) must still never forward.
    let client = proxy.client_as("someone", "proxy-pw");
    let r = fetch(
        client
            .post("http://api.openai.com/v1/embeddings")
            .header("connection", "x-custom-hop")
            .header("x-custom-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-end-to-end", "kept")
            .body("0123456789"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "origin saw 10 bytes");
    assert_eq!(r.header("x-origin"), Some("fake"));
    assert!(
        r.header("via").is_some_and(|v| v.contains("portcullis")),
        "{r:?}"
    );

    let seen = openai.request("/v1/embeddings").await;
    let h = &seen.headers;
    assert_eq!(seen.method, "POST");
    assert_eq!(h["host"], "api.openai.com");
    assert!(h.get("via").is_some(), "no Via: {h:?}");
    assert_eq!(h["x-end-to-end"], "kept");
    for gone in [
        "proxy-authorization",
        "x-custom-hop",
        "keep-alive",
        "proxy-connection",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the origin: {h:?}");
    }
    assert!(
        h.get_all("connection")
            .iter()
            .all(|v| !v.to_str().unwrap().contains("x-custom-hop")),
        "{h:?}"
    );

    let rec = proxy.audit_path("/v1/embeddings").await;
    assert_eq!(rec["action"], "allow");
    assert_eq!(rec["vendor"], "openai");
    assert_eq!(rec["endpoint"], "embeddings");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["bytes_out"], 10);
}

/// A header the client names in `Connection` never reaches the origin, so the policy must not
/// read it either: naming the tenant header there would pass `require_org` and then drop the
/// header, billing a personal key's own org. Same for the key behind `require_key`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_in_connection_are_gone_before_the_policy_reads_them() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let secret = dir.path().join("key-secret");
    std::fs::write(&secret, "a-deployment-secret-of-32-bytes!").expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let fp = portcullis::identity::keys::KeyFingerprinter::new(b"a-deployment-secret-of-32-bytes!");
    let company = fp.fingerprint(b"sk-company-key-0001");
    let openai = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .tail(&format!(
                "[[rule]]\nid = \"company-openai\"\nvendor = \"openai\"\naction = \"allow\"\n\
         require_key = [\"{company}\"]\nrequire_org = [\"org-company\"]\n\n\
         [keys]\nsecret_file = \"{}\"\n",
                secret.display()
            )),
    )
    .await;
    let client = proxy.client();
    let send = |tag: &str, connection: &str| {
        fetch(
            client
                .get(format!("http://api.openai.com/v1/models?{tag}"))
                .header("authorization", "Bearer sk-company-key-0001")
                .header("openai-organization", "org-company")
                .header("connection", connection),
        )
    };
    assert_eq!(send("ok", "keep-alive").await.status, 200);

    let r = send("org", "keep-alive, OpenAI-Organization").await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_reason(&proxy.audit_path("/v1/models?org").await, "org_not_allowed");

    let r = send("key", "Authorization").await;
    assert_eq!(r.status, 403, "{r:?}");
    let rec = proxy.audit_path("/v1/models?key").await;
    assert_reason(&rec, "key_not_allowed");
    assert!(rec.get("key_id").is_none_or(|k| k.is_null()), "{rec}");

    assert_eq!(
        openai.requests().len(),
        1,
        "only the honest request is forwarded"
    );
}

/// Google's front ends and many frameworks act on a method-override header: a `POST` that says
/// it is a `DELETE` must meet the rule on `DELETE`, whatever the header's spelling and case,
/// and wherever in a list it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_override_header_is_decided_as_the_method_it_names() {
    let openai = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", openai.addr).tail(
        "[[rule]]\nid = \"no-deletes\"\nvendor = \"openai\"\nmethod = \"DELETE\"\n\
         action = \"block\"\n",
    ))
    .await;
    let client = proxy.client();
    let url = |tag: &str| format!("http://api.openai.com/v1/files/file-1?{tag}");
    let plain = fetch(client.post(url("plain"))).await;
    assert_eq!(plain.status, 200, "{plain:?}");
    for (i, (name, value)) in [
        ("X-HTTP-Method-Override", "DELETE"),
        ("x-http-method", "delete"),
        ("X-Method-Override", " Delete "),
        // Express's method-override takes a list's first item.
        ("X-HTTP-Method-Override", "DELETE, GET"),
        ("X-HTTP-Method-Override", "GET,delete"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = fetch(client.post(url(&format!("o{i}"))).header(name, value)).await;
        assert_eq!(r.status, 403, "{name}: {value}: {r:?}");
        let rec = proxy.audit_path(&format!("/v1/files/file-1?o{i}")).await;
        assert_eq!(rec["rule"], "no-deletes", "{rec}");
    }
    let r = fetch(
        client
            .post(url("same"))
            .header("x-http-method-override", "POST"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        openai.requests().len(),
        2,
        "only the honest requests are forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_block_and_allow() {
    let (openai, deepseek, proxy) = openai_and_deepseek().await;
    let Some(blocked) = curl(&["-x", &proxy.url(), "-i", "http://api.deepseek.com/models"]).await
    else {
        return;
    };
    let text = String::from_utf8_lossy(&blocked.stdout);
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("x-portcullis-rule: block-deepseek"),
        "{text}"
    );
    assert!(text.contains("\"error\":\"blocked_by_policy\""), "{text}");

    let allowed = curl(&["-x", &proxy.url(), "-f", "http://api.openai.com/v1/models"])
        .await
        .unwrap();
    assert!(allowed.status.success(), "{allowed:?}");
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        "origin saw 0 bytes"
    );
    assert_eq!(
        openai.request("/v1/models").await.headers["host"],
        "api.openai.com"
    );
    assert!(deepseek.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_form_request_is_400_and_never_forwarded() {
    let (openai, _deepseek, proxy) = openai_and_deepseek().await;
    let r = raw(
        proxy.addr,
        b"GET /x HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_error(&r, 400, "not_proxy_request");
    let rec = proxy.audit_path("/x").await;
    assert_eq!(rec["status"], 400);
    assert!(
        openai.requests().is_empty(),
        "an origin-form request was forwarded"
    );
}

/// A path that reads two ways (dot segments kept or resolved, `%2F` decoded or not) lands on
/// a limit rule one way and a tenant restriction the other. Keeping either lets the client
/// pick which applies by how it spells the path: both apply. Two limit rules cannot, and the
/// request is refused as ambiguous. Nothing refused reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_reads_two_ways_meets_the_restrictions_of_both() {
    let openai = Origin::http().await;
    let fp = portcullis::identity::keys::KeyFingerprinter::new(b"a-deployment-secret-of-32-bytes!");
    let company = fp.fingerprint(b"sk-company");
    let dir = tempfile::TempDir::new().expect("tempdir");
    let secret = dir.path().join("key-secret");
    std::fs::write(&secret, "a-deployment-secret-of-32-bytes!").expect("secret");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .tail(&format!(
            "[[rule]]\nid = \"bulk\"\nvendor = \"openai\"\nendpoint = [\"batches\", \"files\"]\n\
             action = \"limit\"\nlimit = {{ requests = 100, per = \"1m\" }}\n\n\
             [[rule]]\nid = \"chat-cap\"\nvendor = \"openai\"\nendpoint = \"chat\"\n\
             action = \"limit\"\nlimit = {{ requests = 100, per = \"1m\" }}\n\n\
             [[rule]]\nid = \"company-only\"\nvendor = \"openai\"\naction = \"allow\"\n\
             require_key = [\"{company}\"]\n\
             set_headers = {{ \"openai-organization\" = \"org-company\" }}\n\n\
             [keys]\nsecret_file = \"{}\"\n",
            secret.display()
        )),
    )
    .await;
    let addr = proxy.addr;
    let send = |path: &str, key: &str| {
        let target = format!("http://api.openai.com{path}");
        let auth = format!("Authorization: Bearer {key}");
        async move { raw_get(addr, &target, &[&auth]).await }
    };
    // A limit one way, the tenant restriction the other: a personal key is refused.
    for path in ["/v1/batches/../assistants", "/v1/files/%2e%2e/assistants"] {
        let r = send(path, "sk-personal").await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert_reason(&proxy.audit_path(path).await, "key_not_allowed");
    }
    // Two limit rules: refused as ambiguous.
    for path in [
        "/v1/batches/../chat/completions",
        "/v1/batches%2F..%2Fchat/completions",
    ] {
        let r = send(path, "sk-company").await;
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert_reason(&proxy.audit_path(path).await, "ambiguous_request");
    }
    assert!(openai.requests().is_empty(), "{:?}", openai.requests());
    // The company key passes both: counted by the limit, and the tenant headers are set.
    let path = "/v1/batches/../assistants";
    let r = send(&format!("{path}?company"), "sk-company").await;
    assert_eq!(r.status, 200, "{r:?}");
    let seen = openai.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["openai-organization"], "org-company");
    assert_eq!(
        proxy.audit_path(&format!("{path}?company")).await["rule"],
        "bulk"
    );
}

/// IIS and Symfony route on `X-Original-URL` / `X-Rewrite-URL`, and Rails, Laravel and
/// Express's method-override act on a `_method` parameter: what they name is decided too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_and_methods_named_by_rewrite_fields_and_parameters_are_decided() {
    let openai = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", openai.addr).tail(
        "[[rule]]\nid = \"no-files\"\nvendor = \"openai\"\nendpoint = \"files\"\naction = \"block\"\n\n\
         [[rule]]\nid = \"no-deletes\"\nvendor = \"openai\"\nmethod = \"DELETE\"\naction = \"block\"\n",
    ))
    .await;
    let client = proxy.client();
    let fields = [
        ("X-Original-URL", "/v1/files"),
        ("x-rewrite-url", "/v1/files"),
        // Symfony routes on the path of an absolute URL here.
        ("X-Original-URL", "https://api.openai.com/v1/files"),
    ];
    for (i, (name, value)) in fields.into_iter().enumerate() {
        let r = fetch(
            client
                .get(format!("http://api.openai.com/v1/models?h{i}"))
                .header(name, value),
        )
        .await;
        assert_eq!(r.status, 403, "{name}: {r:?}");
        assert_eq!(
            proxy.audit_path(&format!("/v1/models?h{i}")).await["rule"],
            "no-files"
        );
    }
    for (i, q) in ["_method=DELETE", "x=1&_method=delete", "%5Fmethod=DELETE"]
        .into_iter()
        .enumerate()
    {
        let path = format!("/v1/models/m?{q}&q{i}");
        let r = fetch(client.post(format!("http://api.openai.com{path}"))).await;
        assert_eq!(r.status, 403, "{q}: {r:?}");
        assert_eq!(proxy.audit_path(&path).await["rule"], "no-deletes");
    }
    let r = fetch(client.get("http://api.openai.com/v1/models?_method=GET")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        openai.requests().len(),
        1,
        "only the honest request is forwarded"
    );
}
