//! The ClientHello/SNI peek: arbitrary bytes from a CONNECT tunnel, before any policy decision.
//!
//! Beyond "never panics": a name it returns is lowercase printable ASCII (what the policy
//! matcher assumes), an accepted hello is accepted identically when its handshake is re-framed
//! into one-byte records, and `Incomplete` really means a longer input could still parse.
//! The async peek the proxy uses, fed the same bytes in small reads, agrees with the parser,
//! never buffers past its limit and keeps every byte it read for forwarding.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use portcullis::tls::sni::{parse_client_hello, peek_client_hello, SniError};
use tokio::io::{AsyncRead, ReadBuf};

/// A limit small enough that fuzzed inputs reach it (the proxy's is larger).
const PEEK_MAX: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let res = parse_client_hello(data);
    peek(data, &res);
    if let Ok(info) = &res {
        if let Some(sni) = &info.sni {
            assert!(!sni.is_empty());
            assert!(
                sni.bytes()
                    .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()),
                "{sni:?}"
            );
        }
        for p in &info.alpn {
            assert!(!p.is_empty());
        }
        // Same handshake, one byte per record: record boundaries must not change the answer.
        if let Some(hs) = handshake_of(data) {
            let mut framed = Vec::with_capacity(hs.len() * 6);
            for &b in hs {
                framed.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, b]);
            }
            assert_eq!(parse_client_hello(&framed).as_ref(), Ok(info));
        }
    }
    // Every strict prefix that ends before the hello's last byte is Incomplete: never an error,
    // never a different hello.
    if res.is_ok() {
        let end = hello_end(data).expect("an accepted hello has an end");
        for cut in [0, end / 3, end / 2, end - 1] {
            assert_eq!(
                parse_client_hello(&data[..cut]),
                Err(SniError::Incomplete),
                "cut {cut} of {end}"
            );
        }
    }
});

/// The handshake message bytes when `data` carries the whole hello in its first record.
fn handshake_of(data: &[u8]) -> Option<&[u8]> {
    let rec = usize::from(u16::from_be_bytes([*data.get(3)?, *data.get(4)?]));
    let body = data.get(5..5 + rec)?;
    let msg = 4 + u24(body.get(1..4)?);
    body.get(..msg)
}

fn u24(b: &[u8]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// Offset just past the last byte of the ClientHello message, following the records.
fn hello_end(data: &[u8]) -> Option<usize> {
    let mut pos = 0;
    let mut have = 0usize; // handshake bytes seen so far
    let mut header = Vec::new();
    loop {
        let len = usize::from(u16::from_be_bytes([
            *data.get(pos + 3)?,
            *data.get(pos + 4)?,
        ]));
        let body = pos + 5;
        for i in 0..len {
            let b = *data.get(body + i)?;
            if header.len() < 4 {
                header.push(b);
            }
            have += 1;
            if header.len() == 4 && have == 4 + u24(&header[1..4]) {
                return Some(body + i + 1);
            }
        }
        pos = body + len;
    }
}

/// Delivers `data` in reads of `chunk` bytes, then end of stream.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(out.remaining());
        let (head, tail) = self.data.split_at(n);
        out.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn peek(data: &[u8], parsed: &Result<portcullis::tls::sni::ClientHelloInfo, SniError>) {
    let chunk = 1 + usize::from(data.last().copied().unwrap_or(0) % 64);
    let mut io = Chunked { data, chunk };
    let mut buf = BytesMut::new();
    let peeked = runtime().block_on(peek_client_hello(&mut io, &mut buf, PEEK_MAX));
    assert!(buf.len() <= PEEK_MAX, "buffered {} > {PEEK_MAX}", buf.len());
    assert_eq!(
        &buf[..],
        &data[..buf.len()],
        "peek must keep the bytes it read, in order"
    );
    match (&peeked, parsed) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Ok(_), Err(e)) => panic!("peek accepted what the parser refused: {e:?}"),
        // A hello that fits the limit is never refused by the peek.
        (Err(e), Ok(_)) => {
            let end = hello_end(data).expect("an accepted hello has an end");
            assert!(
                end > PEEK_MAX && *e == SniError::TooLarge,
                "peek refused ({e:?}) a {end}-byte hello the parser accepts"
            );
        }
        // Both refuse; the peek may say so sooner (TooLarge as soon as the declared length
        // cannot fit), but it reports end of stream only when it has read everything.
        (Err(SniError::Eof), Err(_)) => assert_eq!(buf.len(), data.len()),
        (Err(_), Err(_)) => {}
    }
}
