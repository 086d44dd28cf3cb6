//! The client's TCP socket as the connection's HTTP server holds it, and what the connection
//! task learns through it while hyper owns it:
//! - whether bytes came in since the connection last started waiting for a head: a head
//!   timeout after some did is a request that never finished arriving (slowloris, or an
//!   attempt cut short) and gets an audit record; one on a quiet keep-alive connection does
//!   not;
//! - a close by reset, for an answer cut short: a client reading an answer that ends with the
//!   connection (HTTP/1.0, or no length) would take an orderly close for its whole end.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the socket tells the connection task. Each field has one writer.
#[derive(Default)]
pub struct SocketNotes {
    /// Reads that returned bytes, written by the socket only (so a load and a store, not a
    /// locked add, on every read).
    reads: AtomicU64,
    /// Set by the connection task: close with a reset instead of a FIN.
    reset: AtomicBool,
}

impl SocketNotes {
    /// Reads that returned bytes so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The connection is to end with a reset when the socket is dropped.
    pub fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

pub struct ClientSocket {
    stream: TcpStream,
    notes: Arc<SocketNotes>,
}

impl ClientSocket {
    pub fn new(stream: TcpStream) -> (ClientSocket, Arc<SocketNotes>) {
        let notes = Arc::new(SocketNotes::default());
        let socket = ClientSocket {
            stream,
            notes: notes.clone(),
        };
        (socket, notes)
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        if self.notes.reset.load(Ordering::Relaxed) {
            // SO_LINGER with a zero timeout: the close sends RST and discards unsent data.
            let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ClientSocket {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            let reads = &this.notes.reads;
            reads.store(reads.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (ClientSocket, Arc<SocketNotes>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let (socket, notes) = ClientSocket::new(accepted);
        (socket, notes, peer)
    }

    #[tokio::test]
    async fn reads_that_bring_bytes_are_counted() {
        let (mut socket, notes, mut peer) = pair().await;
        assert_eq!(notes.reads(), 0);
        peer.write_all(b"GET ").await.expect("write");
        let mut buf = [0u8; 16];
        let n = socket.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET ");
        assert_eq!(notes.reads(), 1);
        drop(peer);
        assert_eq!(socket.read(&mut buf).await.expect("eof"), 0);
        assert_eq!(notes.reads(), 1, "the end of the stream is no bytes");
    }

    #[tokio::test]
    async fn a_socket_marked_for_reset_closes_with_one() {
        for reset in [false, true] {
            let (socket, notes, mut peer) = pair().await;
            if reset {
                notes.reset_on_close();
            }
            drop(socket);
            let mut buf = [0u8; 16];
            let got = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf))
                .await
                .expect("the close arrives");
            match reset {
                true => assert_eq!(
                    got.expect_err("a reset").kind(),
                    io::ErrorKind::ConnectionReset
                ),
                false => assert_eq!(got.expect("an orderly close"), 0),
            }
        }
    }
}
