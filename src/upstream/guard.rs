//! The upstream address guard.
//!
//! A forward proxy that dials whatever DNS returns is an SSRF gadget: any
//! client that can make a name resolve to 10.0.0.5 or 169.254.169.254 gets
//! the proxy's network position. So the check runs on the *resolved* socket
//! address, immediately before connect, where no later resolution can change
//! the answer (the lesson of Stripe's smokescreen). Everything that is not
//! plainly public unicast is refused unless the operator carved out an
//! exception, and IPv6 forms that embed an IPv4 address are refused as a
//! class instead of being unwrapped, because each unwrapping rule is one more
//! place for a guard and a kernel to disagree.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    Unspecified,
    Loopback,
    /// RFC 1918
    Private,
    /// 100.64.0.0/10, RFC 6598
    SharedCgnat,
    /// 169.254.0.0/16, fe80::/10
    LinkLocal,
    /// fc00::/7
    UniqueLocal,
    /// fec0::/10 (deprecated, still routable inside some sites)
    SiteLocal,
    Multicast,
    Broadcast,
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48
    Benchmarking,
    /// 0/8, 192.0.0.0/24, 240/4, 100::/64 and all IPv6 outside 2000::/3 etc.
    Reserved,
    /// ::ffff:0:0/96, ::/96, ::ffff:0:0:0/96, 64:ff9b::/96, 64:ff9b:1::/48,
    /// 2002::/16, 2001::/32
    Ipv4Embedded,
    /// Never returned by [`classify`]: the address is one of the proxy's own
    /// listeners, refused because dialling it makes a request loop.
    OwnListener,
}

impl AddrClass {
    /// Stable snake_case name for audit records and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AddrClass::Public => "public",
            AddrClass::Unspecified => "unspecified",
            AddrClass::Loopback => "loopback",
            AddrClass::Private => "private",
            AddrClass::SharedCgnat => "shared_cgnat",
            AddrClass::LinkLocal => "link_local",
            AddrClass::UniqueLocal => "unique_local",
            AddrClass::SiteLocal => "site_local",
            AddrClass::Multicast => "multicast",
            AddrClass::Broadcast => "broadcast",
            AddrClass::Documentation => "documentation",
            AddrClass::Benchmarking => "benchmarking",
            AddrClass::Reserved => "reserved",
            AddrClass::Ipv4Embedded => "ipv4_embedded",
            AddrClass::OwnListener => "own_listener",
        }
    }

    /// Human wording for error messages, where the audit name would be cryptic.
    pub fn describe(self) -> &'static str {
        match self {
            AddrClass::Public => "a public address",
            AddrClass::Unspecified => "the unspecified address",
            AddrClass::Loopback => "a loopback address",
            AddrClass::Private => "a private (RFC 1918) address",
            AddrClass::SharedCgnat => "a shared/CGNAT (100.64.0.0/10) address",
            AddrClass::LinkLocal => "a link-local address",
            AddrClass::UniqueLocal => "an IPv6 unique-local (fc00::/7) address",
            AddrClass::SiteLocal => "an IPv6 site-local (fec0::/10) address",
            AddrClass::Multicast => "a multicast address",
            AddrClass::Broadcast => "the broadcast address",
            AddrClass::Documentation => "a documentation-only address",
            AddrClass::Benchmarking => "a benchmarking address",
            AddrClass::Reserved => "a reserved address",
            AddrClass::Ipv4Embedded => "an IPv6 address embedding IPv4 (mapped/NAT64/6to4/Teredo)",
            AddrClass::OwnListener => "one of this proxy's own listeners",
        }
    }

    pub fn is_public(self) -> bool {
        self == AddrClass::Public
    }
}

/// Ordered most-specific first: the first matching entry wins, which is how
/// e.g. 255.255.255.255 is Broadcast rather than the enclosing 240/4.
const V4_RANGES: &[(u32, u8, AddrClass)] = &[
    (v4(0, 0, 0, 0), 32, AddrClass::Unspecified),
    (v4(0, 0, 0, 0), 8, AddrClass::Reserved),
    (v4(10, 0, 0, 0), 8, AddrClass::Private),
    (v4(100, 64, 0, 0), 10, AddrClass::SharedCgnat),
    (v4(127, 0, 0, 0), 8, AddrClass::Loopback),
    (v4(169, 254, 0, 0), 16, AddrClass::LinkLocal),
    (v4(172, 16, 0, 0), 12, AddrClass::Private),
    (v4(192, 0, 0, 0), 24, AddrClass::Reserved),
    (v4(192, 0, 2, 0), 24, AddrClass::Documentation),
    // 6to4 relay anycast, deprecated by RFC 7526; nothing legitimate lives there.
    (v4(192, 88, 99, 0), 24, AddrClass::Reserved),
    (v4(192, 168, 0, 0), 16, AddrClass::Private),
    (v4(198, 18, 0, 0), 15, AddrClass::Benchmarking),
    (v4(198, 51, 100, 0), 24, AddrClass::Documentation),
    (v4(203, 0, 113, 0), 24, AddrClass::Documentation),
    (v4(224, 0, 0, 0), 4, AddrClass::Multicast),
    (v4(255, 255, 255, 255), 32, AddrClass::Broadcast),
    (v4(240, 0, 0, 0), 4, AddrClass::Reserved),
];

const V6_RANGES: &[(u128, u8, AddrClass)] = &[
    (0, 128, AddrClass::Unspecified),
    (1, 128, AddrClass::Loopback),
    (
        v6([0, 0, 0, 0, 0, 0xffff, 0, 0]),
        96,
        AddrClass::Ipv4Embedded,
    ),
    // SIIT "IPv4-translated" (RFC 2765).
    (
        v6([0, 0, 0, 0, 0xffff, 0, 0, 0]),
        96,
        AddrClass::Ipv4Embedded,
    ),
    // Deprecated IPv4-compatible; after :: and ::1 so those keep their class.
    (0, 96, AddrClass::Ipv4Embedded),
    (
        v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]),
        96,
        AddrClass::Ipv4Embedded,
    ),
    (
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]),
        48,
        AddrClass::Ipv4Embedded,
    ),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0]), 64, AddrClass::Reserved),
    // Teredo, before the enclosing 2001::/23.
    (
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
        32,
        AddrClass::Ipv4Embedded,
    ),
    (
        v6([0x2001, 2, 0, 0, 0, 0, 0, 0]),
        48,
        AddrClass::Benchmarking,
    ),
    // IETF protocol assignments: anycast infrastructure (AS112, AMT, ORCHID)
    // that an HTTP proxy has no reason to reach.
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 23, AddrClass::Reserved),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
        32,
        AddrClass::Documentation,
    ),
    (
        v6([0x2002, 0, 0, 0, 0, 0, 0, 0]),
        16,
        AddrClass::Ipv4Embedded,
    ),
    // RFC 9637.
    (
        v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]),
        20,
        AddrClass::Documentation,
    ),
    // SRv6 SIDs (RFC 9602): segment identifiers, not hosts.
    (v6([0x5f00, 0, 0, 0, 0, 0, 0, 0]), 16, AddrClass::Reserved),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]), 7, AddrClass::UniqueLocal),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, AddrClass::LinkLocal),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]), 10, AddrClass::SiteLocal),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, AddrClass::Multicast),
];

/// IANA allocates global unicast only from 2000::/3; anything else not
/// listed above is unallocated, and "unallocated" must not mean "public".
const V6_GLOBAL_UNICAST: (u128, u8) = (v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3);

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

const fn v6(segments: [u16; 8]) -> u128 {
    let mut out = 0u128;
    let mut i = 0;
    while i < 8 {
        out = (out << 16) | segments[i] as u128;
        i += 1;
    }
    out
}

fn in_v4(addr: u32, net: u32, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    addr & mask == net
}

fn in_v6(addr: u128, net: u128, len: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    addr & mask == net
}

pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    let addr = u32::from(ip);
    V4_RANGES
        .iter()
        .find(|&&(net, len, _)| in_v4(addr, net, len))
        .map_or(AddrClass::Public, |&(_, _, class)| class)
}

fn classify_v6(ip: Ipv6Addr) -> AddrClass {
    let addr = u128::from(ip);
    if let Some(&(_, _, class)) = V6_RANGES
        .iter()
        .find(|&&(net, len, _)| in_v6(addr, net, len))
    {
        return class;
    }
    let (net, len) = V6_GLOBAL_UNICAST;
    if in_v6(addr, net, len) {
        AddrClass::Public
    } else {
        AddrClass::Reserved
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream address {addr} is {} and not allowed", class.describe())]
pub struct GuardDenied {
    pub addr: SocketAddr,
    pub class: AddrClass,
}

#[derive(Debug, Clone, Default)]
pub struct AddressGuard {
    allow: Vec<IpNet>,
    own: Vec<SocketAddr>,
}

impl AddressGuard {
    /// allow: operator exceptions (CIDRs) to the private-address guard; own: the proxy's own listener addresses
    ///
    /// An allow entry must name the address family the dial uses: allowing
    /// 10.0.0.0/8 does not open ::ffff:10.0.0.1, since embedded forms are
    /// never unwrapped. A NAT64 deployment allows 64:ff9b::/96 explicitly.
    pub fn new(allow: Vec<IpNet>, own: Vec<SocketAddr>) -> Self {
        let allow = allow.into_iter().map(|net| net.trunc()).collect();
        // Canonical form so a listener written as [::ffff:127.0.0.1]:3128
        // still matches a dial to 127.0.0.1:3128.
        let own = own
            .into_iter()
            .map(|l| SocketAddr::new(l.ip().to_canonical(), l.port()))
            .collect();
        AddressGuard { allow, own }
    }

    /// Ok when the address may be dialled. Refused: any non-Public class unless inside an `allow` net; ALWAYS refused: the proxy's own listeners (same port and (same ip, or listener ip unspecified and target ip loopback/unspecified)), even when allowed, since dialling ourselves loops.
    pub fn check(&self, addr: SocketAddr) -> Result<(), GuardDenied> {
        // Checked first so that no allow entry, however broad, can open it.
        if self.is_own_listener(addr) {
            return Err(GuardDenied {
                addr,
                class: AddrClass::OwnListener,
            });
        }
        let ip = addr.ip();
        let class = classify(ip);
        if class.is_public() || self.allow.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(GuardDenied { addr, class })
        }
    }

    /// After the connect: a wildcard listener also answers on the host's other interface
    /// addresses (a pod IP, a LAN address), which [`Self::check`] cannot know. A connection to
    /// one of them has the same address at both ends, as the kernel routes it to itself, and
    /// no other socket can hold the listener's port there: so that connection is to us.
    ///
    /// Whatever spelling was dialled, a connection whose far end is one of our listeners'
    /// own addresses is to us, too.
    pub fn check_connected(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), GuardDenied> {
        let ip = peer.ip().to_canonical();
        let ours = |l: &SocketAddr| {
            l.port() == peer.port()
                && (l.ip() == ip || (l.ip().is_unspecified() && local.ip().to_canonical() == ip))
        };
        if self.own.iter().any(ours) {
            return Err(GuardDenied {
                addr: peer,
                class: AddrClass::OwnListener,
            });
        }
        Ok(())
    }

    /// A wildcard listener also accepts connections to the host's other
    /// interface addresses; those are unknown to this pure function, so the
    /// caller should list them in `own` if it wants them caught here too
    /// (private ones are refused by class anyway).
    fn is_own_listener(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.own.iter().any(|listener| {
            listener.port() == addr.port()
                && (listener.ip() == ip
                    // A dial to the unspecified address reaches this host, whichever of its
                    // addresses the listener holds.
                    || ip.is_unspecified()
                    || (listener.ip().is_unspecified() && ip.is_loopback()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddrClass::*;

    fn class_of(s: &str) -> AddrClass {
        classify(
            s.parse::<IpAddr>()
                .unwrap_or_else(|_| panic!("bad test ip {s}")),
        )
    }

    #[test]
    fn a_connection_to_our_own_wildcard_port_on_another_address_is_ours() {
        let guard = AddressGuard::new(
            vec!["10.0.0.0/8".parse().unwrap()],
            vec![
                "0.0.0.0:3128".parse().unwrap(),
                "[::]:9090".parse().unwrap(),
            ],
        );
        let pod = |port: u16| SocketAddr::new("10.9.9.9".parse().unwrap(), port);
        // Dialled through the guard's front door: allowed (10/8 is), so only the
        // connected pair can tell.
        assert!(guard.check(pod(3128)).is_ok());
        let denied = guard.check_connected(pod(41000), pod(3128)).unwrap_err();
        assert_eq!(denied.class, OwnListener);
        let v6 = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);
        assert!(guard
            .check_connected(v6("fd00::5", 41000), v6("fd00::5", 9090))
            .is_err());
        // Another host's port 3128, or another port here: not us.
        assert!(guard
            .check_connected(pod(41000), v6("10.1.1.1", 3128))
            .is_ok());
        assert!(guard.check_connected(pod(41000), pod(8080)).is_ok());
    }

    /// A listener on one address, everything allowed: the unspecified address in any spelling
    /// still reaches it (the kernel delivers a dial to 0.0.0.0 or :: locally), and so does
    /// whatever lands on its own address.
    #[test]
    fn the_unspecified_address_reaches_a_listener_on_any_address() {
        let guard = AddressGuard::new(
            vec![net("0.0.0.0/0"), net("::/0")],
            vec![sa("127.0.0.1:19090"), sa("10.0.0.7:3128")],
        );
        for dialled in [
            "0.0.0.0:19090",
            "[::]:19090",
            "[::ffff:0.0.0.0]:19090",
            "0.0.0.0:3128",
        ] {
            let denied = guard.check(sa(dialled)).unwrap_err();
            assert_eq!(denied.class, OwnListener, "{dialled}");
        }
        assert!(guard.check(sa("0.0.0.0:8080")).is_ok());
        assert!(guard.check(sa("127.0.0.2:19090")).is_ok());
        let denied = guard
            .check_connected(sa("127.0.0.1:41000"), sa("127.0.0.1:19090"))
            .unwrap_err();
        assert_eq!(denied.class, OwnListener);
        assert!(guard
            .check_connected(sa("10.0.0.7:41000"), sa("10.0.0.7:3128"))
            .is_err());
        assert!(guard
            .check_connected(sa("127.0.0.1:41000"), sa("127.0.0.1:8080"))
            .is_ok());
    }

    fn check_all(cases: &[(&str, AddrClass)]) {
        for &(ip, want) in cases {
            assert_eq!(class_of(ip), want, "{ip}");
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn tables_have_no_host_bits() {
        for &(n, len, class) in V4_RANGES {
            assert!(in_v4(n, n, len), "{} /{len} {class:?}", Ipv4Addr::from(n));
        }
        for &(n, len, class) in V6_RANGES {
            assert!(in_v6(n, n, len), "{} /{len} {class:?}", Ipv6Addr::from(n));
        }
    }

    #[test]
    fn v4_boundaries() {
        check_all(&[
            ("0.0.0.0", Unspecified),
            ("0.0.0.1", Reserved),
            ("0.255.255.255", Reserved),
            ("1.0.0.0", Public),
            ("9.255.255.255", Public),
            ("10.0.0.0", Private),
            ("10.255.255.255", Private),
            ("11.0.0.0", Public),
            ("100.63.255.255", Public),
            ("100.64.0.0", SharedCgnat),
            ("100.127.255.255", SharedCgnat),
            ("100.128.0.0", Public),
            ("126.255.255.255", Public),
            ("127.0.0.0", Loopback),
            ("127.0.0.1", Loopback),
            ("127.255.255.255", Loopback),
            ("128.0.0.0", Public),
            ("169.253.255.255", Public),
            ("169.254.0.0", LinkLocal),
            ("169.254.169.254", LinkLocal),
            ("169.254.255.255", LinkLocal),
            ("169.255.0.0", Public),
            ("172.15.255.255", Public),
            ("172.16.0.0", Private),
            ("172.31.255.255", Private),
            ("172.32.0.0", Public),
            ("191.255.255.255", Public),
            ("192.0.0.0", Reserved),
            ("192.0.0.255", Reserved),
            ("192.0.1.0", Public),
            ("192.0.1.255", Public),
            ("192.0.2.0", Documentation),
            ("192.0.2.255", Documentation),
            ("192.0.3.0", Public),
            ("192.88.98.255", Public),
            ("192.88.99.0", Reserved),
            ("192.88.99.255", Reserved),
            ("192.88.100.0", Public),
            ("192.167.255.255", Public),
            ("192.168.0.0", Private),
            ("192.168.255.255", Private),
            ("192.169.0.0", Public),
            ("198.17.255.255", Public),
            ("198.18.0.0", Benchmarking),
            ("198.19.255.255", Benchmarking),
            ("198.20.0.0", Public),
            ("198.51.99.255", Public),
            ("198.51.100.0", Documentation),
            ("198.51.100.255", Documentation),
            ("198.51.101.0", Public),
            ("203.0.112.255", Public),
            ("203.0.113.0", Documentation),
            ("203.0.113.255", Documentation),
            ("203.0.114.0", Public),
            ("223.255.255.255", Public),
            ("224.0.0.0", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.0", Reserved),
            ("255.255.255.254", Reserved),
            ("255.255.255.255", Broadcast),
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
        ]);
    }

    #[test]
    fn v6_boundaries() {
        check_all(&[
            ("::", Unspecified),
            ("::1", Loopback),
            // ::/96 IPv4-compatible
            ("::2", Ipv4Embedded),
            ("::ffff:ffff", Ipv4Embedded),
            ("::1:0:0", Reserved),
            // ::ffff:0:0/96 mapped
            ("::fffe:ffff:ffff", Reserved),
            ("::ffff:0:0", Ipv4Embedded),
            ("::ffff:127.0.0.1", Ipv4Embedded),
            ("::ffff:8.8.8.8", Ipv4Embedded),
            ("::ffff:ffff:ffff", Ipv4Embedded),
            ("::1:0:0:0", Reserved),
            // ::ffff:0:0:0/96 SIIT
            ("::fffe:ffff:ffff:ffff", Reserved),
            ("::ffff:0:0:0", Ipv4Embedded),
            ("::ffff:0:ffff:ffff", Ipv4Embedded),
            ("::ffff:1:0:0", Reserved),
            // 64:ff9b::/96 and 64:ff9b:1::/48 NAT64
            ("64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("64:ff9b::", Ipv4Embedded),
            ("64:ff9b::8.8.8.8", Ipv4Embedded),
            ("64:ff9b::ffff:ffff", Ipv4Embedded),
            ("64:ff9b::1:0:0", Reserved),
            ("64:ff9b:0:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("64:ff9b:1::", Ipv4Embedded),
            ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", Ipv4Embedded),
            ("64:ff9b:2::", Reserved),
            // 100::/64 discard
            ("ff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("100::", Reserved),
            ("100::ffff:ffff:ffff:ffff", Reserved),
            ("100:0:0:1::", Reserved),
            // 2000::/3 edges
            ("1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("2000::", Public),
            ("3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("4000::", Reserved),
            // 2001::/32 Teredo inside 2001::/23
            ("2000:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("2001::", Ipv4Embedded),
            ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", Ipv4Embedded),
            ("2001:1::", Reserved),
            // 2001:2::/48 benchmarking
            ("2001:1:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("2001:2::", Benchmarking),
            ("2001:2:0:ffff:ffff:ffff:ffff:ffff", Benchmarking),
            ("2001:2:1::", Reserved),
            // 2001::/23 end
            ("2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("2001:200::", Public),
            // 2001:db8::/32
            ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("2001:db8::", Documentation),
            ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Documentation),
            ("2001:db9::", Public),
            // 2002::/16 6to4
            ("2001:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("2002::", Ipv4Embedded),
            ("2002:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Ipv4Embedded),
            ("2003::", Public),
            // 3fff::/20
            ("3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Public),
            ("3fff::", Documentation),
            ("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", Documentation),
            ("3fff:1000::", Public),
            // 5f00::/16 SRv6 lies outside 2000::/3, so its neighbours are
            // Reserved too; the entry documents intent should that change.
            ("5eff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("5f00::", Reserved),
            ("5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("5f01::", Reserved),
            // fc00::/7
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("fc00::", UniqueLocal),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", UniqueLocal),
            ("fe00::", Reserved),
            // fe80::/10, fec0::/10, ff00::/8
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Reserved),
            ("fe80::", LinkLocal),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", LinkLocal),
            ("fec0::", SiteLocal),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", SiteLocal),
            ("ff00::", Multicast),
            ("ff02::1", Multicast),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Multicast),
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::1", Public),
        ]);
    }

    #[test]
    fn class_names() {
        let all = [
            Public,
            Unspecified,
            Loopback,
            Private,
            SharedCgnat,
            LinkLocal,
            UniqueLocal,
            SiteLocal,
            Multicast,
            Broadcast,
            Documentation,
            Benchmarking,
            Reserved,
            Ipv4Embedded,
            OwnListener,
        ];
        let mut seen = std::collections::HashSet::new();
        for c in all {
            assert!(seen.insert(c.as_str()), "duplicate {}", c.as_str());
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert_eq!(c.is_public(), c == Public);
        }
    }

    #[test]
    fn default_guard_refuses_non_public() {
        let g = AddressGuard::new(vec![], vec![]);
        assert_eq!(g.check(sa("8.8.8.8:443")), Ok(()));
        assert_eq!(g.check(sa("[2606:4700::1111]:443")), Ok(()));
        for (addr, class) in [
            ("10.0.0.1:443", Private),
            ("127.0.0.1:80", Loopback),
            ("169.254.169.254:80", LinkLocal),
            ("[::1]:443", Loopback),
            ("[::ffff:8.8.8.8]:443", Ipv4Embedded),
            ("[64:ff9b::a00:1]:443", Ipv4Embedded),
            ("0.0.0.0:443", Unspecified),
            ("255.255.255.255:443", Broadcast),
        ] {
            let addr = sa(addr);
            assert_eq!(g.check(addr), Err(GuardDenied { addr, class }));
        }
        let msg = g.check(sa("10.0.0.1:443")).unwrap_err().to_string();
        assert_eq!(
            msg,
            "upstream address 10.0.0.1:443 is a private (RFC 1918) address and not allowed"
        );
    }

    #[test]
    fn allow_list_opens_exactly_its_nets() {
        let g = AddressGuard::new(
            vec![net("10.1.2.3/16"), net("fd00::/8"), net("64:ff9b::/96")],
            vec![],
        );
        assert_eq!(g.check(sa("10.1.0.0:443")), Ok(()));
        assert_eq!(g.check(sa("10.1.255.255:443")), Ok(()));
        assert_eq!(g.check(sa("10.2.0.0:443")).unwrap_err().class, Private);
        assert_eq!(g.check(sa("10.0.255.255:443")).unwrap_err().class, Private);
        assert_eq!(g.check(sa("[fd12::1]:443")), Ok(()));
        assert_eq!(g.check(sa("[fc00::1]:443")).unwrap_err().class, UniqueLocal);
        assert_eq!(g.check(sa("[64:ff9b::a01:203]:443")), Ok(()));
        // An IPv4 exception does not leak into its embedded IPv6 spellings.
        assert_eq!(
            g.check(sa("[::ffff:10.1.2.3]:443")).unwrap_err().class,
            Ipv4Embedded
        );
        assert_eq!(
            g.check(sa("[2002:a01:203::1]:443")).unwrap_err().class,
            Ipv4Embedded
        );
        assert_eq!(g.check(sa("8.8.8.8:443")), Ok(()));
    }

    #[test]
    fn own_listener_always_refused() {
        let everything = vec![net("0.0.0.0/0"), net("::/0")];
        let g = AddressGuard::new(everything.clone(), vec![sa("127.0.0.1:3128")]);
        let own = |addr: &str| GuardDenied {
            addr: sa(addr),
            class: OwnListener,
        };
        assert_eq!(g.check(sa("127.0.0.1:3128")), Err(own("127.0.0.1:3128")));
        assert_eq!(
            g.check(sa("[::ffff:127.0.0.1]:3128")),
            Err(own("[::ffff:127.0.0.1]:3128"))
        );
        assert_eq!(g.check(sa("127.0.0.1:3129")), Ok(()));
        assert_eq!(g.check(sa("127.0.0.2:3128")), Ok(()));

        // Wildcard listeners are reachable through any loopback address.
        let g = AddressGuard::new(
            everything.clone(),
            vec![sa("0.0.0.0:8080"), sa("[::]:8443")],
        );
        for addr in [
            "127.0.0.1:8080",
            "127.9.9.9:8080",
            "0.0.0.0:8080",
            "[::1]:8080",
            "[::]:8443",
            "127.0.0.1:8443",
        ] {
            assert_eq!(g.check(sa(addr)).unwrap_err().class, OwnListener, "{addr}");
        }
        assert_eq!(g.check(sa("10.0.0.1:8080")), Ok(()));
        assert_eq!(g.check(sa("127.0.0.1:8081")), Ok(()));

        // A listener on a public address is still ourselves.
        let g = AddressGuard::new(
            vec![],
            vec![sa("8.8.4.4:3128"), sa("[::ffff:1.2.3.4]:3128")],
        );
        assert_eq!(g.check(sa("8.8.4.4:3128")).unwrap_err().class, OwnListener);
        assert_eq!(g.check(sa("1.2.3.4:3128")).unwrap_err().class, OwnListener);
        assert_eq!(g.check(sa("8.8.4.4:443")), Ok(()));
        let msg = g.check(sa("8.8.4.4:3128")).unwrap_err().to_string();
        assert!(
            msg.contains("8.8.4.4:3128") && msg.contains("own listeners"),
            "{msg}"
        );
    }
}
