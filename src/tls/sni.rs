//! Bounded peek at a TLS ClientHello so the proxy can see the SNI (and ALPN)
//! a client is about to use inside a CONNECT tunnel, without terminating TLS.
//!
//! The parser is deliberately self-contained: it runs on untrusted bytes
//! before any policy decision, so every length is checked against its
//! enclosing length and nothing here can panic or allocate unboundedly.

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What the proxy needs to know about a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHelloInfo {
    /// Lowercased ASCII host_name from the server_name extension; `None` when
    /// the client sent no SNI (e.g. it is connecting to an IP literal).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order of preference.
    pub alpn: Vec<String>,
    /// Bytes of the peeked buffer up to the end of the record that completes the hello:
    /// what follows is the client's next flight, sent before the server answered.
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    /// More bytes are needed (only returned by [`parse_client_hello`]).
    #[error("incomplete TLS ClientHello")]
    Incomplete,
    /// The first bytes are not a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello does not fit in the peek limit.
    #[error("TLS ClientHello exceeds the size limit")]
    TooLarge,
    /// The peer closed the connection before a whole ClientHello arrived.
    #[error("connection closed before a complete TLS ClientHello")]
    Eof,
    #[error("I/O error while reading TLS ClientHello: {0}")]
    Io(String),
}

impl SniError {
    /// Stable identifier for metrics labels and audit logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SniError::Incomplete => "client_hello_incomplete",
            SniError::NotTls => "not_tls",
            SniError::Malformed(_) => "client_hello_malformed",
            SniError::TooLarge => "client_hello_too_large",
            SniError::Eof => "client_hello_eof",
            SniError::Io(_) => "client_hello_io",
        }
    }
}

const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// RFC 8446 §5.2 allows TLSCiphertext up to 2^14 + 256, and older versions up
/// to 2^14 + 2048; a plaintext hello record beyond that is not TLS.
const MAX_RECORD_LEN: usize = (1 << 14) + 2048;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Why the record layer stopped: either a definite error or a need for more
/// bytes. The lower bound lets [`peek_client_hello`] give up as soon as the
/// declared handshake length cannot fit in its limit instead of reading up to
/// the limit first.
enum Stop {
    Fail(SniError),
    NeedAtLeast(usize),
}

impl From<SniError> for Stop {
    fn from(e: SniError) -> Self {
        Stop::Fail(e)
    }
}

/// Parse TLS records from the start of `buf`, reassembling a ClientHello that
/// may be split across several records. Returns [`SniError::Incomplete`] when
/// `buf` ends before the ClientHello does. Bytes after the ClientHello are
/// ignored.
pub fn parse_client_hello(buf: &[u8]) -> Result<ClientHelloInfo, SniError> {
    match parse_records(buf) {
        Ok(info) => Ok(info),
        Err(Stop::Fail(e)) => Err(e),
        Err(Stop::NeedAtLeast(_)) => Err(SniError::Incomplete),
    }
}

fn parse_records(buf: &[u8]) -> Result<ClientHelloInfo, Stop> {
    // Only the handshake bytes are copied; they never exceed buf.len().
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    let mut records = 0usize;

    loop {
        let header = &buf[pos..];
        check_record_header_prefix(header, records == 0)?;
        if header.len() < RECORD_HEADER_LEN {
            return Err(need(records + 1, &handshake));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD_LEN {
            return Err(SniError::Malformed("record length exceeds maximum").into());
        }
        if len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments are forbidden.
            return Err(SniError::Malformed("empty handshake record").into());
        }
        records += 1;
        let body_start = pos + RECORD_HEADER_LEN;
        let available = buf.len() - body_start;
        let take = len.min(available);
        handshake.extend_from_slice(&buf[body_start..body_start + take]);

        if handshake.len() >= HANDSHAKE_HEADER_LEN {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(
                    SniError::Malformed("first handshake message is not a ClientHello").into(),
                );
            }
            let msg_len = u24(&handshake[1..4]);
            let end = HANDSHAKE_HEADER_LEN + msg_len;
            if handshake.len() >= end {
                // Nothing else of the client's first flight is a handshake message: bytes
                // after the hello in its record would be a second hello sent inside the
                // first's record, past the check of what follows the server's answer.
                if handshake.len() > end {
                    return Err(SniError::Malformed("handshake bytes after the ClientHello").into());
                }
                let mut info = parse_client_hello_body(&handshake[HANDSHAKE_HEADER_LEN..end])?;
                // The record that completes the hello is passed on whole, with the hello.
                if take < len {
                    return Err(Stop::NeedAtLeast(body_start + len));
                }
                info.len = body_start + len;
                return Ok(info);
            }
        }

        if take < len {
            return Err(need(records, &handshake));
        }
        pos = body_start + len;
    }
}

/// Validate as much of a record header as has arrived, so plain HTTP (or any
/// other protocol) is refused after its first byte rather than after five.
fn check_record_header_prefix(header: &[u8], first: bool) -> Result<(), Stop> {
    // Once the hello has started, a stray record type or version is a broken
    // (or hostile) TLS stream rather than some other protocol.
    let bad = if first {
        SniError::NotTls
    } else {
        SniError::Malformed("unexpected record in ClientHello")
    };
    if header.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE) {
        return Err(bad.into());
    }
    if header.get(1).is_some_and(|&major| major != 0x03) {
        return Err(bad.into());
    }
    // 0x0300 (SSL 3.0) through 0x0304; anything newer is not a version any
    // real client writes into the record layer.
    if header.get(2).is_some_and(|&minor| minor > 0x04) {
        return Err(bad.into());
    }
    Ok(())
}

/// Lower bound on the total bytes needed: every record seen (or about to be
/// seen) costs a header, plus the whole handshake message once its length is
/// known.
fn need(records: usize, handshake: &[u8]) -> Stop {
    let message = if handshake.len() >= HANDSHAKE_HEADER_LEN {
        HANDSHAKE_HEADER_LEN + u24(&handshake[1..4])
    } else {
        handshake.len() + 1
    };
    Stop::NeedAtLeast(records.max(1) * RECORD_HEADER_LEN + message)
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Bounds-checked reader over a slice; every read names what it was reading
/// so a rejection in the audit log says which field was wrong.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Reader { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if n > self.rest.len() {
            return Err(SniError::Malformed(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, SniError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, SniError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

fn parse_client_hello_body(body: &[u8]) -> Result<ClientHelloInfo, SniError> {
    let mut r = Reader::new(body);
    r.take(2, "truncated legacy_version")?;
    r.take(32, "truncated random")?;
    let session_id = r.vec_u8("truncated session_id")?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session_id longer than 32 bytes"));
    }
    let suites = r.vec_u16("truncated cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("bad cipher_suites length"));
    }
    let compression = r.vec_u8("truncated compression_methods")?;
    if compression.is_empty() {
        return Err(SniError::Malformed("empty compression_methods"));
    }

    let mut info = ClientHelloInfo::default();
    // Pre-TLS-1.2 clients may omit the extensions block entirely.
    if r.is_empty() {
        return Ok(info);
    }
    let extensions = r.vec_u16("truncated extensions")?;
    if !r.is_empty() {
        return Err(SniError::Malformed("trailing bytes after extensions"));
    }

    let mut seen_sni = false;
    let mut seen_alpn = false;
    let mut exts = Reader::new(extensions);
    while !exts.is_empty() {
        let ext_type = exts.u16("truncated extension header")?;
        let data = exts.vec_u16("truncated extension data")?;
        match ext_type {
            EXT_SERVER_NAME => {
                // Two SNI extensions let a client show one name to the proxy
                // and another to the server: treat as fronting, not a quirk.
                if seen_sni {
                    return Err(SniError::Malformed("duplicate server_name extension"));
                }
                seen_sni = true;
                info.sni = parse_server_name(data)?;
            }
            EXT_ALPN => {
                if seen_alpn {
                    return Err(SniError::Malformed("duplicate ALPN extension"));
                }
                seen_alpn = true;
                info.alpn = parse_alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(info)
}

fn parse_server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated server_name list")?;
    if !outer.is_empty() {
        return Err(SniError::Malformed(
            "trailing bytes in server_name extension",
        ));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty server_name list"));
    }
    let mut entries = Reader::new(list);
    let mut host: Option<String> = None;
    while !entries.is_empty() {
        let name_type = entries.u8("truncated server_name entry")?;
        let name = entries.vec_u16("truncated server_name entry")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        // RFC 6066 §3 allows one name per type; a second host_name would be
        // the same two-faced trick as a duplicate extension.
        if host.is_some() {
            return Err(SniError::Malformed(
                "more than one host_name in server_name",
            ));
        }
        if name.is_empty() {
            return Err(SniError::Malformed("empty host_name"));
        }
        // Control bytes or spaces could make the policy matcher and the
        // upstream server disagree about which name this is.
        if !name.iter().all(u8::is_ascii_graphic) {
            return Err(SniError::Malformed("host_name is not printable ASCII"));
        }
        let lowered: String = name
            .iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .collect();
        host = Some(lowered);
    }
    Ok(host)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<String>, SniError> {
    let mut outer = Reader::new(data);
    let list = outer.vec_u16("truncated ALPN list")?;
    if !outer.is_empty() {
        return Err(SniError::Malformed("trailing bytes in ALPN extension"));
    }
    if list.is_empty() {
        return Err(SniError::Malformed("empty ALPN list"));
    }
    let mut protocols = Reader::new(list);
    let mut out = Vec::new();
    while !protocols.is_empty() {
        let p = protocols.vec_u8("truncated ALPN protocol")?;
        if p.is_empty() {
            return Err(SniError::Malformed("empty ALPN protocol"));
        }
        // Protocol ids are opaque bytes (GREASE values are not UTF-8), and
        // refusing them would break real browsers; lossy text is only used
        // for logging and matching known ids like "h2".
        out.push(String::from_utf8_lossy(p).into_owned());
    }
    Ok(out)
}

/// Read from `io` into `buf` until a whole ClientHello has been parsed, never
/// letting `buf` grow past `max` bytes. Every byte read stays in `buf` so the
/// caller can forward it upstream unchanged. The caller applies the timeout.
pub async fn peek_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<ClientHelloInfo, SniError> {
    peek(io, buf, max, parse_records).await
}

/// RFC 8446 §4.1.3: the `random` of a ServerHello that is a HelloRetryRequest
/// (SHA-256 of "HelloRetryRequest").
const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
    0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];
const HANDSHAKE_SERVER_HELLO: u8 = 2;
const CONTENT_TYPE_CHANGE_CIPHER_SPEC: u8 = 0x14;
/// Record header, handshake header, legacy_version: where a ServerHello's random starts.
const SERVER_RANDOM_AT: usize = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2;

/// Whether the first bytes a server sent are a TLS 1.3 HelloRetryRequest, after which the
/// client sends a second ClientHello; `None` until enough bytes have arrived to tell.
/// Anything that is not a ServerHello at the start of a handshake record (an alert, another
/// protocol, a ServerHello split into fragments too small to carry its random, which no real
/// server sends) is not one.
pub fn is_hello_retry(server: &[u8]) -> Option<bool> {
    let end = SERVER_RANDOM_AT + HELLO_RETRY_RANDOM.len();
    match server {
        [] => None,
        [t, ..] if *t != CONTENT_TYPE_HANDSHAKE => Some(false),
        _ if server.len() < RECORD_HEADER_LEN => None,
        _ if usize::from(u16::from_be_bytes([server[3], server[4]])) < end - RECORD_HEADER_LEN => {
            Some(false)
        }
        _ if server.len() < end => None,
        _ => Some(
            server[RECORD_HEADER_LEN] == HANDSHAKE_SERVER_HELLO
                && server[SERVER_RANDOM_AT..end] == HELLO_RETRY_RANDOM,
        ),
    }
}

/// Peeks the ClientHello a client sends in answer to a HelloRetryRequest: past the one
/// change_cipher_spec record a TLS 1.3 client in middlebox-compatibility mode sends first
/// (RFC 8446 §D.4). `buf` keeps every byte read, the record included.
pub async fn peek_retried_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<ClientHelloInfo, SniError> {
    peek(io, buf, max, |b| {
        let skip = change_cipher_spec_prefix(b)?;
        match parse_records(&b[skip..]) {
            Ok(info) => Ok(ClientHelloInfo {
                len: skip + info.len,
                ..info
            }),
            Err(Stop::NeedAtLeast(n)) => Err(Stop::NeedAtLeast(skip + n)),
            Err(fail) => Err(fail),
        }
    })
    .await
}

/// Length of what a client may send before its second ClientHello: the one
/// change_cipher_spec record of middlebox-compatibility mode, and early data (application_data
/// records) it sent after its first hello, which the server skips after a retry request
/// (RFC 8446 §4.2.10). 0 when there is none.
fn change_cipher_spec_prefix(b: &[u8]) -> Result<usize, Stop> {
    const CCS_LEN: usize = RECORD_HEADER_LEN + 1;
    const CONTENT_TYPE_APPLICATION_DATA: u8 = 0x17;
    let mut at = 0;
    let mut ccs = false;
    loop {
        let rest = &b[at..];
        match rest.first() {
            None => return Err(Stop::NeedAtLeast(at + 1)),
            Some(&CONTENT_TYPE_CHANGE_CIPHER_SPEC) if !ccs => {
                if rest.len() < CCS_LEN {
                    return Err(Stop::NeedAtLeast(at + CCS_LEN));
                }
                if rest[3..6] != [0, 1, 1] {
                    return Err(SniError::Malformed(
                        "change_cipher_spec record is not the one byte 1",
                    )
                    .into());
                }
                ccs = true;
                at += CCS_LEN;
            }
            Some(&CONTENT_TYPE_APPLICATION_DATA) => {
                if rest.len() < RECORD_HEADER_LEN {
                    return Err(Stop::NeedAtLeast(at + RECORD_HEADER_LEN));
                }
                let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
                if len > MAX_RECORD_LEN {
                    return Err(SniError::Malformed("record length exceeds maximum").into());
                }
                if rest.len() < RECORD_HEADER_LEN + len {
                    return Err(Stop::NeedAtLeast(at + RECORD_HEADER_LEN + len));
                }
                at += RECORD_HEADER_LEN + len;
            }
            Some(_) => return Ok(at),
        }
    }
}

/// Reads into `buf` until `parse` succeeds or fails for good.
async fn peek<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
    parse: impl Fn(&[u8]) -> Result<ClientHelloInfo, Stop>,
) -> Result<ClientHelloInfo, SniError> {
    // Re-parsing from the start after every read would be quadratic for a
    // client trickling bytes; waiting for the known lower bound keeps it to a
    // handful of parses per hello.
    let mut needed = 0usize;
    loop {
        if buf.len() >= needed {
            match parse(buf) {
                Ok(info) => return Ok(info),
                Err(Stop::Fail(e)) => return Err(e),
                Err(Stop::NeedAtLeast(n)) => needed = n,
            }
        }
        if needed > max || buf.len() >= max {
            return Err(SniError::TooLarge);
        }
        let room = max - buf.len();
        buf.reserve(room.min(4096));
        let n = io
            .read_buf(&mut (&mut *buf).limit(room))
            .await
            .map_err(|e| SniError::Io(e.to_string()))?;
        if n == 0 {
            return Err(SniError::Eof);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    fn client_hello(server: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Split a single-record hello into its handshake bytes.
    fn handshake_bytes(hello: &[u8]) -> Vec<u8> {
        let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
        assert_eq!(hello.len(), RECORD_HEADER_LEN + len, "expected one record");
        hello[RECORD_HEADER_LEN..].to_vec()
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![0x16, 0x03, 0x01];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    /// Hand-built ClientHello so the tests can say exactly which extensions it
    /// carries, including the ones no honest client sends.
    fn synthetic_hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0u8; 32]);
        body.push(0); // session_id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]);
        body.extend_from_slice(&[0x01, 0x00]);
        let mut ext_bytes = Vec::new();
        for (t, d) in exts {
            ext_bytes.extend_from_slice(&t.to_be_bytes());
            ext_bytes.extend_from_slice(&(d.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(d);
        }
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        record(&hs)
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
        let mut list = Vec::new();
        for (t, n) in names {
            list.push(*t);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut d = (list.len() as u16).to_be_bytes().to_vec();
        d.extend_from_slice(&list);
        (EXT_SERVER_NAME, d)
    }

    /// Delivers one byte per read, the worst case for reassembly.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.pos < self.data.len() && out.remaining() > 0 {
                let b = self.data[self.pos];
                out.put_slice(&[b]);
                self.pos += 1;
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn real_client_hello_sni_and_alpn() {
        let hello = client_hello("API.OpenAI.com", &[b"h2", b"http/1.1"]);
        let info = parse_client_hello(&hello).unwrap();
        assert_eq!(info.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(info.alpn, vec!["h2".to_string(), "http/1.1".to_string()]);
    }

    /// A second hello packed into the first's record would reach the origin with it,
    /// unchecked: refused. Early data and the change_cipher_spec record before a second
    /// hello are skipped to it.
    #[tokio::test]
    async fn packed_hellos_are_refused_and_early_data_is_skipped() {
        let hello = synthetic_hello(&[sni_ext(&[(0, b"x.org")])]);
        let body = &hello[RECORD_HEADER_LEN..];
        let mut packed = record(&[body, body].concat());
        assert!(matches!(
            parse_client_hello(&packed),
            Err(SniError::Malformed(_))
        ));
        packed.clear();
        let early = [0x17, 3, 3, 0, 3, 9, 9, 9];
        let ccs = [0x14, 3, 3, 0, 1, 1];
        let mut buf = BytesMut::from(&[&ccs[..], &early, &early, &hello].concat()[..]);
        let mut none: &[u8] = &[];
        let info = peek_retried_client_hello(&mut none, &mut buf, 1 << 16)
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("x.org"));
        assert_eq!(info.len, buf.len());
    }

    /// `len` ends the hello's records: bytes sent after it (a second flight sent ahead) are
    /// not part of it.
    #[test]
    fn len_is_where_the_hello_records_end() {
        let hello = synthetic_hello(&[sni_ext(&[(0, b"x.org")])]);
        let ccs = [0x14, 3, 3, 0, 1, 1];
        let both = [&hello[..], &ccs[..], &hello[..]].concat();
        assert_eq!(parse_client_hello(&both).unwrap().len, hello.len());
        // The hello's record with one more handshake byte: incomplete until it is whole,
        // then refused (nothing may follow the hello in its record).
        let mut padded = hello.clone();
        let record_len = u16::from_be_bytes([padded[3], padded[4]]) + 1;
        padded[3..5].copy_from_slice(&record_len.to_be_bytes());
        assert_eq!(parse_client_hello(&padded), Err(SniError::Incomplete));
        padded.push(0);
        assert!(matches!(
            parse_client_hello(&padded),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn ip_literal_has_no_sni() {
        let hello = client_hello("192.0.2.7", &[]);
        let info = parse_client_hello(&hello).unwrap();
        assert_eq!(info.sni, None);
        assert!(info.alpn.is_empty());
    }

    #[test]
    fn plain_http_is_not_tls() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        // One byte is enough to tell.
        assert_eq!(parse_client_hello(b"G"), Err(SniError::NotTls));
        assert_eq!(parse_client_hello(&[0x16, 0x04]), Err(SniError::NotTls));
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x09]),
            Err(SniError::NotTls)
        );
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let hello = client_hello("example.com", &[b"h2"]);
        for cut in 0..hello.len() {
            assert_eq!(
                parse_client_hello(&hello[..cut]),
                Err(SniError::Incomplete),
                "prefix of {cut} bytes"
            );
        }
    }

    #[test]
    fn trailing_bytes_after_hello_are_ignored() {
        let mut hello = client_hello("example.com", &[]);
        hello.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
        let info = parse_client_hello(&hello).unwrap();
        assert_eq!(info.sni.as_deref(), Some("example.com"));
    }

    #[test]
    fn handshake_fragmented_over_records() {
        let hello = client_hello("chat.example.org", &[b"h2"]);
        let hs = handshake_bytes(&hello);
        // Every split point, including one inside the 4-byte handshake header.
        for split in 1..hs.len() {
            let mut framed = record(&hs[..split]);
            framed.extend_from_slice(&record(&hs[split..]));
            let info = parse_client_hello(&framed).unwrap();
            assert_eq!(
                info.sni.as_deref(),
                Some("chat.example.org"),
                "split {split}"
            );
            assert_eq!(info.alpn, vec!["h2".to_string()]);
            assert_eq!(
                parse_client_hello(&framed[..framed.len() - 1]),
                Err(SniError::Incomplete)
            );
        }
    }

    #[test]
    fn many_small_records() {
        let hello = client_hello("example.com", &[]);
        let hs = handshake_bytes(&hello);
        let framed: Vec<u8> = hs.chunks(7).flat_map(record).collect();
        let info = parse_client_hello(&framed).unwrap();
        assert_eq!(info.sni.as_deref(), Some("example.com"));
    }

    #[test]
    fn non_handshake_record_mid_hello_is_malformed() {
        let hello = client_hello("example.com", &[]);
        let hs = handshake_bytes(&hello);
        let mut framed = record(&hs[..10]);
        let mut alert = record(&hs[10..]);
        alert[0] = 0x15;
        framed.extend_from_slice(&alert);
        assert!(matches!(
            parse_client_hello(&framed),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn rejects_bad_records() {
        // Not a ClientHello (ServerHello type 2).
        let mut hello = client_hello("example.com", &[]);
        hello[5] = 2;
        assert!(matches!(
            parse_client_hello(&hello),
            Err(SniError::Malformed(_))
        ));
        // Record longer than TLS permits.
        let too_long = [0x16, 0x03, 0x01, 0x48, 0x01];
        assert_eq!(
            parse_client_hello(&too_long),
            Err(SniError::Malformed("record length exceeds maximum"))
        );
        let empty = [0x16, 0x03, 0x01, 0x00, 0x00];
        assert!(matches!(
            parse_client_hello(&empty),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn synthetic_sni_cases() {
        let ok = synthetic_hello(&[sni_ext(&[(0, b"Example.COM")])]);
        assert_eq!(
            parse_client_hello(&ok).unwrap().sni.as_deref(),
            Some("example.com")
        );

        let dup = synthetic_hello(&[sni_ext(&[(0, b"a.com")]), sni_ext(&[(0, b"b.com")])]);
        assert_eq!(
            parse_client_hello(&dup),
            Err(SniError::Malformed("duplicate server_name extension"))
        );

        let two_names = synthetic_hello(&[sni_ext(&[(0, b"a.com"), (0, b"b.com")])]);
        assert!(matches!(
            parse_client_hello(&two_names),
            Err(SniError::Malformed(_))
        ));

        let empty = synthetic_hello(&[sni_ext(&[(0, b"")])]);
        assert_eq!(
            parse_client_hello(&empty),
            Err(SniError::Malformed("empty host_name"))
        );

        let non_ascii = synthetic_hello(&[sni_ext(&[(0, "bücher.de".as_bytes())])]);
        assert!(matches!(
            parse_client_hello(&non_ascii),
            Err(SniError::Malformed(_))
        ));

        let nul = synthetic_hello(&[sni_ext(&[(0, b"a.com\0.evil")])]);
        assert!(matches!(
            parse_client_hello(&nul),
            Err(SniError::Malformed(_))
        ));

        // Unknown name types are skipped; the host_name after them counts.
        let other_type = synthetic_hello(&[sni_ext(&[(7, b"\xff\xfe"), (0, b"x.org")])]);
        assert_eq!(
            parse_client_hello(&other_type).unwrap().sni.as_deref(),
            Some("x.org")
        );

        let no_ext = synthetic_hello(&[]);
        assert_eq!(
            parse_client_hello(&no_ext).unwrap(),
            ClientHelloInfo {
                len: no_ext.len(),
                ..ClientHelloInfo::default()
            }
        );

        let dup_alpn = synthetic_hello(&[
            (EXT_ALPN, vec![0, 3, 2, b'h', b'2']),
            (EXT_ALPN, vec![0, 3, 2, b'h', b'2']),
        ]);
        assert!(matches!(
            parse_client_hello(&dup_alpn),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn hello_retry_is_told_from_a_server_hello() {
        let mut hrr = vec![0x16, 3, 3, 0, 60, HANDSHAKE_SERVER_HELLO, 0, 0, 56, 3, 3];
        hrr.extend_from_slice(&HELLO_RETRY_RANDOM);
        for n in 1..hrr.len() {
            assert_eq!(is_hello_retry(&hrr[..n]), None, "{n} bytes");
        }
        assert_eq!(is_hello_retry(&hrr), Some(true));
        let mut plain = hrr.clone();
        plain[20] ^= 1;
        assert_eq!(is_hello_retry(&plain), Some(false));
        assert_eq!(
            is_hello_retry(&[0x15, 3, 3, 0, 2, 2, 40]),
            Some(false),
            "an alert"
        );
        assert_eq!(is_hello_retry(b"HTTP/1.1 400"), Some(false));
        // A record too short to carry the random: not something a real server sends.
        assert_eq!(is_hello_retry(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]), Some(false));
        assert_eq!(is_hello_retry(&[]), None);
    }

    #[tokio::test]
    async fn the_retried_hello_is_read_past_one_change_cipher_spec() {
        let hello = client_hello("api.example.com", &[]);
        let mut bytes = vec![0x14, 3, 3, 0, 1, 1];
        bytes.extend_from_slice(&hello);
        let mut buf = BytesMut::new();
        let info = peek_retried_client_hello(&mut &bytes[..], &mut buf, 64 * 1024)
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("api.example.com"));
        assert_eq!(&buf[..], &bytes[..]);
        let mut buf = BytesMut::new();
        let info = peek_retried_client_hello(&mut &hello[..], &mut buf, 64 * 1024).await;
        assert_eq!(info.unwrap().sni.as_deref(), Some("api.example.com"));
        let bad = [&[0x14, 3, 3, 0, 2, 1, 1][..], &hello].concat();
        let r = peek_retried_client_hello(&mut &bad[..], &mut BytesMut::new(), 64 * 1024).await;
        assert!(matches!(r, Err(SniError::Malformed(_))), "{r:?}");
    }

    #[test]
    fn error_kinds_are_stable() {
        assert_eq!(SniError::NotTls.kind(), "not_tls");
        assert_eq!(SniError::Malformed("x").kind(), "client_hello_malformed");
        assert_eq!(SniError::TooLarge.kind(), "client_hello_too_large");
        assert_eq!(SniError::Incomplete.kind(), "client_hello_incomplete");
        assert_eq!(SniError::Eof.kind(), "client_hello_eof");
        assert_eq!(SniError::Io("x".into()).kind(), "client_hello_io");
    }

    /// xorshift64*: deterministic so a failing mutation can be replayed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_mutations() {
        let hello = client_hello("fuzz.example.com", &[b"h2", b"http/1.1"]);
        let hs = handshake_bytes(&hello);
        let mut fragmented = record(&hs[..100]);
        fragmented.extend_from_slice(&record(&hs[100..]));
        let seeds = [hello.clone(), fragmented];
        for seed in &seeds {
            for cut in 0..=seed.len() {
                let _ = parse_client_hello(&seed[..cut]);
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..5000 {
            let mut m = seeds[i % 2].clone();
            match i % 4 {
                0 => {
                    let at = rng.below(m.len());
                    m[at] ^= 1 << rng.below(8);
                }
                1 => {
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(m.len());
                        m[at] = rng.next() as u8;
                    }
                }
                2 => {
                    // Lengths are big-endian pairs; hit both bytes together.
                    let at = rng.below(m.len() - 1);
                    m[at] = 0xff;
                    m[at + 1] = rng.next() as u8;
                    m.truncate(rng.below(m.len()) + 1);
                }
                _ => {
                    let len = rng.below(600);
                    m = (0..len).map(|_| rng.next() as u8).collect();
                    if !m.is_empty() && rng.below(2) == 0 {
                        m[0] = 0x16;
                    }
                }
            }
            let _ = parse_client_hello(&m);
        }
    }

    #[tokio::test]
    async fn peek_one_byte_at_a_time_keeps_every_byte() {
        let mut hello = client_hello("claude.ai", &[b"h2"]);
        let hs = handshake_bytes(&hello);
        hello = record(&hs[..50]);
        hello.extend_from_slice(&record(&hs[50..]));
        let mut wire = hello.clone();
        wire.extend_from_slice(b"after");
        let mut io = Trickle { data: wire, pos: 0 };
        let mut buf = BytesMut::new();
        let info = peek_client_hello(&mut io, &mut buf, 16 * 1024)
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("claude.ai"));
        // Reading stops exactly at the end of the hello with 1-byte reads.
        assert_eq!(&buf[..], &hello[..]);
    }

    #[tokio::test]
    async fn peek_over_duplex() {
        let hello = client_hello("example.net", &[b"http/1.1"]);
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in sent.chunks(13) {
                client.write_all(chunk).await.unwrap();
            }
            client
        });
        let mut buf = BytesMut::new();
        let info = peek_client_hello(&mut server, &mut buf, 16 * 1024)
            .await
            .unwrap();
        assert_eq!(info.sni.as_deref(), Some("example.net"));
        assert_eq!(info.alpn, vec!["http/1.1".to_string()]);
        assert_eq!(&buf[..], &hello[..]);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn peek_limits_and_eof() {
        let hello = client_hello("example.com", &[]);

        // Too small a limit: refused without reading past it.
        let mut io = &hello[..];
        let mut buf = BytesMut::new();
        let max = 100;
        assert_eq!(
            peek_client_hello(&mut io, &mut buf, max).await,
            Err(SniError::TooLarge)
        );
        assert!(buf.len() <= max);

        // Exactly large enough succeeds.
        let mut io = &hello[..];
        let mut buf = BytesMut::new();
        assert!(peek_client_hello(&mut io, &mut buf, hello.len())
            .await
            .is_ok());

        // Peer hangs up half-way.
        let mut io = &hello[..hello.len() / 2];
        let mut buf = BytesMut::new();
        assert_eq!(
            peek_client_hello(&mut io, &mut buf, 16 * 1024).await,
            Err(SniError::Eof)
        );
        assert_eq!(&buf[..], &hello[..hello.len() / 2]);

        // Plain HTTP is refused after the first read.
        let mut io = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        let mut buf = BytesMut::new();
        assert_eq!(
            peek_client_hello(&mut io, &mut buf, 16 * 1024).await,
            Err(SniError::NotTls)
        );

        // A record promising more than the limit fails before the body arrives.
        let mut io = Trickle {
            data: vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc],
            pos: 0,
        };
        let mut buf = BytesMut::new();
        assert_eq!(
            peek_client_hello(&mut io, &mut buf, 4096).await,
            Err(SniError::TooLarge)
        );
        assert_eq!(buf.len(), 9);
    }

    #[tokio::test]
    async fn peek_io_error() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: Pin<&mut Self>,
                _cx: &mut Context<'_>,
                _out: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Poll::Ready(Err(std::io::Error::other("reset")))
            }
        }
        let mut buf = BytesMut::new();
        let err = peek_client_hello(&mut Broken, &mut buf, 1024)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "client_hello_io");
    }
}
