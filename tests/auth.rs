//! Proxy users from an htpasswd file, rules by user and by group.

mod common;

use common::*;
use serde_json::Value;

const PASSWORD: &str = "correct horse";

/// Writes `users.htpasswd` (bcrypt, cost 4) for alice and bob; returns its directory.
fn htpasswd() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = ["alice", "bob"]
        .iter()
        .map(|u| format!("{u}:{}", bcrypt::hash(PASSWORD, 4).unwrap()))
        .collect();
    let path = dir.path().join("users.htpasswd");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    // A file of secrets must not be readable by others; the proxy refuses it otherwise.
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_groups_are_authenticated_and_matched() {
    let users = htpasswd();
    let origin = Origin::http().await;
    let tail = format!(
        r#"
[[rule]]
id = "alice-no-openai"
vendor = "openai"
user = "alice"
action = "block"

[[rule]]
id = "eng-no-anthropic"
vendor = "anthropic"
group = "eng"
action = "block"

[auth]
htpasswd = "{}"

[groups]
eng = ["bob"]
"#,
        users.path().join("users.htpasswd").display()
    );
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.anthropic.com", origin.addr)
            .tail(&tail),
    )
    .await;

    let anonymous = fetch(proxy.client().get("http://api.openai.com/v1/models")).await;
    assert_eq!(anonymous.status, 407, "{anonymous:?}");
    assert!(
        anonymous
            .header("proxy-authenticate")
            .unwrap()
            .starts_with("Basic"),
        "{anonymous:?}"
    );
    let wrong = fetch(
        proxy
            .client_as("alice", "wrong")
            .get("http://api.openai.com/v1/models"),
    )
    .await;
    assert_eq!(wrong.status, 407);
    let (status, head, _) = raw_connect(proxy.addr, "api.openai.com:443", &[]).await;
    assert_eq!(status, 407, "{head}");

    let alice = proxy.client_as("alice", PASSWORD);
    let bob = proxy.client_as("bob", PASSWORD);
    let r = fetch(alice.get("http://api.openai.com/v1/models?who=alice")).await;
    assert_blocked(&r, "alice-no-openai", "openai");
    let r = fetch(bob.get("http://api.openai.com/v1/models?who=bob")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = fetch(bob.get("http://api.anthropic.com/v1/messages?who=bob")).await;
    assert_blocked(&r, "eng-no-anthropic", "anthropic");
    let r = fetch(alice.get("http://api.anthropic.com/v1/messages?who=alice")).await;
    assert_eq!(r.status, 200, "{r:?}");

    for (path, user, action) in [
        ("/v1/models?who=alice", "alice", "block"),
        ("/v1/models?who=bob", "bob", "allow"),
        ("/v1/messages?who=bob", "bob", "block"),
        ("/v1/messages?who=alice", "alice", "allow"),
    ] {
        let rec = proxy.audit_path(path).await;
        assert_eq!(
            (rec["user"].as_str(), rec["action"].as_str()),
            (Some(user), Some(action)),
            "{rec}"
        );
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.headers.get("proxy-authorization").is_none()),
        "{seen:?}"
    );

    let text = proxy.metrics().await;
    for (name, labels, _) in samples(&text) {
        assert!(
            labels.iter().all(|(_, v)| v != "alice" && v != "bob"),
            "{name} has a user label: {labels:?}"
        );
    }
    assert!(!proxy.audit_text().contains(PASSWORD));
}

/// Removing a user from the htpasswd file and reloading revokes them from the next request,
/// also when their password was cached; a broken file fails the reload and keeps the users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_the_user_file_again() {
    let users = htpasswd();
    let file = users.path().join("users.htpasswd");
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&format!("[auth]\nhtpasswd = \"{}\"\n", file.display())),
    )
    .await;
    let get = |user: &str| {
        fetch(
            proxy
                .client_as(user, PASSWORD)
                .get("http://api.openai.com/v1/models"),
        )
    };
    assert_eq!(get("bob").await.status, 200);
    assert_eq!(get("bob").await.status, 200, "now from the cache");

    let reload = || async {
        let r = reqwest::Client::new()
            .post(format!("http://{}/reload", proxy.admin))
            .send()
            .await
            .expect("POST /reload");
        (r.status().as_u16(), r.text().await.expect("body"))
    };
    // A broken file: the reload fails, naming the line; bob still gets in.
    let alice_line = format!("alice:{}\n", bcrypt::hash(PASSWORD, 4).unwrap());
    std::fs::write(&file, format!("{alice_line}bob:plaintext\n")).unwrap();
    let (status, body) = reload().await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains(":2:"), "{body}");
    assert_eq!(get("bob").await.status, 200);

    std::fs::write(&file, &alice_line).unwrap();
    let (status, body) = reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get("bob").await.status, 407, "bob was removed");
    assert_eq!(get("alice").await.status, 200);
}

/// A user removed from the user file at a reload loses the tunnels they opened, as they lose
/// new requests; so does one whose password changed. Only what was proven at the CONNECT
/// authorised those tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_removed_at_reload_loses_the_tunnels_they_opened() {
    use base64::Engine;
    use tokio::io::AsyncWriteExt;
    let users = htpasswd();
    let file = users.path().join("users.htpasswd");
    let openai = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .tail(&format!("[auth]\nhtpasswd = \"{}\"\n", file.display())),
    )
    .await;
    let (p, o) = (&proxy, &openai);
    let open = |user: &'static str| async move {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{PASSWORD}"));
        let auth = format!("Proxy-Authorization: Basic {token}");
        let (status, _, tcp) = raw_connect(p.addr, "api.openai.com:443", &[&auth]).await;
        assert_eq!(status, 200, "{user}");
        let mut tls = tls_handshake(tcp, "api.openai.com").await.expect("TLS");
        let path = format!("/v1/{user}");
        tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: api.openai.com\r\n\r\n").as_bytes())
            .await
            .unwrap();
        o.request(&path).await;
        tls
    };
    let mut bob = open("bob").await;
    let mut alice = open("alice").await;

    // bob removed; alice still there, her line rewritten as it was (a new hash of the same
    // password would end her tunnel too: only the hash she proved counts).
    let text = std::fs::read_to_string(&file).unwrap();
    let alice_line = text.lines().find(|l| l.starts_with("alice:")).unwrap();
    std::fs::write(&file, format!("{alice_line}\n")).unwrap();
    assert_eq!(proxy.reload_edited(|t| t).await, 200);
    read_until_closed(&mut bob).await;
    let rec = proxy
        .audit_where("bob's tunnel", |r| {
            r["method"] == "CONNECT" && r["user"] == "bob"
        })
        .await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_reason(&rec, "policy_reloaded: proxy_user_revoked");

    // alice's tunnel still carries requests.
    alice
        .write_all(b"GET /v1/alice-after HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .await
        .unwrap();
    openai.request("/v1/alice-after").await;

    // A new password for alice ends hers.
    let new_hash = bcrypt::hash("a new password", 4).unwrap();
    std::fs::write(&file, format!("alice:{new_hash}\n")).unwrap();
    assert_eq!(proxy.reload_edited(|t| t).await, 200);
    read_until_closed(&mut alice).await;
}

/// With `required = false` a request without credentials passes as anonymous, but one whose
/// credentials do not log in is refused as where auth is required: a mistyped password must
/// not go unnoticed, its traffic attributed to no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_auth_passes_no_credentials_but_refuses_wrong_ones() {
    let users = htpasswd();
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&format!(
                "[auth]\nhtpasswd = \"{}\"\nrequired = false\n",
                users.path().join("users.htpasswd").display()
            )),
    )
    .await;
    let anonymous = fetch(
        proxy
            .client()
            .get("http://api.openai.com/v1/models?who=none"),
    )
    .await;
    assert_eq!(anonymous.status, 200, "{anonymous:?}");
    assert_eq!(
        proxy.audit_path("/v1/models?who=none").await["user"],
        Value::Null
    );
    let alice = fetch(
        proxy
            .client_as("alice", PASSWORD)
            .get("http://api.openai.com/v1/models?who=alice"),
    )
    .await;
    assert_eq!(alice.status, 200, "{alice:?}");
    assert_eq!(
        proxy.audit_path("/v1/models?who=alice").await["user"],
        "alice"
    );

    let wrong = fetch(
        proxy
            .client_as("alice", "wrong")
            .get("http://api.openai.com/v1/models?who=wrong"),
    )
    .await;
    assert_eq!(wrong.status, 407, "{wrong:?}");
    let rec = proxy.audit_path("/v1/models?who=wrong").await;
    assert_eq!(
        (rec["action"].as_str(), rec["status"].as_u64()),
        (Some("reject"), Some(407)),
        "{rec}"
    );
    let bearer = "Proxy-Authorization: Bearer not-a-proxy-login";
    let (status, head, _) = raw_connect(proxy.addr, "api.openai.com:443", &[bearer]).await;
    assert_eq!(status, 407, "{head}");
    assert_eq!(origin.requests().len(), 2);
}

/// A login takes a while at a real bcrypt cost; a client that hangs up meanwhile, over plain
/// HTTP or CONNECT, still leaves a record of the attempt (password guessing that never waits
/// for its 407 is seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_its_login_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.htpasswd");
    // Cost 12 (~0.3 s optimised, longer in a debug build), made once with Python's bcrypt.
    std::fs::write(
        &path,
        "carol:$2b$12$/SR4NtT2X8oYencPZBUb4OimQ33Y0fbLxC5sWvajTIcJ0DIyAQnre\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(&format!("[auth]\nhtpasswd = \"{}\"\n", path.display())),
    )
    .await;
    // carol:wrong-guess
    let creds = "Proxy-Authorization: Basic Y2Fyb2w6d3JvbmctZ3Vlc3M=";
    for head in [
        format!("GET http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\n{creds}\r\n\r\n"),
        format!("CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n{creds}\r\n\r\n"),
    ] {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        drop(s);
    }
    let records = proxy.audit_at_least(2).await;
    let methods: Vec<&str> = records
        .iter()
        .filter_map(|r| r["method"].as_str())
        .collect();
    assert_eq!(methods.len(), 2, "{records:?}");
    assert!(
        methods.contains(&"GET") && methods.contains(&"CONNECT"),
        "{records:?}"
    );
    for rec in &records {
        assert_eq!(rec["status"], 499, "{rec}");
        assert_eq!(rec["host"], "api.openai.com", "{rec}");
        assert_eq!(rec["vendor"], "openai", "{rec}");
        // A vendor's request, refused before any decision, still has its endpoint class.
        let endpoint = match rec["method"].as_str() {
            Some("CONNECT") => "unknown",
            _ => "models",
        };
        assert_eq!(rec["endpoint"], endpoint, "{rec}");
        assert!(
            rec["reason"]
                .as_str()
                .unwrap()
                .starts_with("client_aborted"),
            "{rec}"
        );
    }
    assert!(origin.requests().is_empty());
}
