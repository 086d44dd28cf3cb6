//! Operations: hot reload under load (POST /reload, file change, SIGHUP), a broken file keeps
//! the old policy, audit reopen on SIGUSR1 under load loses no line, the admin endpoints.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const BLOCK_OPENAI: &str = "[[rule]]\nid = \"block-openai\"\nvendor = \"openai\"\naction = \"block\"\nreason = \"paused\"\n";

fn admin_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn post_reload(proxy: &Proxy) -> (u16, String) {
    let resp = admin_client()
        .post(format!("http://{}/reload", proxy.admin))
        .send()
        .await
        .expect("POST /reload");
    (resp.status().as_u16(), resp.text().await.expect("body"))
}

/// Appends to the proxy's config file in place (as an operator's editor would save it).
fn edit_config(proxy: &Proxy, f: impl FnOnce(String) -> String) {
    let path = proxy.dir.path().join("portcullis.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let tmp = proxy.dir.path().join("portcullis.toml.new");
    std::fs::write(&tmp, f(text)).expect("write config");
    std::fs::rename(&tmp, &path).expect("replace config");
}

/// Clients that loop GETs to api.openai.com until stopped; every status is recorded per task.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u16>>>,
    done: Arc<AtomicUsize>,
}

impl Load {
    fn start(proxy: &Proxy, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|i| {
                let client = proxy.client();
                let stop = stop.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    let mut statuses = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let url = format!("http://api.openai.com/v1/models?c={i}&n={n}");
                        let resp = client
                            .get(url)
                            .send()
                            .await
                            .expect("no request may fail during reload");
                        statuses.push(resp.status().as_u16());
                        resp.bytes().await.expect("whole body");
                        done.fetch_add(1, Ordering::Relaxed);
                        n += 1;
                    }
                    statuses
                })
            })
            .collect();
        Load { stop, tasks, done }
    }

    async fn until(&self, n: usize) {
        eventually("load progress", || {
            (self.done.load(Ordering::Relaxed) >= n).then_some(())
        })
        .await;
    }

    async fn finish(self) -> Vec<Vec<u16>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(within("load task", t).await.expect("task"));
        }
        out
    }
}

/// Within one client's sequence the decision flips once, from allowed to blocked.
fn assert_switched_once(per_task: &[Vec<u16>]) {
    for statuses in per_task {
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 403),
            "{statuses:?}"
        );
        let first_block = statuses
            .iter()
            .position(|s| *s == 403)
            .expect("switched to blocked");
        assert!(first_block > 0, "allowed before the reload");
        assert!(
            statuses[first_block..].iter().all(|s| *s == 403),
            "no allow after the swap: {statuses:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_under_load_switches_decisions_without_failures() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let load = Load::start(&proxy, 4);
    load.until(40).await;

    // Written without a rename-watch race: the watcher may reload too; either way one swap.
    edit_config(&proxy, |t| t + BLOCK_OPENAI);
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"result\":\"ok\""), "{body}");
    let after = load.done.load(Ordering::Relaxed);
    load.until(after + 40).await;

    assert_switched_once(&load.finish().await);
    let m = proxy.metrics().await;
    assert!(
        metric(&m, "portcullis_config_reloads_total", &[("result", "ok")]) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn broken_file_keeps_the_old_policy_and_names_line_and_column() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    edit_config(&proxy, |t| {
        t + "[[rule]]\nid = \"x\"\nvendor = \"openai\"\naction = \"blok\"\n"
    });

    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{body}");
    let lines = std::fs::read_to_string(proxy.dir.path().join("portcullis.toml")).expect("config");
    let line = lines
        .lines()
        .position(|l| l.contains("\"blok\""))
        .expect("bad line")
        + 1;
    assert!(
        body.contains(&format!("portcullis.toml:{line}:10: unknown action")),
        "{body}"
    );

    let resp = proxy
        .client()
        .get("http://api.openai.com/v1/models")
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "old policy still serving");
    let m = proxy.metrics().await;
    assert!(
        metric(
            &m,
            "portcullis_config_reloads_total",
            &[("result", "error")]
        ) >= 1.0,
        "{m}"
    );
}

/// An editor that truncates the file before writing it wakes the watcher on an empty file,
/// which is valid TOML with no catalog and no rules: that must not open the proxy.
#[tokio::test]
async fn an_emptied_file_keeps_the_old_policy() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .tail(BLOCK_OPENAI),
    )
    .await;
    let get = || async {
        proxy
            .client()
            .get("http://api.openai.com/v1/models")
            .send()
            .await
            .expect("request")
            .status()
    };
    assert_eq!(get().await, 403);
    edit_config(&proxy, |_| "\n  \n".to_string());
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("empty"), "{body}");
    assert_eq!(get().await, 403, "the old policy still blocks");
}

#[tokio::test]
async fn saving_the_file_reloads() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let client = proxy.client();
    let get = || client.get("http://api.openai.com/v1/models").send();
    assert_eq!(get().await.expect("request").status(), 200);
    edit_config(&proxy, |t| t + BLOCK_OPENAI);
    for _ in 0..200 {
        if get().await.expect("request").status() == 403 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the watcher did not reload within 10 s");
}

/// An `include` added while running (in a directory not watched before) is watched from the
/// reload that read it: editing it reloads, as editing the main file does.
#[tokio::test]
async fn an_include_added_at_runtime_is_watched_too() {
    let origin = Origin::http().await;
    let proxy = Proxy::start(Config::new().vendor("api.openai.com", origin.addr)).await;
    let client = proxy.client();
    let status = || async {
        let r = client.get("http://api.openai.com/v1/models").send().await;
        r.expect("request").status().as_u16()
    };
    let until = |want: u16, what: &'static str| async move {
        for _ in 0..200 {
            if status().await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}: no {want} within 10 s");
    };
    let extra_dir = proxy.dir.path().join("rules.d");
    std::fs::create_dir(&extra_dir).expect("mkdir");
    let extra = extra_dir.join("extra.toml");
    std::fs::write(&extra, BLOCK_OPENAI).expect("write include");
    edit_config(&proxy, |t| {
        t.replacen(
            "include = [",
            &format!("include = [\"{}\", ", extra.display()),
            1,
        )
    });
    until(403, "the main file's edit").await;
    // Now only the include changes: an editor's save, by rename.
    let tmp = extra_dir.join("extra.toml.new");
    std::fs::write(&tmp, "# paused no more\n").expect("write");
    std::fs::rename(&tmp, &extra).expect("replace include");
    until(200, "the include's edit").await;
}

#[tokio::test]
async fn sighup_reloads_the_binary() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(Config::new().vendor("api.openai.com", origin.addr)).await;
    let client = proxy.client();
    edit_config(&proxy, |t| t + BLOCK_OPENAI);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let mut blocked = false;
    for _ in 0..200 {
        let resp = client
            .get("http://api.openai.com/v1/models")
            .send()
            .await
            .expect("request");
        if resp.status() == 403 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(blocked, "SIGHUP did not reload");
    assert_eq!(proxy.stop().await.and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopen_under_load_loses_no_line() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(Config::new().vendor("api.openai.com", origin.addr)).await;
    let load = Load::start(&proxy, 4);
    load.until(100).await;

    // logrotate's dance: move the file aside, then tell the proxy to reopen.
    let rotated = proxy.dir.path().join("audit.jsonl.1");
    std::fs::rename(&proxy.audit, &rotated).expect("rotate");
    let usr1 = std::process::Command::new("kill")
        .args(["-USR1", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(usr1.success());
    eventually("a new audit file", || proxy.audit.exists().then_some(())).await;
    let now = load.done.load(Ordering::Relaxed);
    load.until(now + 100).await;
    let answered: usize = load.finish().await.iter().map(Vec::len).sum();
    assert_eq!(proxy.stop().await.and_then(|s| s.code()), Some(0));

    let old = std::fs::read_to_string(&rotated).expect("rotated file");
    let new = std::fs::read_to_string(&proxy.audit).expect("new file");
    let mut lines = 0;
    for l in old.lines().chain(new.lines()) {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("split line {l:?}: {e}"));
        assert_eq!(v["host"], "api.openai.com");
        lines += 1;
    }
    assert!(
        !old.is_empty() && !new.is_empty(),
        "both files hold records"
    );
    assert_eq!(
        lines, answered,
        "one record per answered request, none lost across the reopen"
    );
}

#[tokio::test]
async fn admin_endpoints_answer() {
    let proxy = Proxy::start(Config::new()).await;
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);

    let (status, policy) = proxy.admin_get("/policy").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&policy).expect("policy JSON");
    assert_eq!(v["rules"][0]["id"], "block-deepseek");
    assert_eq!(v["rules"][0]["vendor"][0], "deepseek");
    assert!(v["vendors"].as_array().expect("vendors").len() >= 25);

    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(pac.contains("function FindProxyForURL"), "{pac}");
    assert!(pac.contains(&format!("PROXY {}", proxy.addr)), "{pac}");
    assert!(
        pac.contains("\"api.deepseek.com\"") && pac.contains("\".deepseek.com\""),
        "{pac}"
    );

    let resp = admin_client()
        .get(format!("http://{}/reload", proxy.admin))
        .send()
        .await
        .expect("GET /reload");
    assert_eq!(resp.status(), 405, "reload is POST only");
}

/// Browsers configured by the PAC file send the proxy only what it lists: hosts a rule names
/// beyond the catalog must be there too, or a block on them never sees their traffic.
#[tokio::test]
async fn the_pac_file_lists_the_hosts_rules_name() {
    let proxy = Proxy::start(Config::new().tail(
        "[[rule]]\nid = \"block-new-ai\"\nhost = [\"*.example.ai\", \"203.0.113.7\", \"chat.example.org\"]\n\
         action = \"block\"\n",
    ))
    .await;
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    for listed in ["\".example.ai\"", "\"203.0.113.7\"", "\"chat.example.org\""] {
        assert!(pac.contains(listed), "{listed} missing: {pac}");
    }
}

/// Clients can reach the proxy listener but (rightly) not the admin one, so the PAC file is
/// served there too, to an origin-form `GET /proxy.pac` or `/wpad.dat`; nothing else in origin
/// form is answered but the usual 400.
#[tokio::test]
async fn the_pac_file_is_served_on_the_proxy_listener_too() {
    let proxy = Proxy::start(Config::new()).await;
    let direct = admin_client();
    for path in ["/proxy.pac", "/wpad.dat"] {
        let resp = direct
            .get(format!("http://{}{path}", proxy.addr))
            .send()
            .await
            .expect("GET the PAC file from the proxy port");
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(
            resp.headers()["content-type"],
            "application/x-ns-proxy-autoconfig"
        );
        let pac = resp.text().await.expect("PAC text");
        assert!(pac.contains(&format!("PROXY {}", proxy.addr)), "{pac}");
        assert!(pac.contains("\"api.deepseek.com\""), "{pac}");
    }
    for (method, path) in [
        ("GET", "/proxy.pac.js"),
        ("POST", "/proxy.pac"),
        ("GET", "/"),
    ] {
        let resp = direct
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", proxy.addr),
            )
            .send()
            .await
            .expect("origin-form request");
        assert_eq!(resp.status(), 400, "{method} {path}");
    }
}

/// A mounted Kubernetes ConfigMap: `portcullis.toml -> ..data/portcullis.toml`, and an update
/// swaps the `..data` symlink to a new directory. The watcher must follow it.
#[tokio::test]
async fn configmap_style_symlink_swap_reloads() {
    use std::os::unix::fs::symlink;
    let origin = Origin::http().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let cfg = Config::new().vendor("api.openai.com", origin.addr);
    let v1 = dir.path().join("..2026_v1");
    std::fs::create_dir(&v1).expect("v1");
    let text = std::fs::read_to_string(cfg.write(&v1, any, any)).expect("config");
    symlink("..2026_v1", dir.path().join("..data")).expect("..data");
    let mounted = dir.path().join("portcullis.toml");
    symlink("..data/portcullis.toml", &mounted).expect("mounted");

    let running = portcullis::app::start(portcullis::config::load(&mounted).expect("load"))
        .await
        .expect("start");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://{}", running.proxy_addr)).expect("proxy"))
        .build()
        .expect("client");
    let get = || client.get("http://api.openai.com/v1/models").send();
    assert_eq!(get().await.expect("request").status(), 200);

    // The kubelet's update: a new directory, a temporary symlink, renamed over ..data.
    let v2 = dir.path().join("..2026_v2");
    std::fs::create_dir(&v2).expect("v2");
    std::fs::write(v2.join("portcullis.toml"), text + BLOCK_OPENAI).expect("v2 config");
    symlink("..2026_v2", dir.path().join("..data_tmp")).expect("tmp link");
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
    std::fs::remove_dir_all(&v1).expect("old version removed");

    let mut blocked = false;
    for _ in 0..200 {
        if get().await.expect("request").status() == 403 {
            blocked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    within("shutdown", running.shutdown()).await;
    assert!(blocked, "the symlink swap was not picked up");
}

#[tokio::test]
async fn admin_token_guards_reload_policy_and_top() {
    let proxy = Proxy::start(Config::new()).await;
    // A token file the proxy refuses while others can read it, and accepts at 0600.
    let token = proxy.dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-admin-token\n").expect("token");
    let cfg_with = |mode: u32| {
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
        let path = proxy.dir.path().join("portcullis.toml");
        let text = std::fs::read_to_string(&path).expect("config");
        let text = text.replacen(
            "[admin]\n",
            &format!("[admin]\ntoken_file = \"{}\"\n", token.display()),
            1,
        );
        let other = proxy.dir.path().join("with-token.toml");
        std::fs::write(
            &other,
            text.replace(&proxy.addr.to_string(), "127.0.0.1:0")
                .replace(&proxy.admin.to_string(), "127.0.0.1:0"),
        )
        .expect("write");
        portcullis::config::load(&other).expect("config loads")
    };
    let refused = portcullis::app::start(cfg_with(0o644)).await;
    assert!(
        refused
            .as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("accessible to other users")),
        "a world-readable token file is refused at start"
    );
    let running = portcullis::app::start(cfg_with(0o600))
        .await
        .expect("start");
    let admin = running.admin_addr.expect("admin");
    let client = admin_client();
    for path in ["/policy", "/top"] {
        let r = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 401, "{path} without a token");
        let r = client
            .get(format!("http://{admin}{path}"))
            .bearer_auth("s3cret-admin-token")
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "{path} with the token");
        assert!(
            !r.text().await.expect("body").contains("s3cret"),
            "the token is never echoed"
        );
    }
    let r = client
        .post(format!("http://{admin}/reload"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    let r = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status(), 200, "Prometheus and probes need no token");
    within("shutdown", running.shutdown()).await;
}

/// While draining after SIGTERM the proxy says it is not ready (so load balancers stop sending),
/// finishes the request in flight, then exits 0.
#[tokio::test]
async fn readyz_turns_503_while_draining() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(Config::new().vendor("api.openai.com", origin.addr)).await;
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let (release, in_flight) = {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let body = futures_util::stream::once(async move {
            let _ = rx.await;
            Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"done"))
        });
        let req = proxy
            .client()
            .post("http://api.openai.com/v1/files")
            .body(reqwest::Body::wrap_stream(body));
        (
            tx,
            tokio::spawn(async move { req.send().await.map(|r| r.status().as_u16()) }),
        )
    };
    // In flight = the proxy has decided and connected to the origin.
    eventually("the upload to reach the origin", || {
        (established_to(origin.addr.port()) > 0).then_some(())
    })
    .await;
    let term = std::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let mut saw_503 = false;
    for _ in 0..100 {
        if proxy.admin_get("/readyz").await.0 == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/readyz is 503 while draining");
    release.send(()).expect("release");
    assert_eq!(
        within("in-flight request", in_flight)
            .await
            .expect("task")
            .expect("answered"),
        200
    );
    assert_eq!(proxy.wait_exit().await.and_then(|s| s.code()), Some(0));
}

/// Established TCP connections whose local port is `port` (read from /proc/net/tcp).
fn established_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "01"
        })
        .count()
}

/// An opaque tunnel opened before a block rule is closed by the reload that adds the rule, not
/// left carrying traffic until the client happens to reconnect (HTTP/2 connections live long).
/// A tunnel the new policy still allows stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_closes_open_tunnels_the_new_policy_blocks() {
    let origin = Origin::https().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.anthropic.com", origin.addr),
    )
    .await;
    let openai = proxy.client();
    let anthropic = proxy.client();
    let r = fetch(openai.get("https://api.openai.com/v1/models")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = fetch(anthropic.get("https://api.anthropic.com/v1/models")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        metric(&proxy.metrics().await, "portcullis_tunnels_active", &[]),
        2.0
    );

    edit_config(&proxy, |t| t + BLOCK_OPENAI);
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let rec = proxy.audit_connect("api.openai.com").await;
    assert_eq!(rec["action"], "block", "{rec}");
    assert_eq!(rec["rule"], "block-openai", "{rec}");
    assert_eq!(rec["status"], 200, "the tunnel had been opened: {rec}");
    assert!(
        rec["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("policy_reloaded: paused")),
        "{rec}"
    );
    assert!(rec["bytes_in"].as_u64().unwrap() > 0, "{rec}");
    assert_eq!(
        metric(&proxy.metrics().await, "portcullis_tunnels_active", &[]),
        1.0,
        "the anthropic tunnel stays open"
    );
    let r = fetch(anthropic.get("https://api.anthropic.com/v1/models")).await;
    assert_eq!(
        r.status, 200,
        "the same tunnel still carries requests: {r:?}"
    );
    assert_eq!(
        metric(&proxy.metrics().await, "portcullis_tunnels_active", &[]),
        1.0
    );
}

/// The value of exactly `name{labels}` (no more labels than these), if /metrics shows it.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text)
        .into_iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
}

/// A reload that adds a limit rule exposes its series at 0 before any request meets it (alert
/// rules use `increase()`, blind to a series born at 1); a failed reload moves
/// `result="error"` from 0 to 1.
#[tokio::test]
async fn a_reload_exposes_the_new_policys_series_at_zero() {
    let proxy = Proxy::start(Config::new()).await;
    let key = [("vendor", "anthropic"), ("rule", "cap-anthropic")];
    let m = proxy.metrics().await;
    assert_eq!(
        series(&m, "portcullis_rate_limited_total", &key),
        None,
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "portcullis_config_reloads_total",
            &[("result", "error")]
        ),
        Some(0.0),
        "{m}"
    );

    edit_config(&proxy, |t| {
        t + "[[rule]]\nid = \"cap-anthropic\"\nvendor = \"anthropic\"\naction = \"limit\"\n\
             limit = { concurrent = 2, by = \"client\" }\n"
    });
    let (status, body) = post_reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let mut m = String::new();
    for _ in 0..100 {
        m = proxy.metrics().await;
        if series(&m, "portcullis_rate_limited_total", &key).is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        series(&m, "portcullis_rate_limited_total", &key),
        Some(0.0),
        "{m}"
    );

    edit_config(&proxy, |t| t + "[[rule]]\nid = \"x\"\naction = \"blok\"\n");
    assert_eq!(post_reload(&proxy).await.0, 422);
    let m = proxy.metrics().await;
    assert_eq!(
        series(
            &m,
            "portcullis_config_reloads_total",
            &[("result", "error")]
        ),
        Some(1.0),
        "{m}"
    );
    assert!(
        series(&m, "portcullis_config_reloads_total", &[("result", "ok")]) >= Some(1.0),
        "{m}"
    );
}

/// `GET /healthz` on a new connection from `from`: the status, or why there was none within
/// `PROBE_TIMEOUT` (a liveness probe's patience).
async fn healthz_from(from: std::net::IpAddr, admin: std::net::SocketAddr) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
    let probe = async {
        let mut s = connect_from(from, admin)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let answer = String::from_utf8_lossy(&answer);
        answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("closed without an answer: {answer:?}"))
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PROBE_TIMEOUT:?}")))
}

/// Reads until the peer closes or `limit` passes; how long that took (`None`: still open).
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    tokio::time::timeout(limit, async {
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

/// One client holding (and reopening) many idle admin connections, as a `python3` loop over
/// sockets does, must not make the liveness probe fail: it may hold 8 connections, each of
/// which is closed when no request head arrives within 2 s, and /healthz from another address
/// still answers at once. Once it lets go, its own address is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_from_one_address_do_not_starve_the_probe() {
    let proxy = Proxy::start(Config::new()).await;
    let admin = proxy.admin;
    let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };

    // A connection that never sends a request is closed after the admin head timeout.
    let idle = tokio::spawn(async move {
        let mut s = connect_from(ip("127.0.0.3"), admin).await.expect("connect");
        closed_within(&mut s, Duration::from_secs(8)).await
    });

    // The flood: 80 idle connections from 127.0.0.1, each reopened 100 ms after it is closed.
    let flood_until = tokio::time::Instant::now() + Duration::from_secs(4);
    let flood: Vec<_> = (0..80)
        .map(|_| {
            tokio::spawn(async move {
                while tokio::time::Instant::now() < flood_until {
                    if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
                        let left =
                            flood_until.saturating_duration_since(tokio::time::Instant::now());
                        closed_within(&mut s, left).await;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The probe, from another address, across a full 2 s idle cycle of the flood.
    let mut failures = Vec::new();
    for i in 0..10 {
        match healthz_from(ip("127.0.0.2"), admin).await {
            Ok(200) => {}
            other => failures.push(format!("probe {i}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for t in flood {
        within("flood task", t).await.expect("flood task");
    }
    assert!(
        failures.is_empty(),
        "/healthz from 127.0.0.2 failed while 127.0.0.1 held idle connections: {failures:?}"
    );

    let idle_for = within("idle connection", idle)
        .await
        .expect("task")
        .expect("an idle admin connection is closed within 8 s");
    assert!(
        idle_for >= Duration::from_secs(1) && idle_for < Duration::from_secs(5),
        "idle admin connection closed after {idle_for:?}, want about 2 s"
    );

    // The flooder's address gets its slots back once its connections are gone.
    let mut again = Err(String::new());
    for _ in 0..30 {
        again = healthz_from(ip("127.0.0.1"), admin).await;
        if again == Ok(200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, Ok(200), "127.0.0.1 served again after letting go");

    // Per source: 8 connections held, the 9th closed at accept while they are still open.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from(ip("127.0.0.4"), admin).await.expect("connect"));
    }
    let mut ninth = connect_from(ip("127.0.0.4"), admin).await.expect("connect");
    let ninth_closed = closed_within(&mut ninth, Duration::from_secs(1)).await;
    assert!(
        ninth_closed.is_some(),
        "a 9th connection from one address is closed at accept"
    );
    assert_eq!(
        closed_within(&mut held[7], Duration::from_millis(10)).await,
        None,
        "the first 8 are still open (until their head timeout)"
    );
    assert_eq!(healthz_from(ip("127.0.0.5"), admin).await, Ok(200));
}

/// Idle connections from many addresses, each within its per-source cap, together fill every
/// admin slot and reopen as they are closed. The probe must still be answered: when the
/// slots are full the oldest connection gives way to the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_admin_connections_from_many_addresses_do_not_starve_the_probe() {
    let proxy = Proxy::start(Config::new()).await;
    let admin = proxy.admin;
    let flood_until = tokio::time::Instant::now() + Duration::from_secs(3);
    // 10 addresses × 8 connections: more than the 64 slots.
    let flood: Vec<_> = (0..80)
        .map(|i| {
            let from: std::net::IpAddr = format!("127.0.0.{}", 10 + i / 8).parse().expect("ip");
            tokio::spawn(async move {
                while tokio::time::Instant::now() < flood_until {
                    if let Ok(mut s) = connect_from(from, admin).await {
                        let left =
                            flood_until.saturating_duration_since(tokio::time::Instant::now());
                        closed_within(&mut s, left).await;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut failures = Vec::new();
    for i in 0..8 {
        match healthz_from("127.0.0.2".parse().expect("ip"), admin).await {
            Ok(200) => {}
            other => failures.push(format!("probe {i}: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for t in flood {
        within("flood task", t).await.expect("flood task");
    }
    assert!(
        failures.is_empty(),
        "/healthz failed while 10 addresses held the admin slots: {failures:?}"
    );
}
