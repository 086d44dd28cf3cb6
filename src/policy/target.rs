//! Request-target normalisation.
//!
//! Policy rules match on hosts, so every spelling a client (or a URL parser
//! somewhere downstream) would treat as the same host must collapse to one
//! canonical value here, before any rule is consulted. Otherwise
//! `API.DeepSeek.com.`, `%61pi.deepseek.com` or `api。deepseek。com` walk
//! past a rule written for `api.deepseek.com`. The host parser follows the
//! WHATWG URL standard because that is what browsers and most HTTP clients
//! implement: if we disagree with them about what a host means, the
//! disagreement is a bypass.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use percent_encoding::percent_decode_str;

/// RFC 1035 limits; enforced after IDNA so the limits apply to what goes on
/// the wire, not to the Unicode the client typed.
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    /// Case-insensitive because RFC 3986 schemes are.
    pub fn parse(input: &str) -> Result<Scheme, TargetError> {
        if input.eq_ignore_ascii_case("http") {
            Ok(Scheme::Http)
        } else if input.eq_ignore_ascii_case("https") {
            Ok(Scheme::Https)
        } else {
            Err(TargetError::UnsupportedScheme(input.to_owned()))
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// lowercase ASCII (IDNA/UTS-46 to-ASCII applied), no trailing dot, validated label chars
    Name(Box<str>),
    /// IPv4-mapped IPv6 (::ffff:a.b.c.d) is converted to the V4 form
    Ip(IpAddr),
}

impl Host {
    /// Parses a bare host (no port, no userinfo). IPv6 may be bracketed or
    /// not; an unbracketed IPv6 is only unambiguous when no port follows,
    /// which is why authority parsing does not accept it.
    pub fn parse(input: &str) -> Result<Host, TargetError> {
        if input.is_empty() {
            return Err(TargetError::MissingHost);
        }
        if let Some(rest) = input.strip_prefix('[') {
            let inner = rest.strip_suffix(']').ok_or(TargetError::InvalidIpv6)?;
            return parse_ipv6(inner);
        }
        if input.contains(':') {
            return parse_ipv6(input);
        }
        parse_domain_or_ipv4(input)
    }

    /// Builds an IP host, folding IPv4-mapped IPv6 to IPv4 so that
    /// `::ffff:10.0.0.1` and `10.0.0.1` hit the same rules.
    pub fn from_ip(ip: IpAddr) -> Host {
        Host::Ip(ip.to_canonical())
    }

    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }

    pub fn as_ip(&self) -> Option<IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::Ip(ip) => Some(*ip),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V4(v4)) => f.write_str(Dotted::new(*v4).as_str()),
            Host::Ip(ip) => fmt::Display::fmt(ip, f),
        }
    }
}

impl Host {
    /// The host as text, appended to `out` (IPv6 without brackets, as `Display`).
    pub fn push_to(&self, out: &mut String) {
        match self {
            Host::Name(name) => out.push_str(name),
            Host::Ip(IpAddr::V4(v4)) => out.push_str(Dotted::new(*v4).as_str()),
            Host::Ip(ip) => {
                use fmt::Write as _;
                // Writing to a String cannot fail.
                let _ = write!(out, "{ip}");
            }
        }
    }
}

/// An IPv4 address as dotted-quad text on the stack. std's `Display` goes through the
/// formatting machinery (about a thousand instructions); this is on every request to an
/// IP-literal host and every audit line's client address.
pub struct Dotted {
    buf: [u8; 15],
    len: u8,
}

/// Each octet's decimal digits and their count: formatting an address is four copies.
const OCTET_TEXT: [([u8; 3], u8); 256] = {
    let mut t = [([0u8; 3], 0u8); 256];
    let mut o = 0;
    while o < 256 {
        let (h, d, u) = ((o / 100) as u8, (o / 10 % 10) as u8, (o % 10) as u8);
        t[o] = match o {
            0..=9 => ([b'0' + u, 0, 0], 1),
            10..=99 => ([b'0' + d, b'0' + u, 0], 2),
            _ => ([b'0' + h, b'0' + d, b'0' + u], 3),
        };
        o += 1;
    }
    t
};

impl Dotted {
    pub fn new(ip: Ipv4Addr) -> Dotted {
        let mut d = Dotted {
            buf: [0; 15],
            len: 0,
        };
        let mut at = 0usize;
        for (i, o) in ip.octets().into_iter().enumerate() {
            let (digits, n) = OCTET_TEXT[usize::from(o)];
            // Three bytes always fit: at most 3 × 4 digits and 3 dots, and the last octet
            // starts at 12 at the latest.
            d.buf[at..at + 3].copy_from_slice(&digits);
            at += usize::from(n);
            if i < 3 {
                d.buf[at] = b'.';
                at += 1;
            }
        }
        d.len = at as u8;
        d
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: `new` wrote only ASCII digits and dots into `buf[..len]`. (Checking it
        // again costs as much as writing it, on every request to an address and every record.)
        unsafe { std::str::from_utf8_unchecked(&self.buf[..usize::from(self.len)]) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub scheme: Scheme,
    pub host: Host,
    pub port: u16,
}

impl Target {
    /// "host:port" suitable for a URI authority / Host header: v6 in brackets; port omitted when it is the scheme default
    pub fn authority(&self) -> String {
        let mut out = String::with_capacity(32);
        match &self.host {
            Host::Ip(IpAddr::V6(_)) => {
                out.push('[');
                self.host.push_to(&mut out);
                out.push(']');
            }
            other => other.push_to(&mut out),
        }
        if self.port != self.scheme.default_port() {
            out.push(':');
            out.push_str(itoa::Buffer::new().format(self.port));
        }
        out
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority())
    }
}

/// Absolute-form request target (http://… or https://…). Origin-form ("/x"), other schemes → Err.
pub fn from_uri(uri: &http::Uri) -> Result<Target, TargetError> {
    let scheme = Scheme::parse(uri.scheme_str().ok_or(TargetError::NotAbsolute)?)?;
    let authority = uri.authority().ok_or(TargetError::MissingHost)?;
    let (host, port) = split_authority(authority.as_str())?;
    Ok(Target {
        scheme,
        host,
        port: port.unwrap_or(scheme.default_port()),
    })
}

/// CONNECT authority "host:port"; port REQUIRED; userinfo refused.
pub fn from_connect_authority(authority: &str) -> Result<(Host, u16), TargetError> {
    let (host, port) = split_authority(authority)?;
    // RFC 9110 §9.3.6 requires the port, and guessing one would let a client
    // pick which rule (http vs https default) its tunnel is judged by.
    let port = port.ok_or(TargetError::MissingPort)?;
    Ok((host, port))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("request target is not in absolute form (expected http:// or https://)")]
    NotAbsolute,
    #[error("unsupported scheme {0:?} (only http and https are proxied)")]
    UnsupportedScheme(String),
    #[error("host is empty")]
    MissingHost,
    #[error("userinfo (user@host) in the authority is refused")]
    UserInfo,
    #[error("authority has no port (CONNECT requires host:port)")]
    MissingPort,
    #[error("port is not a decimal number in 1..=65535")]
    BadPort,
    #[error("percent-decoded host is not valid UTF-8")]
    BadPercentEncoding,
    #[error("host rejected by IDNA (UTS-46) processing")]
    Idna,
    #[error("host ends in a number but is not a valid IPv4 address")]
    InvalidIpv4,
    #[error("invalid IPv6 literal (zone identifiers are not accepted)")]
    InvalidIpv6,
    #[error("IPv6 literal in an authority must be enclosed in brackets")]
    UnbracketedIpv6,
    #[error("invalid host name: {0}")]
    InvalidHost(&'static str),
}

impl TargetError {
    /// Stable snake_case name for audit records; never change an existing one.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetError::NotAbsolute => "not_absolute",
            TargetError::UnsupportedScheme(_) => "unsupported_scheme",
            TargetError::MissingHost => "missing_host",
            TargetError::UserInfo => "userinfo_refused",
            TargetError::MissingPort => "missing_port",
            TargetError::BadPort => "bad_port",
            TargetError::BadPercentEncoding => "bad_percent_encoding",
            TargetError::Idna => "idna_rejected",
            TargetError::InvalidIpv4 => "invalid_ipv4",
            TargetError::InvalidIpv6 => "invalid_ipv6",
            TargetError::UnbracketedIpv6 => "unbracketed_ipv6",
            TargetError::InvalidHost(_) => "invalid_host",
        }
    }
}

/// "host[:port]" as a Host header or :authority carries it, normalised like any target.
pub fn split_host_port(authority: &str) -> Result<(Host, Option<u16>), TargetError> {
    split_authority(authority)
}

/// Splits "host[:port]" without trusting anything upstream to have done so.
fn split_authority(authority: &str) -> Result<(Host, Option<u16>), TargetError> {
    // Refused rather than stripped: credentials have no business passing
    // through a policy proxy, and `allowed.com@blocked.com` style confusion
    // is a classic way to make a log and a connection disagree.
    // Byte searches: the authority is short, and a `char` search is built for long text.
    let bytes = authority.as_bytes();
    if bytes.contains(&b'@') {
        return Err(TargetError::UserInfo);
    }
    let (host_part, port_part) = if authority.starts_with('[') {
        let end = authority.find(']').ok_or(TargetError::InvalidIpv6)?;
        let (host, rest) = authority.split_at(end + 1);
        if rest.is_empty() {
            (host, None)
        } else {
            let port = rest
                .strip_prefix(':')
                .ok_or(TargetError::InvalidHost("characters after IPv6 literal"))?;
            (host, Some(port))
        }
    } else {
        match bytes.iter().rposition(|&b| b == b':') {
            // "::1:443" cannot be split reliably, so no guess is made.
            Some(at) if bytes[..at].contains(&b':') => return Err(TargetError::UnbracketedIpv6),
            // ':' is ASCII, so both sides are on char boundaries.
            Some(at) => (&authority[..at], Some(&authority[at + 1..])),
            None => (authority, None),
        }
    };
    let host = Host::parse(host_part)?;
    let port = port_part.map(parse_port).transpose()?;
    Ok((host, port))
}

/// Strict decimal only: an empty port is refused rather than defaulted so
/// that "host:" cannot mean one port to us and another to the origin.
fn parse_port(input: &str) -> Result<u16, TargetError> {
    if input.is_empty() || !input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort);
    }
    // Leading zeros are legal (WHATWG), so length alone cannot bound the value.
    let value = input.bytes().fold(0u32, |acc, b| {
        acc.saturating_mul(10).saturating_add(u32::from(b - b'0'))
    });
    match u16::try_from(value) {
        Ok(0) | Err(_) => Err(TargetError::BadPort),
        Ok(port) => Ok(port),
    }
}

fn parse_ipv6(input: &str) -> Result<Host, TargetError> {
    // std's parser rejects zone ids ("%eth0") already; zones name an
    // interface on *our* machine and have no meaning in a forwarded request.
    let v6: Ipv6Addr = input.parse().map_err(|_| TargetError::InvalidIpv6)?;
    Ok(Host::from_ip(IpAddr::V6(v6)))
}

fn parse_domain_or_ipv4(input: &str) -> Result<Host, TargetError> {
    // Canonical dotted decimal (no leading zeros, four octets) means the same to every parser
    // and skips decoding and UTS-46; every other spelling takes the WHATWG path below.
    if let Ok(v4) = input.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    // Decoding comes first, as in the WHATWG host parser: "%61pi" is "api"
    // to every browser, so it must be "api" to the rules too.
    let decoded: Cow<'_, str> = percent_decode_str(input)
        .decode_utf8()
        .map_err(|_| TargetError::BadPercentEncoding)?;
    // UTS-46 mapping lowercases, folds full-width forms and maps the
    // ideographic full stop to '.', so it must run before the dot handling
    // and IPv4 detection below ("１２７。０。０。１" is loopback).
    // The borrowing form: a name that is already lowercase ASCII (nearly every request) is
    // checked in place, not copied.
    let ascii = idna::domain_to_ascii_cow(decoded.as_bytes(), idna::AsciiDenyList::EMPTY)
        .map_err(|_| TargetError::Idna)?;
    // Exactly one trailing dot is the fully-qualified spelling of the same
    // name; more than one is an empty label and is caught by validation.
    let name = ascii.strip_suffix('.').unwrap_or(&ascii);
    if name.is_empty() {
        return Err(TargetError::MissingHost);
    }
    // WHATWG: a host whose last label is numeric is an IPv4 address or an
    // error, never a name. Falling back to a name lookup would let
    // "0x7f.1" be resolved by a stub resolver that reads it as 127.0.0.1.
    if ends_in_number(name) {
        return parse_ipv4(name)
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .ok_or(TargetError::InvalidIpv4);
    }
    validate_name(name)?;
    Ok(Host::Name(name.into()))
}

/// WHATWG's "ends in a number": the host is an IPv4 address (or an error), never a name.
pub(crate) fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    parse_ipv4_number(last).is_some()
}

/// WHATWG "IPv4 number parser": `0x` prefix is hex, a leading `0` is octal,
/// otherwise decimal. Out-of-range values saturate instead of failing so that
/// an overflowing label is still recognised as numeric (and then rejected as
/// an address) rather than silently treated as a host name.
fn parse_ipv4_number(input: &str) -> Option<u64> {
    if input.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(hex) = input
        .strip_prefix("0x")
        .or_else(|| input.strip_prefix("0X"))
    {
        (hex, 16)
    } else if input.len() > 1 && input.starts_with('0') {
        (&input[1..], 8)
    } else {
        (input, 10)
    };
    // "0x" alone is zero per the standard.
    let mut value: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix)?;
        value = value
            .saturating_mul(u64::from(radix))
            .saturating_add(u64::from(d));
    }
    Some(value)
}

/// WHATWG "IPv4 parser": 1 to 4 parts, every part but the last is one byte,
/// the last fills the remaining bytes ("127.1" = 127.0.0.1).
fn parse_ipv4(input: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut count = 0;
    for piece in input.split('.') {
        if count == parts.len() {
            return None;
        }
        parts[count] = parse_ipv4_number(piece)?;
        count += 1;
    }
    let (&last, init) = parts[..count].split_last()?;
    if init.iter().any(|&p| p > 255) {
        return None;
    }
    // count is 1..=4, so the shift is 32, 24, 16 or 8 bits.
    let last_bits = 8 * (5 - count as u32);
    if last >= 1u64 << last_bits {
        return None;
    }
    let mut addr = last;
    for (i, &part) in init.iter().enumerate() {
        addr += part << (8 * (3 - i));
    }
    u32::try_from(addr).ok().map(Ipv4Addr::from)
}

fn validate_name(name: &str) -> Result<(), TargetError> {
    if name.len() > MAX_NAME_LEN {
        return Err(TargetError::InvalidHost("name longer than 253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(TargetError::InvalidHost("empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(TargetError::InvalidHost("label longer than 63 bytes"));
        }
        // '_' is outside RFC 952 but real (SRV-style and CDN names); anything
        // else (space, NUL, '/', '\\', '%', ...) is what parser-differential
        // attacks are built from.
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(TargetError::InvalidHost(
                "character not allowed in a host name",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Host {
        Host::Name(s.into())
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Host {
        Host::Ip(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
    }

    fn uri(s: &str) -> Result<Target, TargetError> {
        from_uri(&s.parse::<http::Uri>().expect("test URI must parse"))
    }

    fn err(s: &str) -> TargetError {
        Host::parse(s).expect_err(s)
    }

    #[test]
    fn scheme_basics() {
        assert_eq!(Scheme::Http.as_str(), "http");
        assert_eq!(Scheme::Https.as_str(), "https");
        assert_eq!(Scheme::Http.default_port(), 80);
        assert_eq!(Scheme::Https.default_port(), 443);
        assert_eq!(Scheme::parse("HtTpS"), Ok(Scheme::Https));
        assert_eq!(
            Scheme::parse("ws").unwrap_err().kind(),
            "unsupported_scheme"
        );
    }

    #[test]
    fn lowercases() {
        assert_eq!(
            Host::parse("API.DeepSeek.COM"),
            Ok(name("api.deepseek.com"))
        );
    }

    #[test]
    fn one_trailing_dot_removed_two_refused() {
        assert_eq!(
            Host::parse("api.deepseek.com."),
            Ok(name("api.deepseek.com"))
        );
        assert_eq!(err("a.com..").kind(), "invalid_host");
        assert_eq!(err("a..com").kind(), "invalid_host");
        assert_eq!(err(".a.com").kind(), "invalid_host");
        assert_eq!(err(".").kind(), "missing_host");
    }

    #[test]
    fn percent_decoded_first() {
        assert_eq!(
            Host::parse("%61pi.deepseek.com"),
            Ok(name("api.deepseek.com"))
        );
        assert_eq!(
            Host::parse("%41PI%2eDEEPSEEK%2ecom"),
            Ok(name("api.deepseek.com"))
        );
        // Decoding happens before IPv4 detection, as in WHATWG.
        assert_eq!(Host::parse("127%2e0%2e0%2e1"), Ok(v4(127, 0, 0, 1)));
        // Only one round of decoding: the result "%61" is not a valid name.
        assert_eq!(err("%2561pi.com").kind(), "invalid_host");
        assert_eq!(err("%ff.com").kind(), "bad_percent_encoding");
        assert_eq!(err("a%00b.com").kind(), "invalid_host");
        assert_eq!(err("a%2fb.com").kind(), "invalid_host");
        assert_eq!(err("evil.com%40api.deepseek.com").kind(), "invalid_host");
        assert_eq!(err("a%zz.com").kind(), "invalid_host");
        assert_eq!(
            from_connect_authority("%61pi.deepseek.com:443"),
            Ok((name("api.deepseek.com"), 443))
        );
    }

    #[test]
    fn idna_and_full_width_forms() {
        let ascii = Host::parse("api.deepseek.com").unwrap();
        for spelling in [
            "api。deepseek。com",
            "api．deepseek．com",
            "api｡deepseek｡com",
            "ａｐｉ．ｄｅｅｐｓｅｅｋ．ｃｏｍ",
            "ＡＰＩ.DEEPSEEK.ＣＯＭ。",
        ] {
            assert_eq!(Host::parse(spelling).as_ref(), Ok(&ascii), "{spelling}");
        }
        assert_eq!(
            Host::parse("Bücher.example"),
            Ok(name("xn--bcher-kva.example"))
        );
        assert_eq!(
            Host::parse("xn--bcher-kva.example"),
            Ok(name("xn--bcher-kva.example"))
        );
        assert_eq!(
            Host::parse("%C3%BCber.example"),
            Ok(name("xn--ber-goa.example"))
        );
        assert_eq!(err("xn--zz.example").kind(), "idna_rejected");
        // Full-width digits and dots are still an IPv4 literal.
        assert_eq!(Host::parse("１２７。０。０。１"), Ok(v4(127, 0, 0, 1)));
    }

    #[test]
    fn userinfo_refused() {
        for auth in [
            "user:pw@api.deepseek.com:443",
            "@api.deepseek.com:443",
            "a@b@c:1",
        ] {
            assert_eq!(
                from_connect_authority(auth),
                Err(TargetError::UserInfo),
                "{auth}"
            );
        }
        assert_eq!(uri("http://user:pw@host/x"), Err(TargetError::UserInfo));
        assert_eq!(uri("https://@host/"), Err(TargetError::UserInfo));
        assert_eq!(TargetError::UserInfo.kind(), "userinfo_refused");
    }

    #[test]
    fn default_and_explicit_ports() {
        let t = uri("http://a.com/x").unwrap();
        assert_eq!((t.scheme, t.port), (Scheme::Http, 80));
        let t = uri("https://a.com").unwrap();
        assert_eq!((t.scheme, t.port), (Scheme::Https, 443));
        assert_eq!(uri("https://a.com:8443/").unwrap().port, 8443);
        assert_eq!(uri("http://a.com:443/").unwrap().port, 443);
        assert_eq!(uri("http://a.com:00080/").unwrap().port, 80);
        assert_eq!(uri("HTTP://A.COM/").unwrap().host, name("a.com"));
        assert_eq!(from_connect_authority("a.com:1"), Ok((name("a.com"), 1)));
        assert_eq!(
            from_connect_authority("a.com:65535"),
            Ok((name("a.com"), 65535))
        );
    }

    #[test]
    fn bad_ports_refused() {
        for auth in [
            "a.com:0",
            "a.com:65536",
            "a.com:99999",
            "a.com:4294967377",
            "a.com:8a",
            "a.com:+80",
            "a.com: 80",
            "a.com:-1",
            "a.com:",
            "a.com:８０",
        ] {
            assert_eq!(
                from_connect_authority(auth),
                Err(TargetError::BadPort),
                "{auth}"
            );
        }
        assert_eq!(uri("http://a.com:0/"), Err(TargetError::BadPort));
        assert_eq!(uri("http://a.com:65536/"), Err(TargetError::BadPort));
        assert_eq!(uri("http://a.com:/"), Err(TargetError::BadPort));
    }

    #[test]
    fn connect_requires_port() {
        assert_eq!(
            from_connect_authority("a.com"),
            Err(TargetError::MissingPort)
        );
        assert_eq!(
            from_connect_authority("[::1]"),
            Err(TargetError::MissingPort)
        );
        assert_eq!(TargetError::MissingPort.kind(), "missing_port");
    }

    #[test]
    fn empty_host_refused() {
        assert_eq!(Host::parse(""), Err(TargetError::MissingHost));
        assert_eq!(
            from_connect_authority(":443"),
            Err(TargetError::MissingHost)
        );
        assert_eq!(from_connect_authority(""), Err(TargetError::MissingHost));
        assert_eq!(uri("http://:80/"), Err(TargetError::MissingHost));
        assert_eq!(err("%2e").kind(), "missing_host");
    }

    #[test]
    fn label_validation() {
        for bad in [
            "a b.com", "a\0b.com", "a/b.com", "a\\b.com", "a%b.com", "a?b", "a#b", "a*b.com",
            "a,b.com", "a\tb.com", "a\"b.com", "a<b.com", "a|b.com", "a'b.com",
        ] {
            assert_eq!(err(bad).kind(), "invalid_host", "{bad:?}");
        }
        assert_eq!(Host::parse("_dmarc.a-b.c0m"), Ok(name("_dmarc.a-b.c0m")));
        let label63 = "a".repeat(63);
        let label64 = "a".repeat(64);
        assert!(Host::parse(&format!("{label63}.com")).is_ok());
        assert!(Host::parse(&format!("{label64}.com")).is_err());
        // 4 * 63 + 3 dots = 255; trim to exactly 253 and 254.
        let long = [label63.as_str(); 4].join(".");
        assert!(Host::parse(&long[..253]).is_ok());
        assert!(Host::parse(&format!("{}.", &long[..253])).is_ok());
        assert_eq!(err(&long[..254]).kind(), "invalid_host");
    }

    #[test]
    fn ipv4_whatwg_forms() {
        let lo = v4(127, 0, 0, 1);
        for spelling in [
            "127.0.0.1",
            "127.0.0.1.",
            "127.1",
            "127.0.1",
            "2130706433",
            "0x7f000001",
            "0X7F000001",
            "0x7f.0.0.1",
            "0x7f.1",
            "0177.0.0.1",
            "0177.1",
            "017700000001",
            "0x7f.0.01",
            "127.0.0x0.01",
            "0x0000007f.0x0.0.1",
            "00000127.1",
        ] {
            // "00000127" is octal 127 = 87, so that one is not loopback.
            if spelling == "00000127.1" {
                assert_eq!(Host::parse(spelling), Ok(v4(87, 0, 0, 1)));
                continue;
            }
            assert_eq!(Host::parse(spelling).as_ref(), Ok(&lo), "{spelling}");
        }
        assert_eq!(Host::parse("0"), Ok(v4(0, 0, 0, 0)));
        assert_eq!(Host::parse("0x"), Ok(v4(0, 0, 0, 0)));
        assert_eq!(Host::parse("4294967295"), Ok(v4(255, 255, 255, 255)));
        assert_eq!(Host::parse("1.16777215"), Ok(v4(1, 255, 255, 255)));
        assert_eq!(Host::parse("1.2.65535"), Ok(v4(1, 2, 255, 255)));
        assert_eq!(Host::parse("169.254.169.254"), Ok(v4(169, 254, 169, 254)));
    }

    #[test]
    fn ipv4_overflow_and_junk_is_an_error_not_a_name() {
        for bad in [
            "4294967296",
            "0x100000000",
            "99999999999999999999999999",
            "0xffffffffffffffffffffffffffff",
            "256.0.0.1",
            "1.256.0.1",
            "1.2.3.256",
            "1.16777216",
            "1.2.65536",
            "1.2.3.4.5",
            "09.0.0.1",
            "1.2.3.08",
            "0x1g.0.0.1",
            "foo.1",
            "api.deepseek.0x1",
            "1..1",
            "1.2.3.4..",
        ] {
            let e = err(bad);
            assert!(
                matches!(e, TargetError::InvalidIpv4 | TargetError::InvalidHost(_)),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(err("foo.1").kind(), "invalid_ipv4");
        assert_eq!(err("4294967296").kind(), "invalid_ipv4");
        // A last label that merely starts with digits is a name.
        assert_eq!(Host::parse("1.2.3.4a"), Ok(name("1.2.3.4a")));
        assert_eq!(Host::parse("a.0x1g"), Ok(name("a.0x1g")));
    }

    #[test]
    fn ipv6_literals() {
        let v6 = |s: &str| Host::Ip(IpAddr::V6(s.parse().unwrap()));
        assert_eq!(Host::parse("[::1]"), Ok(v6("::1")));
        assert_eq!(Host::parse("::1"), Ok(v6("::1")));
        assert_eq!(Host::parse("[2001:DB8::1]"), Ok(v6("2001:db8::1")));
        assert_eq!(Host::parse("[2001:db8:0:0:0:0:0:1]"), Ok(v6("2001:db8::1")));
        assert_eq!(Host::parse("[::ffff:127.0.0.1]"), Ok(v4(127, 0, 0, 1)));
        assert_eq!(Host::parse("[::ffff:7f00:1]"), Ok(v4(127, 0, 0, 1)));
        assert_eq!(Host::parse("::ffff:7f00:1"), Ok(v4(127, 0, 0, 1)));
        // Compatible (not mapped) stays IPv6; the guard refuses it on dial.
        assert_eq!(Host::parse("[::127.0.0.1]"), Ok(v6("::7f00:1")));
        for bad in [
            "[fe80::1%25eth0]",
            "[fe80::1%eth0]",
            "[::1",
            "[]",
            "[1.2.3.4]",
            "[:::1]",
            "[g::1]",
        ] {
            assert_eq!(err(bad).kind(), "invalid_ipv6", "{bad}");
        }
        assert_eq!(from_connect_authority("[::1]:443"), Ok((v6("::1"), 443)));
        assert_eq!(
            from_connect_authority("[::ffff:10.0.0.1]:443"),
            Ok((v4(10, 0, 0, 1), 443))
        );
        assert_eq!(
            from_connect_authority("::1:443"),
            Err(TargetError::UnbracketedIpv6)
        );
        assert_eq!(
            from_connect_authority("[::1]x:443").unwrap_err().kind(),
            "invalid_host"
        );
        assert_eq!(from_connect_authority("[::1]:"), Err(TargetError::BadPort));
        let t = uri("http://[::ffff:127.0.0.1]:8080/").unwrap();
        assert_eq!((t.host, t.port), (v4(127, 0, 0, 1), 8080));
    }

    #[test]
    fn display_and_authority() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(Host::Ip(v6).to_string(), "2001:db8::1");
        assert_eq!(v4(10, 0, 0, 1).to_string(), "10.0.0.1");
        assert_eq!(name("a.com").to_string(), "a.com");
        let t = |scheme, host, port| Target { scheme, host, port };
        assert_eq!(
            t(Scheme::Https, Host::Ip(v6), 443).authority(),
            "[2001:db8::1]"
        );
        assert_eq!(
            t(Scheme::Https, Host::Ip(v6), 8443).authority(),
            "[2001:db8::1]:8443"
        );
        assert_eq!(t(Scheme::Http, name("a.com"), 80).authority(), "a.com");
        assert_eq!(t(Scheme::Http, name("a.com"), 443).authority(), "a.com:443");
        assert_eq!(
            t(Scheme::Https, v4(1, 2, 3, 4), 80).authority(),
            "1.2.3.4:80"
        );
        assert_eq!(
            t(Scheme::Https, v4(1, 2, 3, 4), 80).to_string(),
            "https://1.2.3.4:80"
        );
        assert_eq!(name("a.com").as_name(), Some("a.com"));
        assert_eq!(v4(1, 2, 3, 4).as_name(), None);
        assert_eq!(
            v4(1, 2, 3, 4).as_ip(),
            Some(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)))
        );
    }

    #[test]
    fn from_uri_shapes() {
        assert_eq!(uri("/x"), Err(TargetError::NotAbsolute));
        assert_eq!(uri("*"), Err(TargetError::NotAbsolute));
        assert_eq!(
            uri("ftp://a.com/").unwrap_err().kind(),
            "unsupported_scheme"
        );
        assert_eq!(
            uri("wss://a.com/").unwrap_err().kind(),
            "unsupported_scheme"
        );
        assert_eq!(
            uri("http://0x7f.1/"),
            Ok(Target {
                scheme: Scheme::Http,
                host: v4(127, 0, 0, 1),
                port: 80
            })
        );
        assert_eq!(
            uri("https://api.deepseek.com.:443/v1"),
            Ok(Target {
                scheme: Scheme::Https,
                host: name("api.deepseek.com"),
                port: 443
            })
        );
        // An authority-form URI has no scheme, so it is not absolute.
        assert_eq!(uri("a.com:443"), Err(TargetError::NotAbsolute));
    }

    #[test]
    fn kinds_are_distinct_snake_case() {
        let all = [
            TargetError::NotAbsolute,
            TargetError::UnsupportedScheme("x".into()),
            TargetError::MissingHost,
            TargetError::UserInfo,
            TargetError::MissingPort,
            TargetError::BadPort,
            TargetError::BadPercentEncoding,
            TargetError::Idna,
            TargetError::InvalidIpv4,
            TargetError::InvalidIpv6,
            TargetError::UnbracketedIpv6,
            TargetError::InvalidHost("x"),
        ];
        let mut seen = std::collections::HashSet::new();
        for e in &all {
            let k = e.kind();
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{k}"
            );
            assert!(seen.insert(k), "duplicate kind {k}");
            assert!(!e.to_string().is_empty());
        }
    }

    /// Deterministic xorshift so failures reproduce without a proptest dep.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn spell_byte(rng: &mut Rng, b: u32) -> String {
        match rng.below(3) {
            0 => format!("{b}"),
            1 => format!("0x{b:x}"),
            _ => format!("0{b:o}"),
        }
    }

    #[test]
    fn ipv4_spellings_agree() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let n = rng.next() as u32;
            let [a, b, c, d] = n.to_be_bytes().map(u32::from);
            let expected = Host::Ip(IpAddr::V4(Ipv4Addr::from(n)));
            let spellings = [
                format!("{a}.{b}.{c}.{d}"),
                format!("{n}"),
                format!("0x{n:x}"),
                format!("0X{n:08X}"),
                format!("0{n:o}"),
                format!("0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}"),
                format!("0{a:o}.0{b:o}.0{c:o}.0{d:o}"),
                format!("{a}.{}", n & 0x00ff_ffff),
                format!("{a}.{b}.{}", n & 0xffff),
                format!("{a}.0x{:x}", n & 0x00ff_ffff),
                format!("{a}.{b}.0{:o}", n & 0xffff),
                format!(
                    "{}.{}.{}.{}",
                    spell_byte(&mut rng, a),
                    spell_byte(&mut rng, b),
                    spell_byte(&mut rng, c),
                    spell_byte(&mut rng, d)
                ),
                format!("{a}.{b}.{c}.{d}."),
            ];
            for s in &spellings {
                assert_eq!(Host::parse(s).as_ref(), Ok(&expected), "{s}");
            }
            let t = from_connect_authority(&format!("{}:443", spellings[2])).unwrap();
            assert_eq!(t, (expected.clone(), 443));
        }
    }

    #[test]
    fn name_spellings_agree() {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..5_000 {
            let labels = 1 + rng.below(4);
            let mut lower = String::new();
            for i in 0..labels {
                if i > 0 {
                    lower.push('.');
                }
                // Leading letter keeps the last label from looking numeric.
                lower.push(char::from(b'a' + rng.below(26) as u8));
                for _ in 0..rng.below(12) {
                    lower.push(char::from(CHARS[rng.below(CHARS.len() as u64) as usize]));
                }
            }
            let expected = Host::Name(lower.as_str().into());
            let upper = lower.to_ascii_uppercase();
            let full_width: String = upper
                .chars()
                .map(|c| match c {
                    'A'..='Z' | '0'..='9' => char::from_u32(c as u32 + 0xfee0).unwrap(),
                    '.' => '。',
                    other => other,
                })
                .collect();
            let encoded: String = lower
                .bytes()
                .map(|b| {
                    if rng.below(2) == 0 {
                        format!("%{b:02x}")
                    } else {
                        char::from(b).to_string()
                    }
                })
                .collect();
            for s in [
                lower.clone(),
                upper.clone(),
                format!("{lower}."),
                format!("{upper}."),
                full_width.clone(),
                format!("{full_width}。"),
                encoded,
            ] {
                assert_eq!(Host::parse(&s).as_ref(), Ok(&expected), "{s}");
            }
            let connect = from_connect_authority(&format!("{upper}.:443")).unwrap();
            assert_eq!(connect, (expected.clone(), 443));
        }
    }

    #[test]
    fn dotted_quads_match_std() {
        for ip in [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(255, 255, 255, 255),
            Ipv4Addr::new(10, 99, 100, 9),
            Ipv4Addr::new(1, 20, 200, 255),
        ] {
            assert_eq!(Dotted::new(ip).as_str(), ip.to_string());
        }
        for n in (0..u32::MAX).step_by(7_919_993) {
            let ip = Ipv4Addr::from(n);
            assert_eq!(Dotted::new(ip).as_str(), ip.to_string());
        }
        let t = Target {
            scheme: Scheme::Http,
            host: Host::Ip("::1".parse().unwrap()),
            port: 8080,
        };
        assert_eq!(t.authority(), "[::1]:8080");
    }
}
