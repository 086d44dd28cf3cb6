//! The ClientHello/SNI peek: arbitrary bytes from a CONNECT tunnel, before any policy decision.
//!
//! Beyond "never panics": a name it returns is lowercase printable ASCII (what the policy
//! matcher assumes), an accepted hello is accepted identically when its handshake is re-framed
//! into one-byte records, and `Incomplete` really means a longer input could still parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::tls::sni::{parse_client_hello, SniError};

fuzz_target!(|data: &[u8]| {
    let res = parse_client_hello(data);
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
