//! The shared harness of the integration tests: fake vendor origins (HTTP and HTTPS with an
//! rcgen CA made at test time), a proxy configuration builder, the real proxy in-process or as
//! the real binary, raw clients for what reqwest and curl refuse to send, and readers for the
//! audit log and /metrics. Everything listens on 127.0.0.1 with ephemeral ports.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// No single step of a test may take longer than this.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const VENDORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Runs `f`, failing the test with `what` if it has not finished within [`DEADLINE`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}

/// Polls `probe` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    within(what, async {
        loop {
            if let Some(v) = probe() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Certificates

pub struct Certs {
    pub ca_pem: String,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// Names the fake HTTPS origins answer for.
const CERT_NAMES: &[&str] = &[
    "api.openai.com",
    "api.deepseek.com",
    "api.anthropic.com",
    "localhost",
];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and one leaf for the vendor names, made once per test binary.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "portcullis test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let leaf_key = KeyPair::generate().expect("leaf key");
        let names = CERT_NAMES.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let leaf = CertificateParams::new(names)
            .expect("leaf params")
            .signed_by(&leaf_key, &ca, &ca_key)
            .expect("leaf cert");

        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
            .expect("server config");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Certs {
            ca_pem: ca.pem(),
            server: Arc::new(server),
            client: Arc::new(client),
        }
    })
}

/// A TLS handshake with `sni` over an established stream (e.g. a CONNECT tunnel).
pub async fn tls_handshake(
    stream: TcpStream,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    tokio_rustls::TlsConnector::from(certs().client.clone())
        .connect(name, stream)
        .await
}

// ---------------------------------------------------------------------------------------------
// Fake vendor origins

/// What an origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    /// [`fnv1a`] of the body: tells whether the bytes arrived as sent, in order.
    pub body_fnv: u64,
}

/// FNV-1a, 64 bits, continued from `h` (start with [`FNV_START`]).
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// An HTTP(S) origin on 127.0.0.1. Paths: `/download/N` streams N bytes; `/slow/...` answers
/// after 50 ms; anything else reads the body (streaming, counting) and answers
/// `origin saw N bytes` with `x-origin: fake`.
pub struct Origin {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// `/sse` sends its first event, then waits for a permit here before the last.
    gate: Arc<tokio::sync::Semaphore>,
    counts: Arc<OriginCounts>,
}

/// Connections an origin accepted and requests it answered at once.
#[derive(Default)]
struct OriginCounts {
    connections: AtomicUsize,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// One request inside the origin's handler, counted in and out.
struct Answering(Arc<OriginCounts>);

impl Answering {
    fn new(counts: &Arc<OriginCounts>) -> Answering {
        let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counts.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        Answering(counts.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

type OriginBody = BoxBody<Bytes, std::convert::Infallible>;

impl Origin {
    pub async fn http() -> Origin {
        Origin::start(false, false).await
    }

    pub async fn https() -> Origin {
        Origin::start(true, false).await
    }

    /// HTTPS offering ALPN h2 and http/1.1, serving whichever the client picks.
    pub async fn https_h2() -> Origin {
        Origin::start(true, true).await
    }

    /// Lets a waiting `/sse` response send its last event.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    async fn start(tls: bool, h2: bool) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let counts = Arc::new(OriginCounts::default());
        let log = seen.clone();
        let g = gate.clone();
        let c = counts.clone();
        let acceptor = tls.then(|| {
            let mut cfg = (*certs().server).clone();
            if h2 {
                cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            }
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                let gate = g.clone();
                let counts = c.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                serve_origin(s, log, gate, counts).await
                            }
                        }
                        None => serve_origin(stream, log, gate, counts).await,
                    }
                });
            }
        });
        Origin {
            addr,
            seen,
            gate,
            counts,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.counts.connections.load(Ordering::SeqCst)
    }

    /// The most requests the origin has had in hand at once.
    pub fn peak_in_flight(&self) -> usize {
        self.counts.peak_in_flight.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("origin log").clone()
    }

    /// The one request seen with this path (and query), waiting for its body to finish.
    pub async fn request(&self, path: &str) -> Seen {
        eventually(&format!("origin to see {path}"), || {
            self.requests().into_iter().find(|s| s.uri == path)
        })
        .await
    }
}

async fn serve_origin<I>(
    io: I,
    log: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<tokio::sync::Semaphore>,
    counts: Arc<OriginCounts>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let answering = Answering::new(&counts);
        let answer = origin_answer(req, log.clone(), gate.clone());
        async move {
            let r = answer.await;
            drop(answering);
            r
        }
    });
    // Speaks HTTP/2 when the client starts with its preface (after ALPN h2), else HTTP/1.1.
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

async fn origin_answer(
    req: Request<Incoming>,
    log: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<tokio::sync::Semaphore>,
) -> Result<Response<OriginBody>, std::convert::Infallible> {
    static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];
    let (parts, mut body) = req.into_parts();
    let mut body_len = 0u64;
    let mut body_fnv = FNV_START;
    while let Some(frame) = body.frame().await {
        match frame.map(|f| f.into_data()) {
            Ok(Ok(d)) => {
                body_len += d.len() as u64;
                body_fnv = fnv1a(body_fnv, &d);
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    let path = parts.uri.path().to_string();
    log.lock().expect("origin log").push(Seen {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or(path.clone(), |p| p.to_string()),
        headers: parts.headers,
        body_len,
        body_fnv,
    });
    if path.starts_with("/slow") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if path == "/sse" {
        // Server-sent events: the first now, the last only once the test has seen the first.
        let events = futures_util::stream::unfold(0u8, move |n| {
            let gate = gate.clone();
            async move {
                match n {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"data: first\n\n"))), 1)),
                    1 => {
                        gate.acquire().await.expect("gate").forget();
                        Some((Ok(Frame::data(Bytes::from_static(b"data: last\n\n"))), 2))
                    }
                    _ => None,
                }
            }
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(events)));
        resp.headers_mut()
            .insert("content-type", "text/event-stream".parse().expect("header"));
        return Ok(resp);
    }
    if let Some(n) = path.strip_prefix("/sized/") {
        // `n` bytes with their length announced, and the body's end only later: as an HTTP/2
        // origin whose END_STREAM comes in a frame of its own.
        let n: usize = n.parse().expect("size");
        let frames = futures_util::stream::unfold(0u8, move |step| async move {
            match step {
                0 => Some((Ok(Frame::data(Bytes::from(vec![b's'; n]))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    None
                }
                _ => None,
            }
        });
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        resp.headers_mut()
            .insert("content-length", n.to_string().parse().expect("header"));
        return Ok(resp);
    }
    if let Some(n) = path.strip_prefix("/trailers/") {
        // As a gRPC answer ends: a body, then status in trailer fields; `n` bytes of filler
        // in a head field and in a trailer field, to check how large each may be.
        let filler = "f".repeat(n.parse().expect("filler size"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("trailer"));
        trailers.insert("x-filler", filler.parse().expect("trailer"));
        let frames = futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"ok"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        resp.headers_mut()
            .insert("x-filler", filler.parse().expect("header"));
        resp.headers_mut()
            .insert("trailer", "grpc-status, x-filler".parse().expect("header"));
        return Ok(resp);
    }
    let body: OriginBody = match path.strip_prefix("/download/") {
        Some(n) => {
            let total: u64 = n.parse().expect("download size");
            let chunks = total.div_ceil(CHUNK.len() as u64);
            let stream = futures_util::stream::iter((0..chunks).map(move |i| {
                let len = (total - i * CHUNK.len() as u64).min(CHUNK.len() as u64) as usize;
                Ok(Frame::data(Bytes::from_static(&CHUNK[..len])))
            }));
            BodyExt::boxed(StreamBody::new(stream))
        }
        None => Full::new(Bytes::from(format!("origin saw {body_len} bytes"))).boxed(),
    };
    let mut resp = Response::new(body);
    resp.headers_mut()
        .insert("x-origin", "fake".parse().expect("header"));
    let version = format!("{:?}", parts.version);
    resp.headers_mut()
        .insert("x-origin-version", version.parse().expect("header"));
    Ok(resp)
}

/// A TCP origin that accepts, counts the bytes it receives and never answers.
pub struct Sink {
    pub addr: SocketAddr,
    received: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
}

impl Sink {
    pub async fn start() -> Sink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let received = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (r, a) = (received.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        r.fetch_add(n as u64, Ordering::SeqCst);
                    }
                });
            }
        });
        Sink {
            addr,
            received,
            accepted,
        }
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A loopback port that nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Proxy configuration

/// A proxy configuration: the shipped catalog, the shipped `block-deepseek` rule, an audit
/// file in the test's directory, plus whatever the test adds.
#[derive(Clone)]
pub struct Config {
    resolve: Vec<(String, SocketAddr)>,
    allow_loopback: bool,
    proxy: Vec<String>,
    upstream: Vec<String>,
    audit: Vec<String>,
    audit_path: Option<PathBuf>,
    admin: Vec<String>,
    default_action: &'static str,
    tail: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resolve: Vec::new(),
            allow_loopback: false,
            proxy: Vec::new(),
            upstream: Vec::new(),
            audit: Vec::new(),
            audit_path: None,
            admin: Vec::new(),
            default_action: "allow",
            tail: String::new(),
        }
    }
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// Points `host` (ports 80 and 443) at `addr` and allows 127.0.0.0/8 upstream.
    pub fn vendor(mut self, host: &str, addr: SocketAddr) -> Config {
        for port in [80, 443] {
            self.resolve.push((format!("{host}:{port}"), addr));
        }
        self.loopback()
    }

    /// `resolve = { "host:port" = addr }`, without opening the guard.
    pub fn resolve(mut self, host_port: &str, addr: SocketAddr) -> Config {
        self.resolve.push((host_port.to_string(), addr));
        self
    }

    /// `allow_private = ["127.0.0.0/8"]`.
    pub fn loopback(mut self) -> Config {
        self.allow_loopback = true;
        self
    }

    /// A line in `[proxy]`, e.g. `header_read_timeout = "1s"`.
    pub fn proxy(mut self, line: &str) -> Config {
        self.proxy.push(line.to_string());
        self
    }

    /// A line in `[upstream]`.
    pub fn upstream(mut self, line: &str) -> Config {
        self.upstream.push(line.to_string());
        self
    }

    /// A line in `[admin]`, e.g. `token_file = "..."`.
    pub fn admin(mut self, line: &str) -> Config {
        self.admin.push(line.to_string());
        self
    }

    /// A line in `[audit]`, e.g. `on_full = "block"`.
    pub fn audit(mut self, line: &str) -> Config {
        self.audit.push(line.to_string());
        self
    }

    /// The audit sink at `path` (a FIFO, `/dev/full`) instead of `audit.jsonl` in the test's
    /// directory; `Proxy::audit` then names it.
    pub fn audit_path(mut self, path: &Path) -> Config {
        self.audit_path = Some(path.to_path_buf());
        self
    }

    /// Where the audit log goes for a proxy whose directory is `dir`.
    pub fn audit_file(&self, dir: &Path) -> PathBuf {
        self.audit_path
            .clone()
            .unwrap_or_else(|| dir.join("audit.jsonl"))
    }

    /// `[defaults] action = "block"`: nothing unexpected leaves the machine even if a test
    /// finds a bug.
    pub fn default_block(mut self) -> Config {
        self.default_action = "block";
        self
    }

    /// TOML appended after the shipped rule: more `[[rule]]`s, `[auth]`, `[groups]`.
    pub fn tail(mut self, toml: &str) -> Config {
        self.tail.push_str(toml);
        self.tail.push('\n');
        self
    }

    /// Writes `portcullis.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path, listen: SocketAddr, admin: SocketAddr) -> PathBuf {
        let resolve = self
            .resolve
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let allow = if self.allow_loopback {
            "\"127.0.0.0/8\""
        } else {
            ""
        };
        let text = format!(
            "include = [\"{VENDORS}\"]\n\n[proxy]\nlisten = \"{listen}\"\n{proxy}\n\n\
             [admin]\nlisten = \"{admin}\"\n{admin_lines}\n\n[audit]\npath = \"{audit}\"\n{audit_lines}\n\n\
             [upstream]\nresolve = {{ {resolve} }}\nallow_private = [{allow}]\n{upstream}\n\n\
             [defaults]\naction = \"{default}\"\n\n\
             [[rule]]\nid = \"block-deepseek\"\nvendor = \"deepseek\"\naction = \"block\"\n\
             reason = \"DeepSeek is not approved (policy SEC-12)\"\n\n{tail}",
            proxy = self.proxy.join("\n"),
            audit = self.audit_file(dir).display(),
            audit_lines = self.audit.join("\n"),
            admin_lines = self.admin.join("\n"),
            upstream = self.upstream.join("\n"),
            default = self.default_action,
            tail = self.tail,
        );
        let path = dir.join("portcullis.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy under test

enum Run {
    InProcess(Option<portcullis::app::Running>),
    Binary(tokio::process::Child),
}

pub struct Proxy {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub audit: PathBuf,
    run: Run,
}

impl Proxy {
    /// The real server in this process, on ephemeral ports.
    pub async fn start(cfg: Config) -> Proxy {
        let dir = TempDir::new().expect("tempdir");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let path = cfg.write(dir.path(), any, any);
        let loaded = portcullis::config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
        let running = portcullis::app::start(loaded)
            .await
            .unwrap_or_else(|e| panic!("start proxy: {e}"));
        Proxy {
            addr: running.proxy_addr,
            admin: running.admin_addr.expect("admin listener"),
            audit: cfg.audit_file(dir.path()),
            dir,
            run: Run::InProcess(Some(running)),
        }
    }

    /// The real binary (`portcullis run --config`), on ports picked free for it; returns once
    /// both listeners accept. Its stdout and stderr go to `stdout.log` and `stderr.log` in
    /// its directory.
    pub async fn spawn(cfg: Config) -> Proxy {
        Proxy::spawn_with(cfg, &[]).await
    }

    /// [`Proxy::spawn`] with extra environment variables (e.g. `RUST_LOG`).
    pub async fn spawn_with(cfg: Config, env: &[(&str, &str)]) -> Proxy {
        let dir = TempDir::new().expect("tempdir");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = cfg.write(dir.path(), addr, admin);
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("stdout log");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("stderr log");
        let child = tokio::process::Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn portcullis");
        let proxy = Proxy {
            addr,
            admin,
            audit: cfg.audit_file(dir.path()),
            dir,
            run: Run::Binary(child),
        };
        within("the binary to listen", async {
            for a in [addr, admin] {
                while TcpStream::connect(a).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        proxy
    }

    /// What the binary wrote on stdout and stderr so far.
    pub fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("stderr.log"))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The binary's process id.
    pub fn pid(&self) -> u32 {
        match &self.run {
            Run::Binary(c) => c.id().expect("running child"),
            Run::InProcess(_) => panic!("in-process proxy has no pid"),
        }
    }

    /// reqwest through this proxy, trusting the test CA.
    pub fn client(&self) -> reqwest::Client {
        self.client_with(reqwest::Proxy::all(self.url()).expect("proxy url"))
    }

    /// reqwest through this proxy with `Proxy-Authorization: Basic user:password`.
    pub fn client_as(&self, user: &str, password: &str) -> reqwest::Client {
        let proxy = reqwest::Proxy::all(self.url()).expect("proxy url");
        self.client_with(proxy.basic_auth(user, password))
    }

    fn client_with(&self, proxy: reqwest::Proxy) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(proxy)
            .add_root_certificate(
                reqwest::Certificate::from_pem(certs().ca_pem.as_bytes()).expect("CA pem"),
            )
            .timeout(DEADLINE)
            .build()
            .expect("client")
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let resp = within(
            "admin request",
            client.get(format!("http://{}{path}", self.admin)).send(),
        )
        .await
        .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.text().await.expect("admin body"))
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200);
        body
    }

    /// `portcullis_upstream_errors_total{kind}` now.
    pub async fn upstream_errors(&self, kind: &str) -> f64 {
        let text = self.metrics().await;
        metric(&text, "portcullis_upstream_errors_total", &[("kind", kind)])
    }

    /// The audit file's text as it is now.
    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit).unwrap_or_default()
    }

    /// Every audit record written so far. A read can land while the writer's `write` is
    /// under way and see the start of a line: what follows the last newline is not a record
    /// yet.
    pub fn audit_records(&self) -> Vec<Value> {
        let text = self.audit_text();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// Waits until at least `n` audit records are written; returns them all.
    pub async fn audit_at_least(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} audit records"), || {
            Some(self.audit_records()).filter(|r| r.len() >= n)
        })
        .await
    }

    /// Waits for the first audit record that `pred` accepts.
    pub async fn audit_where(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        eventually(&format!("audit record: {what}"), || {
            self.audit_records().into_iter().find(|r| pred(r))
        })
        .await
    }

    /// Waits for the audit record of the request whose path (as logged) is `path`.
    pub async fn audit_path(&self, path: &str) -> Value {
        self.audit_where(path, |r| r["path"] == path).await
    }

    /// Rewrites this proxy's config through `edit`, then reloads it: the admin's status.
    pub async fn reload_edited(&self, edit: impl FnOnce(String) -> String) -> u16 {
        let path = self.dir.path().join("portcullis.toml");
        let text = std::fs::read_to_string(&path).expect("read config");
        let tmp = self.dir.path().join("portcullis.toml.new");
        std::fs::write(&tmp, edit(text)).expect("write config");
        std::fs::rename(&tmp, &path).expect("replace config");
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
            .post(format!("http://{}/reload", self.admin))
            .send()
            .await
            .expect("POST /reload")
            .status()
            .as_u16()
    }

    /// Waits for the audit record of a CONNECT to `host`.
    pub async fn audit_connect(&self, host: &str) -> Value {
        self.audit_where(host, |r| r["method"] == "CONNECT" && r["host"] == host)
            .await
    }

    /// Binary: its exit status once it stops by itself (after a signal the test sent).
    pub async fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.run {
            Run::Binary(child) => Some(within("binary exit", child.wait()).await.expect("wait")),
            Run::InProcess(_) => None,
        }
    }

    /// In-process: stop and drain. Binary: SIGTERM, then the exit status.
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        match &mut self.run {
            Run::InProcess(r) => {
                within("proxy shutdown", r.take().expect("running").shutdown()).await;
                None
            }
            Run::Binary(child) => {
                let pid = child.id().expect("running child").to_string();
                let kill = std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .expect("kill");
                assert!(kill.success());
                Some(
                    within("binary exit after SIGTERM", child.wait())
                        .await
                        .expect("wait"),
                )
            }
        }
    }
}

/// Plain HTTP origins for OpenAI and DeepSeek behind an in-process proxy (shipped rules).
pub async fn openai_and_deepseek() -> (Origin, Origin, Proxy) {
    let openai = Origin::http().await;
    let deepseek = Origin::http().await;
    let proxy = Proxy::start(
        Config::new()
            .vendor("api.openai.com", openai.addr)
            .vendor("api.deepseek.com", deepseek.addr),
    )
    .await;
    (openai, deepseek, proxy)
}

// ---------------------------------------------------------------------------------------------
// Raw clients

/// A response read off a raw connection.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// Sends a reqwest request and keeps what the client saw, in the same shape as a raw answer.
pub async fn fetch(req: reqwest::RequestBuilder) -> Raw {
    within("request through the proxy", async {
        let resp = req.send().await.expect("request");
        let mut head = format!("HTTP/1.1 {}\r\n", resp.status().as_u16());
        for (k, v) in resp.headers() {
            head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
        }
        Raw {
            status: resp.status().as_u16(),
            head,
            body: resp.text().await.expect("response body"),
        }
    })
    .await
}

/// Reads one response head, byte by byte so that nothing after it is consumed.
pub async fn read_head(s: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await.unwrap_or_else(|e| {
            panic!(
                "connection ended inside a response head ({e}): {:?}",
                String::from_utf8_lossy(&head)
            )
        });
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    (status, head)
}

/// Sends `request` as it is and reads the answer to the end of the connection.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Raw {
    within("raw request", async {
        let mut s = TcpStream::connect(addr).await.expect("connect proxy");
        s.write_all(request).await.expect("write request");
        let (status, head) = read_head(&mut s).await;
        let mut body = Vec::new();
        let _ = s.read_to_end(&mut body).await;
        Raw {
            status,
            head,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    })
    .await
}

/// `GET target` with `Connection: close` and any extra header lines ("Name: value").
pub async fn raw_get(addr: SocketAddr, target: &str, headers: &[&str]) -> Raw {
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: proxy-test\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw(addr, req.as_bytes()).await
}

/// Sends `CONNECT authority` and returns the status, the head and the connection (a tunnel
/// after a 200).
pub async fn raw_connect(
    addr: SocketAddr,
    authority: &str,
    headers: &[&str],
) -> (u16, String, TcpStream) {
    within("CONNECT", async {
        let mut s = TcpStream::connect(addr).await.expect("connect proxy");
        let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write CONNECT");
        let (status, head) = read_head(&mut s).await;
        (status, head, s)
    })
    .await
}

/// A CONNECT the proxy refuses: its answer with the body (Content-Length bytes).
pub async fn connect_refused(addr: SocketAddr, authority: &str, headers: &[&str]) -> Raw {
    let (status, head, mut s) = raw_connect(addr, authority, headers).await;
    let mut r = Raw {
        status,
        head,
        body: String::new(),
    };
    let len: usize = r
        .header("content-length")
        .map_or(0, |v| v.parse().expect("length"));
    let mut body = vec![0u8; len];
    within("refusal body", s.read_exact(&mut body))
        .await
        .expect("refusal body");
    r.body = String::from_utf8_lossy(&body).into_owned();
    r
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.2, …): another
/// client address as far as the proxy can tell.
pub async fn connect_from(from: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = match from {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(from, 0))?;
    sock.connect(addr).await
}

/// Resident memory of a process, in kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Sets `TCP_CORK` on a socket: what is written then (and a FIN) leaves in one segment, so
/// the peer reads it all at once.
pub fn cork(socket: &impl std::os::fd::AsRawFd) {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and a c_int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_CORK");
}

/// Reads until the peer closes (cleanly or by reset); returns the bytes read.
pub async fn read_until_closed(s: &mut (impl AsyncRead + Unpin)) -> usize {
    within("the peer to close", async {
        let mut total = 0;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// curl

/// Runs curl with `args`; `None` (and a note) when curl is not installed.
pub async fn curl(args: &[&str]) -> Option<std::process::Output> {
    if std::process::Command::new("which")
        .arg("curl")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        eprintln!("note: curl not found; skipping the curl part of this test");
        return None;
    }
    let out = within(
        "curl",
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run curl");
    Some(out)
}

/// curl through `proxy`, body discarded; returns what `-w write_out` printed.
pub async fn curl_write_out(proxy: &Proxy, write_out: &str, url: &str) -> Option<String> {
    let out = curl(&["-x", &proxy.url(), "-o", "/dev/null", "-w", write_out, url]).await?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The test CA as a file, for `curl --cacert` and `[upstream] ca_file`.
pub fn ca_file(dir: &Path) -> PathBuf {
    let path = dir.join("test-ca.pem");
    std::fs::write(&path, &certs().ca_pem).expect("write CA");
    path
}

// ---------------------------------------------------------------------------------------------
// Metrics text

/// One sample: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parses the Prometheus text format (enough of it for these tests).
pub fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            let value: f64 = value.parse().expect("sample value");
            let Some((name, labels)) = series.split_once('{') else {
                return (series.to_string(), Vec::new(), value);
            };
            let mut out = Vec::new();
            let mut rest = labels.strip_suffix('}').expect("label set");
            while let Some((k, v)) = rest.split_once("=\"") {
                let end = v.find('"').expect("label value");
                out.push((k.trim_start_matches(',').to_string(), v[..end].to_string()));
                rest = &v[end + 1..];
            }
            (name.to_string(), out, value)
        })
        .collect()
}

/// The sum of the samples named `name` that carry every label in `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// Whether any sample named `name` exists.
pub fn has_metric(text: &str, name: &str) -> bool {
    samples(text).iter().any(|(n, _, _)| n == name)
}

// ---------------------------------------------------------------------------------------------
// Assertions shared by several files

/// A 403 from a block rule, as the client sees it.
pub fn assert_blocked(r: &Raw, rule: &str, vendor: &str) {
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-portcullis-rule"), Some(rule), "{r:?}");
    assert_eq!(r.header("x-portcullis-vendor"), Some(vendor), "{r:?}");
    let j = r.json();
    assert_eq!(j["error"], "blocked_by_policy");
    assert_eq!(j["rule"], rule);
    assert_eq!(j["vendor"], vendor);
    assert!(j["reason"].as_str().is_some_and(|s| !s.is_empty()), "{j}");
}

/// An audit record whose reason starts with `prefix` (an error kind, "sni_mismatch", ...).
pub fn assert_reason(rec: &Value, prefix: &str) {
    let reason = rec["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with(prefix),
        "reason should start with {prefix}: {rec}"
    );
}

/// An error answer naming `kind`.
pub fn assert_error(r: &Raw, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.json()["error"], kind, "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Servers tests need

/// A redis-server child on an ephemeral loopback port, killed on drop.
pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server` ({e}): the Redis limit-store tests need it on \
                     PATH (Debian: apt-get install redis-server)"
                )
            });
        let server = RedisServer {
            child: Some(child),
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
