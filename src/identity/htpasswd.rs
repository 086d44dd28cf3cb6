//! Proxy-Authorization: Basic checked against an Apache-style htpasswd file.
//!
//! Only bcrypt entries are accepted: the other htpasswd formats (MD5-crypt,
//! unsalted SHA-1, DES crypt, plaintext) are cheap enough to brute-force that
//! accepting them would make the file itself a liability.

use std::collections::hash_map::{DefaultHasher, RandomState};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use dashmap::{DashMap, DashSet};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    #[error("{path}:{line}:{col}: {msg}")]
    Parse {
        path: String,
        line: usize,
        col: usize,
        msg: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Enough for every active user of a large site to stay warm, small enough
/// (~100 bytes an entry) that an attacker holding one valid password cannot
/// grow it meaningfully.
const CACHE_CAPACITY: usize = 10_000;

const BCRYPT_PREFIXES: [&str; 3] = ["$2a$", "$2b$", "$2y$"];
const BCRYPT_HASH_LEN: usize = 60;

type CacheKey = (String, [u8; 32]);

/// Users and their bcrypt hashes, plus a cache of recent successful checks.
///
/// Debug is implemented by hand so that neither hashes nor cached digests can
/// reach a log line.
pub struct Htpasswd {
    users: HashMap<String, Arc<str>>,
    verified: DashSet<CacheKey>,
    /// Mixed into cached digests so a memory dump does not hold plain
    /// SHA-256(password) values that could be looked up in a rainbow table.
    cache_salt: [u8; 32],
    /// bcrypt runs on tokio's blocking pool, which also serves DNS lookups and
    /// file I/O; a burst of wrong passwords must not be able to starve those.
    bcrypt_slots: Semaphore,
    /// One check at a time per client address and user name, then one per
    /// client address, taken before a bcrypt slot. A client flooding wrong
    /// passwords over many connections queues behind itself: it holds one
    /// place in `bcrypt_slots`' FIFO whatever names it tries, so other
    /// addresses' first logins wait for one of its checks at most; and one
    /// place per name in its address's queue, so another user behind the
    /// same NAT address waits for one check per name the flood uses, not for
    /// every request it has in flight.
    per_name: DashMap<(IpAddr, String), Arc<Semaphore>>,
    per_client: DashMap<IpAddr, Arc<Semaphore>>,
}

impl fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Htpasswd")
            .field("users", &self.users.len())
            .field("cached", &self.verified.len())
            .finish_non_exhaustive()
    }
}

impl Htpasswd {
    /// Parse htpasswd text; `path` is used only in error messages.
    pub fn parse(path: &str, text: &str) -> Result<Htpasswd, HtpasswdError> {
        let err = |line: usize, col: usize, msg: String| HtpasswdError::Parse {
            path: path.to_owned(),
            line,
            col,
            msg,
        };
        let mut users: HashMap<String, Arc<str>> = HashMap::new();
        let mut first_seen: HashMap<String, usize> = HashMap::new();

        for (idx, raw) in text.split('\n').enumerate() {
            let lineno = idx + 1;
            // Files edited on Windows or by hand often carry CRs and trailing
            // blanks, which would otherwise end up inside the hash.
            let line = raw.trim_end();
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err(
                    lineno,
                    1,
                    "expected `user:hash` (no ':' found)".to_owned(),
                ));
            };
            if user.is_empty() {
                return Err(err(lineno, 1, "empty user name".to_owned()));
            }
            if let Some((off, _)) = user
                .char_indices()
                .find(|(_, c)| c.is_whitespace() || c.is_control())
            {
                return Err(err(
                    lineno,
                    column(line, off),
                    "user name contains whitespace or control characters".to_owned(),
                ));
            }
            let hash_col = column(line, user.len() + 1);
            // Messages never quote the hash field: on a misconfigured file it
            // may be a plaintext password.
            check_hash(hash).map_err(|msg| err(lineno, hash_col, msg))?;

            if let Some(prev) = first_seen.get(user) {
                return Err(err(
                    lineno,
                    1,
                    format!("duplicate user `{user}` (first defined on line {prev})"),
                ));
            }
            first_seen.insert(user.to_owned(), lineno);
            users.insert(user.to_owned(), Arc::from(hash));
        }

        let slots = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(4);
        Ok(Htpasswd {
            users,
            verified: DashSet::new(),
            cache_salt: random_salt(),
            bcrypt_slots: Semaphore::new(slots),
            per_name: DashMap::new(),
            per_client: DashMap::new(),
        })
    }

    pub fn load(path: &Path) -> Result<Htpasswd, HtpasswdError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| HtpasswdError::Io {
            path: shown.clone(),
            source,
        })?;
        Htpasswd::parse(&shown, &text)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// The stored hash of `user`: what a login opened earlier was proven against.
    pub fn hash_of(&self, user: &str) -> Option<&Arc<str>> {
        self.users.get(user)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `user` exists and `password` matches its bcrypt hash.
    ///
    /// Successful checks are cached so a client sending credentials on every
    /// request pays for bcrypt once. Failures are never cached: a cached
    /// "no" could be planted by an attacker to lock a user out, and a wrong
    /// password should stay expensive to try.
    pub async fn verify(&self, client: IpAddr, user: &str, password: &str) -> bool {
        self.login(client, user, password).await.is_some()
    }

    /// As [`Htpasswd::verify`], answering with the hash the password was proven against
    /// (see [`crate::identity::ProxyUser`]).
    pub async fn login(&self, client: IpAddr, user: &str, password: &str) -> Option<Arc<str>> {
        // Unknown users are refused without running bcrypt. That lets a
        // timing observer tell which user names exist, but names are not the
        // secret here, and burning a bcrypt for any name would hand
        // unauthenticated clients a cheap way to exhaust the blocking pool.
        let hash = self.users.get(user)?;
        let key = (user.to_owned(), self.cache_digest(password));
        if self.verified.contains(&key) {
            return Some(hash.clone());
        }

        let who = (client, user.to_owned());
        let name_gate = gate(&self.per_name, who.clone());
        let client_gate = gate(&self.per_client, client);
        let ok = self
            .check_in_turn([&name_gate, &client_gate], &key, hash, password)
            .await;
        drop((name_gate, client_gate));
        // Only the maps hold them: nobody of this client (and name) is waiting.
        self.per_name
            .remove_if(&who, |_, g| Arc::strong_count(g) == 1);
        self.per_client
            .remove_if(&client, |_, g| Arc::strong_count(g) == 1);

        if ok {
            // Wholesale clearing is crude but O(1) to reason about: the next
            // request from each active user pays one bcrypt and the cache
            // refills with whoever is actually active.
            if self.verified.len() >= CACHE_CAPACITY {
                self.verified.clear();
            }
            self.verified.insert(key);
        }
        ok.then(|| hash.clone())
    }

    /// bcrypt, once it is this client's turn (under each of `gates`, in order) and a slot is
    /// free.
    async fn check_in_turn(
        &self,
        gates: [&Semaphore; 2],
        key: &CacheKey,
        hash: &Arc<str>,
        password: &str,
    ) -> bool {
        let Ok(_name_turn) = gates[0].acquire().await else {
            return false;
        };
        let Ok(_client_turn) = gates[1].acquire().await else {
            return false;
        };
        // A parallel request of this client may have just proved the same password.
        if self.verified.contains(key) {
            return true;
        }
        let Ok(_slot) = self.bcrypt_slots.acquire().await else {
            return false;
        };
        let hash = Arc::clone(hash);
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            bcrypt::verify(password.as_bytes(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
    }

    fn cache_digest(&self, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_salt);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    #[cfg(test)]
    fn cached_len(&self) -> usize {
        self.verified.len()
    }
}

/// The one-at-a-time gate for `who`, made on first use.
fn gate<K: std::hash::Hash + Eq>(map: &DashMap<K, Arc<Semaphore>>, who: K) -> Arc<Semaphore> {
    map.entry(who)
        .or_insert_with(|| Arc::new(Semaphore::new(1)))
        .clone()
}

/// 1-based character column of byte offset `off` in `line`.
fn column(line: &str, off: usize) -> usize {
    line[..off].chars().count() + 1
}

fn check_hash(hash: &str) -> Result<(), String> {
    if hash.is_empty() {
        return Err("missing password hash".to_owned());
    }
    if let Some(prefix) = BCRYPT_PREFIXES.iter().find(|p| hash.starts_with(*p)) {
        let cost = &hash[prefix.len()..];
        let cost_ok = cost.len() >= 3
            && cost.as_bytes()[2] == b'$'
            && cost[..2]
                .parse::<u32>()
                .is_ok_and(|c| (4..=31).contains(&c));
        // `get`: a truncated hash ("$2y$0") is shorter than the prefix and cost.
        let alphabet_ok = hash.get(prefix.len() + 3..).is_some_and(|rest| {
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
        });
        if hash.len() != BCRYPT_HASH_LEN || !cost_ok || !alphabet_ok {
            return Err(
                "malformed bcrypt hash (expected $2y$NN$ followed by 53 characters)".to_owned(),
            );
        }
        return Ok(());
    }
    let scheme = if hash.starts_with("$apr1$") {
        "MD5 ($apr1$)"
    } else if hash.starts_with("{SHA}") {
        "SHA-1 ({SHA})"
    } else if hash.starts_with("$1$") {
        "MD5-crypt ($1$)"
    } else if hash.starts_with("$5$") || hash.starts_with("$6$") {
        "SHA-crypt ($5$/$6$)"
    } else if hash.starts_with('$') {
        "unknown"
    } else {
        "crypt or plaintext"
    };
    Err(format!(
        "unsupported password hash scheme: {scheme}; only bcrypt ($2a$, $2b$, $2y$) \
         is accepted (create entries with `htpasswd -B`)"
    ))
}

/// Per-instance salt without pulling in an RNG crate: RandomState is seeded
/// from the OS once per process and perturbed per instance, and the clock and
/// a stack address add a little more. It only needs to be unpredictable to
/// someone reading a memory dump, not cryptographically strong.
fn random_salt() -> [u8; 32] {
    let mut h = Sha256::new();
    for i in 0..4u64 {
        let mut s: DefaultHasher = RandomState::new().build_hasher();
        s.write_u64(i);
        h.update(s.finish().to_le_bytes());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.update(now.to_le_bytes());
    let marker = 0u8;
    h.update((std::ptr::addr_of!(marker) as usize).to_le_bytes());
    h.finalize().into()
}

/// Some clients drop base64 padding; refusing them would look like a wrong
/// password, which is miserable to debug.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Parse a `Proxy-Authorization` value of the form `Basic base64(user:pass)`.
/// The scheme is case-insensitive and surrounding whitespace is ignored. The
/// password may itself contain ':'. Returns `None` for other schemes,
/// undecodable or non-UTF-8 credentials, or a missing ':'.
pub fn parse_basic(value: &http::HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?.trim();
    let (scheme, rest) = text.split_once(|c: char| c.is_ascii_whitespace())?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = LENIENT_BASE64.decode(rest.trim()).ok()?;
    // RFC 7617 leaves the charset to the client: most send UTF-8, Python's requests sends
    // Latin-1. Bytes that are not UTF-8 are read as Latin-1, so `pä$$` logs in either way.
    let decoded = String::from_utf8(decoded)
        .unwrap_or_else(|e| e.into_bytes().iter().map(|&b| char::from(b)).collect());
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hash(pw: &str) -> String {
        bcrypt::hash(pw, 4).unwrap()
    }

    fn parse_err(text: &str) -> (usize, usize, String) {
        match Htpasswd::parse("users.htpasswd", text) {
            Err(HtpasswdError::Parse {
                path,
                line,
                col,
                msg,
            }) => {
                assert_eq!(path, "users.htpasswd");
                (line, col, msg)
            }
            other => panic!("expected parse error, got {other:?}"),
        }
    }

    #[test]
    fn parses_bcrypt_variants_comments_and_blanks() {
        let b = hash("pw");
        let y = b.replacen("$2b$", "$2y$", 1);
        let a = b.replacen("$2b$", "$2a$", 1);
        let text =
            format!("# team\n\nalice:{b}\r\n   \n  # indented comment\nbob:{y}\ncarol:{a}  \n");
        let h = Htpasswd::parse("f", &text).unwrap();
        assert_eq!(h.len(), 3);
        assert!(!h.is_empty());
        assert!(Htpasswd::parse("f", "").unwrap().is_empty());
    }

    #[test]
    fn refuses_weak_schemes_at_hash_column() {
        let good = hash("pw");
        let text = format!("alice:{good}\n# comment\nbob:$apr1$abc$def\n");
        let (line, col, msg) = parse_err(&text);
        assert_eq!((line, col), (3, 5));
        assert!(msg.contains("$apr1$"), "{msg}");

        let (line, col, msg) = parse_err("carol1:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=");
        assert_eq!((line, col), (1, 8));
        assert!(msg.contains("SHA-1"), "{msg}");

        let (line, col, msg) = parse_err("\n\nd:xyJkl7Mzn3/sc");
        assert_eq!((line, col), (3, 3));
        assert!(msg.contains("crypt"), "{msg}");
        // The hash field (possibly a plaintext password) is never echoed.
        assert!(!msg.contains("xyJkl7Mzn3"));

        let (line, col, _) = parse_err("éa:$6$salt$abc");
        assert_eq!((line, col), (1, 4));
    }

    #[test]
    fn refuses_malformed_lines() {
        assert_eq!(parse_err("justauser\n").0, 1);
        let (line, col, msg) = parse_err("u:\n");
        assert_eq!((line, col), (1, 3));
        assert!(msg.contains("missing"));
        assert_eq!(parse_err(":$2y$04$x").1, 1);
        let (line, col, _) = parse_err("al ice:$2y$");
        assert_eq!((line, col), (1, 3));
        let truncated = &hash("pw")[..40];
        let (line, col, msg) = parse_err(&format!("ok:{truncated}"));
        assert_eq!((line, col), (1, 4));
        assert!(msg.contains("malformed bcrypt"), "{msg}");
        let bad_cost = hash("pw").replacen("$04$", "$99$", 1);
        assert!(parse_err(&format!("ok:{bad_cost}")).2.contains("malformed"));
    }

    #[test]
    fn refuses_duplicate_users() {
        let h = hash("pw");
        let (line, col, msg) = parse_err(&format!("alice:{h}\nbob:{h}\n\nalice:{h}\n"));
        assert_eq!((line, col), (4, 1));
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn display_has_file_line_col() {
        let e = Htpasswd::parse("/etc/portcullis/users", "x:{SHA}abc").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/portcullis/users:1:3: "), "{s}");
    }

    #[test]
    fn load_reports_io_errors_with_path() {
        let missing = std::env::temp_dir().join("portcullis-no-such-htpasswd-file");
        let e = Htpasswd::load(&missing).unwrap_err();
        assert!(matches!(e, HtpasswdError::Io { .. }));
        assert!(e.to_string().contains("portcullis-no-such-htpasswd-file"));
    }

    #[test]
    fn load_reads_file() {
        let path =
            std::env::temp_dir().join(format!("portcullis-htpasswd-test-{}", std::process::id()));
        std::fs::write(&path, format!("alice:{}\n", hash("pw"))).unwrap();
        let h = Htpasswd::load(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(h.unwrap().len(), 1);
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test]
    async fn verify_right_and_wrong_password() {
        let text = format!(
            "alice:{}\nbob:{}\n",
            hash("s3cret:with:colons"),
            hash("other")
        );
        let h = Htpasswd::parse("f", &text).unwrap();
        assert!(h.verify(LOCAL, "alice", "s3cret:with:colons").await);
        assert!(!h.verify(LOCAL, "alice", "wrong").await);
        assert!(!h.verify(LOCAL, "alice", "other").await);
        assert!(h.verify(LOCAL, "bob", "other").await);
        assert!(!h.verify(LOCAL, "mallory", "other").await);
        assert!(!h.verify(LOCAL, "", "").await);
    }

    /// A client flooding wrong passwords waits behind itself: another
    /// client's check finishes after a bounded number of the flood's (one
    /// in flight per slot at most), not after all of them, however many
    /// user names the flood goes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_client_flooding_does_not_queue_ahead_of_others() {
        // Cost 8 (~20 ms a check): the flood is still queued when the other client comes.
        let slow = bcrypt::hash("pw", 8).unwrap();
        let names = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
        ];
        let text: String = names.iter().map(|n| format!("{n}:{slow}\n")).collect();
        let h = Arc::new(Htpasswd::parse("f", &text).unwrap());
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let attacker: IpAddr = "10.9.9.9".parse().unwrap();
        let mut flood = Vec::new();
        for i in 0..40 {
            let (h, done) = (h.clone(), done.clone());
            flood.push(tokio::spawn(async move {
                assert!(!h.verify(attacker, names[i % names.len()], "wrong").await);
                done.lock().unwrap().push("flood");
            }));
        }
        // Let the flood queue up first.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let at_start = done.lock().unwrap().len();
        assert!(h.verify(LOCAL, "alice", "pw").await);
        let before = done.lock().unwrap().len() - at_start;
        for f in flood {
            f.await.unwrap();
        }
        let slots = std::thread::available_parallelism().map_or(4, |n| n.get());
        assert!(
            before <= slots + 2,
            "{before} of the flood's checks ran while the other client waited"
        );
        assert!(at_start < 40, "the flood was over before the check began");
        assert!(h.per_client.is_empty(), "gates are dropped when idle");
        assert!(h.per_name.is_empty(), "gates are dropped when idle");
    }

    /// Behind one NAT address, a user flooding wrong passwords under their own name holds
    /// one place in that address's queue: another user's first login from the same address
    /// waits for a few of the flood's checks, not for all it has in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_behind_a_shared_address_holds_one_place_in_its_queue() {
        let slow = bcrypt::hash("pw", 8).unwrap();
        let h = Arc::new(Htpasswd::parse("f", &format!("alice:{slow}\nbob:{slow}\n")).unwrap());
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut flood = Vec::new();
        for _ in 0..40 {
            let (h, done) = (h.clone(), done.clone());
            flood.push(tokio::spawn(async move {
                assert!(!h.verify(LOCAL, "alice", "wrong").await);
                done.lock().unwrap().push(());
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let at_start = done.lock().unwrap().len();
        assert!(h.verify(LOCAL, "bob", "pw").await);
        let before = done.lock().unwrap().len() - at_start;
        for f in flood {
            f.await.unwrap();
        }
        assert!(
            before <= 3,
            "{before} of the flood's checks ran while bob waited"
        );
        assert!(at_start < 40, "the flood was over before bob began");
    }

    #[tokio::test]
    async fn successful_checks_are_cached_failures_are_not() {
        let h = Htpasswd::parse("f", &format!("alice:{}\n", hash("pw"))).unwrap();
        assert!(!h.verify(LOCAL, "alice", "nope").await);
        assert_eq!(h.cached_len(), 0);
        assert!(h.verify(LOCAL, "alice", "pw").await);
        assert_eq!(h.cached_len(), 1);

        // Prove the hit path skips bcrypt: with every bcrypt slot taken a
        // miss would wait forever, but a hit answers immediately.
        let _all = h
            .bcrypt_slots
            .acquire_many(h.bcrypt_slots.available_permits() as u32)
            .await
            .unwrap();
        let hit = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            h.verify(LOCAL, "alice", "pw"),
        );
        assert!(hit.await.unwrap());
        let miss = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            h.verify(LOCAL, "alice", "pw2"),
        );
        assert!(miss.await.is_err());
        assert_eq!(h.cached_len(), 1);
    }

    #[tokio::test]
    async fn cache_is_bounded() {
        let h = Htpasswd::parse("f", &format!("alice:{}\n", hash("pw"))).unwrap();
        for i in 0..CACHE_CAPACITY {
            h.verified.insert((format!("u{i}"), [0u8; 32]));
        }
        assert!(h.verify(LOCAL, "alice", "pw").await);
        assert_eq!(h.cached_len(), 1);
    }

    #[tokio::test]
    async fn debug_leaks_nothing() {
        let hashed = hash("hunter2");
        let h = Htpasswd::parse("f", &format!("alice:{hashed}\n")).unwrap();
        assert!(h.verify(LOCAL, "alice", "hunter2").await);
        let dbg = format!("{h:?}");
        assert!(!dbg.contains("hunter2"));
        assert!(!dbg.contains(&hashed));
        assert!(!dbg.contains("alice"));
    }

    fn basic(v: &str) -> Option<(String, String)> {
        parse_basic(&HeaderValue::from_str(v).unwrap())
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn parse_basic_cases() {
        let ok = Some(("alice".to_owned(), "pw".to_owned()));
        assert_eq!(basic(&format!("Basic {}", b64("alice:pw"))), ok);
        assert_eq!(basic(&format!("  bAsIc   {}  ", b64("alice:pw"))), ok);
        assert_eq!(basic(&format!("basic\t{}", b64("alice:pw"))), ok);
        assert_eq!(
            basic(&format!("Basic {}", b64("alice:a:b:c"))),
            Some(("alice".to_owned(), "a:b:c".to_owned()))
        );
        assert_eq!(
            basic(&format!("Basic {}", b64("alice:"))),
            Some(("alice".to_owned(), String::new()))
        );
        // Unpadded base64 ("alice:pw" encodes with one '=').
        let unpadded = b64("alice:pw").trim_end_matches('=').to_owned();
        assert_eq!(basic(&format!("Basic {unpadded}")), ok);

        assert_eq!(basic(&format!("Bearer {}", b64("alice:pw"))), None);
        assert_eq!(basic(&format!("Basicx {}", b64("alice:pw"))), None);
        assert_eq!(basic("Basic"), None);
        assert_eq!(basic("Basic !!!notbase64"), None);
        assert_eq!(basic(&format!("Basic {}", b64("nocolon"))), None);
        // UTF-8 as most clients send it, and Latin-1 as Python's requests does: the same.
        let carol = Some(("carol".to_owned(), "pä$$:wörd".to_owned()));
        assert_eq!(basic(&format!("Basic {}", b64("carol:pä$$:wörd"))), carol);
        let latin1: Vec<u8> = "carol:pä$$:wörd".chars().map(|c| c as u8).collect();
        let latin1 = base64::engine::general_purpose::STANDARD.encode(latin1);
        assert_eq!(basic(&format!("Basic {latin1}")), carol);
        let opaque = HeaderValue::from_bytes(b"Basic \xe9").unwrap();
        assert_eq!(parse_basic(&opaque), None);
    }
}
