//! Secrets: files that hold them (htpasswd, the admin token, the key_id HMAC secret) are refused
//! at start when other users can read them; and no secret a client sends or the configuration
//! holds shows up in the audit log, the process's output at trace level, /metrics, /policy or
//! /top.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use common::*;
use hmac::{Hmac, Mac};
use tokio::io::AsyncWriteExt;

const PROXY_PW: &str = "pw-Proxy-S3cret-7f2a";
const WRONG_PW: &str = "pw-Wrong-S3cret-91bd";
const BEARER: &str = "sk-live-Bearer-S3cret-0a1b2c";
const X_API_KEY: &str = "sk-ant-XApiKey-S3cret-3d4e5f";
const QUERY_KEY: &str = "AIza-Query-S3cret-6a7b8c";
const USERINFO_PW: &str = "pw-Userinfo-S3cret-5e6f";
const KEY_ID_SECRET: &str = "keyid-Hmac-S3cret-0123456789abcdef";
const ADMIN_TOKEN: &str = "admin-Token-S3cret-fedcba9876";

fn write_secret(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn htpasswd_line() -> String {
    format!("alice:{}\n", bcrypt::hash(PROXY_PW, 4).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn world_readable_secret_files_are_refused_at_start() {
    let secrets = tempfile::tempdir().unwrap();
    let htpasswd = secrets.path().join("users.htpasswd");
    let token = secrets.path().join("admin.token");
    let key = secrets.path().join("keyid.secret");
    let cases: [(&Path, String, Config); 3] = [
        (
            &htpasswd,
            htpasswd_line(),
            Config::new().tail(&format!("[auth]\nhtpasswd = \"{}\"\n", htpasswd.display())),
        ),
        (
            &token,
            ADMIN_TOKEN.to_string(),
            Config::new().admin(&format!("token_file = \"{}\"", token.display())),
        ),
        (
            &key,
            KEY_ID_SECRET.to_string(),
            Config::new().tail(&format!("[keys]\nsecret_file = \"{}\"", key.display())),
        ),
    ];
    for (path, content, cfg) in cases {
        for mode in [0o644, 0o604, 0o602] {
            write_secret(path, &content, mode);
            let dir = tempfile::tempdir().unwrap();
            let any = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
            let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
            let config = cfg.write(dir.path(), any, admin);
            let out = within(
                "the binary to refuse",
                tokio::process::Command::new(BIN)
                    .args(["run", "--config"])
                    .arg(&config)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "{} mode {mode:o} accepted",
                path.display()
            );
            assert!(
                stderr.contains(&path.display().to_string())
                    && stderr.contains("accessible to other users"),
                "{stderr}"
            );
            let shown = format!("{stderr}{}", String::from_utf8_lossy(&out.stdout));
            for s in [PROXY_PW, ADMIN_TOKEN, KEY_ID_SECRET] {
                assert!(!shown.contains(s), "secret in output: {shown}");
            }
        }
        // Owner-only is fine (the leak test below starts with these at 0600).
        write_secret(path, &content, 0o600);
    }
}

fn fingerprint(secret: &str, key: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(key.as_bytes());
    let out = mac.finalize().into_bytes();
    let hex: String = out[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("k_{hex}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_output_metrics_or_policy() {
    let secrets = tempfile::tempdir().unwrap();
    let htpasswd = secrets.path().join("users.htpasswd");
    let key = secrets.path().join("keyid.secret");
    let hash_line = htpasswd_line();
    write_secret(&htpasswd, &hash_line, 0o600);
    write_secret(&key, &format!("{KEY_ID_SECRET}\n"), 0o600);
    let origin = Origin::http().await;
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proxy = Proxy::spawn_with(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.deepseek.com", origin.addr)
            .vendor("api.mistral.ai", closed)
            .proxy("client_hello_timeout = \"1s\"")
            .tail(&format!("[auth]\nhtpasswd = \"{}\"\n", htpasswd.display()))
            .tail(&format!("[keys]\nsecret_file = \"{}\"", key.display())),
        &[("RUST_LOG", "trace")],
    )
    .await;
    let alice = proxy.client_as("alice", PROXY_PW);
    let with_keys = |rb: reqwest::RequestBuilder| {
        rb.header("authorization", format!("Bearer {BEARER}"))
            .header("x-api-key", X_API_KEY)
    };

    // Allowed, blocked, failed upstream: each with every kind of key.
    let q = format!("?key={QUERY_KEY}&alt=sse");
    let r = fetch(
        with_keys(alice.post(format!("http://api.openai.com/v1/chat/completions{q}"))).body("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = fetch(
        alice
            .post("http://api.openai.com/v1/chat/completions?one-key")
            .header("authorization", format!("Bearer {BEARER}"))
            .body("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = fetch(with_keys(
        alice.get(format!("http://api.deepseek.com/chat/completions{q}")),
    ))
    .await;
    assert_eq!(r.status, 403);
    let r = fetch(with_keys(
        alice.get(format!("http://api.mistral.ai/v1/models{q}")),
    ))
    .await;
    assert_eq!(r.status, 502);
    // A wrong proxy password, and none.
    let r = fetch(with_keys(
        proxy
            .client_as("alice", WRONG_PW)
            .get("http://api.openai.com/v1/models"),
    ))
    .await;
    assert_eq!(r.status, 407);
    let r = fetch(
        proxy
            .client()
            .get(format!("http://api.openai.com/v1/models{q}")),
    )
    .await;
    assert_eq!(r.status, 407);
    // Userinfo in the target (refused), and a CONNECT with credentials that sends no TLS.
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PROXY_PW}"));
    let auth = format!("Proxy-Authorization: Basic {basic}");
    let r = raw_get(
        proxy.addr,
        &format!("http://alice:{USERINFO_PW}@api.openai.com/v1/models"),
        &[&auth],
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    let (status, _, mut tunnel) = raw_connect(
        proxy.addr,
        "api.openai.com:443",
        &[&auth, &format!("Authorization: Bearer {BEARER}")],
    )
    .await;
    assert_eq!(status, 200);
    tunnel
        .write_all(format!("GET /?key={QUERY_KEY} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until_closed(&mut tunnel).await;

    // The origin needs the vendor key; it never gets the proxy's credentials.
    let seen = origin.request(&format!("/v1/chat/completions{q}")).await;
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {BEARER}").as_str()
    );
    assert!(!seen.headers.contains_key("proxy-authorization"));

    // key_id is the HMAC under the configured secret: stable across restarts and replicas.
    let rec = proxy
        .audit_where("the allowed one-key request", |r| {
            r["status"] == 200 && r["path"] == "/v1/chat/completions?one-key"
        })
        .await;
    assert_eq!(rec["key_id"], fingerprint(KEY_ID_SECRET, BEARER), "{rec}");
    assert_eq!(rec["user"], "alice");
    // Three different keys in one request: which one the vendor uses is not ours to guess.
    let rec = proxy
        .audit_where("the allowed every-key request", |r| {
            r["status"] == 200 && r["path"].as_str().is_some_and(|p| p.contains("alt=sse"))
        })
        .await;
    assert_eq!(rec["key_id"], "k_ambiguous", "{rec}");
    proxy.audit_connect("api.openai.com").await;
    proxy.audit_at_least(8).await;

    let metrics = proxy.metrics().await;
    let (_, policy) = proxy.admin_get("/policy").await;
    let (_, top) = proxy.admin_get("/top").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(proxy.stop().await.map(|s| s.success()), Some(true));
    let output = proxy.output();
    assert!(
        output.contains("portcullis serving"),
        "no process output? {output}"
    );
    assert!(
        output.contains("TRACE") || output.contains("DEBUG"),
        "RUST_LOG=trace not in effect"
    );
    assert!(!output.contains("panicked"), "{output}");

    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("alice:{WRONG_PW}"));
    let bcrypt_hash = hash_line.trim().split_once(':').unwrap().1.to_string();
    let secrets = [
        PROXY_PW,
        WRONG_PW,
        BEARER,
        X_API_KEY,
        QUERY_KEY,
        USERINFO_PW,
        KEY_ID_SECRET,
        &basic,
        &wrong,
        &bcrypt_hash,
    ];
    let places = [
        ("audit log", proxy.audit_text()),
        ("stdout/stderr at trace", output),
        ("/metrics", metrics),
        ("/policy", policy),
        ("/top", top),
    ];
    for (place, text) in &places {
        assert!(!text.is_empty() || *place == "/top", "{place} is empty");
        for s in secrets {
            assert!(!text.contains(s), "{place} contains the secret {s:?}");
        }
    }
}

/// Query parameters that carry credentials under any vendor's spelling, separated by `&` or
/// `;`: their names reach the audit `path`, their values never do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_credentials_are_redacted_in_the_audit_path() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let values = [
        ("key", "q-Key-S3cret-11"),
        ("api_token", "q-ApiToken-S3cret-12"),
        ("private_token", "q-PrivateToken-S3cret-13"),
        ("auth_token", "q-AuthToken-S3cret-14"),
        ("bearer", "q-Bearer-S3cret-15"),
        ("jwt", "q-Jwt-S3cret-16"),
        ("X-Amz-Signature", "q-AmzSig-S3cret-17"),
        ("X-Amz-Credential", "q-AmzCred-S3cret-18"),
        ("sig", "q-Sig-S3cret-19"),
        ("client_secret", "q-ClientSecret-S3cret-20"),
        ("password", "q-Password-S3cret-21"),
        ("session_id", "q-Session-S3cret-22"),
        ("code", "q-Code-S3cret-23"),
    ];
    let query: Vec<String> = values.iter().map(|(n, v)| format!("{n}={v}")).collect();
    // The reviewer's form: `;` after the first parameter, `&` after the rest.
    let path = format!("/v1/models?x=1;{}", query.join("&"));
    let r = fetch(proxy.client().get(format!("http://api.openai.com{path}"))).await;
    assert_eq!(r.status, 200, "{r:?}");
    let redacted: Vec<String> = values
        .iter()
        .map(|(n, _)| format!("{n}=REDACTED"))
        .collect();
    let want = format!("/v1/models?x=1;{}", redacted.join("&"));
    proxy.audit_path(&want).await;
    let text = proxy.audit_text();
    for (name, value) in values {
        assert!(
            !text.contains(value),
            "{name}'s value in the audit log: {text}"
        );
    }
    // The origin still got the credentials: redaction is for the log only.
    assert_eq!(origin.requests().last().unwrap().uri, path);
}

/// Keys sent in the path itself (a key-management endpoint, Telegram-style `bot<id>:<token>`
/// URLs, `;jsessionid=` segment parameters) reach the origin as sent and the audit `path`
/// without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_credentials_are_redacted_in_the_audit_path() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    for (sent, logged, secret) in [
        (
            "/v1/keys/sk-proj-ZQXpath0123456789abcdef/usage",
            "/v1/keys/REDACTED/usage",
            "ZQXpath0123456789abcdef",
        ),
        (
            "/bot123456:ZQXtelegram03abcdefghijklmnopqrstu/getMe",
            "/REDACTED/getMe",
            "ZQXtelegram03abcdefghijklmnopqrstu",
        ),
        (
            "/v1/files;jsessionid=ZQXsess04/x",
            "/v1/files;jsessionid=REDACTED/x",
            "ZQXsess04",
        ),
    ] {
        let r = fetch(proxy.client().get(format!("http://api.openai.com{sent}"))).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(origin.requests().last().unwrap().uri, sent);
        proxy.audit_path(logged).await;
        assert!(!proxy.audit_text().contains(secret), "{secret}");
    }
}
