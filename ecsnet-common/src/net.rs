//! Numbers of the wire protocols that both sides read: IP protocol numbers and TCP flag bits,
//! as the IPv4 and TCP headers carry them; and IPv4 addresses as the maps hold them.

use core::net::Ipv4Addr;

/// IP protocol numbers (the IPv4 header's protocol field) ecsnet knows.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IPv4 address as the maps hold it: a `u32` in network byte order, read natively (its bytes
/// are the address's, in order).
pub const fn ipv4_to_map(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address of a map's network-byte-order `u32`.
pub const fn ipv4_from_map(addr: u32) -> Ipv4Addr {
    let [a, b, c, d] = addr.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// TCP flag bits as in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::{ipv4_from_map, ipv4_to_map};

    #[test]
    fn map_addresses_are_network_byte_order() {
        let a = Ipv4Addr::new(172, 17, 0, 2);
        assert_eq!(ipv4_to_map(a), u32::from(a).to_be());
        assert_eq!(ipv4_from_map(u32::from(a).to_be()), a);
        assert_eq!(ipv4_to_map(a).to_ne_bytes(), [172, 17, 0, 2]);
    }
}
