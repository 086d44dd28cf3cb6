//! The config loader: TOML files (with includes) compiled into settings and a policy.
//!
//! The input is up to three files separated by a line `%%%`: `main.toml`, `a.toml` and
//! `b.toml`, written to a private directory so `include = ["a.toml"]` resolves. An error must
//! carry a FILE:LINE:COL that exists in the named file; a policy that loads must answer
//! `decide` for any request without panicking.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use http::Method;
use libfuzzer_sys::fuzz_target;
use portcullis::policy::target::Host;
use portcullis::policy::Request;

const NAMES: [&str; 3] = ["main.toml", "a.toml", "b.toml"];

/// One scratch directory per process. On tmpfs when there is one: rewriting a file on ext4
/// flushes it (auto_da_alloc), which made this target ten times slower.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = match std::env::var_os("PORTCULLIS_FUZZ_SCRATCH") {
            Some(d) => PathBuf::from(d),
            None if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
            None => std::env::temp_dir(),
        };
        let d = base.join(format!("portcullis-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create fuzz scratch dir");
        d
    })
}

/// Includes may only name the sibling files: an include of /dev/zero or a large binary would
/// hang or exhaust memory, which is the operator's choice to make, not a loader bug.
fn includes_are_local(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return true; // the loader will refuse it before reading any include
    };
    match table.get("include") {
        None => true,
        Some(toml::Value::Array(items)) => items.iter().all(|v| match v {
            toml::Value::String(s) => !s.contains(['/', '\\']) && !s.starts_with('.'),
            _ => true,
        }),
        Some(_) => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files: Vec<&str> = text.splitn(3, "\n%%%\n").collect();
    if !files.iter().all(|f| includes_are_local(f)) {
        return;
    }
    let d = dir();
    for (i, name) in NAMES.iter().enumerate() {
        let p = d.join(name);
        match files.get(i) {
            Some(body) => std::fs::write(&p, body).expect("write fuzz config"),
            None => {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let main = d.join(NAMES[0]);
    match portcullis::config::load(&main) {
        Ok(loaded) => {
            let policy = loaded.policy;
            let hosts = [
                Host::parse("api.openai.com").unwrap(),
                Host::parse("chat.deepseek.com").unwrap(),
                Host::from_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
                Host::from_ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ];
            for host in &hosts {
                for (path, user) in [
                    (Some("/v1/chat/completions"), None),
                    (Some("/v1/files"), Some("alice")),
                    (None, Some("bob")),
                ] {
                    let req = Request {
                        client: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                        user,
                        method: &Method::POST,
                        host,
                        port: 443,
                        path,
                        body: Default::default(),
                    };
                    let d = policy.decide(&req);
                    let _ = d.enforced();
                }
            }
            let _ = policy.groups_of("alice").count();
        }
        Err(e) => {
            assert!(e.line >= 1 && e.col >= 1, "{e}");
            let shown = e.to_string();
            assert!(
                shown.starts_with(&format!("{}:{}:{}: ", e.file, e.line, e.col)),
                "{shown}"
            );
            if let Some(i) = NAMES
                .iter()
                .position(|n| d.join(n).display().to_string() == e.file)
            {
                // A file that could not be read is reported at 1:1 of itself.
                let body = files.get(i).copied().unwrap_or("");
                let lines: Vec<&str> = body.split('\n').collect();
                assert!(e.line <= lines.len(), "{e} ({} lines)", lines.len());
                let width = lines[e.line - 1].chars().count();
                assert!(e.col <= width + 1, "{e} (line is {width} chars)");
            }
        }
    }
});
