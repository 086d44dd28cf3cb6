//! Policy decision cost: the shipped catalog plus 10,000 generated rules, compiled through the
//! real config loader. The peer in the same run is a naive first-match scan over every rule
//! (what the index exists to avoid), so the ratio is meaningful on a noisy machine.
//!
//!     cargo bench --bench decide

use std::fmt::Write as _;
use std::net::IpAddr;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::Method;
use portcullis::config;
use portcullis::policy::target::Host;
use portcullis::policy::{path, Action, HostPattern, Policy, Request};

const RULES: usize = 10_000;

fn generated_config(dir: &std::path::Path) -> std::path::PathBuf {
    let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
    let mut t = format!("include = [{vendors:?}]\n[defaults]\naction = \"allow\"\n");
    t.push_str("[[rule]]\nid = \"block-deepseek\"\nvendor = \"deepseek\"\naction = \"block\"\n");
    let vendor_ids = [
        "openai",
        "anthropic",
        "mistral",
        "google-gemini",
        "cohere",
        "groq",
    ];
    for i in 0..RULES {
        match i % 10 {
            // Most rules in a large deployment name hosts: exact and subtree.
            0..=5 => writeln!(t, "[[rule]]\nid = \"h{i}\"\nhost = \"svc{i}.internal{}.example\"\naction = \"block\"", i % 97),
            6..=8 => writeln!(t, "[[rule]]\nid = \"s{i}\"\nhost = \".team{i}.example\"\naction = \"audit\""),
            _ => writeln!(
                t,
                "[[rule]]\nid = \"v{i}\"\nvendor = \"{}\"\npath = \"/v1/never{i}\"\nmethod = \"POST\"\naction = \"block\"",
                vendor_ids[i % vendor_ids.len()]
            ),
        }
        .expect("write to String");
    }
    let path = dir.join("bench.toml");
    std::fs::write(&path, t).expect("write bench config");
    path
}

/// The peer: first match by scanning every rule in order.
struct Naive {
    rules: Vec<(Vec<HostPattern>, usize)>,
}

impl Naive {
    fn new(p: &Policy) -> Naive {
        Naive {
            rules: p
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        r.hosts
                            .iter()
                            .filter_map(|h| HostPattern::parse(h).ok())
                            .collect(),
                        i,
                    )
                })
                .collect(),
        }
    }

    fn decide(&self, p: &Policy, req: &Request<'_>) -> Action {
        let hit = p.catalog.lookup(req.host);
        let norm = req.path.map(path::normalize);
        let segs = norm.as_deref().map(path::Segments::new);
        let endpoint = hit.map_or(portcullis::policy::Endpoint::None, |h| {
            p.catalog.classify(h, segs.as_ref())
        });
        let facts = portcullis::policy::Facts {
            client: req.client,
            user: req.user,
            groups: 0,
            method: req.method,
            port: req.port,
            path: segs.as_ref(),
            vendor: hit.map(|h| h.vendor),
            endpoint,
            model: None,
            dlp: 0,
        };
        let name = req.host.as_name().unwrap_or("");
        for (hosts, i) in &self.rules {
            let rule = &p.rules[*i];
            if (hosts.is_empty() || hosts.iter().any(|h| h.matches(name))) && rule.matches(&facts) {
                return rule.action;
            }
        }
        p.default.action
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = config::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/portcullis.toml"
    )))
    .expect("shipped config")
    .policy;
    let big = config::load(&generated_config(dir.path()))
        .expect("generated config")
        .policy;
    assert_eq!(big.rules.len(), RULES + 1);
    let naive = Naive::new(&big);

    let client: IpAddr = "10.1.2.3".parse().expect("ip");
    let post = Method::POST;
    let get = Method::GET;
    let cases: Vec<(&str, Host, &Method, Option<&str>)> = vec![
        (
            "blocked_vendor",
            Host::parse("api.deepseek.com").expect("host"),
            &post,
            Some("/chat/completions"),
        ),
        (
            "allowed_vendor_path",
            Host::parse("api.openai.com").expect("host"),
            &post,
            Some("/v1/chat/completions"),
        ),
        (
            "unknown_host",
            Host::parse("www.example.org").expect("host"),
            &get,
            Some("/index.html"),
        ),
        (
            "generated_subtree",
            Host::parse("a.b.team4446.example").expect("host"),
            &get,
            Some("/"),
        ),
        (
            "connect_no_path",
            Host::parse("api.anthropic.com").expect("host"),
            &Method::CONNECT,
            None,
        ),
    ];

    let mut g = c.benchmark_group("decide");
    for (name, host, method, path) in &cases {
        let req = Request {
            client,
            user: None,
            method,
            host,
            port: 443,
            path: *path,
            body: Default::default(),
        };
        // Both engines must agree, or the comparison means nothing.
        assert_eq!(big.decide(&req).action, naive.decide(&big, &req), "{name}");
        g.bench_function(format!("shipped/{name}"), |b| {
            b.iter(|| black_box(shipped.decide(black_box(&req))).action)
        });
        g.bench_function(format!("indexed_10k/{name}"), |b| {
            b.iter(|| black_box(big.decide(black_box(&req))).action)
        });
        g.bench_function(format!("naive_scan_10k/{name}"), |b| {
            b.iter(|| black_box(naive.decide(&big, black_box(&req))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
