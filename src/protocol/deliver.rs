//! The `Deliver` push, encoded straight from the message's fields. It is
//! the one frame written for every message delivered, and building it as
//! a [`proto::Envelope`] first costs three allocations (the two ids and the
//! username are owned there) and their frees. The bytes are exactly the
//! ones prost writes for [`super::push`] of that envelope (a test pins
//! it), so clients see no difference.

use bytes::{BufMut, Bytes, BytesMut};

use super::proto;

/// A message as its `Deliver` push carries it: the fields of `Envelope`
/// in `relay.proto`, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct Deliver<'a> {
    pub message_id: &'a [u8; 16],
    /// `None` once the sender deleted their account.
    pub sender_id: Option<&'a [u8; 16]>,
    pub sender_username: &'a str,
    /// `EnvelopeType`'s number.
    pub envelope_type: i32,
    pub content: &'a [u8],
    pub server_timestamp_ms: u64,
    pub client_timestamp_ms: u64,
}

/// Field numbers, from `relay.proto`.
const SERVER_FRAME_PUSH: u32 = 2;
const PUSH_DELIVER: u32 = 1;
const MESSAGE_ID: u32 = 1;
const SENDER_ID: u32 = 2;
const SENDER_USERNAME: u32 = 3;
const TYPE: u32 = 4;
const CONTENT: u32 = 5;
const SERVER_TIMESTAMP_MS: u32 = 6;
const CLIENT_TIMESTAMP_MS: u32 = 7;

/// Protobuf's wire types.
const VARINT: u32 = 0;
const LEN: u32 = 2;

impl Deliver<'_> {
    /// Appends the `ServerFrame` holding this push to `buf`, growing it
    /// once. Like prost, it leaves out fields holding their default
    /// (proto3), and writes the others in field order.
    pub fn encode(&self, buf: &mut BytesMut) {
        let envelope = self.envelope_len();
        let push = len_field_len(PUSH_DELIVER, envelope);
        buf.reserve(len_field_len(SERVER_FRAME_PUSH, push));
        put_key(buf, SERVER_FRAME_PUSH, LEN);
        put_varint(buf, push as u64);
        put_key(buf, PUSH_DELIVER, LEN);
        put_varint(buf, envelope as u64);
        put_bytes(buf, MESSAGE_ID, self.message_id);
        if let Some(sender) = self.sender_id {
            put_bytes(buf, SENDER_ID, sender);
        }
        put_bytes(buf, SENDER_USERNAME, self.sender_username.as_bytes());
        // Enum fields are int32: a negative number takes ten bytes, as
        // its sign-extended 64-bit value.
        put_varint_field(buf, TYPE, i64::from(self.envelope_type) as u64);
        put_bytes(buf, CONTENT, self.content);
        put_varint_field(buf, SERVER_TIMESTAMP_MS, self.server_timestamp_ms);
        put_varint_field(buf, CLIENT_TIMESTAMP_MS, self.client_timestamp_ms);
    }

    /// The same envelope, owned, as the generated type (what the JSON
    /// encoding builds its frame from), with `content`: these bytes,
    /// shared rather than copied if the caller has them as `Bytes`.
    pub fn to_envelope(&self, content: Bytes) -> proto::Envelope {
        debug_assert_eq!(&content[..], self.content);
        proto::Envelope {
            message_id: Bytes::copy_from_slice(self.message_id),
            sender_id: self
                .sender_id
                .map_or_else(Bytes::new, |id| Bytes::copy_from_slice(id)),
            sender_username: self.sender_username.to_owned(),
            r#type: self.envelope_type,
            content,
            server_timestamp_ms: self.server_timestamp_ms,
            client_timestamp_ms: self.client_timestamp_ms,
        }
    }

    fn envelope_len(&self) -> usize {
        let bytes = |tag, value: &[u8]| match value.len() {
            0 => 0,
            n => len_field_len(tag, n),
        };
        let varint = |tag, value: u64| match value {
            0 => 0,
            v => key_len(tag) + varint_len(v),
        };
        bytes(MESSAGE_ID, self.message_id)
            + self.sender_id.map_or(0, |s| bytes(SENDER_ID, s))
            + bytes(SENDER_USERNAME, self.sender_username.as_bytes())
            + varint(TYPE, i64::from(self.envelope_type) as u64)
            + bytes(CONTENT, self.content)
            + varint(SERVER_TIMESTAMP_MS, self.server_timestamp_ms)
            + varint(CLIENT_TIMESTAMP_MS, self.client_timestamp_ms)
    }
}

/// A length-delimited field's size: key, length, then `len` bytes (an
/// embedded message is written even when empty, as prost writes a oneof).
fn len_field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + varint_len(len as u64) + len
}

fn key_len(tag: u32) -> usize {
    varint_len(u64::from(tag << 3))
}

fn varint_len(value: u64) -> usize {
    // 7 bits per byte; 0 still takes one.
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_key(buf: &mut impl BufMut, tag: u32, wire_type: u32) {
    put_varint(buf, u64::from((tag << 3) | wire_type));
}

fn put_varint(buf: &mut impl BufMut, mut value: u64) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// A `bytes` or `string` field, left out when empty.
fn put_bytes(buf: &mut impl BufMut, tag: u32, value: &[u8]) {
    if !value.is_empty() {
        put_key(buf, tag, LEN);
        put_varint(buf, value.len() as u64);
        buf.put_slice(value);
    }
}

/// A varint field, left out when zero.
fn put_varint_field(buf: &mut impl BufMut, tag: u32, value: u64) {
    if value != 0 {
        put_key(buf, tag, VARINT);
        put_varint(buf, value);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::protocol::proto::push;

    /// What prost writes for the same push, built the slow way.
    fn by_prost(d: &Deliver<'_>) -> Vec<u8> {
        let envelope = d.to_envelope(Bytes::copy_from_slice(d.content));
        crate::protocol::push(push::Event::Deliver(envelope)).encode_to_vec()
    }

    #[test]
    fn the_push_is_byte_for_byte_what_prost_writes() {
        let id = [7u8; 16];
        let sender = [9u8; 16];
        let long_name = "n".repeat(300);
        let contents: [&[u8]; 4] = [b"", b"x", &[0xAB; 127], &[0xCD; 70_000]];
        let names = ["", "alice", long_name.as_str()];
        let times = [0, 1, 127, 128, 1_764_000_000_000, u64::MAX];
        // The types the relay sends, the default, and numbers prost writes
        // in more bytes (a negative one takes ten).
        let types = [0, 1, 3, 5, 8, 300, -1];
        for content in contents {
            for name in names {
                for (i, time) in times.iter().enumerate() {
                    for envelope_type in types {
                        let d = Deliver {
                            message_id: &id,
                            sender_id: (i % 2 == 0).then_some(&sender),
                            sender_username: name,
                            envelope_type,
                            content,
                            server_timestamp_ms: *time,
                            client_timestamp_ms: times[times.len() - 1 - i],
                        };
                        let mut ours = BytesMut::new();
                        d.encode(&mut ours);
                        assert_eq!(ours, by_prost(&d), "{d:?}");
                    }
                }
            }
        }
    }

    /// The lengths of the push and of the frame around it take one more
    /// byte at 128 and at 16,384: contents whose frames cross both.
    #[test]
    fn enclosing_lengths_cross_their_varint_boundaries() {
        let id = [1u8; 16];
        let content = vec![0x5A; 16_500];
        for len in (80..=140).chain(16_300..=16_420) {
            let d = Deliver {
                message_id: &id,
                sender_id: Some(&id),
                sender_username: "bob",
                envelope_type: 1,
                content: &content[..len],
                server_timestamp_ms: 1_764_000_000_000,
                client_timestamp_ms: 1_764_000_000_000,
            };
            let mut ours = BytesMut::new();
            d.encode(&mut ours);
            assert_eq!(ours, by_prost(&d), "content of {len} bytes");
        }
    }

    #[test]
    fn varints_are_written_and_sized_as_prost_does() {
        for shift in 0..64 {
            for value in [1u64 << shift, (1u64 << shift) - 1, (1u64 << shift) | 1] {
                let mut ours = Vec::new();
                put_varint(&mut ours, value);
                assert_eq!(varint_len(value), ours.len(), "{value}");
                if value == 0 {
                    // prost leaves a zero field out; zero is one byte.
                    assert_eq!(ours, [0]);
                    continue;
                }
                // Field 6 alone: its one-byte key, then the varint.
                let by_prost = proto::Envelope {
                    server_timestamp_ms: value,
                    ..Default::default()
                }
                .encode_to_vec();
                assert_eq!(by_prost.get(1..), Some(ours.as_slice()), "{value}");
            }
        }
    }
}
