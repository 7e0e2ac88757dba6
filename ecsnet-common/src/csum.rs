//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624) on values exactly as
//! they sit in the packet. The datapath uses it for the checksums no kernel helper can reach (the
//! headers quoted inside an ICMP error); user space and tests use it to build and check packets.

/// Folds a 32-bit one's-complement sum to 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    fold64(sum as u64)
}

/// The one's-complement sum of 32-bit words read from a packet in any one byte order, before
/// folding: a header whose checksum is right folds (`fold64`) to 0xffff, in either order.
#[inline(always)]
pub const fn sum32(words: &[u32; 5]) -> u64 {
    words[0] as u64 + words[1] as u64 + words[2] as u64 + words[3] as u64 + words[4] as u64
}

/// Folds a 64-bit one's-complement sum to 16 bits: the carries above 32 bits are added back in,
/// then those above 16.
#[inline(always)]
#[expect(clippy::cast_possible_truncation, reason = "carried down to 16 bits")]
pub const fn fold64(sum: u64) -> u16 {
    carry(carry(sum, 32), 16) as u16
}

/// Adds the carries above the low `bits` of a one's-complement sum back in, twice: the first
/// round leaves at most one carry, the second adds it, and the sum then fits in `bits` bits.
#[inline(always)]
const fn carry(sum: u64, bits: u32) -> u64 {
    let low = (1 << bits) - 1;
    let sum = (sum & low) + (sum >> bits);
    (sum & low) + (sum >> bits)
}

/// The checksum field after a 16-bit word of the covered data changed from `old` to `new`
/// (RFC 1624 eq. 3: HC' = ~(~HC + ~m + m')). Values in the same byte order as the field.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// The checksum field after a 32-bit word of the covered data changed from `old` to `new`.
/// The words must be read from the packet in the same byte order as the field.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the word's two 16-bit halves"
)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let c = replace2(check, old as u16, new as u16);
    replace2(c, (old >> 16) as u16, (new >> 16) as u16)
}

/// The Internet checksum of `data` (big-endian words, odd tail padded with zero), starting from
/// the partial sum `initial`: the value to store in a header's checksum field.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let (words, tail) = data.as_chunks::<2>();
    for w in words {
        sum += u32::from(u16::from_be_bytes(*w));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = tail {
        sum += u32::from(*last) << 8;
    }
    !fold(sum)
}

/// The partial sum of an IPv4 pseudo-header, for [`checksum`] over a TCP or UDP segment.
pub fn pseudo_header(src: [u8; 4], dst: [u8; 4], proto: u8, len: u16) -> u32 {
    let w = |b: [u8; 4]| {
        u32::from(u16::from_be_bytes([b[0], b[1]])) + u32::from(u16::from_be_bytes([b[2], b[3]]))
    };
    w(src) + w(dst) + u32::from(proto) + u32::from(len)
}

/// The partial sum of an IPv6 pseudo-header (RFC 8200 §8.1), for [`checksum`] over an upper
/// layer packet of `len` bytes (`ICMPv6` too: unlike `ICMPv4`, its checksum covers the addresses).
pub fn pseudo_header6(src: [u8; 16], dst: [u8; 16], next: u8, len: u32) -> u32 {
    let words = |b: [u8; 16]| -> u32 {
        b.as_chunks::<2>()
            .0
            .iter()
            .map(|w| u32::from(u16::from_be_bytes(*w)))
            .sum()
    };
    words(src) + words(dst) + (len >> 16) + (len & 0xffff) + u32::from(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    // An IPv4 header from RFC 1071's usual example, checksum 0xb861.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    /// [`HDR`] with its checksum in place.
    fn checked_hdr() -> [u8; 20] {
        let mut h = HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        h
    }

    #[test]
    fn full_checksum_of_a_known_header() {
        assert_eq!(checksum(&HDR, 0), 0xb861);
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        let mut h = checked_hdr();
        // Rewrite the destination address 192.168.0.199 -> 172.17.0.2, as DNAT does.
        let old = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let new = u32::from_be_bytes([172, 17, 0, 2]);
        h[16..20].copy_from_slice(&new.to_be_bytes());
        let inc = replace4(0xb861, old, new);
        let mut z = h;
        z[10] = 0;
        z[11] = 0;
        assert_eq!(inc, checksum(&z, 0));
        // And a header with its checksum in place sums to zero.
        h[10..12].copy_from_slice(&inc.to_be_bytes());
        assert_eq!(checksum(&h, 0), 0);
    }

    #[test]
    fn incremental_update_of_a_ttl_word() {
        let mut h = checked_hdr();
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_be_bytes([h[8], h[9]]);
        let c = replace2(0xb861, old, new);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&h, 0), 0);
    }

    #[test]
    fn a_right_header_sums_to_ffff_in_either_byte_order() {
        fn words(h: &[u8; 20], f: fn([u8; 4]) -> u32) -> [u32; 5] {
            core::array::from_fn(|i| f([h[4 * i], h[4 * i + 1], h[4 * i + 2], h[4 * i + 3]]))
        }
        let mut h = checked_hdr();
        assert_eq!(fold64(sum32(&words(&h, u32::from_be_bytes))), 0xffff);
        assert_eq!(fold64(sum32(&words(&h, u32::from_le_bytes))), 0xffff);
        h[19] ^= 1;
        assert_ne!(fold64(sum32(&words(&h, u32::from_le_bytes))), 0xffff);
        assert_eq!(fold64(0xffff_ffff_ffff_ffff), 0xffff);
    }

    #[test]
    fn fold_carries_twice() {
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold(0xffff_ffff), 0xffff);
    }
}
