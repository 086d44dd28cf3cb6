//! API-key fingerprints: a keyed hash that lets the audit log and limits tell keys apart
//! without ever storing a key. HMAC with a deployment secret, so a leaked log cannot be used
//! to confirm a guessed key offline.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use http::HeaderMap;
use percent_encoding::percent_decode_str;
use sha2::Sha256;

/// Headers the catalog's vendors read API keys from (besides `Authorization`): Anthropic and
/// many others, Google, Azure OpenAI, Azure AI services (APIM), ElevenLabs.
/// The WebSocket subprotocol that carries an API key (see `from_request`).
const WS_KEY_PROTOCOL: &[u8] = b"openai-insecure-api-key.";

const KEY_HEADERS: [http::HeaderName; 5] = [
    http::HeaderName::from_static("x-api-key"),
    http::HeaderName::from_static("x-goog-api-key"),
    http::HeaderName::from_static("api-key"),
    http::HeaderName::from_static("ocp-apim-subscription-key"),
    http::HeaderName::from_static("xi-api-key"),
];

/// Query parameters vendors read keys from: Google's `key`, Baidu's `access_token`, Azure
/// OpenAI's `api-key` (its Realtime WebSocket takes the key so), Azure API Management's
/// `subscription-key`, and the usual `api_key` / `apikey`.
const KEY_PARAMS: [&[u8]; 7] = [
    b"key",
    b"api_key",
    b"apikey",
    b"api-key",
    b"subscription-key",
    b"subscription_key",
    b"access_token",
];

/// A presigned AWS URL's credential (`AKID/date/region/service/aws4_request`): its access
/// key id is the key, as in a Signature V4 `Authorization` field.
const AWS_CREDENTIAL_PARAM: &[u8] = b"x-amz-credential";

/// A query parameter's name or value as servers' form decoders read it: `+` is a space and
/// `%XX` a byte; ASCII whitespace around it is dropped, as around a key in a header field.
fn form_decoded(s: &str) -> Cow<'_, [u8]> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s.as_bytes().trim_ascii());
    }
    let spaced = s.replace('+', " ");
    let bytes: Vec<u8> = percent_decode_str(&spaced).collect();
    Cow::Owned(bytes.trim_ascii().to_vec())
}

/// The credential an `Authorization` value carries, whatever its scheme (RFC 9110 §11.4:
/// `scheme 1*SP credentials`, spaces and tabs tolerated as origins tolerate them): the token
/// of `Bearer`, `Token` and the like; the access key id of AWS Signature V4, whose signature
/// changes with every request; the whole value when it has no scheme (a bare key).
fn authorization_credential(v: &[u8]) -> &[u8] {
    let v = v.trim_ascii();
    let Some(gap) = v.iter().position(|b| *b == b' ' || *b == b'\t') else {
        return v;
    };
    let (scheme, rest) = (&v[..gap], v[gap..].trim_ascii());
    if scheme.len() > 5 && scheme[..5].eq_ignore_ascii_case(b"aws4-") {
        // `Credential=AKID/date/region/service/aws4_request, SignedHeaders=…, Signature=…`
        let at = rest
            .windows(11)
            .position(|w| w.eq_ignore_ascii_case(b"credential="));
        if let Some(at) = at {
            let id = &rest[at + 11..];
            let end = id
                .iter()
                .position(|b| matches!(b, b'/' | b',' | b' '))
                .unwrap_or(id.len());
            return &id[..end];
        }
    }
    rest
}

/// The key in `Basic` credentials: the password, or the user name when the password is empty
/// (`:KEY`, `any-name:KEY`, `KEY:` are one key however the other half is spelled, as vendors
/// that take keys this way read them). `None` when the value is not Basic credentials.
fn basic_credential(field: &http::HeaderValue) -> Option<Vec<u8>> {
    let v = field.as_bytes().trim_ascii_start();
    if v.len() < 6 || !v[..5].eq_ignore_ascii_case(b"basic") || !matches!(v[5], b' ' | b'\t') {
        return None;
    }
    let (user, password) = crate::identity::htpasswd::parse_basic(field)?;
    let secret = if password.is_empty() { user } else { password };
    Some(secret.into_bytes())
}

pub struct KeyFingerprinter {
    mac: Hmac<Sha256>,
}

impl KeyFingerprinter {
    pub fn new(secret: &[u8]) -> KeyFingerprinter {
        KeyFingerprinter {
            mac: Hmac::new_from_slice(secret).expect("HMAC takes any key length"),
        }
    }

    /// The secret in `[keys] secret_file` (refused when other users can read it, or
    /// shorter than 16 bytes), or a random one when none is configured. With a file,
    /// fingerprints agree across restarts and replicas (audit logs correlate; `by = "key"`
    /// limits in a shared store count one key once).
    pub fn configured(path: Option<&std::path::Path>) -> Result<KeyFingerprinter, String> {
        let Some(path) = path else {
            return Ok(KeyFingerprinter::random());
        };
        let secret = crate::secrets::read_secret_file(path)?;
        if secret.len() < 16 {
            return Err(format!(
                "{}: key_id secret is shorter than 16 bytes",
                path.display()
            ));
        }
        Ok(KeyFingerprinter::new(secret.as_bytes()))
    }

    /// A fresh random secret: fingerprints are then stable for this process only.
    pub fn random() -> KeyFingerprinter {
        let mut secret = [0u8; 32];
        // rustls' provider gives us a CSPRNG without another dependency.
        let rng = rustls::crypto::ring::default_provider();
        let _ = rng.secure_random.fill(&mut secret);
        KeyFingerprinter::new(&secret)
    }

    /// `k_` and 12 hex digits (48 bits): enough to tell an organisation's keys apart.
    pub fn fingerprint(&self, key: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(key);
        let out = mac.finalize().into_bytes();
        let mut s = String::with_capacity(14);
        s.push_str("k_");
        for b in &out[..6] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// The fingerprint of the API key a request carries, if any. Every place a vendor reads a
    /// key from is looked at (each `Authorization` bearer, each key header, the percent-decoded
    /// `?key=`): when they name different keys, the request gets [`AMBIGUOUS_KEY`], which no
    /// `require_key` list admits, rather than the fingerprint of whichever was looked at first
    /// while the vendor authenticates with another.
    pub fn from_request<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> KeyIds {
        let mut found: Option<Cow<'a, [u8]>> = None;
        // Other keys, when there are several: each is charged by `by = "key"` limits.
        let mut others: Vec<Cow<'a, [u8]>> = Vec::new();
        let mut too_many = false;
        let mut take = |key: Cow<'a, [u8]>| {
            if key.is_empty() {
                return;
            }
            match &found {
                None => found = Some(key),
                Some(f) if **f != *key => {
                    if !others.contains(&key) {
                        if others.len() + 1 < MAX_KEYS {
                            others.push(key);
                        } else {
                            too_many = true;
                        }
                    }
                }
                Some(_) => {}
            }
        };
        // One pass over the fields a request has (a handful) costs less than a hashed lookup
        // per place a key could be.
        for (name, field) in headers {
            let v = field.as_bytes();
            if name == http::header::AUTHORIZATION {
                match basic_credential(field) {
                    Some(secret) => take(Cow::Owned(secret)),
                    None => take(Cow::Borrowed(authorization_credential(v))),
                }
            } else if KEY_HEADERS.contains(name) {
                take(Cow::Borrowed(v.trim_ascii()));
            } else if name == http::header::SEC_WEBSOCKET_PROTOCOL {
                // A browser cannot set headers on a WebSocket: OpenAI's Realtime API takes the
                // key as a subprotocol, `openai-insecure-api-key.<key>`.
                for token in v.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if let Some(key) = token.strip_prefix(WS_KEY_PROTOCOL) {
                        take(Cow::Borrowed(key));
                    }
                }
            }
        }
        // `;` separates parameters too where origins split on it (the redactor reads it so).
        for pair in query.into_iter().flat_map(|q| q.split(['&', ';'])) {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            // The vendor decodes both: `%6Bey=` is `key=`, `%41Iza…` is `AIza…`. Names in any
            // case: ASP.NET (Azure) reads `API-KEY=` as `api-key=`.
            let name = form_decoded(name);
            if KEY_PARAMS.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                take(form_decoded(value));
            } else if name.eq_ignore_ascii_case(AWS_CREDENTIAL_PARAM) {
                let credential = form_decoded(value);
                let id = credential.split(|b| *b == b'/').next().unwrap_or_default();
                take(Cow::Owned(id.to_vec()));
            }
        }
        let Some(first) = found else {
            return KeyIds::default();
        };
        if others.is_empty() {
            return KeyIds {
                id: Some(self.fingerprint(&first)),
                each: Vec::new(),
                too_many: false,
            };
        }
        KeyIds {
            id: Some(AMBIGUOUS_KEY.to_string()),
            each: std::iter::once(&first)
                .chain(&others)
                .map(|k| self.fingerprint(k))
                .collect(),
            too_many,
        }
    }
}

/// The keys of a request, as [`KeyFingerprinter::from_request`] found them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyIds {
    /// The audit `key_id`: the key's fingerprint, or [`AMBIGUOUS_KEY`].
    pub id: Option<String>,
    /// With several different keys, each one's fingerprint (the first [`MAX_KEYS`]): a
    /// `by = "key"` limit charges every one, so a junk second key buys no second budget.
    pub each: Vec<String>,
    /// More different keys than [`MAX_KEYS`]: the request is refused, since the one the vendor
    /// reads might be among those not charged.
    pub too_many: bool,
}

/// Different keys one request may carry; an honest one carries one (two where a gateway adds
/// its own). Beyond this the request is refused rather than charged for some keys only.
pub const MAX_KEYS: usize = 16;

/// The key id of a request carrying two different keys: never a fingerprint, so never on a
/// `require_key` list. Limits charge each key instead ([`KeyIds::each`]).
pub const AMBIGUOUS_KEY: &str = "k_ambiguous";

#[cfg(test)]
mod tests {
    use super::*;

    /// Every place a catalog vendor reads a key from, in every spelling an origin accepts,
    /// is that key: a personal key in one of them beside the company key in another is two
    /// keys, not the company's.
    #[test]
    fn keys_are_found_wherever_vendors_read_them() {
        let f = KeyFingerprinter::new(b"secret");
        let key = f.fingerprint(b"sk-personal");
        for (name, value) in [
            ("authorization", "Bearer sk-personal"),
            ("authorization", "bearer\tsk-personal"),
            ("authorization", "Bearer   sk-personal "),
            ("authorization", "Token sk-personal"),
            ("authorization", "sk-personal"),
            ("authorization", "AWS4-HMAC-SHA256 Credential=sk-personal/20261129/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=abc"),
            ("xi-api-key", "sk-personal"),
            ("ocp-apim-subscription-key", "sk-personal"),
            ("api-key", "sk-personal"),
            // OpenAI Realtime from a browser: the key as a WebSocket subprotocol.
            ("sec-websocket-protocol", "realtime, openai-insecure-api-key.sk-personal"),
            ("sec-websocket-protocol", "openai-insecure-api-key.sk-personal,openai-beta.realtime-v1"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            assert_eq!(f.from_request(&h, None).id.as_deref(), Some(&*key), "{name}: {value}");
            h.insert("x-api-key", "sk-company".parse().unwrap());
            assert_eq!(
                f.from_request(&h, None).id.as_deref(),
                Some(AMBIGUOUS_KEY),
                "{name}: {value} beside another key"
            );
        }
        for basic in [
            ":sk-personal",
            "x:sk-personal",
            "sk-personal:",
            "user:sk-personal",
        ] {
            let value = format!("Basic {}", base64_of(basic));
            let mut h = HeaderMap::new();
            h.insert("authorization", value.parse().unwrap());
            assert_eq!(
                f.from_request(&h, None).id.as_deref(),
                Some(&*key),
                "{basic}"
            );
        }
        for q in [
            "access_token=sk-personal",
            "api_key=sk-personal",
            "apikey=sk-personal",
            "a=b;key=sk-personal",
            // Azure OpenAI's Realtime WebSocket; Azure API Management.
            "api-version=1&api-key=sk-personal",
            "subscription-key=sk-personal",
            // A presigned AWS URL: the access key id of its credential.
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=sk-personal%2F20261130%2Fus-east-1%2Fbedrock%2Faws4_request&X-Amz-Signature=ab12",
            "x-amz-credential=sk-personal/20261130/us-east-1/bedrock/aws4_request",
            // Names in another case, and what form decoders make of `+` and spaces.
            "API-KEY=sk-personal",
            "Subscription-Key=sk-personal",
            "api-key%20=sk-personal",
            "api-key=sk-personal+",
            "api-key=+sk-personal%20",
        ] {
            assert_eq!(
                f.from_request(&HeaderMap::new(), Some(q)).id.as_deref(),
                Some(&*key),
                "{q}"
            );
            // Beside a key in a field the vendor may ignore, it is still seen: two keys.
            let mut h = HeaderMap::new();
            h.insert("x-goog-api-key", "sk-company".parse().unwrap());
            assert_eq!(
                f.from_request(&h, Some(q)).id.as_deref(),
                Some(AMBIGUOUS_KEY),
                "{q} beside another key"
            );
        }
    }

    fn base64_of(text: &str) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn finds_keys_and_never_echoes_them() {
        let f = KeyFingerprinter::new(b"secret");
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-live-abc".parse().unwrap());
        let a = f.from_request(&h, None).id.unwrap();
        assert!(a.starts_with("k_") && a.len() == 14 && !a.contains("abc"));
        let mut h2 = HeaderMap::new();
        h2.insert("x-api-key", "sk-live-abc".parse().unwrap());
        assert_eq!(f.from_request(&h2, None).id.unwrap(), a);
        assert_eq!(
            f.from_request(&HeaderMap::new(), Some("alt=sse&key=sk-live-abc"))
                .id
                .unwrap(),
            a
        );
        assert_eq!(f.from_request(&HeaderMap::new(), Some("alt=sse")).id, None);
        // Percent-encoded spellings of the same key are the same key.
        for q in [
            "key=%73k-live-abc",
            "%6Bey=sk-live-ab%63",
            "alt=sse&key=sk-live-abc&key=sk-live-abc",
        ] {
            assert_eq!(
                f.from_request(&HeaderMap::new(), Some(q)).id.unwrap(),
                a,
                "{q}"
            );
        }
        // The same key in two places is that key; two different keys are neither.
        let mut both = h.clone();
        both.insert("x-api-key", "sk-live-abc".parse().unwrap());
        assert_eq!(f.from_request(&both, None).id.unwrap(), a);
        both.insert("x-api-key", "sk-personal".parse().unwrap());
        assert_eq!(f.from_request(&both, None).id.unwrap(), AMBIGUOUS_KEY);
        assert_eq!(
            f.from_request(&h, Some("key=sk-personal")).id.unwrap(),
            AMBIGUOUS_KEY
        );
        let mut twice = HeaderMap::new();
        twice.append("authorization", "Bearer sk-live-abc".parse().unwrap());
        twice.append("authorization", "Bearer sk-other".parse().unwrap());
        assert_eq!(f.from_request(&twice, None).id.unwrap(), AMBIGUOUS_KEY);
        // Each key is fingerprinted for the limits, once, in the order met.
        assert_eq!(
            f.from_request(&twice, Some("key=sk-live-abc&key=sk-third"))
                .each,
            [
                a.clone(),
                f.fingerprint(b"sk-other"),
                f.fingerprint(b"sk-third")
            ]
        );
        assert!(f.from_request(&h, None).each.is_empty());
        assert_ne!(
            KeyFingerprinter::new(b"other").fingerprint(b"sk-live-abc"),
            a
        );
    }
}
