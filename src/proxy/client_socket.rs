//! The client's TCP socket as the connection's HTTP server holds it, and what the connection
//! task learns through it while hyper owns it:
//! - whether bytes came in since the connection last started waiting for a head: a head
//!   timeout after some did is a request that never finished arriving (slowloris, or an
//!   attempt cut short) and gets an audit record; one on a quiet keep-alive connection does
//!   not;
//! - a close by reset, for an answer cut short: a client reading an answer that ends with the
//!   connection (HTTP/1.0, or no length) would take an orderly close for its whole end.
//!
//! The socket also holds the connection's places under `max_connections` and
//! `max_connections_per_client`, so they last as long as it is open: through a CONNECT tunnel
//! the connection became, and through a lingering close.
//!
//! And a lingering close (nginx's): when the connection ends with the client still sending (an
//! upload the proxy refused without reading it), what it sends is read and thrown away for a
//! while. Closed with unread data, the socket would send a reset, and a client still writing
//! its upload would see that reset instead of the 403 waiting in its receive buffer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::per_client::ClientSlot;

/// What the socket tells the connection task. Each field has one writer.
#[derive(Default)]
pub struct SocketNotes {
    /// Reads that returned bytes other than CR and LF (a client may send an empty line after
    /// a request, RFC 9112 §2.2, and it is no head), written by the socket only (so a load
    /// and a store, not a locked add, on every read).
    reads: AtomicU64,
    /// Set by the connection task: close with a reset instead of a FIN.
    reset: AtomicBool,
}

impl SocketNotes {
    /// Reads that returned bytes other than CR and LF so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// The connection is to end with a reset when the socket is dropped.
    pub fn reset_on_close(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

/// The longest a lingering close reads, and the longest it waits for the next bytes (nginx's
/// `lingering_time` and `lingering_timeout`, shorter).
const LINGER_FOR: Duration = Duration::from_secs(10);
const LINGER_GAP: Duration = Duration::from_secs(2);

/// A connection's places under the connection caps, given back when dropped.
pub struct Slots {
    pub permit: OwnedSemaphorePermit,
    /// `None` when `max_connections_per_client` is 0 (no cap).
    pub client: Option<ClientSlot>,
}

pub struct ClientSocket {
    /// Taken only by `drop`, for a lingering close.
    stream: Option<TcpStream>,
    notes: Arc<SocketNotes>,
    /// Taken only by `drop`, with the stream.
    slots: Option<Slots>,
}

impl ClientSocket {
    pub fn new(stream: TcpStream, slots: Slots) -> (ClientSocket, Arc<SocketNotes>) {
        let notes = Arc::new(SocketNotes::default());
        let socket = ClientSocket {
            stream: Some(stream),
            notes: notes.clone(),
            slots: Some(slots),
        };
        (socket, notes)
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for ClientSocket {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.notes.reset.load(Ordering::Relaxed) {
            // SO_LINGER with a zero timeout: the close sends RST and discards unsent data.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        }
        // Bytes waiting unread: the client is still sending. (A quiet socket, one at its end
        // or in error closes at once, as does every socket of a keep-alive client that left.)
        let mut probe = [0u8; 64];
        if matches!(stream.try_read(&mut probe), Ok(1..)) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(linger(stream, self.slots.take()));
            }
        }
    }
}

/// Ends the answer's side (FIN), then reads and discards until the client closes, goes quiet
/// for [`LINGER_GAP`] or [`LINGER_FOR`] has passed. The connection's slots are held meanwhile:
/// lingering sockets count against the caps, or a client could hold any number open.
async fn linger(mut stream: TcpStream, _slots: Option<Slots>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let until = tokio::time::Instant::now() + LINGER_FOR;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let gap = (tokio::time::Instant::now() + LINGER_GAP).min(until);
        match tokio::time::timeout_at(gap, stream.read(&mut buf)).await {
            Ok(Ok(1..)) => {}
            _ => return,
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
        let r = Pin::new(this.stream()?).poll_read(cx, buf);
        // The first byte settles it for every read but an empty line's.
        if buf.filled()[before..]
            .iter()
            .any(|b| !matches!(b, b'\r' | b'\n'))
        {
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
        Pin::new(self.get_mut().stream()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().stream()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().stream()?).poll_shutdown(cx)
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
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("permit");
        let slots = Slots {
            permit,
            client: None,
        };
        let (socket, notes) = ClientSocket::new(accepted, slots);
        (socket, notes, peer)
    }

    #[tokio::test]
    async fn reads_that_bring_bytes_are_counted() {
        let (mut socket, notes, mut peer) = pair().await;
        assert_eq!(notes.reads(), 0);
        peer.write_all(b"\r\n").await.expect("write");
        let mut line = [0u8; 2];
        socket.read_exact(&mut line).await.expect("read");
        assert_eq!(notes.reads(), 0, "an empty line is no head");
        peer.write_all(b"GET ").await.expect("write");
        let mut buf = [0u8; 16];
        let n = socket.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET ");
        assert_eq!(notes.reads(), 1);
        drop(peer);
        assert_eq!(socket.read(&mut buf).await.expect("eof"), 0);
        assert_eq!(notes.reads(), 1, "the end of the stream is no bytes");
    }

    /// The client uploads 8 MiB; the proxy answers after the first bytes and closes without
    /// reading the rest. Lingering, the client finishes its upload and reads the answer and an
    /// orderly end; closed at once, it would get a reset mid-upload.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_still_uploading_at_the_close_gets_to_read_the_answer() {
        let (mut socket, _notes, peer) = pair().await;
        let (mut from_proxy, mut to_proxy) = peer.into_split();
        let upload = tokio::spawn(async move {
            let chunk = vec![b'u'; 64 * 1024];
            for _ in 0..128 {
                to_proxy.write_all(&chunk).await?;
            }
            to_proxy.shutdown().await
        });
        let mut first = [0u8; 1024];
        let n = socket.read(&mut first).await.expect("the upload starts");
        assert!(n > 0);
        socket
            .write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            .await
            .expect("answer");
        drop(socket);
        let sent = tokio::time::timeout(Duration::from_secs(10), upload)
            .await
            .expect("the upload ends")
            .expect("task");
        assert!(sent.is_ok(), "the upload was cut: {sent:?}");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), from_proxy.read_to_end(&mut answer))
            .await
            .expect("the answer ends")
            .expect("an orderly end, not a reset");
        assert_eq!(answer, b"HTTP/1.1 403 Forbidden\r\n\r\n");
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
