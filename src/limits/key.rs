//! State keys: (spec id, limit definition, key values) in one canonical byte encoding, hashed
//! two ways: a per-process 128-bit hash for the memory store (fast; keyed where clients
//! supply the input, so they cannot craft collisions into someone else's bucket) and SHA-256
//! for Redis (stable across processes and versions, so replicas and restarts agree; no user
//! name or API-key fingerprint is stored in Redis in clear).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::OnceLock;

use rustc_hash::FxHasher;
use sha2::{Digest, Sha256};

use super::{KeyPart, KeyValues, LimitKind, LimitSpec};

/// Writes the limit's definition (kind and parameters, key parts) — not its id.
fn write_def(spec: &LimitSpec, w: &mut impl FnMut(&[u8])) {
    match spec.kind {
        LimitKind::Rate {
            requests,
            per,
            burst,
        } => {
            w(b"R");
            w(&requests.to_le_bytes());
            w(&per.as_nanos().to_le_bytes());
            w(&burst.to_le_bytes());
        }
        LimitKind::Bytes { bytes, per } => {
            w(b"B");
            w(&bytes.to_le_bytes());
            w(&per.as_nanos().to_le_bytes());
        }
        LimitKind::Concurrent { max } => {
            w(b"C");
            w(&max.to_le_bytes());
        }
    }
    for part in &spec.by {
        w(match part {
            KeyPart::Client => b"c",
            KeyPart::User => b"u",
            KeyPart::Key => b"k",
            KeyPart::Vendor => b"v",
        });
    }
    w(b".");
}

fn write_ip(ip: IpAddr, w: &mut impl FnMut(&[u8])) {
    match ip {
        IpAddr::V4(a) => {
            w(b"4");
            w(&a.octets());
        }
        IpAddr::V6(a) => {
            w(b"6");
            w(&a.octets());
        }
    }
}

fn write_str(tag: &[u8], s: &str, w: &mut impl FnMut(&[u8])) {
    w(tag);
    w(&(s.len() as u64).to_le_bytes());
    w(s.as_bytes());
}

/// Writes the request's values for the spec's key parts. Every value is tagged and
/// length-prefixed, so no two different tuples encode alike. A missing user or API key falls
/// back to the client address (under its own tag): limiting such requests per address is the
/// conservative reading that neither exempts them nor lumps every anonymous client together.
fn write_key(spec: &LimitSpec, keys: &KeyValues<'_>, w: &mut impl FnMut(&[u8])) {
    for part in &spec.by {
        match part {
            KeyPart::Client => {
                w(b"C");
                write_ip(keys.client, w);
            }
            KeyPart::User => match keys.user {
                Some(u) => write_str(b"U", u, w),
                None => {
                    w(b"u");
                    write_ip(keys.client, w);
                }
            },
            KeyPart::Key => match keys.key_id {
                Some(k) => write_str(b"K", k, w),
                None => {
                    w(b"k");
                    write_ip(keys.client, w);
                }
            },
            KeyPart::Vendor => match keys.vendor {
                Some(v) => write_str(b"V", v, w),
                None => w(b"v"),
            },
        }
    }
}

/// Per-process hash keys: a random SipHash key and a random seed for the second half.
fn hashers() -> &'static (RandomState, usize) {
    static H: OnceLock<(RandomState, usize)> = OnceLock::new();
    H.get_or_init(|| {
        let r = RandomState::new();
        (RandomState::new(), r.hash_one(0x5eed_u64) as usize)
    })
}

/// Collects the key values' bytes on the stack so each hasher sees one `write` (many tiny
/// writes cost more than the hashing); spills to the heap only for long values.
struct Buf {
    arr: [u8; 96],
    len: usize,
    spill: Vec<u8>,
}

impl Buf {
    fn new() -> Buf {
        Buf {
            arr: [0; 96],
            len: 0,
            spill: Vec::new(),
        }
    }
    fn push(&mut self, b: &[u8]) {
        if self.spill.is_empty() && self.len + b.len() <= self.arr.len() {
            self.arr[self.len..self.len + b.len()].copy_from_slice(b);
            self.len += b.len();
        } else {
            if self.spill.is_empty() {
                self.spill.extend_from_slice(&self.arr[..self.len]);
            }
            self.spill.extend_from_slice(b);
        }
    }
    fn bytes(&self) -> &[u8] {
        if self.spill.is_empty() {
            &self.arr[..self.len]
        } else {
            &self.spill
        }
    }
}

/// The spec's id and definition in 64 bits. These come from the operator's config, not from
/// clients, so a fast unkeyed hash is enough here.
fn spec_prefix(tag: &[u8], spec: &LimitSpec) -> u64 {
    let mut h = FxHasher::default();
    let mut w = |b: &[u8]| h.write(b);
    write_str(tag, &spec.id, &mut w);
    write_def(spec, &mut w);
    h.finish()
}

/// 128 bits over (prefix, bytes): the high half a keyed SipHash (clients cannot craft
/// collisions into another's bucket), the low half a randomly seeded Fx hash that makes
/// accidental collisions of the whole vanishingly rare at little cost.
fn hash128(prefix: u64, bytes: &[u8]) -> u128 {
    let (sip, seed) = hashers();
    let mut hi = sip.build_hasher();
    hi.write_u64(prefix);
    hi.write(bytes);
    let mut lo = FxHasher::with_seed(*seed);
    lo.write_u64(prefix);
    lo.write(bytes);
    (u128::from(hi.finish()) << 64) | u128::from(lo.finish())
}

/// The memory store's key.
pub(crate) fn state_key(spec: &LimitSpec, keys: &KeyValues<'_>) -> u128 {
    let mut buf = Buf::new();
    write_key(spec, keys, &mut |b: &[u8]| buf.push(b));
    hash128(spec_prefix(b"I", spec), buf.bytes())
}

/// The shared overflow bucket of a spec (see the memory store): same id and definition,
/// no key values, under a tag no keyed state uses.
pub(crate) fn overflow_key(spec: &LimitSpec) -> u128 {
    hash128(spec_prefix(b"O", spec), &[])
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The Redis key: `portcullis:{id}:{definition hash}:{key hash}`.
pub(crate) fn redis_key(spec: &LimitSpec, keys: &KeyValues<'_>) -> String {
    let mut def = Sha256::new();
    write_def(spec, &mut |b: &[u8]| def.update(b));
    let mut key = Sha256::new();
    write_key(spec, keys, &mut |b: &[u8]| key.update(b));
    format!(
        "portcullis:{}:{}:{}",
        spec.id,
        hex(&def.finalize()[..8]),
        hex(&key.finalize()[..16])
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn spec(id: &str, requests: u64, by: Vec<KeyPart>) -> LimitSpec {
        LimitSpec {
            id: Arc::from(id),
            kind: LimitKind::Rate {
                requests,
                per: Duration::from_secs(60),
                burst: requests,
            },
            by,
        }
    }

    fn kv<'a>(ip: &str, user: Option<&'a str>) -> KeyValues<'a> {
        KeyValues {
            client: ip.parse().unwrap(),
            user,
            key_id: None,
            vendor: Some("openai"),
        }
    }

    #[test]
    fn keys_separate_ids_definitions_and_values() {
        let a = spec("a", 5, vec![KeyPart::User]);
        let k1 = state_key(&a, &kv("10.0.0.1", Some("ann")));
        assert_eq!(k1, state_key(&a.clone(), &kv("10.0.0.2", Some("ann"))));
        assert_ne!(k1, state_key(&a, &kv("10.0.0.1", Some("bob"))));
        assert_ne!(
            k1,
            state_key(
                &spec("b", 5, vec![KeyPart::User]),
                &kv("10.0.0.1", Some("ann"))
            )
        );
        assert_ne!(
            k1,
            state_key(
                &spec("a", 6, vec![KeyPart::User]),
                &kv("10.0.0.1", Some("ann"))
            )
        );
        // No user: per client address, never the same bucket as a user or another address.
        let anon1 = state_key(&a, &kv("10.0.0.1", None));
        assert_ne!(anon1, k1);
        assert_ne!(anon1, state_key(&a, &kv("10.0.0.2", None)));
        assert_ne!(anon1, overflow_key(&a));
        // Values longer than the stack buffer hash the same way, still distinct.
        let long = "x".repeat(500);
        let kl = state_key(&a, &kv("10.0.0.1", Some(&long)));
        assert_eq!(kl, state_key(&a, &kv("10.0.0.3", Some(&long))));
        assert_ne!(kl, state_key(&a, &kv("10.0.0.1", Some(&long[1..]))));
    }

    #[test]
    fn redis_key_is_stable_and_hides_values() {
        let a = spec("openai-bulk", 5, vec![KeyPart::User, KeyPart::Vendor]);
        let k = redis_key(&a, &kv("10.0.0.1", Some("ann")));
        assert!(k.starts_with("portcullis:openai-bulk:"), "{k}");
        assert!(!k.contains("ann") && !k.contains("openai:"), "{k}");
        assert_eq!(k, redis_key(&a, &kv("10.0.0.9", Some("ann"))));
        assert_ne!(
            k,
            redis_key(
                &spec("openai-bulk", 6, a.by.clone()),
                &kv("10.0.0.1", Some("ann"))
            )
        );
    }
}
