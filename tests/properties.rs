//! Properties of the parsers that read untrusted or hand-edited input, checked with proptest on
//! generated inputs (the coverage-guided fuzz targets in fuzz/ check the same parsers on
//! mutated bytes; scripts/fuzz.sh runs them).
//!
//! The central property: every spelling of a host or path that the normaliser accepts maps to
//! the same canonical value, and `Policy::decide` gives it the same decision as the canonical
//! form. A spelling that decided differently would walk past a rule. Where the WHATWG URL
//! parser (the `url` crate: what browsers and most HTTP clients implement) reads a spelling,
//! it must read the same host.
//!
//! Regression tests for what the fuzzers found are at the end.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use http::Method;
use portcullis::config;
use portcullis::identity::htpasswd::{parse_basic, Htpasswd, HtpasswdError};
use portcullis::policy::path::{normalize, PathPattern};
use portcullis::policy::target::{from_connect_authority, from_uri, Host};
use portcullis::policy::{Action, Policy, Request};
use portcullis::tls::sni::{parse_client_hello, ClientHelloInfo, SniError};
use proptest::prelude::*;
use proptest::sample::select;

// ---------------------------------------------------------------------------------------------
// The policy decisions are compared against: default block, and rules keyed by vendor, exact
// host, host suffix, glob, address literal, path, endpoint and method.

const POLICY: &str = r#"
[defaults]
action = "block"
reason = "default"

[[rule]]
id = "block-deepseek"
vendor = "deepseek"
action = "block"

[[rule]]
id = "audit-openai-batches"
vendor = "openai"
path = "/v1/batches"
action = "audit"

[[rule]]
id = "block-openai-files-post"
vendor = "openai"
endpoint = "files"
method = "POST"
action = "block"

[[rule]]
id = "allow-openai"
vendor = "openai"
action = "allow"

[[rule]]
id = "allow-exact"
host = "allowed.example.com"
action = "allow"

[[rule]]
id = "audit-suffix"
host = ".audited.example"
action = "audit"

[[rule]]
id = "allow-glob"
host = "svc-*.glob.example"
action = "allow"

[[rule]]
id = "allow-ip"
host = ["192.0.2.7", "[2001:db8::7]"]
action = "allow"

[[rule]]
id = "audit-loopback"
host = "127.0.0.1"
action = "audit"
"#;

fn policy() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let vendors = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendors.toml");
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, format!("include = [{vendors:?}]\n{POLICY}")).expect("write");
        config::load(&file).expect("test policy loads").policy
    })
}

/// What a decision amounts to, comparable across spellings.
fn decision(host: &Host, port: u16, path: Option<&str>, method: &Method) -> String {
    let d = policy().decide(&Request {
        client: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        user: None,
        method,
        host,
        port,
        path,
        body: Default::default(),
    });
    format!(
        "{:?} {:?} rule={:?} vendor={:?} endpoint={:?}",
        d.action,
        d.mode,
        d.rule_id(),
        d.vendor_id(),
        d.endpoint
    )
}

/// Host, CONNECT authority, absolute URI: each accepted spelling is the canonical host and
/// gets the canonical host's decision, for a tunnel and for a request with a path.
fn assert_same_target(spelled: &str, canonical: &Host) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        Host::parse(spelled),
        Ok(canonical.clone()),
        "host {:?}",
        spelled
    );
    for path in [None, Some("/v1/batches"), Some("/v1/files")] {
        let h = Host::parse(spelled).unwrap();
        prop_assert_eq!(
            decision(&h, 443, path, &Method::POST),
            decision(canonical, 443, path, &Method::POST),
            "{:?} path {:?}",
            spelled,
            path
        );
    }
    let authority = if spelled.contains(':') && !spelled.starts_with('[') {
        format!("[{spelled}]:443")
    } else {
        format!("{spelled}:443")
    };
    prop_assert_eq!(
        from_connect_authority(&authority),
        Ok((canonical.clone(), 443)),
        "CONNECT {:?}",
        authority
    );
    // http::Uri refuses non-ASCII and some characters a bare host allows: only where it parses.
    if let Ok(uri) = format!("https://{authority}/v1/batches").parse::<http::Uri>() {
        let t = from_uri(&uri).expect("an accepted authority is an accepted URI");
        prop_assert_eq!(&t.host, canonical);
        prop_assert_eq!(t.port, 443);
    }
    Ok(())
}

/// The WHATWG URL parser reads the same host (when it accepts the spelling at all).
fn assert_whatwg_agrees(spelled: &str, canonical: &Host) -> Result<(), TestCaseError> {
    let Ok(u) = url::Url::parse(&format!("http://{spelled}/")) else {
        return Ok(());
    };
    let theirs = match u.host() {
        Some(url::Host::Domain(d)) => Host::Name(d.strip_suffix('.').unwrap_or(d).into()),
        Some(url::Host::Ipv4(a)) => Host::Ip(IpAddr::V4(a)),
        Some(url::Host::Ipv6(a)) => Host::from_ip(IpAddr::V6(a)),
        None => return Ok(()),
    };
    prop_assert_eq!(&theirs, canonical, "WHATWG reads {:?} differently", spelled);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host name spellings.

/// A canonical name: 1 to 4 labels of [a-z0-9-_], the last starting with a letter (a numeric
/// last label makes it an IPv4 address), or a name the test policy has a rule for.
fn canonical_name() -> impl Strategy<Value = String> {
    let label = "[a-z0-9_][a-z0-9_-]{0,9}";
    let last = "[a-z][a-z0-9-]{0,6}";
    prop_oneof![
        (prop::collection::vec(label, 0..3), last)
            .prop_map(|(mut ls, l)| {
                ls.push(l);
                ls.join(".")
            })
            // An "xn--" label must be valid Punycode: not every string of this alphabet is.
            .prop_filter("no A-labels", |n| !n
                .split('.')
                .any(|l| l.starts_with("xn--"))),
        select(vec![
            "api.deepseek.com",
            "chat.deepseek.com",
            "deepseek.com",
            "api.openai.com",
            "chatgpt.com",
            "allowed.example.com",
            "x.audited.example",
            "audited.example",
            "svc-42.glob.example",
        ])
        .prop_map(String::from),
    ]
}

/// One way of writing a character of a name that every WHATWG host parser reads as it.
#[derive(Debug, Clone, Copy)]
enum CharSpelling {
    Plain,
    Upper,
    Percent,
    PercentLowerHex,
    FullWidth,
    PercentFullWidth,
}

fn spell_char(c: char, how: CharSpelling, out: &mut String) {
    let full_width = |c: char| -> char {
        match c {
            'a'..='z' => char::from_u32(c as u32 - 'a' as u32 + 0xff41).unwrap(),
            '0'..='9' => char::from_u32(c as u32 - '0' as u32 + 0xff10).unwrap(),
            '-' => '\u{ff0d}',
            '_' => '\u{ff3f}',
            other => other,
        }
    };
    match how {
        CharSpelling::Plain => out.push(c),
        CharSpelling::Upper => out.push(c.to_ascii_uppercase()),
        CharSpelling::Percent => write!(out, "%{:02X}", c as u32).unwrap(),
        CharSpelling::PercentLowerHex => write!(out, "%{:02x}", c as u32).unwrap(),
        CharSpelling::FullWidth => out.push(full_width(c)),
        CharSpelling::PercentFullWidth => {
            let mut buf = [0u8; 4];
            for b in full_width(c).encode_utf8(&mut buf).bytes() {
                write!(out, "%{b:02X}").unwrap();
            }
        }
    }
}

fn char_spelling() -> impl Strategy<Value = CharSpelling> {
    select(vec![
        CharSpelling::Plain,
        CharSpelling::Plain,
        CharSpelling::Upper,
        CharSpelling::Percent,
        CharSpelling::PercentLowerHex,
        CharSpelling::FullWidth,
        CharSpelling::PercentFullWidth,
    ])
}

/// The dot between labels: ASCII, ideographic, full-width, half-width, or percent-encoded.
fn dot_spelling() -> impl Strategy<Value = &'static str> {
    select(vec![
        ".", ".", ".", "%2E", "%2e", "\u{3002}", "\u{ff0e}", "\u{ff61}",
    ])
}

fn spell_name(name: &str, chars: &[CharSpelling], dots: &[&str], trailing: Option<&str>) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c == '.' {
            out.push_str(dots[i % dots.len()]);
        } else {
            spell_char(c, chars[i % chars.len()], &mut out);
        }
    }
    if let Some(dot) = trailing {
        out.push_str(dot);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// IPv4 spellings (WHATWG: 1 to 4 parts, decimal, 0x hex or 0 octal, the last part filling the
// remaining bytes).

fn spell_number(n: u64, radix: u8) -> String {
    match radix {
        0 => format!("{n}"),
        1 => format!("0x{n:x}"),
        2 => format!("0X{n:X}"),
        3 => format!("0{n:o}"),
        _ => format!("0x{n:08x}"), // leading zeros after 0x
    }
}

fn spell_ipv4(addr: Ipv4Addr, parts: usize, radixes: &[u8]) -> String {
    let n = u64::from(u32::from(addr));
    let b = addr.octets().map(u64::from);
    let nums: Vec<u64> = match parts {
        1 => vec![n],
        2 => vec![b[0], n & 0xff_ffff],
        3 => vec![b[0], b[1], n & 0xffff],
        _ => b.to_vec(),
    };
    nums.iter()
        .enumerate()
        .map(|(i, &v)| spell_number(v, radixes[i % radixes.len()]))
        .collect::<Vec<_>>()
        .join(".")
}

fn interesting_ipv4() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        any::<u32>().prop_map(Ipv4Addr::from),
        select(vec![
            Ipv4Addr::new(192, 0, 2, 7),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(10, 0, 0, 1),
        ]),
    ]
}

fn full_width_digits(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '0'..='9' => char::from_u32(c as u32 - '0' as u32 + 0xff10).unwrap(),
            '.' => '\u{3002}',
            c => c,
        })
        .collect()
}

/// Uncompressed, zero-padded, upper-case hex: a spelling std never prints.
fn ipv6_long_form(a: Ipv6Addr) -> String {
    a.segments()
        .iter()
        .map(|s| format!("{s:04X}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------------------------
// Paths.

/// A canonical path: segments of unreserved characters, none of them "." or "..", or one of
/// the paths the test policy's rules and the catalog's endpoints name.
fn canonical_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec("[a-zA-Z0-9._~-]{1,8}", 0..5)
            .prop_filter("no dot segments", |segs| {
                segs.iter().all(|s| s != "." && s != "..")
            })
            .prop_map(|segs| format!("/{}", segs.join("/"))),
        select(vec![
            "/v1/batches",
            "/v1/batches/b_1",
            "/v1/files",
            "/v1/files/",
            "/v1/uploads/u",
            "/v1/chat/completions",
            "/v1/models",
            "/v1",
            "/",
        ])
        .prop_map(String::from),
    ]
}

#[derive(Debug, Clone, Copy)]
enum PathNoise {
    None,
    DotSegment,
    EncodedDotSegment,
    Detour,
    EncodedDetour,
    DoubleSlash,
    /// `;params` after the segment (servlet containers drop them).
    Param,
    /// `\` before the segment instead of `/` (IIS reads it as one).
    Backslash,
    /// The segment in upper case (ASP.NET and IIS route case-insensitively).
    Upper,
}

fn path_noise() -> impl Strategy<Value = PathNoise> {
    select(vec![
        PathNoise::None,
        PathNoise::None,
        PathNoise::DotSegment,
        PathNoise::EncodedDotSegment,
        PathNoise::Detour,
        PathNoise::EncodedDetour,
        PathNoise::DoubleSlash,
        PathNoise::Param,
        PathNoise::Backslash,
        PathNoise::Upper,
    ])
}

/// The same path with dot segments, detours ("x/../"), empty segments, percent-encoded
/// unreserved characters, `;params`, backslashes and case changes; origins (some of them, for
/// the last three) read all of them as the canonical path.
fn spell_path(canonical: &str, noise: &[PathNoise], encode: &[bool], query: bool) -> String {
    let mut out = String::new();
    let segs: Vec<&str> = canonical.split('/').skip(1).collect();
    for (i, seg) in segs.iter().enumerate() {
        match noise[i % noise.len()] {
            PathNoise::None => {}
            PathNoise::DotSegment => out.push_str("/."),
            PathNoise::EncodedDotSegment => out.push_str("/%2E"),
            PathNoise::Detour => out.push_str("/detour/.."),
            // No `%2F` here: a path with an encoded slash is also decided as its decoding
            // origins read it (the stricter wins), which `encoded_slashes_never_loosen` covers.
            PathNoise::EncodedDetour => out.push_str("/x%2e/%2e%2E"),
            PathNoise::DoubleSlash => out.push('/'),
            PathNoise::Param | PathNoise::Backslash | PathNoise::Upper => {}
        }
        let noise_here = noise[i % noise.len()];
        out.push(match noise_here {
            PathNoise::Backslash if !out.is_empty() => '\\',
            _ => '/',
        });
        for (j, c) in seg.chars().enumerate() {
            let c = match noise_here {
                PathNoise::Upper => c.to_ascii_uppercase(),
                _ => c,
            };
            if encode[(i + j) % encode.len()] {
                if j % 2 == 0 {
                    write!(out, "%{:02X}", c as u32).unwrap();
                } else {
                    write!(out, "%{:02x}", c as u32).unwrap();
                }
            } else {
                out.push(c);
            }
        }
        if matches!(noise_here, PathNoise::Param) {
            out.push_str(";jsessionid=A1");
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    if query {
        out.push_str("?a=/../x&b=%2e");
    }
    out
}

/// Every '%' starts a two-hex-digit escape (see `normal_form_is_a_fixpoint`).
fn well_formed_escapes(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().enumerate().all(|(i, &c)| {
        c != b'%'
            || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// How much a decision holds a request back, to compare readings of a path.
fn strictness(path: &str, method: &Method) -> u8 {
    let host = Host::parse("api.openai.com").unwrap();
    let d = policy().decide(&Request {
        client: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        user: None,
        method,
        host: &host,
        port: 443,
        path: Some(path),
        body: Default::default(),
    });
    match d.enforced() {
        Action::Block => 3,
        Action::Limit => 2,
        Action::Audit => 1,
        Action::Allow => 0,
    }
}

/// A dot segment as clients spell it: `.` or `..`, escaped, with `;params` (`..;` is `..` to
/// servlet containers).
fn dot_segment() -> impl Strategy<Value = &'static str> {
    select(vec![
        "..", "%2e%2e", "%2E.", ".%2e", "..;", "..;x=1", "%2e%2e;a", ".", "%2E", ".;x",
    ])
}

// ---------------------------------------------------------------------------------------------
// ClientHello construction.

fn record(payload: &[u8]) -> Vec<u8> {
    let mut r = vec![0x16, 0x03, 0x01];
    r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    r.extend_from_slice(payload);
    r
}

fn vec16(data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

#[derive(Debug, Clone)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
    session_id: Vec<u8>,
    suites: usize,
    /// Unknown extensions before and after the interesting ones.
    other: Vec<(u16, Vec<u8>)>,
}

impl Hello {
    fn handshake(&self) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(self.session_id.len() as u8);
        body.extend_from_slice(&self.session_id);
        let suites: Vec<u8> = (0..self.suites).flat_map(|i| [0x13, i as u8]).collect();
        body.extend_from_slice(&vec16(&suites));
        body.extend_from_slice(&[0x01, 0x00]);
        let mut exts = Vec::new();
        let mut push = |t: u16, d: &[u8]| {
            exts.extend_from_slice(&t.to_be_bytes());
            exts.extend_from_slice(&vec16(d));
        };
        let (before, after) = self.other.split_at(self.other.len() / 2);
        for (t, d) in before {
            push(*t, d);
        }
        if let Some(name) = &self.sni {
            let mut entry = vec![0u8];
            entry.extend_from_slice(&vec16(name.as_bytes()));
            push(0, &vec16(&entry));
        }
        if !self.alpn.is_empty() {
            let list: Vec<u8> = self
                .alpn
                .iter()
                .flat_map(|p| std::iter::once(p.len() as u8).chain(p.iter().copied()))
                .collect();
            push(16, &vec16(&list));
        }
        for (t, d) in after {
            push(*t, d);
        }
        body.extend_from_slice(&vec16(&exts));
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        hs
    }
}

fn hello() -> impl Strategy<Value = Hello> {
    // Unknown extension types (above ALPN's 16), before and after SNI and ALPN.
    let other = prop::collection::vec(
        (17u16..0xffff, prop::collection::vec(any::<u8>(), 0..20)),
        0..4,
    );
    (
        prop::option::of("[!-~]{1,60}"),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..12), 0..4),
        prop::collection::vec(any::<u8>(), 0..=32),
        1usize..20,
        other,
    )
        .prop_map(|(sni, alpn, session_id, suites, other)| Hello {
            sni,
            alpn,
            session_id,
            suites,
            other,
        })
}

/// Split a handshake message into records at the given (sorted, deduplicated) cut points.
fn frame(hs: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % hs.len())
        .filter(|&c| c > 0)
        .collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain([hs.len()]) {
        out.extend_from_slice(&record(&hs[start..p]));
        start = p;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Config text.

/// Fragments config files are made of, valid and not, so the loader sees both.
fn toml_fragment() -> impl Strategy<Value = String> {
    let frag = select(vec![
        "[proxy]\n",
        "listen = \"127.0.0.1:3128\"\n",
        "listen = \"nowhere\"\n",
        "connect_ports = [443, 0, 70000]\n",
        "idle_timeout = \"5q\"\n",
        "idle_timeout = \"10s\"\n",
        "max_header_bytes = -1\n",
        "[admin]\n",
        "pac = \"some\"\n",
        "[upstream]\n",
        "resolve = { \"a.com:443\" = \"127.0.0.1:1\", \"bad\" = \"x\" }\n",
        "allow_private = [\"10.0.0.0/8\", \"not-a-net\"]\n",
        "[auth]\n",
        "htpasswd = \"users\"\n",
        "[groups]\n",
        "research = [\"alice\", \"bob\"]\n",
        "[limits.team]\n",
        "requests = 10\n",
        "per = \"1m\"\n",
        "by = [\"user\", \"nobody\"]\n",
        "[limit_store]\n",
        "kind = \"redis\"\n",
        "kind = \"carrier-pigeon\"\n",
        "[defaults]\n",
        "action = \"allow\"\n",
        "action = \"maybe\"\n",
        "[[rule]]\n",
        "id = \"r1\"\n",
        "id = \"r 2\"\n",
        "vendor = \"openai\"\n",
        "vendor = [\"nope\"]\n",
        "host = [\"*.example.ai\", \".corp.example\", \"203.0.113.7\"]\n",
        "host = \"*\"\n",
        "host = \"a b\"\n",
        "path = \"/v1/files\"\n",
        "path = \"v1\"\n",
        "endpoint = \"batches\"\n",
        "endpoint = \"everything\"\n",
        "method = [\"POST\", \"G E T\"]\n",
        "client = [\"10.0.0.0/8\", \"300.1.1.1\"]\n",
        "group = \"research\"\n",
        "limit = { requests = 5, per = \"1s\" }\n",
        "limit = { bananas = 5 }\n",
        "limit = \"team\"\n",
        "mode = \"shadow\"\n",
        "mode = \"loud\"\n",
        "[[vendor]]\n",
        "hosts = [\"api.x.example\"]\n",
        "[vendor.endpoints]\n",
        "chat = [\"/v1/chat\"]\n",
        "unknown_key = 1\n",
        "= \"\"\n",
        "[[[\n",
        "\"unterminated\n",
        "x = 'é ünïcode'\n",
        "\u{feff}\n",
        "\t\r\n",
        "\n",
    ]);
    prop_oneof![
        9 => frag.prop_map(String::from),
        1 => "[ -~\t\n\u{e9}\u{3002}]{0,12}",
    ]
}

/// Write `text` as a config file and load it; an error must name a line and column that exist.
fn load_text(text: &str) -> Result<config::Loaded, config::ConfigError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("p.toml");
    std::fs::write(&file, text).expect("write config");
    let res = config::load(&file);
    if let Err(e) = &res {
        assert_eq!(e.file, file.display().to_string(), "{e}");
        let lines: Vec<&str> = text.split('\n').collect();
        assert!(
            e.line >= 1 && e.line <= lines.len(),
            "{e}: {} lines",
            lines.len()
        );
        let width = lines[e.line - 1].chars().count();
        assert!(
            e.col >= 1 && e.col <= width + 1,
            "{e}: line is {width} chars"
        );
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("{}:{}:{}: ", e.file, e.line, e.col)),
            "{shown}"
        );
    }
    res
}

// ---------------------------------------------------------------------------------------------
// htpasswd.

const BCRYPT: &str = "$2y$05$c4WoMPo3SXsafkva.HHa6uXQZWr7oboPiC2bT/r7q1BB8I2s0BRqC";

/// Lines of an htpasswd file, including hashes cut short or mangled the way hand edits do.
fn htpasswd_line() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            "[a-z]{1,6}",
            0usize..=60,
            select(vec!["$2y$", "$2a$", "$2b$", "$2x$"])
        )
            .prop_map(|(u, cut, p)| format!("{u}:{}", &BCRYPT.replacen("$2y$", p, 1)[..cut])),
        ("[a-z]{1,6}", "[$0-9a-zA-Z./{}é:]{0,64}").prop_map(|(u, h)| format!("{u}:{h}")),
        select(vec![
            "# comment",
            "",
            "   ",
            "\r",
            "nocolon",
            ":x",
            "a b:x",
            "é:$2y$"
        ])
        .prop_map(String::from),
        "[ -~é\t\r]{0,30}",
    ]
}

// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn name_spellings_same_host_and_decision(
        name in canonical_name(),
        chars in prop::collection::vec(char_spelling(), 1..8),
        dots in prop::collection::vec(dot_spelling(), 1..4),
        trailing in prop::option::of(dot_spelling()),
    ) {
        let canonical = Host::parse(&name).expect("canonical name parses");
        prop_assert_eq!(canonical.as_name(), Some(name.as_str()));
        let spelled = spell_name(&name, &chars, &dots, trailing);
        assert_same_target(&spelled, &canonical)?;
        assert_whatwg_agrees(&spelled, &canonical)?;
    }

    #[test]
    fn ipv4_spellings_same_host_and_decision(
        addr in interesting_ipv4(),
        parts in 1usize..=4,
        radixes in prop::collection::vec(0u8..5, 1..5),
        trailing_dot in any::<bool>(),
        full_width in any::<bool>(),
    ) {
        let canonical = Host::Ip(IpAddr::V4(addr));
        let mut spelled = spell_ipv4(addr, parts, &radixes);
        if trailing_dot {
            spelled.push('.');
        }
        assert_whatwg_agrees(&spelled, &canonical)?;
        if full_width {
            spelled = full_width_digits(&spelled);
        }
        assert_same_target(&spelled, &canonical)?;
        // IPv4-mapped IPv6, in dotted and in hex form, is the same address and the same rules.
        let o = addr.octets();
        for mapped in [
            format!("[::ffff:{addr}]"),
            format!("[::FFFF:{:x}{:02x}:{:x}{:02x}]", o[0], o[1], o[2], o[3]),
            format!("[0:0:0:0:0:ffff:{addr}]"),
        ] {
            assert_same_target(&mapped, &canonical)?;
            assert_whatwg_agrees(&mapped, &canonical)?;
        }
    }

    #[test]
    fn ipv6_spellings_same_host_and_decision(
        raw in prop_oneof![
            any::<u128>().prop_map(Ipv6Addr::from),
            select(vec!["2001:db8::7".parse::<Ipv6Addr>().unwrap(), Ipv6Addr::LOCALHOST]),
        ],
    ) {
        let canonical = Host::from_ip(IpAddr::V6(raw));
        for spelled in [
            format!("[{raw}]"),
            format!("[{}]", ipv6_long_form(raw)),
            ipv6_long_form(raw),
        ] {
            assert_same_target(&spelled, &canonical)?;
            if spelled.starts_with('[') {
                assert_whatwg_agrees(&spelled, &canonical)?;
            }
        }
    }

    #[test]
    fn host_parse_canonical_form_is_a_fixpoint(
        s in prop_oneof![
            "[a-zA-Z0-9.%:\\[\\]_-]{0,24}",
            "[0-9xX.]{1,20}",
            "[a-z\u{e4}\u{df}\u{3002}\u{ff41}-\u{ff5a}\u{200d}\u{fe0f}.-]{1,16}",
            any::<String>(),
        ],
    ) {
        if let Ok(h) = Host::parse(&s) {
            let printed = h.to_string();
            prop_assert_eq!(Host::parse(&printed), Ok(h.clone()), "{:?} -> {:?}", s, printed);
            if let Host::Name(n) = &h {
                prop_assert!(n.len() <= 253 && !n.ends_with('.'));
                prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || b"-_.".contains(&b)));
            }
            assert_whatwg_agrees_if_plain(&s, &h)?;
        }
    }

    #[test]
    fn unicode_names_same_host_as_their_punycode(
        labels in prop::collection::vec("[a-z\u{e4}\u{f6}\u{fc}\u{e9}\u{f1}\u{65e5}\u{672c}]{1,8}", 1..3),
        upper in any::<bool>(),
        percent in any::<bool>(),
    ) {
        let unicode = format!("{}.example", labels.join("."));
        let Ok(canonical) = Host::parse(&unicode) else {
            return Ok(()); // e.g. a label IDNA refuses: refused in every spelling
        };
        // The A-label form is what goes on the wire; it must be the same host.
        let ascii = canonical.to_string();
        assert_same_target(&ascii, &canonical)?;
        let mut spelled: String = if upper { unicode.to_uppercase() } else { unicode.clone() };
        if percent {
            spelled = spelled
                .bytes()
                .map(|b| if b.is_ascii() { char::from(b).to_string() } else { format!("%{b:02X}") })
                .collect();
        }
        assert_same_target(&spelled, &canonical)?;
        // Decomposed accents (NFD) normalise to the same name.
        let nfd: String = unicode
            .chars()
            .flat_map(|c| match c {
                '\u{e4}' => vec!['a', '\u{308}'],
                '\u{f6}' => vec!['o', '\u{308}'],
                '\u{fc}' => vec!['u', '\u{308}'],
                '\u{e9}' => vec!['e', '\u{301}'],
                '\u{f1}' => vec!['n', '\u{303}'],
                c => vec![c],
            })
            .collect();
        assert_same_target(&nfd, &canonical)?;
        assert_whatwg_agrees(&unicode, &canonical)?;
    }

    #[test]
    fn path_spellings_same_normal_form_and_decision(
        canonical in canonical_path(),
        noise in prop::collection::vec(path_noise(), 1..5),
        encode in prop::collection::vec(prop::bool::weighted(0.2), 1..7),
        query in any::<bool>(),
        post in any::<bool>(),
    ) {
        let spelled = spell_path(&canonical, &noise, &encode, query);
        let folded = canonical.to_ascii_lowercase();
        prop_assert_eq!(normalize(&canonical), folded.as_str());
        prop_assert_eq!(normalize(&spelled), folded.as_str(), "{:?}", spelled);
        let host = Host::parse("api.openai.com").unwrap();
        let method = if post { Method::POST } else { Method::GET };
        prop_assert_eq!(
            decision(&host, 443, Some(&spelled), &method),
            decision(&host, 443, Some(&canonical), &method),
            "{:?}", spelled
        );
    }

    /// Some origins route on the decoded path (`/v1%2Ffiles` is `/v1/files` to them), most do
    /// not: replacing any slashes of a path with `%2F` never earns a more lenient decision than
    /// the plain path gets.
    #[test]
    fn encoded_slashes_never_loosen(
        canonical in canonical_path(),
        which in prop::collection::vec(any::<bool>(), 1..8),
        post in any::<bool>(),
    ) {
        let mut n = 0;
        let spelled: String = canonical
            .char_indices()
            .map(|(i, c)| {
                if c == '/' && i > 0 {
                    n += 1;
                    if which[n % which.len()] {
                        return if n % 2 == 0 { "%2F".to_string() } else { "%2f".to_string() };
                    }
                }
                c.to_string()
            })
            .collect();
        let method = if post { Method::POST } else { Method::GET };
        prop_assert!(
            strictness(&spelled, &method) >= strictness(&canonical, &method),
            "{:?} vs {:?}", spelled, canonical
        );
    }

    /// A method rule holds for the method in any case: `post` is not `POST` to `http`, but some
    /// origins read it so.
    #[test]
    fn method_case_never_changes_the_decision(
        canonical in canonical_path(),
        method in select(vec!["POST", "GET", "DELETE", "PUT"]),
        mask in any::<u8>(),
    ) {
        let spelled: String = method
            .chars()
            .enumerate()
            .map(|(i, c)| if mask & (1 << i) != 0 { c.to_ascii_lowercase() } else { c })
            .collect();
        let spelled = Method::from_bytes(spelled.as_bytes()).unwrap();
        let upper = Method::from_bytes(method.as_bytes()).unwrap();
        let host = Host::parse("api.openai.com").unwrap();
        for path in [Some(canonical.as_str()), None] {
            prop_assert_eq!(
                decision(&host, 443, path, &spelled),
                decision(&host, 443, path, &upper),
                "{} {:?}", spelled, path
            );
        }
    }

    /// Origins that route on the path as sent (Express, many gateways) read a dot segment as
    /// an ordinary segment: `/v1/batches/../x` is under `/v1/batches` to them. Putting a dot
    /// segment anywhere in a path (after `/`, `\` or `%2F`) never earns a more lenient
    /// decision than an ordinary segment in its place gets; nor than the path without it, as
    /// origins that resolve dot segments read it.
    #[test]
    fn dot_segments_never_loosen(
        canonical in canonical_path(),
        at in any::<prop::sample::Index>(),
        dots in dot_segment(),
        sep in select(vec!["/", "/", "\\", "%2F", "%2f"]),
        tail in select(vec!["", "/", "?q=1"]),
        post in any::<bool>(),
    ) {
        let segs: Vec<&str> = canonical.split('/').skip(1).filter(|s| !s.is_empty()).collect();
        let i = at.index(segs.len() + 1);
        let join = |mid: &str, sep: &str| {
            let mut out = String::new();
            for seg in &segs[..i] {
                out.push('/');
                out.push_str(seg);
            }
            out.push_str(sep);
            out.push_str(mid);
            for seg in &segs[i..] {
                out.push('/');
                out.push_str(seg);
            }
            out.push_str(tail);
            out
        };
        let spelled = join(dots, sep);
        // "zz-dot" is no segment a rule or endpoint of the test policy names.
        let ordinary = join("zz-dot", "/");
        let method = if post { Method::POST } else { Method::GET };
        let strict = strictness(&spelled, &method);
        prop_assert!(
            strict >= strictness(&ordinary, &method),
            "{:?} vs {:?}", spelled, ordinary
        );
        // A lone `.` resolves to nothing; `..` also drops the segment before it.
        let resolved = normalize(&spelled);
        prop_assert!(
            strict >= strictness(&resolved, &method),
            "{:?} vs {:?}", spelled, resolved
        );
    }

    #[test]
    fn normal_form_is_a_fixpoint(
        tokens in prop::collection::vec(
            select(vec!["/", "/", ".", "..", "a", "B", "~", "%2e", "%2E", "%2f", "%2F", "%41",
                        "%7e", "%25", "%00", "?", "#", "*", ":", "\u{e9}", "%C3%A9", "%%", "%4",
                        ";", ";x=1", "\\", "%5C", "%3B", "Z"]),
            0..16,
        ),
    ) {
        let s: String = tokens.concat();
        let n = normalize(&s);
        prop_assert!(n.starts_with('/'), "{:?} -> {:?}", s, n);
        prop_assert!(!n.contains("//"), "{:?} -> {:?}", s, n);
        prop_assert!(n.split('/').all(|seg| seg != "." && seg != ".."), "{:?} -> {:?}", s, n);
        if let Ok(p) = PathPattern::parse(&s) {
            prop_assert!(p.matches(&n), "pattern {:?} vs its own path {:?}", s, n);
        }
        // With a stray '%' one decoding pass can assemble a new escape ("%%32e" -> "%2e"),
        // which a second pass would decode although no origin does: only well-formed input.
        if well_formed_escapes(&s) {
            prop_assert_eq!(normalize(&n), n.clone(), "{:?}", s);
        }
    }

    #[test]
    fn sni_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        tls_prefix in any::<bool>(),
    ) {
        let mut input = bytes;
        if tls_prefix {
            let len = (input.len() as u16).to_be_bytes();
            let mut framed = vec![0x16, 0x03, 0x01, len[0], len[1], 0x01, 0x00];
            framed.extend_from_slice(&input);
            input = framed;
        }
        let _ = parse_client_hello(&input);
    }

    #[test]
    fn sni_round_trips_from_generated_hellos(
        h in hello(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        trailing in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let hs = h.handshake();
        let mut wire = frame(&hs, &cuts);
        let expected = ClientHelloInfo {
            sni: h.sni.as_ref().map(|s| s.to_ascii_lowercase()),
            alpn: h.alpn.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect(),
            len: wire.len(),
        };
        // Every strict prefix is Incomplete; the whole hello parses; what follows is not part
        // of it.
        for cut in [0, wire.len() / 2, wire.len() - 1] {
            prop_assert_eq!(parse_client_hello(&wire[..cut]), Err(SniError::Incomplete));
        }
        prop_assert_eq!(parse_client_hello(&wire), Ok(expected.clone()));
        wire.extend_from_slice(&trailing);
        prop_assert_eq!(parse_client_hello(&wire), Ok(expected));
    }

    #[test]
    fn htpasswd_never_panics_errors_point_into_the_file(
        lines in prop::collection::vec(htpasswd_line(), 0..6),
        crlf in any::<bool>(),
    ) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        match Htpasswd::parse("users", &text) {
            Ok(h) => prop_assert!(h.len() <= lines.len()),
            Err(HtpasswdError::Parse { line, col, .. }) => {
                let all: Vec<&str> = text.split('\n').collect();
                prop_assert!(line >= 1 && line <= all.len());
                prop_assert!(col >= 1 && col <= all[line - 1].chars().count() + 1);
            }
            Err(e) => return Err(TestCaseError::fail(format!("parse did I/O: {e}"))),
        }
        if let Ok(v) = http::HeaderValue::from_str(&format!("Basic {}", lines.concat())) {
            let _ = parse_basic(&v);
        }
    }
}

proptest! {
    // Each case writes a file and compiles a policy: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_loader_never_panics_and_errors_carry_line_col(
        frags in prop::collection::vec(toml_fragment(), 0..24),
    ) {
        let _ = load_text(&frags.concat());
    }

    /// One bad value among valid rules: the error names the line it is on.
    #[test]
    fn config_error_points_at_the_bad_line(
        rules in 1usize..8,
        bad_rule in 0usize..8,
        bad in select(vec![
            ("action", "\"maybe\""),
            ("method", "\"G E T\""),
            ("host", "\"a b\""),
            ("path", "\"v1\""),
            ("mode", "\"loud\""),
            ("client", "\"300.1.1.1\""),
            ("endpoint", "\"everything\""),
            ("no_such_key", "1"),
        ]),
    ) {
        let bad_rule = bad_rule % rules;
        let mut text = String::from("[defaults]\naction = \"allow\"\n");
        let mut bad_line = 0;
        for i in 0..rules {
            writeln!(text, "\n[[rule]]\nid = \"r{i}\"\nhost = \"h{i}.example\"").unwrap();
            if i == bad_rule {
                bad_line = text.matches('\n').count() + 1;
                writeln!(text, "{} = {}", bad.0, bad.1).unwrap();
            }
            if i != bad_rule || bad.0 != "action" {
                writeln!(text, "action = \"block\"").unwrap();
            }
        }
        let e = load_text(&text).expect_err("a bad value is refused");
        prop_assert_eq!(e.line, bad_line, "{}\n{}", e, text);
    }
}

/// Checks a host that a URL could carry as is against the WHATWG parser.
fn assert_whatwg_agrees_if_plain(s: &str, ours: &Host) -> Result<(), TestCaseError> {
    let structural = |c: char| {
        matches!(c, '/' | '\\' | '?' | '#' | '@' | '[' | ']' | ':') || c.is_control() || c == ' '
    };
    if s.contains(structural) {
        return Ok(());
    }
    assert_whatwg_agrees(s, ours)
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the fuzzers (scripts/fuzz.sh); the inputs are also in fuzz/seeds.

/// fuzz target `htpasswd`: a bcrypt prefix with the hash cut short ("$2y$0") sliced past the
/// end of the string and panicked, taking the proxy down at start or reload.
#[test]
fn regression_htpasswd_truncated_bcrypt_is_an_error() {
    for text in [
        "alice:$2y$0\nbob:$apr1$abc$G37mj9g=\nd:$6$s.l#c\n#c\n",
        "u:$2y$",
        "u:$2a$1",
        "u:$2b$04",
        "u:$2y$\u{e9}\u{e9}",
        "u:$2y$0\u{e9}",
    ] {
        match Htpasswd::parse("users", text) {
            Err(HtpasswdError::Parse { line: 1, msg, .. }) => {
                assert!(msg.contains("malformed bcrypt"), "{text:?}: {msg}")
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    // A whole hash with a multi-byte character where the salt starts is refused too.
    let mangled = format!("u:$2y$05\u{e9}{}", &BCRYPT[9..]);
    assert!(Htpasswd::parse("users", &mangled).is_err());
}
