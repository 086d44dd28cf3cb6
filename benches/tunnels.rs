//! Memory per idle tunnel: opens N CONNECT tunnels through the release binary to a loopback
//! sink (each sends a real ClientHello, so it is past the SNI check and spliced, as a browser's
//! idle keep-alive tunnel is), then reads the proxy's VmRSS from /proc.
//!
//!   cargo bench --bench tunnels                 # 10,000 tunnels
//!   TUNNELS=2000 cargo bench --bench tunnels
//!
//! Needs 2 descriptors per tunnel in each process (client and sink here; client side and
//! upstream side in the proxy): it raises its own limit as far as the hard limit allows, and
//! opens as many tunnels as both processes' limits leave room for once warmed up.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// Tunnels opened before the first reading, so the allocator's and runtime's first growth is
/// not counted as the tunnels'.
const WARM: usize = 16;

/// Raises the open-files limit as far as allowed; returns the soft limit now in force.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_max = lim.rlim_max.max(want);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Descriptors `pid` has open now.
fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count() as u64
}

/// The soft open-files limit `pid` runs under.
fn fd_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS")
}

/// The first record of a TLS 1.2-style ServerHello (no session id, no extensions): enough for
/// the proxy to tell it is not a HelloRetryRequest.
const SERVER_HELLO: [u8; 49] = {
    let mut r = [0u8; 49];
    let head = [0x16, 0x03, 0x03, 0x00, 44, 0x02, 0x00, 0x00, 40, 0x03, 0x03];
    let mut i = 0;
    while i < head.len() {
        r[i] = head[i];
        i += 1;
    }
    // The random: anything but the HelloRetryRequest's.
    while i < head.len() + 32 {
        r[i] = 0x5a;
        i += 1;
    }
    // session id length 0, cipher suite, compression 0, extensions length 0.
    r[i + 1] = 0xc0;
    r[i + 2] = 0x2f;
    r
};

/// A ClientHello as rustls sends it for `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("hello");
    }
    out
}

async fn open_tunnel(proxy: SocketAddr, hello: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: tunnel.test:443\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("closed before 200"));
        }
        head.push(byte[0]);
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&head).to_string(),
        ));
    }
    s.write_all(hello).await?;
    Ok(s)
}

async fn settle(pid: u32) -> u64 {
    let mut last = rss_kib(pid);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = rss_kib(pid);
        if now.abs_diff(last) < 64 {
            return now;
        }
        last = now;
    }
    last
}

#[tokio::main]
async fn main() {
    let want: usize = std::env::var("TUNNELS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // Each process holds two descriptors per tunnel; a container may cap the hard limit.
    let limit = raise_nofile(2 * want as u64 + 1024);

    let sink = TcpListener::bind("127.0.0.1:0").await.expect("sink");
    let sink_addr = sink.local_addr().expect("sink addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = sink.accept().await {
            // A ServerHello that is not a HelloRetryRequest: the proxy passes it on and splices,
            // as after a real handshake. Then nothing more either way: an idle tunnel.
            let _ = s.write_all(&SERVER_HELLO).await;
            held.push(s);
        }
    });

    let dir = tempfile::TempDir::new().expect("tempdir");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
        l.local_addr().expect("addr").port()
    };
    let proxy_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let cfg = dir.path().join("portcullis.toml");
    let mut f = std::fs::File::create(&cfg).expect("config");
    write!(
        f,
        "include = [\"{vendors}\"]\n\
         [proxy]\nlisten = \"{proxy_addr}\"\nmax_connections = {max}\nmax_connections_per_client = 0\nidle_timeout = \"600s\"\n\
         [admin]\nlisten = \"off\"\n\
         [audit]\npath = \"{audit}\"\n\
         [upstream]\nresolve = {{ \"tunnel.test:443\" = \"{sink_addr}\" }}\nallow_private = [\"127.0.0.0/8\"]\n\
         [[rule]]\nid = \"block-deepseek\"\nvendor = \"deepseek\"\naction = \"block\"\n",
        vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml"),
        // Open tunnels hold their places: the warm-up ones, the measured ones, and room.
        max = want + WARM + 200,
        audit = dir.path().join("audit.jsonl").display(),
    )
    .expect("write config");
    drop(f);

    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn portcullis");
    let pid = child.id().expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(proxy_addr).await.is_err() {
        assert!(Instant::now() < deadline, "proxy did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let hello = Arc::new(client_hello("tunnel.test"));
    // Warm up the allocator and runtime, then measure from there.
    let mut warm = Vec::new();
    for _ in 0..WARM {
        warm.push(open_tunnel(proxy_addr, &hello).await.expect("warm tunnel"));
    }
    let before = settle(pid).await;
    // Room left in each process once warm, less a few descriptors for what the proxy opens on
    // the side (a log rotation, a resolver socket).
    let room = |limit: u64, open: u64| (limit.saturating_sub(open + 8) / 2) as usize;
    let own = std::process::id();
    let n = want
        .min(room(limit, open_fds(own)))
        .min(room(fd_limit(pid), open_fds(pid)));
    if n < want {
        println!(
            "tunnels: the open-files limits (here {limit}, the proxy's {}) leave room for {n} tunnels, not {want}",
            fd_limit(pid)
        );
    }

    let start = Instant::now();
    let mut tunnels = Vec::with_capacity(n);
    let mut opened = 0;
    while opened < n {
        let batch: Vec<_> = (0..(n - opened).min(200))
            .map(|_| {
                let h = hello.clone();
                tokio::spawn(async move { open_tunnel(proxy_addr, &h).await })
            })
            .collect();
        for t in batch {
            tunnels.push(t.await.expect("join").expect("tunnel"));
            opened += 1;
        }
    }
    let after = settle(pid).await;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "tunnels: {n} idle tunnels opened in {:.1}s; proxy RSS {before} KiB -> {after} KiB; {:.1} KiB per tunnel ({per:.0} bytes)",
        start.elapsed().as_secs_f64(),
        per / 1024.0
    );
    drop(tunnels);
    drop(warm);
    let _ = child.kill().await;
}
