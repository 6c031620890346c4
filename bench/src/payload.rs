//! What the generators put in a message: a header saying when it was meant
//! to be sent (what its latency is measured from) and its sequence, then
//! filler up to the chosen size.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of every payload taken by the header (intended send time, sequence).
pub const HEADER: usize = 16;

/// A message of `size` bytes: the timestamp header, then filler that does
/// not compress, like the ciphertext real messages carry (PostgreSQL
/// compresses stored content over about 2 KiB; a patterned filler would
/// make large messages cost it a fraction of what they do).
pub fn payload_template(size: usize, pair: usize) -> BytesMut {
    let size = size.max(HEADER);
    let mut b = BytesMut::with_capacity(size);
    b.put_bytes(0, HEADER);
    // xorshift64, seeded per pair: cheap, and as incompressible as noise.
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (pair as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    b.extend((0..size - HEADER).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    b
}

pub fn payload(template: &BytesMut, intended_ns: u64, seq: u64) -> Bytes {
    let mut b = template.clone();
    b[..8].copy_from_slice(&intended_ns.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b.freeze()
}

/// The intended send time a payload carries.
pub fn intended_of(content: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(content.get(..8)?.try_into().ok()?))
}
