//! Why the datapath dropped a packet: one enum for kernel and user space, with stable numbers.
//! Numbers are never reused: a retired reason keeps its number and is marked retired here.

/// A drop reason as stored in [`crate::maps::DropKey::reason`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A header ended before the packet said it would.
    Truncated = 1,
    /// IPv4 header length below 20 bytes or beyond the packet.
    BadIpHeader = 2,
    /// TCP data offset below 5 words.
    BadTcpOffset = 3,
    /// A fragment that could not be matched to a tracked first fragment.
    Fragment = 4,
    /// The connection table is full; new flows fail closed.
    CtTableFull = 5,
    /// No free source port for masquerade towards the destination of a new flow: every port
    /// tried is another flow's.
    NatPortsExhausted = 6,
    /// The destination task's inbound security-group rules reject the packet.
    SgIngress = 7,
    /// The source task's outbound security-group rules reject the packet.
    SgEgress = 8,
    /// A task sent a packet with an address or MAC that is not its own.
    SpoofedSource = 9,
    /// A task tried to reach 169.254.169.254 while `blockInstanceMetadata` is on.
    ImdsBlocked = 10,
    /// A redirect helper refused the packet.
    RedirectFailed = 11,
    /// The reply tuple of a new translated flow is already another flow's.
    NatCollision = 12,
    /// An ICMP error quotes a packet too short or malformed to translate.
    BadIcmpError = 13,
    /// A frame on a task interface carries a VLAN tag (802.1Q or 802.1ad), in the frame or
    /// stripped into the skb: a receiving kernel would untag it past every check.
    VlanTagged = 14,
    /// A frame on a task interface that is neither IPv4, ARP nor IPv6.
    UnknownEthertype = 15,
    /// A task sent unicast IPv4 in a broadcast or multicast frame.
    UnicastInGroupMac = 16,
    /// IPv6 to or from a task under a policy: IPv6 rules do not exist yet, so nothing passes.
    Ipv6Policed = 17,
    /// The IPv4 header checksum is wrong; the kernel would drop the packet too.
    BadIpChecksum = 18,
    /// A TCP RST or FIN outside the receiver's window: ignored by conntrack and dropped.
    TcpOutOfWindow = 19,
    /// The program that opens new flows of tasks is not loaded, or could not take the flow
    /// over: the flow fails closed.
    TailCallFailed = 20,
    /// A task interface that appeared on the bridge before ecsnet knew whose it is, under
    /// `defaultPolicy: deny`: held, nothing passes until the container is identified.
    Unidentified = 21,
    /// A task already holds its share of masquerade ports (`up --nat-task-ports`) towards the
    /// destination (address, port, protocol) of a new flow: refused, so that one task cannot
    /// take the ports other tasks need towards the same destination.
    NatTaskPortLimit = 22,
    /// A task's neighbour solicitation or advertisement speaks for another: a target address
    /// that is not the task's, or a link-layer address option that is not its MAC. No poisoning
    /// the host's or another task's neighbour cache.
    NdSpoofed = 23,
    /// A task sent a router advertisement, a redirect or a `DHCPv6` server message: tasks are
    /// never routers or `DHCPv6` servers on the bridge, and one that said so would reroute its
    /// neighbours' IPv6.
    RogueRouter = 24,
    /// IPv6 whose extension headers ecsnet will not walk: more than it reads, a routing header
    /// of type 0, a hop-by-hop header not first, or a first fragment without its transport
    /// header. What it cannot read it does not pass around a check.
    BadExtHeader = 25,
}

impl DropReason {
    /// Every reason, in number order.
    pub const ALL: [DropReason; 25] = [
        Self::Truncated,
        Self::BadIpHeader,
        Self::BadTcpOffset,
        Self::Fragment,
        Self::CtTableFull,
        Self::NatPortsExhausted,
        Self::SgIngress,
        Self::SgEgress,
        Self::SpoofedSource,
        Self::ImdsBlocked,
        Self::RedirectFailed,
        Self::NatCollision,
        Self::BadIcmpError,
        Self::VlanTagged,
        Self::UnknownEthertype,
        Self::UnicastInGroupMac,
        Self::Ipv6Policed,
        Self::BadIpChecksum,
        Self::TcpOutOfWindow,
        Self::TailCallFailed,
        Self::Unidentified,
        Self::NatTaskPortLimit,
        Self::NdSpoofed,
        Self::RogueRouter,
        Self::BadExtHeader,
    ];

    /// The reason for a number read from a map, if it is one.
    pub const fn from_u8(n: u8) -> Option<Self> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as u8 == n {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// The name of reason number `n` as `stats`, `monitor` and metrics show it: the stable name,
    /// or `UNKNOWN_<n>` for a number this build does not know (a newer datapath's).
    pub fn name_of(n: u8) -> impl core::fmt::Display {
        ReasonName(n)
    }

    /// The stable name shown by `stats`, `monitor` and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Truncated => "TRUNCATED",
            Self::BadIpHeader => "BAD_IP_HEADER",
            Self::BadTcpOffset => "BAD_TCP_OFFSET",
            Self::Fragment => "FRAGMENT",
            Self::CtTableFull => "CT_TABLE_FULL",
            Self::NatPortsExhausted => "NAT_PORTS_EXHAUSTED",
            Self::SgIngress => "SG_INGRESS",
            Self::SgEgress => "SG_EGRESS",
            Self::SpoofedSource => "SPOOFED_SOURCE",
            Self::ImdsBlocked => "IMDS_BLOCKED",
            Self::RedirectFailed => "REDIRECT_FAILED",
            Self::NatCollision => "NAT_COLLISION",
            Self::BadIcmpError => "BAD_ICMP_ERROR",
            Self::VlanTagged => "VLAN_TAGGED",
            Self::UnknownEthertype => "UNKNOWN_ETHERTYPE",
            Self::UnicastInGroupMac => "UNICAST_IN_GROUP_MAC",
            Self::Ipv6Policed => "IPV6_POLICED",
            Self::BadIpChecksum => "BAD_IP_CHECKSUM",
            Self::TcpOutOfWindow => "TCP_OUT_OF_WINDOW",
            Self::TailCallFailed => "TAIL_CALL_FAILED",
            Self::Unidentified => "UNIDENTIFIED",
            Self::NatTaskPortLimit => "NAT_TASK_PORT_LIMIT",
            Self::NdSpoofed => "ND_SPOOFED",
            Self::RogueRouter => "ROGUE_ROUTER",
            Self::BadExtHeader => "BAD_EXT_HEADER",
        }
    }
}

/// See [`DropReason::name_of`].
struct ReasonName(u8);

impl core::fmt::Display for ReasonName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match DropReason::from_u8(self.0) {
            Some(r) => f.write_str(r.as_str()),
            None => write!(f, "UNKNOWN_{}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::DropReason;

    #[test]
    fn numbers_without_a_reason_have_a_name_too() {
        assert_eq!(DropReason::name_of(7).to_string(), "SG_INGRESS");
        assert_eq!(DropReason::name_of(200).to_string(), "UNKNOWN_200");
    }

    #[test]
    fn numbers_round_trip_and_are_unique() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(DropReason::from_u8(*r as u8), Some(*r));
            for other in &DropReason::ALL[i + 1..] {
                assert_ne!(*r as u8, *other as u8, "{r:?} and {other:?} share a number");
                assert_ne!(r.as_str(), other.as_str());
            }
        }
        assert_eq!(DropReason::from_u8(0), None);
        assert_eq!(DropReason::from_u8(200), None);
    }

    #[test]
    fn numbers_are_stable() {
        // These numbers are ABI: pinned maps outlive upgrades. Never change one.
        assert_eq!(DropReason::Truncated as u8, 1);
        assert_eq!(DropReason::SgIngress as u8, 7);
        assert_eq!(DropReason::SpoofedSource as u8, 9);
        assert_eq!(DropReason::RedirectFailed as u8, 11);
        assert_eq!(DropReason::VlanTagged as u8, 14);
        assert_eq!(DropReason::TcpOutOfWindow as u8, 19);
        assert_eq!(DropReason::NatTaskPortLimit as u8, 22);
    }
}
