//! The lowest floor hyper allows for a plain-HTTP forward proxy: hyper's HTTP/1 server, and
//! hyper's HTTP/1 client connection (`hyper::client::conn::http1`, no pool) pinned to the client
//! connection that uses it, so a request costs no pool lookup at all. No policy, audit, metrics
//! or limits. `examples/hyper_floor.rs` is the pooled hyper-util client, which costs more per
//! request than portcullis's own pool; this is the figure to hold portcullis against when asking
//! what the product adds over hyper, and whether a target is reachable on hyper at all.
//! Not a proxy to deploy: it forwards anywhere.
//!
//!   cargo run --release --example hyper_conn_floor -- 127.0.0.1:18899

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Reply = Response<Either<Incoming, Empty<bytes::Bytes>>>;

/// The upstream connection of one client connection, and the authority it goes to.
type Pinned = Arc<Mutex<Option<(String, client::SendRequest<Incoming>)>>>;

fn status(code: StatusCode) -> Reply {
    let mut r = Response::new(Either::Right(Empty::new()));
    *r.status_mut() = code;
    r
}

async fn forward(pinned: Pinned, mut req: Request<Incoming>) -> Result<Reply, hyper::Error> {
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        return Ok(status(StatusCode::BAD_REQUEST));
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    *req.uri_mut() = path.parse().expect("a path from a URI parses");
    // One request at a time per client connection (HTTP/1.1): the lock is never contended.
    let mut slot = pinned.lock().await;
    let reuse = matches!(&*slot, Some((a, tx)) if *a == authority && !tx.is_closed());
    if !reuse {
        let addr = if authority.contains(':') {
            authority.clone()
        } else {
            format!("{authority}:80")
        };
        let Ok(tcp) = TcpStream::connect(addr).await else {
            return Ok(status(StatusCode::BAD_GATEWAY));
        };
        tcp.set_nodelay(true).ok();
        let (tx, conn) = client::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        *slot = Some((authority, tx));
    }
    let (_, tx) = slot.as_mut().expect("set above");
    if tx.ready().await.is_err() {
        *slot = None;
        return Ok(status(StatusCode::BAD_GATEWAY));
    }
    Ok(match tx.send_request(req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18899".into())
        .parse()
        .expect("listen address");
    assert!(addr.ip().is_loopback(), "the floor serves loopback only");
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let pinned: Pinned = Arc::new(Mutex::new(None));
            let service = service_fn(move |req| forward(pinned.clone(), req));
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
