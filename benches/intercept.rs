//! What interception costs per tunnel: issuing a leaf, and a whole TLS handshake (TLS 1.3,
//! in memory, no sockets) with a cached leaf against one with a freshly signed leaf. The
//! end-to-end requests/s through interception are measured with ../shared/bench/peers.sh
//! (see benches/README.md).

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use portcullis::tls::ca::{Authority, AuthoritySettings};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

fn authority() -> Arc<Authority> {
    Arc::new(
        Authority::generate(AuthoritySettings {
            ca_cert: "mem".into(),
            ca_key: "mem".into(),
            leaf_cache: 10_000,
            leaf_validity: Duration::from_secs(24 * 3600),
        })
        .expect("CA"),
    )
}

fn client_config(a: &Authority) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(a.ca_der().clone()).expect("root");
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Drives a client and a server connection to the end of their handshake through memory.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) {
    let name = ServerName::try_from("api.openai.com").expect("name");
    let mut c = ClientConnection::new(client.clone(), name).expect("client");
    let mut s = ServerConnection::new(server.clone()).expect("server");
    let mut buf = Vec::with_capacity(4096);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).expect("client write");
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).expect("server read");
            s.process_new_packets().expect("server handshake");
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).expect("server write");
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).expect("client read");
            c.process_new_packets().expect("client handshake");
        }
    }
}

fn bench(c: &mut Criterion) {
    let a = authority();
    let client = client_config(&a);
    let shared = Arc::new(a.server_config(None));
    a.leaf("api.openai.com").expect("warm the cache");

    let mut g = c.benchmark_group("intercept");
    g.bench_function("leaf/cached", |b| {
        b.iter(|| black_box(a.leaf(black_box("api.openai.com")).expect("leaf")))
    });
    g.bench_function("leaf/issue", |b| {
        b.iter(|| black_box(a.issue(black_box("api.openai.com")).expect("leaf")))
    });
    g.bench_function("handshake/cached_leaf", |b| {
        b.iter(|| handshake(&client, &shared))
    });
    g.bench_function("handshake/fresh_leaf", |b| {
        b.iter(|| {
            let leaf = Arc::new(a.issue("api.openai.com").expect("leaf"));
            let server = Arc::new(a.server_config(Some(leaf)));
            handshake(&client, &server)
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
