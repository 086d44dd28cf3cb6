//! Copying a tunnel's bytes both ways, holding a buffer only while bytes are moving.
//!
//! tokio's `copy_bidirectional` keeps a buffer per direction for the tunnel's whole life; most
//! tunnels (a browser's or an SDK's keep-alive connection) sit idle most of the time, so at
//! 10,000 tunnels that is hundreds of MiB doing nothing. Here a direction takes its buffer when
//! the source has bytes and gives it back as soon as the source has none and everything read
//! has been written. Buffers given back are kept for reuse by the thread, a few of them: a busy
//! tunnel takes and returns one per wake-up and direction, and a fresh 16 KiB allocation each
//! time was a sixth of what relaying a request cost.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::on_wake::WakeFlag;

type Buffer = Box<[MaybeUninit<u8>]>;

/// Buffers kept per thread: enough for the bursts of one wake-up, no more (16 × 16 KiB).
const SPARE_MAX: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer(size: usize) -> Buffer {
    let spare = SPARE.with_borrow_mut(|s| match s.last() {
        Some(b) if b.len() == size => s.pop(),
        _ => None,
    });
    spare.unwrap_or_else(|| Box::new_uninit_slice(size))
}

fn give_back(buf: Option<Buffer>) {
    if let Some(b) = buf {
        SPARE.with_borrow_mut(|s| {
            if s.len() < SPARE_MAX {
                s.push(b);
            }
        });
    }
}

/// One direction's state.
struct Half {
    size: usize,
    /// Uninitialised: a buffer is taken per burst of bytes, so zero-filling it each time would
    /// cost more than the copy. `buf[..cap]` is initialised.
    buf: Option<Buffer>,
    pos: usize,
    cap: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
    moved: u64,
}

impl Half {
    fn new(size: usize) -> Half {
        Half {
            size,
            buf: None,
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            done: false,
            moved: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.cap && !self.read_done {
                let size = self.size;
                let buf = self.buf.get_or_insert_with(|| take_buffer(size));
                let mut rb = ReadBuf::uninit(buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_done = true;
                            give_back(self.buf.take());
                        } else {
                            self.pos = 0;
                            self.cap = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Idle: nothing to write either, so the buffer can go.
                        give_back(self.buf.take());
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.cap {
                let buf = self.buf.as_ref().expect("bytes pending imply a buffer");
                // SAFETY: the reader initialised `buf[..cap]` (ReadBuf::filled) and nothing
                // has written to the buffer since.
                let filled: &[u8] =
                    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), self.cap) };
                let n = ready!(writer.as_mut().poll_write(cx, &filled[self.pos..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.moved += n as u64;
                self.need_flush = true;
            }

            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies `a`→`b` and `b`→`a` until both directions reach end of stream (each then shuts down
/// its writer), or either fails. Returns the bytes moved a→b and b→a.
///
/// Once one side has ended, the other has `half_closed_idle` of silence to finish in: a client
/// that went away must not hold its tunnel (and the limit slots it holds) until the origin
/// happens to write or the tunnel's idle timeout, hours later for a silent origin. TLS, what
/// tunnels carry, does not use half-closed connections to wait for answers.
pub async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    buf_size: usize,
    half_closed_idle: Duration,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Half::new(buf_size);
    let mut b_to_a = Half::new(buf_size);
    // A waker per direction: a request and its answer wake the task once each, and polling the
    // direction that has nothing (a read that finds no bytes, with a buffer taken and given
    // back for it) was a tenth of what relaying a request cost.
    let (ab_flag, ba_flag) = (WakeFlag::new(), WakeFlag::new());
    let (ab_waker, ba_waker) = (Waker::from(ab_flag.clone()), Waker::from(ba_flag.clone()));
    let mut linger: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut moved_then = 0;
    poll_fn(|cx| {
        ab_flag.register(cx.waker());
        ba_flag.register(cx.waker());
        if !a_to_b.done && ab_flag.take() {
            let cx = &mut Context::from_waker(&ab_waker);
            if let Poll::Ready(r) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)) {
                r?;
                a_to_b.done = true;
            }
        }
        if !b_to_a.done && ba_flag.take() {
            let cx = &mut Context::from_waker(&ba_waker);
            if let Poll::Ready(r) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)) {
                r?;
                b_to_a.done = true;
            }
        }
        if a_to_b.done && b_to_a.done {
            return Poll::Ready(Ok((a_to_b.moved, b_to_a.moved)));
        }
        if a_to_b.done || b_to_a.done {
            let moved = a_to_b.moved + b_to_a.moved;
            let deadline = tokio::time::Instant::now() + half_closed_idle;
            let timer = linger.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if moved != moved_then {
                moved_then = moved;
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok((a_to_b.moved, b_to_a.moved)));
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        // A wake-up lost between the two directions shows as a stall, not a hung test.
        let copied = async {
            let (mut client, mut near) = tokio::io::duplex(1024);
            let (mut far, mut server) = tokio::io::duplex(1024);
            let task = tokio::spawn(async move {
                splice(&mut near, &mut far, 64, Duration::from_secs(5)).await
            });
            let up = vec![7u8; 10_000];
            let up2 = up.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&up2).await.unwrap();
                client.shutdown().await.unwrap();
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.unwrap();
                back
            });
            let mut got = Vec::new();
            let mut chunk = [0u8; 333];
            while got.len() < up.len() {
                let n = server.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                got.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(got, up);
            server.write_all(b"pong").await.unwrap();
            server.shutdown().await.unwrap();
            assert_eq!(writer.await.unwrap(), b"pong");
            assert_eq!(task.await.unwrap().unwrap(), (10_000, 4));
        };
        tokio::time::timeout(Duration::from_secs(10), copied)
            .await
            .expect("the splice stalled");
    }

    #[test]
    fn given_back_buffers_are_reused_up_to_a_bound() {
        let b = take_buffer(100);
        let at = b.as_ptr();
        give_back(Some(b));
        let again = take_buffer(100);
        assert_eq!(
            again.as_ptr(),
            at,
            "the spare was taken, not a new allocation"
        );
        give_back(Some(again));
        // A spare of another size is left for its own kind.
        assert_eq!(take_buffer(64).len(), 64);
        let kept = take_buffer(100);
        assert_eq!(kept.as_ptr(), at);
        for _ in 0..SPARE_MAX + 8 {
            give_back(Some(Box::new_uninit_slice(100)));
        }
        assert_eq!(SPARE.with_borrow(|s| s.len()), SPARE_MAX);
    }

    /// One side ends and the other stays silent: the splice ends after the half-closed
    /// grace, not never. Bytes still moving keep it going.
    #[tokio::test]
    async fn a_half_closed_splice_ends_after_its_grace() {
        let grace = Duration::from_secs(2);
        let (mut client, mut near) = tokio::io::duplex(1024);
        let (mut far, mut server) = tokio::io::duplex(1024);
        let task = tokio::spawn(async move { splice(&mut near, &mut far, 64, grace).await });
        client.shutdown().await.unwrap();
        let mut byte = [0u8; 1];
        // The client's end reaches the server.
        assert_eq!(server.read(&mut byte).await.unwrap(), 0);
        for _ in 0..4 {
            tokio::time::sleep(grace / 6).await;
            server.write_all(b"x").await.unwrap();
            client.read_exact(&mut byte).await.unwrap();
        }
        assert!(!task.is_finished(), "bytes were still moving");
        let ended = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert_eq!(ended.expect("ended").unwrap().unwrap(), (0, 4));
        drop(server);
    }
}
