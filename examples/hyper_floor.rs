//! The floor under portcullis's plain-HTTP path: the same hyper server and pooled hyper-util
//! client, forwarding absolute-form requests with no policy, audit, metrics or limits. Run it as
//! a peer in `../shared/bench/peers.sh` to see what the framework costs before the product
//! adds anything (see benches/README.md). Not a proxy to deploy: it forwards anywhere.
//!
//!   cargo run --release --example hyper_floor -- 127.0.0.1:18899

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

type Upstream = Client<HttpConnector, Incoming>;
type Reply = Response<Either<Incoming, Empty<bytes::Bytes>>>;

async fn forward(client: Upstream, req: Request<Incoming>) -> Result<Reply, Infallible> {
    if req.uri().scheme().is_none() {
        let mut bad = Response::new(Either::Right(Empty::new()));
        *bad.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(bad);
    }
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(Either::Left),
        Err(_) => {
            let mut bad = Response::new(Either::Right(Empty::new()));
            *bad.status_mut() = StatusCode::BAD_GATEWAY;
            bad
        }
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
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| forward(client.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
