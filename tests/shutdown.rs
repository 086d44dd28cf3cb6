//! SIGTERM under load: the binary drains, flushes the audit log and exits 0, and every answer a
//! client received has exactly one audit record.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_audit_record() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .vendor("api.deepseek.com", origin.addr)
            .proxy("shutdown_grace = \"5s\""),
    )
    .await;

    // (path, status) of every answer a client received.
    let answered = Arc::new(Mutex::new(Vec::<(String, u16)>::new()));
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let client = proxy.client();
        let answered = answered.clone();
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let vendor = if (c + i) % 3 == 0 {
                    "deepseek"
                } else {
                    "openai"
                };
                let path = format!("/slow/{vendor}/{c}/{i}");
                let Ok(resp) = client
                    .get(format!("http://api.{vendor}.com{path}"))
                    .send()
                    .await
                else {
                    return; // the proxy has stopped accepting
                };
                let status = resp.status().as_u16();
                if resp.bytes().await.is_err() {
                    return;
                }
                answered.lock().unwrap().push((path, status));
            }
        }));
    }
    eventually("load to build up", || {
        (answered.lock().unwrap().len() >= 40).then_some(())
    })
    .await;

    let status = proxy.stop().await.expect("the binary's exit status");
    assert!(status.success(), "exit status {status:?}");
    for c in clients {
        within("clients to notice the shutdown", c).await.unwrap();
    }

    let answered = answered.lock().unwrap().clone();
    let statuses: BTreeSet<u16> = answered.iter().map(|(_, s)| *s).collect();
    assert_eq!(statuses, BTreeSet::from([200, 403]), "{answered:?}");
    let audited: Vec<String> = proxy
        .audit_records()
        .into_iter()
        .filter_map(|r| r["path"].as_str().map(str::to_string))
        .filter(|p| p.starts_with("/slow/"))
        .collect();
    let answered_paths: BTreeSet<String> = answered.iter().map(|(p, _)| p.clone()).collect();
    let audited_paths: BTreeSet<String> = audited.iter().cloned().collect();
    assert_eq!(
        audited.len(),
        audited_paths.len(),
        "a request was audited twice"
    );
    assert_eq!(
        answered_paths
            .difference(&audited_paths)
            .collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "answered but not audited"
    );
    assert_eq!(
        audited_paths.len(),
        answered_paths.len(),
        "audited but never answered"
    );
}

/// A request still at the origin when the grace period runs out is cut, and its record says
/// so: the request reached the vendor, so it must be in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cut_by_shutdown_is_audited() {
    // An origin that takes requests and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            h.lock().unwrap().push(s);
        }
    });
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", addr)
            .proxy("shutdown_grace = \"1s\""),
    )
    .await;
    let client = proxy.client();
    let pending = tokio::spawn(async move {
        client
            .get("http://api.openai.com/v1/models?cut")
            .send()
            .await
    });
    eventually("the request to reach the origin", || {
        (!held.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let status = proxy.stop().await.expect("the binary's exit status");
    assert!(status.success(), "exit status {status:?}");
    let _ = pending.await;
    let rec = proxy
        .audit_records()
        .into_iter()
        .find(|r| r["path"] == "/v1/models?cut")
        .expect("a record for the request shutdown cut");
    assert_eq!(rec["status"], 499, "{rec}");
    assert_reason(&rec, "shutdown");
}

/// An answer still streaming when the grace period runs out is cut with a reset: a client whose
/// answer ends at the close (HTTP/1.0, no length) would take an orderly close for its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_by_shutdown_ends_in_a_reset() {
    let origin = Origin::http().await;
    let mut proxy = Proxy::spawn(
        Config::new()
            .vendor("api.openai.com", origin.addr)
            .proxy("shutdown_grace = \"1s\""),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // The fake origin's event stream: its first event, then nothing until released.
    s.write_all(b"GET http://api.openai.com/sse HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, 200);
    let status = proxy.stop().await.expect("the binary's exit status");
    assert!(status.success(), "exit status {status:?}");
    let mut buf = [0u8; 4096];
    let end = within("the end of the answer", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => {}
                Err(e) => return Some(e.kind()),
            }
        }
    })
    .await;
    assert_eq!(end, Some(std::io::ErrorKind::ConnectionReset));
    origin.release();
    // The record says who cut it: the proxy's shutdown, not the client.
    let rec = proxy
        .audit_records()
        .into_iter()
        .find(|r| r["path"] == "/sse")
        .expect("a record for the answer shutdown cut");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_reason(&rec, "shutdown");
    assert!(
        rec["reason"].as_str().unwrap().ends_with("response cut"),
        "{rec}"
    );
}

/// A tunnel where nothing moves is closed once the grace period runs out, and the binary exits:
/// its watcher, woken by the drain first, must still see the stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tunnel_is_closed_when_the_grace_runs_out() {
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    let mut proxy = Proxy::spawn(
        Config::new()
            .resolve("echo.test:443", addr)
            .loopback()
            .proxy("tunnel_require_tls = false")
            .proxy("shutdown_grace = \"1s\""),
    )
    .await;
    let (status, _, mut s) = raw_connect(proxy.addr, "echo.test:443", &[]).await;
    assert_eq!(status, 200);
    let hello = b"not TLS, and then silence\r\n";
    s.write_all(hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    let status = proxy.stop().await.expect("the binary's exit status");
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(read_until_closed(&mut s).await, 0);
    let rec = proxy.audit_connect("echo.test").await;
    assert_eq!(rec["action"], "allow", "{rec}");
    assert!(
        rec["reason"]
            .as_str()
            .unwrap_or("")
            .ends_with("closed: shutdown"),
        "{rec}"
    );
}
