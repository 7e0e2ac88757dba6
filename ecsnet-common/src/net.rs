//! Numbers of the wire protocols that both sides read: IP protocol numbers and TCP flag bits,
//! as the IPv4 and TCP headers carry them.

/// IP protocol numbers (the IPv4 header's protocol field) ecsnet knows.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// TCP flag bits as in the header's flags byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
