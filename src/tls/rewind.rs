//! A stream that first replays bytes already read from it: the ClientHello we peeked at has to
//! reach the TLS acceptor too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Rewind<S> {
        Rewind {
            prefix: released_if_empty(prefix),
            inner,
        }
    }
}

/// A slice, even an empty one, keeps the whole buffer it was cut from (hyper's read buffer, the
/// peeked hello): held for a tunnel's life, that is kilobytes per idle tunnel.
fn released_if_empty(b: Bytes) -> Bytes {
    match b.is_empty() {
        true => Bytes::new(),
        false => b,
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.prefix = released_if_empty(std::mem::take(&mut this.prefix));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_prefix_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b" world")
            .await
            .unwrap();
        drop(a);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    /// The buffer a prefix was cut from is let go once the prefix is read, or at once if it is
    /// empty: a tunnel must not hold the connection's read buffer for its whole life.
    #[tokio::test]
    async fn lets_go_of_the_buffer_behind_the_prefix() {
        let mut whole = bytes::BytesMut::with_capacity(8192);
        whole.extend_from_slice(b"CONNECT ... \r\n\r\nhello");
        let whole = whole.freeze();
        let at = whole.len() - 5;

        let empty = Rewind::new(whole.slice(whole.len()..), tokio::io::empty());
        assert!(whole.is_unique(), "an empty prefix still holds the buffer");
        drop(empty);

        let (_a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(whole.slice(at..), b);
        assert!(!whole.is_unique());
        let mut got = [0u8; 5];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(
            whole.is_unique(),
            "a consumed prefix still holds the buffer"
        );
    }
}
