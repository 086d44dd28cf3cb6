//! The audit trail: one JSON line per decision, written by a dedicated writer thread behind a
//! bounded queue so that a slow disk never stalls a request. What a full queue means is
//! `[audit] on_full`: `drop` drops the record and counts it (`portcullis_audit_dropped_total`);
//! `block` keeps it (records of exchanges already served are never dropped) and stops
//! admitting new requests until the writer has caught up. A sink that fails (disk full, EIO, a
//! FIFO whose reader went away) is retried, holding its records, until it takes them again;
//! with `block` new requests are refused meanwhile. Shutdown drains the queue and flushes;
//! what it must give up on (the sink still fails) is counted as dropped and logged. A record
//! counts as written (`portcullis_audit_records_total`) once a flush has taken it.

use std::fs::OpenOptions;
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::ser::{Serialize, SerializeMap, Serializer};

use prometheus::IntCounter;

use crate::config::{AuditSettings, OnFull};
use crate::policy::target::Dotted;

/// One audit record. Strings the policy owns are shared (`Arc<str>`), not copied.
#[derive(Debug, Clone)]
pub struct Record {
    pub ts: SystemTime,
    pub id: u64,
    pub client: SocketAddr,
    pub user: Option<Box<str>>,
    pub method: http::Method,
    pub scheme: &'static str,
    pub host: Box<str>,
    pub port: u16,
    /// Already redacted.
    pub path: Option<Box<str>>,
    pub vendor: Option<Arc<str>>,
    pub endpoint: &'static str,
    pub rule: Option<Arc<str>>,
    pub action: &'static str,
    pub mode: &'static str,
    pub reason: Arc<str>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: f64,
    pub tls: &'static str,
    pub sni: Option<Box<str>>,
    pub key_id: Option<Box<str>>,
    /// The request body's `model`, when inspection read it.
    pub model: Option<Box<str>>,
    /// Each key's fingerprint when the request carried several (`key_id` is then
    /// `k_ambiguous`): the bulk signal counts every one. Not written to the log.
    pub key_ids: Vec<Box<str>>,
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(23))?;
        m.serialize_entry("ts", &Shown(humantime::format_rfc3339_millis(self.ts)))?;
        m.serialize_entry("id", &Shown(format_args!("{:016x}", self.id)))?;
        m.serialize_entry("client", &Shown(self.client))?;
        m.serialize_entry("user", &self.user)?;
        m.serialize_entry("method", self.method.as_str())?;
        m.serialize_entry("scheme", self.scheme)?;
        m.serialize_entry("host", &self.host)?;
        m.serialize_entry("port", &self.port)?;
        m.serialize_entry("path", &self.path)?;
        m.serialize_entry("vendor", &self.vendor.as_deref())?;
        m.serialize_entry("endpoint", self.endpoint)?;
        m.serialize_entry("rule", &self.rule.as_deref())?;
        m.serialize_entry("action", self.action)?;
        m.serialize_entry("mode", self.mode)?;
        m.serialize_entry("reason", &*self.reason)?;
        m.serialize_entry("status", &self.status)?;
        m.serialize_entry("bytes_in", &self.bytes_in)?;
        m.serialize_entry("bytes_out", &self.bytes_out)?;
        m.serialize_entry(
            "duration_ms",
            &((self.duration_ms * 1000.0).round() / 1000.0),
        )?;
        m.serialize_entry("tls", self.tls)?;
        m.serialize_entry("sni", &self.sni)?;
        m.serialize_entry("key_id", &self.key_id)?;
        m.serialize_entry("model", &self.model)?;
        m.end()
    }
}

impl Record {
    /// The record as one JSON object, in the order of the `Serialize` impl (the contract's),
    /// appended to `out`. The writer thread formats every record, so the keys go in as
    /// constant bytes; strings still go through serde_json's escaping. The timestamp, id and
    /// client address are digits and punctuation and need none.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        // Inlined so each key is a constant-length copy rather than a `memcpy` call.
        #[inline(always)]
        fn text(out: &mut Vec<u8>, key: &[u8], v: Option<&str>) {
            out.extend_from_slice(key);
            match v {
                // Most values need no escape: copied as they are.
                Some(v) if !needs_escape(v.as_bytes()) => {
                    out.push(b'"');
                    out.extend_from_slice(v.as_bytes());
                    out.push(b'"');
                }
                // Writing to a Vec cannot fail.
                Some(v) => drop(serde_json::to_writer(&mut *out, v)),
                None => out.extend_from_slice(b"null"),
            }
        }
        #[inline(always)]
        fn number(out: &mut Vec<u8>, key: &[u8], v: u64) {
            out.extend_from_slice(key);
            out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        }
        // One growth for the whole line instead of one per field.
        out.reserve(512);
        out.extend_from_slice(br#"{"ts":""#);
        push_rfc3339_millis(out, self.ts);
        out.extend_from_slice(br#"","id":""#);
        let mut hex = [0u8; 16];
        for (i, h) in hex.iter_mut().enumerate() {
            *h = b"0123456789abcdef"[(self.id >> ((15 - i) * 4)) as usize & 0xf];
        }
        out.extend_from_slice(&hex);
        out.extend_from_slice(br#"","client":""#);
        match self.client {
            SocketAddr::V4(v4) => {
                out.extend_from_slice(Dotted::new(*v4.ip()).as_str().as_bytes());
                out.push(b':');
                out.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
            }
            // Writing to a Vec cannot fail.
            v6 => drop(write!(out, "{v6}")),
        }
        out.push(b'"');
        text(out, br#","user":"#, self.user.as_deref());
        text(out, br#","method":"#, Some(self.method.as_str()));
        text(out, br#","scheme":"#, Some(self.scheme));
        text(out, br#","host":"#, Some(&self.host));
        number(out, br#","port":"#, self.port.into());
        text(out, br#","path":"#, self.path.as_deref());
        text(out, br#","vendor":"#, self.vendor.as_deref());
        text(out, br#","endpoint":"#, Some(self.endpoint));
        text(out, br#","rule":"#, self.rule.as_deref());
        text(out, br#","action":"#, Some(self.action));
        text(out, br#","mode":"#, Some(self.mode));
        text(out, br#","reason":"#, Some(&self.reason));
        number(out, br#","status":"#, self.status.into());
        number(out, br#","bytes_in":"#, self.bytes_in);
        number(out, br#","bytes_out":"#, self.bytes_out);
        out.extend_from_slice(br#","duration_ms":"#);
        let _ = serde_json::to_writer(&mut *out, &((self.duration_ms * 1000.0).round() / 1000.0));
        text(out, br#","tls":"#, Some(self.tls));
        text(out, br#","sni":"#, self.sni.as_deref());
        text(out, br#","key_id":"#, self.key_id.as_deref());
        text(out, br#","model":"#, self.model.as_deref());
        out.push(b'}');
    }
}

/// Whether a JSON string needs escapes (as serde_json writes them: controls, quote,
/// backslash). Eight bytes at a time: the writer thread checks every field of every record.
fn needs_escape(b: &[u8]) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // Per byte, the high bit of the result is set for a byte below 0x20 or equal to `"` or `\`
    // (the zero-byte test of "Bit Twiddling Hacks", exact for these bytes once bytes with
    // their own high bit set are masked out: those are never escaped).
    let hit = |w: u64| {
        let below = w.wrapping_sub(LO * 0x20);
        let quote = (w ^ (LO * u64::from(b'"'))).wrapping_sub(LO);
        let slash = (w ^ (LO * u64::from(b'\\'))).wrapping_sub(LO);
        (below | quote | slash) & !w & HI != 0
    };
    let mut chunks = b.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("eight bytes"));
        if hit(w) {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&c| c < 0x20 || c == b'"' || c == b'\\')
}

/// `2026-11-28T20:52:39.833Z`, as `humantime::format_rfc3339_millis` writes it, without the
/// formatting machinery: the writer thread stamps every record. Civil date from days since
/// 1970 by Howard Hinnant's algorithm; times before 1970 are written as 1970 (clocks there
/// are broken anyway).
fn push_rfc3339_millis(out: &mut Vec<u8>, ts: SystemTime) {
    let since = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    fn two(out: &mut Vec<u8>, n: u64, sep: u8) {
        out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8, sep]);
    }
    let year = year.clamp(0, 9999) as u64;
    two(out, year / 100, b'0' + (year / 10 % 10) as u8);
    out.extend_from_slice(&[b'0' + (year % 10) as u8, b'-']);
    two(out, month as u64, b'-');
    two(out, day as u64, b'T');
    two(out, rem / 3600, b':');
    two(out, rem / 60 % 60, b':');
    two(out, rem % 60, b'.');
    let ms = since.subsec_millis();
    out.push(b'0' + (ms / 100) as u8);
    out.push(b'0' + (ms / 10 % 10) as u8);
    out.push(b'0' + (ms % 10) as u8);
    out.push(b'Z');
}

/// A `Display` value serialised as a JSON string straight into the line, with no `String` in
/// between: the writer thread formats every record.
struct Shown<T>(T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Parts of query parameter names that mark their values as credentials: a parameter whose
/// name (percent-decoded, any case) contains one of them has its value replaced. A substring
/// rule rather than a list of names, because vendors keep inventing spellings: Google's `?key=`,
/// Baidu's `?access_token=`, GitLab's `private_token`, AWS's `X-Amz-Signature`,
/// `X-Amz-Credential` and `X-Amz-Security-Token`, Azure SAS's `sig`, OAuth's `code`,
/// `client_secret`, `assertion` and `SAMLResponse`. Redacting `author` or `zipcode` too is the
/// price: a lost value costs less than a leaked credential.
const SECRET_NAME_PARTS: &[&[u8]] = &[
    b"key",
    b"token",
    b"secret",
    b"auth",
    b"sig",
    b"jwt",
    b"bearer",
    // password, passwd, passphrase, passcode
    b"pass",
    b"pwd",
    // credential, creds
    b"cred",
    b"session",
    b"code",
    b"assertion",
    b"saml",
    b"hmac",
    b"ticket",
];

/// What a credential's value is replaced with.
const REDACTED: &str = "REDACTED";

/// Whether `name` contains one of [`SECRET_NAME_PARTS`], ignoring ASCII case. One pass over
/// the name; a part is compared only where its first letter is (this runs on the request path,
/// for every query parameter).
fn is_secret_name(name: &[u8]) -> bool {
    (0..name.len()).any(|i| {
        let rest = &name[i..];
        let first = rest[0].to_ascii_lowercase();
        SECRET_NAME_PARTS.iter().any(|part| {
            part[0] == first
                && rest.len() >= part.len()
                && rest[..part.len()].eq_ignore_ascii_case(part)
        })
    })
}

/// Whether a parameter name, percent-decoded, names a credential.
fn secret_name(name: &str) -> bool {
    if name.contains('%') {
        is_secret_name(&percent_encoding::percent_decode_str(name).collect::<Vec<u8>>())
    } else {
        is_secret_name(name.as_bytes())
    }
}

/// How vendors' API keys and tokens begin, as issued: one of them as a whole path segment
/// (`/v1/keys/sk-…`) is a credential whatever the path around it.
const KEY_PREFIXES: [&str; 25] = [
    "sk-",
    "fw_",
    "csk-",
    "tgp_v1_",
    "sk_live_",
    "rk_live_",
    "AIza",
    "AKIA",
    "ASIA",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "hf_",
    "gsk_",
    "pplx-",
    "r8_",
    "nvapi-",
    "xai-",
];

/// Shorter segments are names, not keys (`sk-` alone, a model id).
const MIN_KEY_LEN: usize = 20;

/// Whether a value is a credential by its shape: a vendor key (see [`KEY_PREFIXES`]), or
/// Telegram's `bot<id>:<token>`. For what the log shows of paths, query values and `model`.
pub fn looks_like_key(seg: &str) -> bool {
    // Keys are one run of these; a name with a dot, colon or space in it is not one.
    let keyish = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if seg.len() < MIN_KEY_LEN {
        return false;
    }
    if let Some(rest) = seg.strip_prefix("bot") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 0 && rest.as_bytes().get(digits) == Some(&b':') {
            let token = &rest[digits + 1..];
            return token.len() >= 30 && keyish(token);
        }
    }
    match KEY_PREFIXES.iter().find(|p| seg.starts_with(**p)) {
        // AWS access key ids: exactly 20, upper case and digits (`ASIAPacific-…` is a name).
        Some(&("AKIA" | "ASIA")) => {
            seg.len() == 20
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        }
        Some(_) => keyish(seg),
        None => false,
    }
}

/// [`looks_like_key`] for a run found among other text, where words after a prefix are more
/// likely than a key (`sk-hynix-memory-chips-2024`, `xai-org_grok-1_tokenizer`): some piece
/// after the prefix, between `-` and `_`, is 12 characters or more, as an issued key's random
/// part is.
fn key_among_text(run: &str) -> bool {
    looks_like_key(run)
        && KEY_PREFIXES
            .iter()
            .find(|p| run.starts_with(**p))
            .is_none_or(|p| {
                run[p.len()..]
                    .split(['-', '_'])
                    .any(|piece| piece.len() >= 12)
            })
}

/// Whether a piece of a path or a query value holds a credential by its shape, as sent or
/// percent-decoded, up to three times (an origin that decodes `%2F` reads `a%2Fsk-…` as a
/// segment that is a key; a value may be a URL encoded twice): see [`holds_key`].
fn hides_key(piece: &str) -> bool {
    decodings(piece).any(|d| holds_key(&d))
}

/// `s`, then `s` percent-decoded again while it still has escapes: three decodings at most.
fn decodings(s: &str) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    let mut next = Some(std::borrow::Cow::Borrowed(s));
    let mut left = 4;
    std::iter::from_fn(move || {
        let cur = next.take()?;
        left -= 1;
        if left > 0 && cur.contains('%') {
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(&cur).collect();
            let decoded = String::from_utf8_lossy(&decoded).into_owned();
            if decoded != *cur {
                next = Some(std::borrow::Cow::Owned(decoded));
            }
        }
        Some(cur)
    })
}

/// The piece is a key (see [`looks_like_key`]), or holds one among other text: a run of key
/// characters shaped like one, or ending in one after a `-` or `_` (`ids=sk-…,sk-…`,
/// `Bearer+sk-…`, `sk-….json`, `key_sk-…`, a nested URL's `?key=AIza…`), a JWT, a Google
/// OAuth access token, or the token after `Bearer`, `Basic` or `Token`.
fn holds_key(s: &str) -> bool {
    if s.len() < MIN_KEY_LEN {
        return false;
    }
    let in_run = |run: &str| {
        key_among_text(run)
            || run
                .match_indices(['-', '_'])
                .any(|(i, _)| key_among_text(&run[i + 1..]))
    };
    looks_like_key(s)
        || s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .any(in_run)
        || holds_token(s)
        || after_scheme_word(s)
}

/// A JWT (`eyJ…` header, payload, signature, joined by dots) or a Google OAuth access token
/// (`ya29.…`) in `s`: their dots split them into runs no prefix marks. Two dotted parts only
/// (a base64 pagination cursor) are not a JWT.
fn holds_token(s: &str) -> bool {
    let b = s.as_bytes();
    let run = |from: usize, dots: bool| {
        b.get(from..).map_or(0, |t| {
            t.iter()
                .take_while(|c| {
                    c.is_ascii_alphanumeric() || **c == b'-' || **c == b'_' || (dots && **c == b'.')
                })
                .count()
        })
    };
    let jwt = memchr::memmem::find_iter(b, b"eyJ").any(|i| {
        let head = run(i, false);
        let body = i + head + 1;
        let payload = run(body, false);
        head >= 10
            && b.get(i + head) == Some(&b'.')
            && b.get(body + payload) == Some(&b'.')
            && run(body + payload + 1, false) >= 10
    });
    jwt || memchr::memmem::find_iter(b, b"ya29.").any(|i| run(i + 5, true) >= 20)
}

/// The token after an authorization scheme word (`Bearer abc…`, `Basic dXNl…`, `Token …`):
/// a header's value passed along as a query value.
fn after_scheme_word(s: &str) -> bool {
    let b = s.as_bytes();
    ["bearer", "basic", "token"].iter().any(|word| {
        // Case-insensitive without a lowered copy: this runs on the request path.
        let at = |i: usize| {
            b.get(i..i + word.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(word.as_bytes()))
        };
        (0..b.len().saturating_sub(word.len()))
            .filter(|&i| at(i))
            .any(|i| {
                let rest = &s[i + word.len()..];
                let token = rest.trim_start_matches([' ', '+', '\t', ':', '=']);
                token.len() < rest.len()
                    && token
                        .bytes()
                        .take_while(|c| c.is_ascii_alphanumeric() || b"-_.~+/=".contains(c))
                        .count()
                        >= 16
            })
    })
}

/// A query value that carries a credential by name inside it: a URL or query whose own
/// parameters name one (`?u=https://host/x?api_key=…`, encoded once or twice), JSON or a
/// header line passed as a value (`{"api_key":"…"}`, `x-api-key: …`), or a URL with a
/// password in it (`https://admin:pw@host/`).
fn nests_secret(value: &str) -> bool {
    if !value.contains(['=', '%', ':']) {
        return false;
    }
    decodings(value).any(|d| {
        let query_like = d.contains(['?', '&']);
        let pairs = query_like
            && d.split(['?', '&', ';'])
                .filter_map(|pair| pair.split_once('='))
                .any(|(name, v)| !v.is_empty() && secret_name(name));
        pairs || named_with_colon(&d) || userinfo_password(&d)
    })
}

/// `"name": "value"` or `name: value` with a credential's name: JSON or a header line.
fn named_with_colon(s: &str) -> bool {
    s.match_indices(':').any(|(i, _)| {
        let before = s[..i].trim_end().trim_end_matches('"');
        let name_at = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .map_or(0, |k| k + 1);
        let after = s[i + 1..].trim_start().trim_start_matches('"');
        !after.is_empty() && !after.starts_with('/') && secret_name(&before[name_at..])
    })
}

/// `scheme://user:password@host`: a URL carrying its password.
fn userinfo_password(s: &str) -> bool {
    s.match_indices("://").any(|(i, _)| {
        let authority = s[i + 3..].split(['/', '?', '#']).next().unwrap_or_default();
        authority.rsplit_once('@').is_some_and(|(userinfo, _)| {
            userinfo
                .split_once(':')
                .is_some_and(|(_, pw)| !pw.is_empty())
        })
    })
}

/// Whether a `;` parameter of a path segment hides a credential: by its name, as query
/// parameters are, or by its value's shape, or (no `=`) by its own.
fn param_hides(p: &str) -> bool {
    match p.split_once('=') {
        Some((name, value)) => secret_name(name) || hides_key(value),
        None => hides_key(p),
    }
}

/// The path (no query) for the log: segments that are credentials by their shape replaced,
/// and `;name=value` segment parameters (which servlet containers read) redacted by name or
/// by the value's shape. Borrowed back when there is nothing to hide.
fn redact_segments(path: &str) -> std::borrow::Cow<'_, str> {
    // The usual path has neither a `;` nor a segment long enough to be a key: one pass over
    // its bytes tells, before any splitting.
    let mut run = 0;
    let might_hide = path.bytes().any(|b| match b {
        b'/' => {
            run = 0;
            false
        }
        b';' => true,
        _ => {
            run += 1;
            run >= MIN_KEY_LEN
        }
    });
    if !might_hide {
        return std::borrow::Cow::Borrowed(path);
    }
    let hides = |seg: &str| {
        let mut pieces = seg.split(';');
        pieces.next().is_some_and(hides_key) || pieces.any(param_hides)
    };
    if !path.split('/').any(hides) {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let mut pieces = seg.split(';');
        let bare = pieces.next().unwrap_or_default();
        out.push_str(if hides_key(bare) { REDACTED } else { bare });
        for p in pieces {
            out.push(';');
            match p.split_once('=') {
                Some((name, _)) if param_hides(p) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                None if param_hides(p) => out.push_str(REDACTED),
                _ => out.push_str(p),
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The path and query for the log, with credentials replaced: query values by their
/// parameter's name, path segments by their shape (see [`redact_segments`]). Parameters
/// are separated by `&` or `;` (both are read as separators by common servers); names and
/// separators are kept as they came.
pub fn redact_path(path_and_query: &str) -> Box<str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return redact_segments(path_and_query).into();
    };
    let mut out = String::with_capacity(path_and_query.len());
    out.push_str(&redact_segments(path));
    out.push('?');
    let mut rest = query;
    loop {
        let (pair, sep, next) = match rest.find(['&', ';']) {
            Some(i) => (&rest[..i], Some(&rest[i..=i]), &rest[i + 1..]),
            None => (rest, None, ""),
        };
        match pair.split_once('=') {
            Some((name, value)) => {
                // A key pasted as the name (`?sk-…=1`) goes too.
                out.push_str(if hides_key(name) { REDACTED } else { name });
                out.push('=');
                // By its name, or by its shape (`?model=sk-…`, a key where none is expected),
                // or by a name inside it (a URL passed as a value).
                let secret = secret_name(name) || hides_key(value) || nests_secret(value);
                out.push_str(if secret { REDACTED } else { value });
            }
            None => out.push_str(if hides_key(pair) { REDACTED } else { pair }),
        }
        match sep {
            Some(sep) => out.push_str(sep),
            None => break,
        }
        rest = next;
    }
    out.into_boxed_str()
}

enum Msg {
    Record(Box<Record>),
    /// Everything before this is written; flush and stop.
    Close,
}

/// What the request path and the writer thread share. (The overflow keeps the records boxed
/// as they came off the queue's messages: no copy of a large struct under the lock.)
#[allow(clippy::vec_box)]
struct Shared {
    /// False while new requests must be refused (`on_full = "block"` only).
    admitting: AtomicBool,
    block: bool,
    /// Block mode: records of exchanges already served that found the queue full. The writer
    /// takes them after the queue; bounded by `overflow_max` (beyond it: dropped, counted).
    overflow: Mutex<Vec<Box<Record>>>,
    overflow_max: usize,
    /// Set by `close`: a failing sink is no longer waited for.
    closing: AtomicBool,
    /// Set by `reopen` (SIGUSR1), taken by the writer: a flag rather than a message, so that a
    /// full queue cannot lose the request.
    reopen: AtomicBool,
    /// Records given up on at shutdown because the sink still failed (also counted in
    /// `portcullis_audit_dropped_total`).
    lost: AtomicU64,
    /// Records taken into the queue (or the overflow), and records the writer is done with
    /// (on the sink, or lost): at shutdown, what a stalled sink still holds is the difference.
    taken: AtomicU64,
    settled: AtomicU64,
    /// When a dropped record was last reported in the process log: milliseconds since
    /// `born`, plus one (0: never).
    drop_reported: AtomicU64,
    born: Instant,
}

/// How often dropped records are reported in the process log, at most.
const DROP_REPORT: Duration = Duration::from_secs(10);

impl Shared {
    #[allow(clippy::vec_box)]
    fn overflow(&self) -> std::sync::MutexGuard<'_, Vec<Box<Record>>> {
        self.overflow.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sending side, cheap to clone into every connection.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<Msg>,
    dropped: IntCounter,
    next_id: Arc<AtomicU64>,
    shared: Arc<Shared>,
}

impl AuditSink {
    /// Never blocks. A full queue drops the record and counts it, or with `on_full = "block"`
    /// keeps it aside and stops admission until the writer catches up.
    pub fn send(&self, record: Box<Record>) {
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => {
                self.shared.taken.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(Msg::Record(r))) if self.shared.block => {
                if self.shared.admitting.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "audit log: the queue is full; refusing new requests (503) until the writer catches up (on_full = \"block\")"
                    );
                }
                let mut spill = self.shared.overflow();
                if spill.len() < self.shared.overflow_max {
                    spill.push(r);
                    self.shared.taken.fetch_add(1, Ordering::Relaxed);
                } else {
                    drop(spill);
                    self.drop_one();
                }
            }
            Err(_) => self.drop_one(),
        }
    }

    /// A record the queue had no room for: counted, and said in the process log at most
    /// every [`DROP_REPORT`], so a log watcher learns of it as well as the metric.
    #[cold]
    fn drop_one(&self) {
        self.dropped.inc();
        let shared = &self.shared;
        let now = shared.born.elapsed().as_millis() as u64 + 1;
        let last = shared.drop_reported.load(Ordering::Relaxed);
        let due = last == 0 || now >= last + DROP_REPORT.as_millis() as u64;
        if due
            && shared
                .drop_reported
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped = self.dropped.get(),
                "audit log: records dropped, the queue is full (the sink is slow or failing; on_full = \"drop\"); counted in portcullis_audit_dropped_total"
            );
        }
    }

    /// False while requests must be refused because the audit log cannot take their records
    /// (`on_full = "block"` and a full queue or a failing sink). One atomic load.
    pub fn admitting(&self) -> bool {
        self.shared.admitting.load(Ordering::Relaxed)
    }

    /// Asks the writer to close and reopen the file (after logrotate moved it). Never lost:
    /// the writer takes the request before its next record, however full the queue is.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }

    /// How many records `close` had to give up on because the sink still failed.
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Acquire)
    }

    /// Unique per process run: a random-ish start so ids from restarts do not collide.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Owns the writer thread; `close` drains and flushes.
pub struct AuditWriter {
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The longest `close` waits for a stalled sink before giving up on it.
const CLOSE_WAIT: Duration = Duration::from_secs(30);

/// Opens the sink (a file, or stdout) and starts the writer thread.
pub fn start(
    settings: &AuditSettings,
    written: IntCounter,
    dropped: IntCounter,
) -> io::Result<(AuditSink, AuditWriter)> {
    let file = FileSink::open(settings)?;
    let (tx, rx) = sync_channel(settings.queue);
    let shared = Arc::new(Shared {
        admitting: AtomicBool::new(true),
        block: settings.on_full == OnFull::Block,
        overflow: Mutex::new(Vec::new()),
        overflow_max: settings.queue.max(1024),
        closing: AtomicBool::new(false),
        reopen: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        taken: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        drop_reported: AtomicU64::new(0),
        born: Instant::now(),
    });
    let writer = Writer {
        sink: file,
        shared: shared.clone(),
        written,
        dropped: dropped.clone(),
        line: Vec::with_capacity(1024),
        pending: 0,
        failing: false,
    };
    let thread = std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || write_loop(rx, writer))?;
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        << 16;
    Ok((
        AuditSink {
            tx,
            dropped,
            next_id: Arc::new(AtomicU64::new(seed)),
            shared,
        },
        AuditWriter {
            thread: Mutex::new(Some(thread)),
        },
    ))
}

impl AuditWriter {
    /// Writes everything queued so far, flushes and stops the writer. Call it after the last
    /// request has finished: a record sent later is counted as dropped. A sink that fails is
    /// not retried any more (what it refuses is counted as dropped); one that blocks (a FIFO
    /// nobody reads) is waited for up to [`CLOSE_WAIT`]. Returns how many records were given
    /// up on because the sink still failed (and says so in the log).
    pub fn close(&self, sink: &AuditSink) -> u64 {
        self.close_within(sink, CLOSE_WAIT)
    }

    fn close_within(&self, sink: &AuditSink, wait: Duration) -> u64 {
        sink.shared.closing.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + wait;
        let mut msg = Msg::Close;
        loop {
            match sink.tx.try_send(msg) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(TrySendError::Full(_)) => break,
            }
        }
        let handle = self.thread.lock().map(|mut t| t.take()).unwrap_or(None);
        if let Some(h) = handle {
            while !h.is_finished() {
                if Instant::now() >= deadline {
                    // The writer is stuck in a write: what it holds, and what is still queued
                    // behind it, never reaches the log.
                    let shared = &sink.shared;
                    let held = shared
                        .taken
                        .load(Ordering::Acquire)
                        .saturating_sub(shared.settled.load(Ordering::Acquire));
                    sink.dropped.inc_by(held);
                    let lost = shared.lost.fetch_add(held, Ordering::AcqRel) + held;
                    tracing::error!(
                        lost,
                        "audit log: {lost} records lost at shutdown (the sink was still blocked after {wait:?}; counted in portcullis_audit_dropped_total)"
                    );
                    return lost;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = h.join();
        }
        // The running drops were said at most every `DROP_REPORT`: the total once more.
        let dropped = sink.dropped.get().saturating_sub(sink.lost());
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "audit log: {dropped} records dropped while running (queue full; on_full = \"drop\")"
            );
        }
        let lost = sink.lost();
        if lost > 0 {
            tracing::error!(
                lost,
                "audit log: {lost} records lost at shutdown (the sink still failed; counted in portcullis_audit_dropped_total)"
            );
        }
        lost
    }
}

/// The open audit file (or stdout), with what rotation needs to know.
struct FileSink {
    out: BufWriter<Box<dyn Write + Send>>,
    path: Option<PathBuf>,
    size: u64,
    /// 0: no size rotation (always 0 for stdout).
    max_size: u64,
    keep: usize,
    rotation: RotationState,
}

/// A size rotation that fails (a directory in the way, a read-only directory) is retried at
/// most every [`ROTATE_RETRY`] and reported at most every [`ROTATE_REPORT`]; records are
/// written on to the current file meanwhile.
#[derive(Default)]
struct RotationState {
    /// No rotation is tried before this.
    retry_at: Option<Instant>,
    /// When a failure was last reported.
    reported_at: Option<Instant>,
    /// Failed attempts since the last success.
    failures: u64,
}

const ROTATE_RETRY: Duration = Duration::from_secs(5);
const ROTATE_REPORT: Duration = Duration::from_secs(60);

/// Mode of an audit file portcullis creates: it holds user names and client addresses.
const FILE_MODE: u32 = 0o640;

impl FileSink {
    fn open(s: &AuditSettings) -> io::Result<FileSink> {
        let (out, size) = open(s.path.as_ref())?;
        Ok(FileSink {
            out: BufWriter::with_capacity(64 * 1024, out),
            path: s.path.clone(),
            size,
            max_size: if s.path.is_some() { s.max_size } else { 0 },
            keep: s.keep,
            rotation: RotationState::default(),
        })
    }

    /// Whole lines only: a rotation happens between records, never inside one.
    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.max_size > 0 && self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate_due()?;
        }
        self.out.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// The file is full: rotate, unless a failed rotation is waiting for its retry. An error
    /// is the sink's (flushing what is buffered), to be retried as a write; a failed rotation
    /// is reported (rate-limited) and writing goes on.
    #[cold]
    fn rotate_due(&mut self) -> io::Result<()> {
        let now = Instant::now();
        if self.rotation.retry_at.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.out.flush()?;
        match self.rotate() {
            Ok(()) => {
                if self.rotation.failures > 0 {
                    tracing::warn!(
                        failed_attempts = self.rotation.failures,
                        "audit log rotation works again"
                    );
                }
                self.rotation = RotationState::default();
            }
            Err(e) => {
                let r = &mut self.rotation;
                r.failures += 1;
                r.retry_at = Some(now + ROTATE_RETRY);
                if r.reported_at
                    .is_none_or(|t| now.duration_since(t) >= ROTATE_REPORT)
                {
                    r.reported_at = Some(now);
                    tracing::error!(
                        error = %e,
                        failed_attempts = r.failures,
                        "audit log rotation failed; writing on past max_size, retrying every {ROTATE_RETRY:?} (reported at most every {ROTATE_REPORT:?})"
                    );
                }
            }
        }
        Ok(())
    }

    /// path.N-1 → path.N … path → path.1, then a fresh path. Stops at the first step that
    /// fails (other than a file not there), so that a retried rotation never shifts older
    /// files over each other.
    fn rotate(&mut self) -> io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let name = |n: usize| {
            let mut p = path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let absent_ok = |r: io::Result<()>| match r {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        absent_ok(std::fs::remove_file(name(self.keep)))?;
        for n in (1..self.keep).rev() {
            absent_ok(std::fs::rename(name(n), name(n + 1)))?;
        }
        std::fs::rename(&path, name(1))?;
        self.reopen()
    }

    /// After an external rotation (logrotate + SIGUSR1): write to whatever is at `path` now.
    fn reopen(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let (out, size) = open(self.path.as_ref())?;
        self.out = BufWriter::with_capacity(64 * 1024, out);
        self.size = size;
        Ok(())
    }
}

fn open(path: Option<&PathBuf>) -> io::Result<(Box<dyn Write + Send>, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(match path {
        None => (Box::new(io::stdout()), 0),
        Some(p) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(FILE_MODE)
                .open(p)?;
            let mut size = f.metadata().map(|m| m.len()).unwrap_or(0);
            // A process stopped mid-line (the disk was full at shutdown) left a partial last
            // line: end it, so the first record written now is a line of its own.
            if size > 0 && !ends_in_newline(p, size) {
                (&f).write_all(b"\n")?;
                size += 1;
            }
            (Box::new(f), size)
        }
    })
}

/// Whether the file's last byte is a newline; true when it cannot be read (a file opened
/// for appending only).
fn ends_in_newline(path: &Path, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut last = [b'\n'];
    match std::fs::File::open(path) {
        Ok(f) => f.read_exact_at(&mut last, size - 1).is_err() || last[0] == b'\n',
        Err(_) => true,
    }
}

/// Longest the writer sleeps when the queue is empty: the most a record waits to be written
/// when traffic is quiet.
const IDLE_POLL_MAX: Duration = Duration::from_millis(20);
const BUSY_POLL: Duration = Duration::from_millis(2);
/// Retry interval of a failing sink: doubling from the first to the second.
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// The writer thread's side: the sink and what it reports.
struct Writer {
    sink: FileSink,
    shared: Arc<Shared>,
    written: IntCounter,
    dropped: IntCounter,
    line: Vec<u8>,
    /// Records taken by the sink's buffer since its last successful flush: counted as
    /// written when a flush succeeds, so that one given up on at shutdown is counted once
    /// (as dropped), never as both.
    pending: u64,
    /// The last write or flush failed.
    failing: bool,
}

impl Writer {
    /// Writes one record, retrying while the sink fails: a record the writer has taken is
    /// lost only if the process shuts down while the sink still fails.
    fn write(&mut self, r: &Record) {
        self.line.clear();
        r.write_json(&mut self.line);
        self.line.push(b'\n');
        let mut backoff = RETRY_MIN;
        loop {
            match self.sink.write_line(&self.line) {
                Ok(()) => {
                    self.pending += 1;
                    return;
                }
                Err(e) => {
                    if !self.wait_for_sink(&e, &mut backoff) {
                        self.lose(1);
                        return;
                    }
                }
            }
        }
    }

    /// Flushes, retrying while the sink fails (the buffer keeps what was not written). False
    /// when it gave up (shutting down).
    fn flush(&mut self) -> bool {
        let mut backoff = RETRY_MIN;
        loop {
            match self.sink.out.flush() {
                Ok(()) => {
                    let n = std::mem::take(&mut self.pending);
                    self.written.inc_by(n);
                    self.shared.settled.fetch_add(n, Ordering::Release);
                    if self.failing {
                        self.failing = false;
                        tracing::warn!("audit log writable again");
                    }
                    return true;
                }
                Err(e) => {
                    if !self.wait_for_sink(&e, &mut backoff) {
                        return false;
                    }
                }
            }
        }
    }

    /// The last flush, at shutdown. If the sink still fails, the records whose line has not
    /// reached it whole (their newline is still in the buffer) are lost: counted as dropped,
    /// and the buffer is discarded rather than flushed once more on drop.
    fn finish(mut self) {
        if self.flush() {
            return;
        }
        let held = self
            .sink
            .out
            .buffer()
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        let written = std::mem::take(&mut self.pending).saturating_sub(held);
        self.written.inc_by(written);
        self.shared.settled.fetch_add(written, Ordering::Release);
        self.lose(held);
        let out = std::mem::replace(
            &mut self.sink.out,
            BufWriter::new(Box::new(io::sink()) as Box<dyn Write + Send>),
        );
        drop(out.into_parts());
    }

    /// `n` records given up on at shutdown.
    fn lose(&self, n: u64) {
        self.dropped.inc_by(n);
        self.shared.lost.fetch_add(n, Ordering::AcqRel);
        self.shared.settled.fetch_add(n, Ordering::Release);
    }

    /// Reopens the file if `reopen` was asked for since the last look. One load per record.
    #[inline]
    fn reopen_if_asked(&mut self) {
        if self.shared.reopen.load(Ordering::Relaxed)
            && self.shared.reopen.swap(false, Ordering::AcqRel)
        {
            if let Err(e) = self.sink.reopen() {
                tracing::error!(error = %e, "audit log reopen failed; keeping the old file");
            }
        }
    }

    /// The sink failed: say so (once), stop admission in block mode, wait before the retry.
    /// False when shutting down: give up instead.
    fn wait_for_sink(&mut self, e: &io::Error, backoff: &mut Duration) -> bool {
        if !self.failing {
            self.failing = true;
            tracing::error!(error = %e, "audit log write failed; holding records and retrying");
        }
        if self.shared.block {
            self.shared.admitting.store(false, Ordering::Relaxed);
        }
        if self.shared.closing.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(RETRY_MAX);
        true
    }

    /// The queue was just found empty: in block mode, admit again once nothing is held back.
    fn caught_up(&self) {
        if self.shared.block
            && !self.failing
            && !self.shared.admitting.load(Ordering::Relaxed)
            && self.shared.overflow().is_empty()
        {
            self.shared.admitting.store(true, Ordering::Relaxed);
            tracing::warn!("audit log caught up; admitting requests again");
        }
    }
}

/// The writer polls instead of blocking in `recv`: a blocking receiver makes every `send`
/// wake it (a futex call and a context switch per record, on the request path's core).
/// Polling lets records pile up and be written, and flushed, in batches.
fn write_loop(rx: Receiver<Msg>, mut w: Writer) {
    let mut idle = BUSY_POLL;
    'outer: loop {
        let mut got = false;
        loop {
            w.reopen_if_asked();
            match rx.try_recv() {
                Ok(Msg::Record(r)) => {
                    got = true;
                    w.write(&r);
                }
                Ok(Msg::Close) | Err(TryRecvError::Disconnected) => break 'outer,
                Err(TryRecvError::Empty) => {
                    // Then what overflowed while the queue was full (block mode).
                    let spilled = std::mem::take(&mut *w.shared.overflow());
                    if spilled.is_empty() {
                        break;
                    }
                    got = true;
                    for r in spilled {
                        w.write(&r);
                    }
                }
            }
        }
        if got {
            w.flush();
            idle = BUSY_POLL;
        } else {
            idle = (idle * 2).min(IDLE_POLL_MAX);
        }
        w.caught_up();
        std::thread::sleep(idle);
    }
    // A record sent after `close` (none should be) is written, or counted if the sink fails.
    while let Ok(Msg::Record(r)) = rx.try_recv() {
        w.write(&r);
    }
    drop(rx);
    let spilled = std::mem::take(&mut *w.shared.overflow());
    for r in spilled {
        w.write(&r);
    }
    w.finish();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_rotation_keeps_whole_lines_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let settings = AuditSettings {
            path: Some(path.clone()),
            queue: 16,
            max_size: 100,
            keep: 2,
            on_full: OnFull::Drop,
        };
        let mut sink = FileSink::open(&settings).unwrap();
        for i in 0..10 {
            sink.write_line(format!("{{\"n\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}\n").as_bytes())
                .unwrap();
        }
        sink.out.flush().unwrap();
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        let cur = read(&path);
        let one = read(&dir.path().join("audit.jsonl.1"));
        let two = read(&dir.path().join("audit.jsonl.2"));
        assert!(!dir.path().join("audit.jsonl.3").exists(), "keep = 2");
        for f in [&cur, &one, &two] {
            assert!(f.len() <= 100 && f.ends_with('\n'), "{f:?}");
            for l in f.lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
        }
        // The newest lines survive; the oldest were rotated away.
        assert!(cur.contains("\"n\":9"));
    }

    /// A line cut short by the last run (the disk was full when it stopped) is ended before
    /// the first record of this one, which would otherwise be glued onto it.
    #[test]
    fn a_partial_last_line_is_ended_before_new_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"n\":1}\n{\"n\":2,\"cut").unwrap();
        let settings = AuditSettings {
            path: Some(path.clone()),
            queue: 16,
            max_size: 0,
            keep: 2,
            on_full: OnFull::Drop,
        };
        for _ in 0..2 {
            let mut sink = FileSink::open(&settings).unwrap();
            sink.write_line(b"{\"n\":3}\n").unwrap();
            sink.out.flush().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":1}\n{\"n\":2,\"cut\n{\"n\":3}\n{\"n\":3}\n");
    }

    fn sample() -> Record {
        Record {
            ts: SystemTime::UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            id: 0xabc,
            client: "127.0.0.1:40000".parse().unwrap(),
            user: None,
            method: http::Method::GET,
            scheme: "http",
            host: "api.openai.com".into(),
            port: 80,
            path: Some("/v1/models".into()),
            vendor: Some("openai".into()),
            endpoint: "models",
            rule: None,
            action: "allow",
            mode: "enforce",
            reason: "default".into(),
            status: 200,
            bytes_in: 128,
            bytes_out: 0,
            duration_ms: 0.4567,
            tls: "none",
            sni: None,
            key_id: None,
            model: None,
            key_ids: Vec::new(),
        }
    }

    #[test]
    fn hand_written_json_is_byte_for_byte_the_serde_form() {
        let mut odd = sample();
        odd.client = "[fe80::1%2]:8443".parse().unwrap();
        odd.user = Some("ann \"the\" admin\\\u{1}".into());
        odd.method = http::Method::from_bytes(b"PROPFIND").unwrap();
        odd.host = "xn--bcher-kva.example".into();
        odd.port = 65535;
        odd.path = Some("/a\"b\\c?q=\u{7f}é\n".into());
        odd.rule = Some("cap-\"x\"".into());
        odd.reason = "rate_limited: 10/min; <script>\t".into();
        odd.status = 429;
        odd.bytes_in = u64::MAX;
        odd.bytes_out = 1 << 40;
        odd.duration_ms = 12345.0;
        odd.tls = "intercept";
        odd.sni = Some("api.openai.com".into());
        odd.key_id = Some("k_0123456789ab".into());
        odd.model = Some("gpt-4o\u{2028}".into());
        odd.ts = UNIX_EPOCH + Duration::from_millis(951_868_799_001);
        let mut tiny = sample();
        tiny.client = "255.10.0.1:1".parse().unwrap();
        tiny.duration_ms = 0.0;
        tiny.path = None;
        tiny.vendor = None;
        for r in [sample(), odd, tiny] {
            let mut ours = Vec::new();
            r.write_json(&mut ours);
            let serde = serde_json::to_vec(&r).unwrap();
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                String::from_utf8(serde).unwrap()
            );
        }
    }

    #[test]
    fn escape_check_agrees_with_the_byte_rule_at_every_position() {
        let naive = |b: &[u8]| b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        // Every byte value, at every offset of a 19-byte field (two words and a tail), among
        // neighbours that could disturb a borrow: plain letters, 0x80+ bytes, near misses.
        for filler in [b'a', 0x80, 0xff, 0x20, 0x21, 0x23, 0x5b, 0x5d] {
            for pos in 0..19 {
                for c in 0..=255u8 {
                    let mut field = [filler; 19];
                    field[pos] = c;
                    assert_eq!(
                        needs_escape(&field),
                        naive(&field),
                        "byte {c:#x} at {pos} among {filler:#x}"
                    );
                }
            }
        }
        assert!(!needs_escape(b""));
    }

    #[test]
    fn timestamps_match_humantime() {
        let at = |secs: u64, ms: u32| {
            UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms.into())
        };
        let mut cases = vec![
            at(0, 0),
            at(951_782_400, 999),     // 2000-02-29
            at(1_709_251_199, 999),   // 2024-02-29T23:59:59.999
            at(4_107_542_400, 7),     // 2100-03-01
            at(253_402_300_799, 500), // 9999-12-31T23:59:59.500
        ];
        cases.extend(
            (0..4_102_444_800u64)
                .step_by(113_417)
                .map(|s| at(s, (s % 1000) as u32)),
        );
        for ts in cases {
            let mut ours = Vec::new();
            push_rfc3339_millis(&mut ours, ts);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                humantime::format_rfc3339_millis(ts).to_string()
            );
        }
    }

    /// What `f` logs through `tracing` on this thread, as text.
    fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let out = tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (out, text)
    }

    fn settings(path: Option<PathBuf>) -> AuditSettings {
        AuditSettings {
            path,
            queue: 16,
            max_size: 0,
            keep: 1,
            on_full: OnFull::Drop,
        }
    }

    #[test]
    fn a_failing_rotation_is_retried_with_backoff_and_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        // Rotation must rename the file to audit.jsonl.1: a directory is in the way.
        std::fs::create_dir(dir.path().join("audit.jsonl.1")).unwrap();
        let mut s = settings(Some(path.clone()));
        s.max_size = 100;
        let mut sink = FileSink::open(&s).unwrap();
        let line = |i: usize| format!("{{\"n\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxx\"}}\n");
        let ((), logs) = logs_of(|| {
            for i in 0..50 {
                sink.write_line(line(i).as_bytes()).unwrap();
            }
            sink.out.flush().unwrap();
        });
        assert_eq!(logs.matches("ERROR").count(), 1, "{logs}");
        assert!(logs.contains("audit log rotation failed"), "{logs}");
        // Every record was written on, to the current file.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 50);
        assert!(dir.path().join("audit.jsonl.1").is_dir());

        // The obstacle goes; once the retry is due, the next record rotates and max_size holds.
        std::fs::remove_dir(dir.path().join("audit.jsonl.1")).unwrap();
        sink.rotation.retry_at = Some(Instant::now());
        let ((), logs) = logs_of(|| {
            sink.write_line(line(50).as_bytes()).unwrap();
            sink.out.flush().unwrap();
        });
        assert!(logs.contains("audit log rotation works again"), "{logs}");
        let old = std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap();
        assert_eq!(old.lines().count(), 50);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), line(50));
    }

    #[test]
    fn a_failed_rotation_does_not_shift_older_files_over_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let name = |n: usize| dir.path().join(format!("audit.jsonl.{n}"));
        // audit.jsonl.3 cannot be removed: the rotation must stop before moving .2 onto it
        // or .1 onto .2.
        std::fs::create_dir(name(3)).unwrap();
        std::fs::write(name(2), "two\n").unwrap();
        std::fs::write(name(1), "one\n").unwrap();
        let mut s = settings(Some(path.clone()));
        s.keep = 3;
        let mut sink = FileSink::open(&s).unwrap();
        sink.write_line(b"zero\n").unwrap();
        assert!(sink.rotate().is_err());
        assert_eq!(std::fs::read_to_string(name(1)).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(name(2)).unwrap(), "two\n");
    }

    #[test]
    fn the_audit_file_is_created_readable_by_owner_and_group_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut s = settings(Some(path.clone()));
        s.max_size = 10;
        let mut sink = FileSink::open(&s).unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o640);
        // The file a size rotation starts is created the same way.
        sink.write_line(b"0123456789\n").unwrap();
        sink.write_line(b"0123456789\n").unwrap();
        sink.out.flush().unwrap();
        assert!(dir.path().join("audit.jsonl.1").exists());
        assert_eq!(mode(&path), 0o640);
    }

    /// Waits (up to 10 s) for `cond`.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn records_a_failing_sink_holds_at_shutdown_are_counted_as_dropped() {
        // /dev/full takes the open and refuses every write (ENOSPC): the records stay in the
        // writer's buffer until shutdown gives up on them.
        let written = IntCounter::new("w", "w").unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let (sink, writer) = start(
            &settings(Some("/dev/full".into())),
            written.clone(),
            dropped.clone(),
        )
        .unwrap();
        for _ in 0..5 {
            sink.send(Box::new(sample()));
        }
        // Let the writer take them and fail its flush at least once.
        std::thread::sleep(Duration::from_millis(100));
        let (lost, logs) = logs_of(|| writer.close(&sink));
        assert_eq!(lost, 5);
        assert_eq!(sink.lost(), 5);
        assert_eq!(dropped.get(), 5);
        assert_eq!(
            written.get(),
            0,
            "a lost record is not also counted as written"
        );
        assert!(logs.contains("5 records lost at shutdown"), "{logs}");
    }

    /// A FIFO whose reader never reads, and that reader: a writer blocks in a write once the
    /// pipe and its own buffer are full.
    fn stalled_fifo(dir: &std::path::Path) -> (PathBuf, std::fs::File) {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = dir.join("audit.fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        (fifo, reader)
    }

    #[test]
    fn records_a_stalled_sink_holds_at_shutdown_are_counted_as_lost() {
        // The writer blocks with some records in hand and the rest queued behind it.
        let dir = tempfile::tempdir().unwrap();
        let (fifo, _reader) = stalled_fifo(dir.path());
        let written = IntCounter::new("w", "w").unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let mut s = settings(Some(fifo));
        s.queue = 4096;
        let (sink, writer) = start(&s, written.clone(), dropped.clone()).unwrap();
        const SENT: u64 = 2000;
        for _ in 0..SENT {
            sink.send(Box::new(sample()));
        }
        std::thread::sleep(Duration::from_millis(100));
        let (lost, logs) = logs_of(|| writer.close_within(&sink, Duration::from_millis(500)));
        assert!(lost > 0, "{logs}");
        assert_eq!(sink.lost(), lost);
        // Every record is accounted for: on the sink, or dropped (lost ones included).
        assert_eq!(written.get() + dropped.get(), SENT, "{logs}");
        assert!(
            logs.contains(&format!("{lost} records lost at shutdown")),
            "{logs}"
        );
    }

    #[test]
    fn dropped_records_are_said_in_the_process_log_not_on_every_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (fifo, _reader) = stalled_fifo(dir.path());
        let dropped = IntCounter::new("d", "d").unwrap();
        let (sink, writer) = start(
            &settings(Some(fifo)),
            IntCounter::new("w", "w").unwrap(),
            dropped.clone(),
        )
        .unwrap();
        let ((), logs) = logs_of(|| {
            for _ in 0..2000 {
                sink.send(Box::new(sample()));
            }
        });
        assert!(dropped.get() > 100, "the queue never filled");
        assert_eq!(logs.matches("records dropped").count(), 1, "{logs}");
        writer.close_within(&sink, Duration::from_millis(100));
    }

    #[test]
    fn written_counts_records_once_flushed_and_shutdown_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let written = IntCounter::new("w", "w").unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let (sink, writer) = start(
            &settings(Some(path.clone())),
            written.clone(),
            dropped.clone(),
        )
        .unwrap();
        for _ in 0..5 {
            sink.send(Box::new(sample()));
        }
        wait_for("5 records counted", || written.get() == 5);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 5);
        let (lost, logs) = logs_of(|| writer.close(&sink));
        assert_eq!((lost, dropped.get()), (0, 0));
        assert!(!logs.contains("lost"), "{logs}");
    }

    #[test]
    fn reopen_is_not_lost_when_the_queue_is_full() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("audit.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        // A log shipper that holds the FIFO open and does not read (yet).
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(0o4000) // O_NONBLOCK
            .open(&fifo)
            .unwrap();
        let written = IntCounter::new("w", "w").unwrap();
        let dropped = IntCounter::new("d", "d").unwrap();
        let mut s = settings(Some(fifo.clone()));
        s.queue = 1;
        let (sink, writer) = start(&s, written.clone(), dropped.clone()).unwrap();
        // Fill the pipe until the writer blocks in a write: then the one-slot queue stays
        // full and every record sent is dropped (the writer polls at least every 20 ms).
        let mut in_a_row = 0;
        wait_for("the writer to block on the pipe", || {
            let before = dropped.get();
            sink.send(Box::new(sample()));
            std::thread::sleep(Duration::from_millis(1));
            in_a_row = if dropped.get() > before {
                in_a_row + 1
            } else {
                0
            };
            in_a_row >= 100
        });
        // Logrotate moves the FIFO away and asks for a reopen while the queue is full.
        std::fs::rename(&fifo, dir.path().join("audit.fifo.1")).unwrap();
        sink.reopen();
        // The shipper reads again: the writer unblocks, takes the reopen and creates a new
        // file at the configured path for the records after it.
        let stop = Arc::new(AtomicBool::new(false));
        let drain = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    if !matches!(std::io::Read::read(&mut reader, &mut buf), Ok(1..)) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            })
        };
        wait_for("the reopen to create a new file", || fifo.is_file());
        sink.send(Box::new(sample()));
        writer.close(&sink);
        stop.store(true, Ordering::Relaxed);
        drain.join().unwrap();
        assert!(!std::fs::read_to_string(&fifo).unwrap().is_empty());
    }

    #[test]
    fn redacts_credentials_in_query() {
        assert_eq!(&*redact_path("/v1/x"), "/v1/x");
        assert_eq!(
            &*redact_path("/v1beta/models/m:generateContent?key=AIzaSECRET&alt=sse"),
            "/v1beta/models/m:generateContent?key=REDACTED&alt=sse"
        );
        assert_eq!(
            &*redact_path("/rpc?ACCESS_TOKEN=abc&%6Bey=zzz&flag"),
            "/rpc?ACCESS_TOKEN=REDACTED&%6Bey=REDACTED&flag"
        );
    }

    #[test]
    fn redacts_the_reviewers_query_with_semicolons() {
        assert_eq!(
            &*redact_path(
                "/p?x=1;key=S1&api_token=S2&private_token=S3&auth_token=S4&bearer=S5&jwt=S6"
            ),
            "/p?x=1;key=REDACTED&api_token=REDACTED&private_token=REDACTED\
             &auth_token=REDACTED&bearer=REDACTED&jwt=REDACTED"
        );
    }

    #[test]
    fn semicolons_separate_parameters_and_are_kept() {
        assert_eq!(&*redact_path("/p?a=1;key=S"), "/p?a=1;key=REDACTED");
        // Keys in the path, by their shape; segment parameters by their name.
        for (sent, logged) in [
            (
                "/v1/keys/sk-proj-ZQXpath0123456789abc/x",
                "/v1/keys/REDACTED/x",
            ),
            ("/v1/m/AIzaSyZQXpath02abcdefghij", "/v1/m/REDACTED"),
            (
                "/bot123456:ZQXtelegram03abcdefghijklmnopqrst/getMe",
                "/REDACTED/getMe",
            ),
            (
                "/reports/ASIAPacific-report-2024",
                "/reports/ASIAPacific-report-2024",
            ),
            ("/keys/AKIAIOSFODNN7EXAMPLE", "/keys/REDACTED"),
            (
                "/bot42:sendMessage-and-more-text",
                "/bot42:sendMessage-and-more-text",
            ),
            (
                "/app;jsessionid=ABC123;lang=en/x?q=1",
                "/app;jsessionid=REDACTED;lang=en/x?q=1",
            ),
            ("/x;key=S", "/x;key=REDACTED"),
            ("/x;%6Bey=S", "/x;%6Bey=REDACTED"),
            (
                "/v1/m?model=sk-proj-ZQXquery0123456789ab&n=1",
                "/v1/m?model=REDACTED&n=1",
            ),
            // Names, not keys: short, or not a key's beginning.
            (
                "/v1/models/gpt-4o-mini-2024-07-18",
                "/v1/models/gpt-4o-mini-2024-07-18",
            ),
            ("/v1/sk-short", "/v1/sk-short"),
            (
                "/botanical-garden-images-2024:x",
                "/botanical-garden-images-2024:x",
            ),
            ("/a;b;c=d", "/a;b;c=d"),
            // Keys behind an encoded slash, in a segment parameter of any name or none, or
            // percent-encoded: an origin that decodes reads a key there.
            (
                "/v1/models/a%2Fsk-proj-ZQXpath0123456789abcd",
                "/v1/models/REDACTED",
            ),
            (
                "/v1/chat/completions;x=sk-proj-ZQXparam0123456789ab",
                "/v1/chat/completions;x=REDACTED",
            ),
            (
                "/v1/files;sk-proj-ZQXbare0123456789abcd/x",
                "/v1/files;REDACTED/x",
            ),
            ("/v1/sk%2Dproj%2DZQXenc0123456789abcd", "/v1/REDACTED"),
            (
                "/p?x=a%2Fsk-proj-ZQXquery0123456789ab&sk-proj-ZQXbare0123456789abcd",
                "/p?x=REDACTED&REDACTED",
            ),
            ("/v1/models/a%2Fgpt-4o-mini", "/v1/models/a%2Fgpt-4o-mini"),
            ("", ""),
            ("/", "/"),
        ] {
            assert_eq!(&*redact_path(sent), logged, "{sent}");
        }
        assert_eq!(&*redact_path("/p?key=S;a=1"), "/p?key=REDACTED;a=1");
        assert_eq!(&*redact_path("/p?a=1;b=2&c=3"), "/p?a=1;b=2&c=3");
        assert_eq!(&*redact_path("/p?;;&"), "/p?;;&");
        assert_eq!(&*redact_path("/p?"), "/p?");
        assert_eq!(&*redact_path("/p?key"), "/p?key");
        assert_eq!(&*redact_path("/p?key="), "/p?key=REDACTED");
        assert_eq!(&*redact_path("/p?key=a=b;c=d"), "/p?key=REDACTED;c=d");
    }

    /// Keys among other text in a value or segment, in shapes the red team sent: lists,
    /// `Bearer` prefixes, file names, URLs passed as values, JWTs, vendors' newer prefixes.
    #[test]
    fn keys_inside_longer_values_are_redacted() {
        let k = "sk-proj-ZQXinside0123456789abcd";
        for (sent, logged) in [
            (format!("/v1/x?ids={k},{k}"), "/v1/x?ids=REDACTED"),
            (format!("/v1/x?h=Bearer+{k}"), "/v1/x?h=REDACTED"),
            (format!("/v1/x?h=Bearer%20{k}"), "/v1/x?h=REDACTED"),
            (format!("/v1/{k}.json"), "/v1/REDACTED"),
            (format!("/v1/x?x={k}."), "/v1/x?x=REDACTED"),
            (
                "/v1/x?u=https://g.example/v1/x?key=AIzaSyZQXnested0123456789".into(),
                "/v1/x?u=REDACTED",
            ),
            (
                "/v1/x?u=https%3A%2F%2Fg.example%2Fv1%3Fapi_key%3Dplainsecret".into(),
                "/v1/x?u=REDACTED",
            ),
            (
                "/v1/x?json=%7B%22k%22%3A%22sk-ant-api03-ZQXjson0123456789%22%7D".into(),
                "/v1/x?json=REDACTED",
            ),
            (
                "/v1/files/fw_ZQXfireworks0123456789ab".into(),
                "/v1/files/REDACTED",
            ),
            (
                "/v1/x?c=csk-ZQXcerebras0123456789abc".into(),
                "/v1/x?c=REDACTED",
            ),
            (
                "/v1/x?t=tgp_v1_ZQXtogether0123456789a".into(),
                "/v1/x?t=REDACTED",
            ),
            (
                "/v1/x?t=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl".into(),
                "/v1/x?t=REDACTED",
            ),
            (
                "/v1/x?t=ya29.a0AfH6SMZQXgoogle0123456789".into(),
                "/v1/x?t=REDACTED",
            ),
        ] {
            assert_eq!(&*redact_path(&sent), logged, "{sent}");
        }
        // More the red team sent: encoded twice, a Basic header's value, JSON and a header
        // line by name, a password in a URL, a key after `key_`, a key as the name, a JWT
        // with a short or an empty payload, a Google token with dots in it.
        let basic = "dXNlcjpzay1wcm9qLVpRWGJhc2ljMDEyMzQ1Njc4OWFiY2Q=";
        for (sent, logged) in [
            (
                "/v1/x?k=sk%252Dproj-ZQXtwice0123456789abcd".to_string(),
                "/v1/x?k=REDACTED",
            ),
            (
                "/v1/sk%252Dproj-ZQXtwice0123456789abcd".into(),
                "/v1/REDACTED",
            ),
            (
                "/v1/x?u=https%253A%252F%252Fh%252Fx%253Fapi_key%253Dplainsecret".into(),
                "/v1/x?u=REDACTED",
            ),
            (format!("/v1/x?h=Basic%20{basic}"), "/v1/x?h=REDACTED"),
            (
                "/v1/x?h=Authorization:%20Bearer%20ZQXnoprefix0123456789".into(),
                "/v1/x?h=REDACTED",
            ),
            (
                "/v1/x?h=x-api-key:ZQXheader0123456789".into(),
                "/v1/x?h=REDACTED",
            ),
            (
                "/v1/x?cfg=%7B%22api_key%22%3A%22ZQXjsonenc%22%7D".into(),
                "/v1/x?cfg=REDACTED",
            ),
            (
                "/v1/x?cfg=%7B%22apiKey%22:%20%22ZQXjson%22%7D".into(),
                "/v1/x?cfg=REDACTED",
            ),
            (
                "/v1/x?next=https://admin:hunter2@internal.example/".into(),
                "/v1/x?next=REDACTED",
            ),
            (
                "/v1/x?v=key_sk-proj-ZQXkeyprefix0123456789".into(),
                "/v1/x?v=REDACTED",
            ),
            (
                "/v1/x?sk-proj-ZQXbarename0123456789ab=1".into(),
                "/v1/x?REDACTED=1",
            ),
            (
                "/v1/x?t=eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJlMDEy".into(),
                "/v1/x?t=REDACTED",
            ),
            (
                "/v1/x?t=eyJhbGciOiJIUzI1NiJ9..c2lnbmF0dXJlMDEy".into(),
                "/v1/x?t=REDACTED",
            ),
            (
                "/v1/x?p=ya29.a0AfH6SMZQX.google0123456789".into(),
                "/v1/x?p=REDACTED",
            ),
        ] {
            assert_eq!(&*redact_path(&sent), logged, "{sent}");
        }
        // Text that only looks like it: kept. Words after a key's prefix are not a key, a
        // cursor of two dotted parts is not a JWT, a nested name=value that is no URL or
        // query is not a parameter.
        for kept in [
            "/v1/x?q=ask-me-anything-about-rust-today",
            "/v1/x?redirect=https://g.example/next?page=2",
            "/v1/models/gpt-4o-mini-2024-07-18:predict?alt=sse",
            "/v1/x?t=eyJshort.x",
            "/v1/x?q=tell+me+about+sk-hynix-memory-chips-2024",
            "/v1/x?file=xai-org_grok-1_tokenizer_config.json",
            "/v1/x?after=eyJpZCI6ImFiY2RlZmcifQ.eyJwYWdlIjoiMiJ9",
            "/v1/x?filter=author%3Dbob",
            "/v1/x?u=https://g.example/x",
            "/v1/files/file-abc123XYZ456def789",
        ] {
            assert_eq!(&*redact_path(kept), kept);
        }
    }

    /// One case per part of a name that marks a credential, in the spellings vendors use.
    #[test]
    fn redacts_every_kind_of_credential_name() {
        let cases = [
            ("key", "key"),
            ("key", "api_key"),
            ("key", "apiKey"),
            ("key", "x-goog-api-key"),
            ("token", "token"),
            ("token", "access_token"),
            ("token", "X-Amz-Security-Token"),
            ("token", "private_token"),
            ("secret", "client_secret"),
            ("auth", "auth"),
            ("auth", "Authorization"),
            ("auth", "oauth_nonce"),
            ("sig", "sig"),
            ("sig", "signature"),
            ("sig", "X-Amz-Signature"),
            ("sig", "X-Goog-Signature"),
            ("jwt", "jwt"),
            ("jwt", "id_jwt"),
            ("bearer", "bearer"),
            ("pass", "password"),
            ("pass", "passwd"),
            ("pass", "PassPhrase"),
            ("pwd", "pwd"),
            ("pwd", "user_pwd"),
            ("cred", "credential"),
            ("cred", "X-Amz-Credential"),
            ("cred", "creds"),
            ("session", "session"),
            ("session", "JSESSIONID"),
            ("code", "code"),
            ("code", "auth_code"),
            ("assertion", "client_assertion"),
            ("saml", "SAMLResponse"),
            ("hmac", "hmac"),
            ("ticket", "ticket"),
        ];
        for (part, name) in cases {
            assert!(
                name.to_ascii_lowercase().contains(part),
                "{name} is not a case of {part}"
            );
            for sep in ['&', ';'] {
                let got = redact_path(&format!("/p?a=1{sep}{name}=S3cr3t{sep}b=2"));
                assert_eq!(
                    &*got,
                    format!("/p?a=1{sep}{name}=REDACTED{sep}b=2"),
                    "{name} ({part})"
                );
            }
        }
        // Every part is covered above.
        for part in SECRET_NAME_PARTS {
            let part = std::str::from_utf8(part).unwrap();
            assert!(cases.iter().any(|(p, _)| *p == part), "no case for {part}");
        }
    }

    #[test]
    fn credential_names_are_matched_percent_decoded_and_in_any_case() {
        // %54oken = Token, %2D = '-', %5F = '_'
        assert_eq!(&*redact_path("/p?%54oken=S"), "/p?%54oken=REDACTED");
        assert_eq!(
            &*redact_path("/p?X%2DAmz%2DSignature=S"),
            "/p?X%2DAmz%2DSignature=REDACTED"
        );
        assert_eq!(
            &*redact_path("/p?access%5FTOKEN=S"),
            "/p?access%5FTOKEN=REDACTED"
        );
        assert_eq!(&*redact_path("/p?BeArEr=S"), "/p?BeArEr=REDACTED");
        // Not a credential name: kept as it came, even when encoded.
        assert_eq!(&*redact_path("/p?alt=sse&q=%6Bey"), "/p?alt=sse&q=%6Bey");
        assert_eq!(&*redact_path("/p?model=gpt-4o&n=2"), "/p?model=gpt-4o&n=2");
    }
}
