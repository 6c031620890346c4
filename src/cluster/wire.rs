//! The node-to-node messages (`proto/cluster.proto`) and their conversions
//! from and to the relay's own types. Decoding is strict where a bad value
//! could misroute (ids must be 16 bytes) and total: a malformed entry from a
//! peer is an error, never a panic.

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::envelope::{EnvelopeType, Message};

include!(concat!(env!("OUT_DIR"), "/relay.cluster.v1.rs"));

pub use item::Kind;

/// A peer sent something this build cannot read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("undecodable batch")]
    Decode(#[from] prost::DecodeError),
    #[error("{0} is not a 16-byte id")]
    BadId(&'static str),
    #[error("unknown envelope type {0}")]
    BadEnvelopeType(i32),
}

pub fn id_bytes(id: Uuid) -> Bytes {
    Bytes::copy_from_slice(id.as_bytes())
}

pub fn parse_id(bytes: &[u8], what: &'static str) -> Result<Uuid, WireError> {
    Uuid::from_slice(bytes).map_err(|_| WireError::BadId(what))
}

impl Envelope {
    pub fn from_message(m: &Message) -> Self {
        Envelope {
            id: id_bytes(m.id),
            sender_id: m.sender_id.map(id_bytes).unwrap_or_default(),
            sender_username: m.sender_username.to_string(),
            envelope_type: i32::from(m.envelope_type.code()),
            content: m.content.clone(),
            server_timestamp_ms: m.server_timestamp_ms,
            client_timestamp_ms: m.client_timestamp_ms,
            expires_at_ms: m.expires_at_ms,
            ephemeral: m.ephemeral,
        }
    }

    /// The message for `recipient`, numbered `seq` by the node that routes
    /// it.
    pub fn into_message(self, recipient: Uuid, seq: i64) -> Result<Message, WireError> {
        let sender_id = if self.sender_id.is_empty() {
            None
        } else {
            Some(parse_id(&self.sender_id, "sender id")?)
        };
        let envelope_type = i16::try_from(self.envelope_type)
            .ok()
            .and_then(EnvelopeType::from_code)
            .ok_or(WireError::BadEnvelopeType(self.envelope_type))?;
        Ok(Message {
            id: parse_id(&self.id, "message id")?,
            seq,
            sender_id,
            sender_username: Arc::from(self.sender_username),
            recipient_id: recipient,
            envelope_type,
            content: self.content,
            server_timestamp_ms: self.server_timestamp_ms,
            client_timestamp_ms: self.client_timestamp_ms,
            expires_at_ms: self.expires_at_ms,
            ephemeral: self.ephemeral,
        })
    }
}

impl From<Kind> for Item {
    fn from(kind: Kind) -> Self {
        Item { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_survives_the_trip() {
        let mut m = Message::for_test(Uuid::new_v4(), Uuid::new_v4(), 7);
        m.sender_id = Some(Uuid::new_v4());
        m.sender_username = Arc::from("alice");
        let back = Envelope::from_message(&m)
            .into_message(m.recipient_id, 9)
            .unwrap();
        assert_eq!(back.id, m.id);
        assert_eq!(back.seq, 9, "the routing node numbers it");
        assert_eq!(back.sender_id, m.sender_id);
        assert_eq!(&*back.sender_username, "alice");
        assert_eq!(back.content, m.content);
        assert_eq!(back.expires_at_ms, m.expires_at_ms);
    }

    #[test]
    fn malformed_ids_are_errors() {
        let m = Message::for_test(Uuid::new_v4(), Uuid::new_v4(), 1);
        let mut e = Envelope::from_message(&m);
        e.id = Bytes::from_static(b"short");
        assert!(matches!(
            e.into_message(m.recipient_id, 1),
            Err(WireError::BadId(_))
        ));
    }
}
