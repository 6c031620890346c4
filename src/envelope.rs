//! The relayed message, as every layer knows it: the request that accepts
//! it, the registry that routes it, the connection that writes it and the
//! storage that keeps it. It lives below all of them so none of them has to
//! reach up into another for it.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::protocol::deliver::Deliver;
use crate::protocol::proto;

/// Signal's envelope types that may be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvelopeType {
    Ciphertext,
    PreKeyBundle,
    /// Made only by the server, when a queued message is acked.
    Receipt,
    PlaintextContent,
}

impl EnvelopeType {
    /// Parses a type a client may send (not `Receipt`).
    pub fn from_client(value: i32) -> Option<Self> {
        match proto::EnvelopeType::try_from(value).ok()? {
            proto::EnvelopeType::Ciphertext => Some(Self::Ciphertext),
            proto::EnvelopeType::PrekeyBundle => Some(Self::PreKeyBundle),
            proto::EnvelopeType::PlaintextContent => Some(Self::PlaintextContent),
            proto::EnvelopeType::Receipt | proto::EnvelopeType::Unspecified => None,
        }
    }

    /// Signal's numeric value, also the value stored in the database.
    pub fn code(self) -> i16 {
        match self {
            Self::Ciphertext => 1,
            Self::PreKeyBundle => 3,
            Self::Receipt => 5,
            Self::PlaintextContent => 8,
        }
    }

    /// The type as the relay's frames carry it.
    pub fn to_proto(self) -> proto::EnvelopeType {
        match self {
            Self::Ciphertext => proto::EnvelopeType::Ciphertext,
            Self::PreKeyBundle => proto::EnvelopeType::PrekeyBundle,
            Self::Receipt => proto::EnvelopeType::Receipt,
            Self::PlaintextContent => proto::EnvelopeType::PlaintextContent,
        }
    }

    pub fn from_code(code: i16) -> Option<Self> {
        match code {
            1 => Some(Self::Ciphertext),
            3 => Some(Self::PreKeyBundle),
            5 => Some(Self::Receipt),
            8 => Some(Self::PlaintextContent),
            _ => None,
        }
    }
}

/// A message the relay has accepted. Immutable, and owned by one place at a
/// time: moved from the sender's request to the recipient's connection or
/// the store writer (and from a connection to the store writer if it is not
/// acked), never copied; its content is shared `Bytes`.
#[derive(Debug)]
pub struct Message {
    pub id: Uuid,
    /// Position in the recipient's delivery order.
    pub seq: i64,
    /// `None` once the sender deleted their account.
    pub sender_id: Option<Uuid>,
    pub sender_username: Arc<str>,
    pub recipient_id: Uuid,
    pub envelope_type: EnvelopeType,
    pub content: Bytes,
    pub server_timestamp_ms: i64,
    pub client_timestamp_ms: i64,
    pub expires_at_ms: i64,
    /// Delivered only if the recipient is online; never stored.
    pub ephemeral: bool,
}

impl Message {
    /// A small ciphertext with placeholder fields, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(id: Uuid, recipient: Uuid, seq: i64) -> Message {
        Message {
            id,
            seq,
            sender_id: None,
            sender_username: Arc::from(""),
            recipient_id: recipient,
            envelope_type: EnvelopeType::Ciphertext,
            content: Bytes::from_static(b"x"),
            server_timestamp_ms: 0,
            client_timestamp_ms: 0,
            expires_at_ms: i64::MAX,
            ephemeral: false,
        }
    }

    /// A delivery receipt telling `original_sender` that `acker` took the
    /// stored message `original`. Its id is derived from the original's, so
    /// an ack repeated after a crash cannot store a second receipt.
    pub fn receipt(
        acker: Uuid,
        acker_username: Arc<str>,
        original: Uuid,
        original_sender: Uuid,
        seq: i64,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Message {
        let mut key = b"receipt:".to_vec();
        key.extend_from_slice(original.as_bytes());
        Message {
            id: message_id(acker, Some(&key)),
            seq,
            sender_id: Some(acker),
            sender_username: acker_username,
            recipient_id: original_sender,
            envelope_type: EnvelopeType::Receipt,
            content: Bytes::copy_from_slice(original.as_bytes()),
            server_timestamp_ms: now_ms,
            client_timestamp_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(ttl_ms),
            ephemeral: false,
        }
    }

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }

    /// This message's fields as its `Deliver` push carries them, borrowed.
    pub fn deliver(&self) -> Deliver<'_> {
        Deliver {
            message_id: self.id.as_bytes(),
            sender_id: self.sender_id.as_ref().map(Uuid::as_bytes),
            sender_username: &self.sender_username,
            envelope_type: self.envelope_type.to_proto() as i32,
            content: &self.content,
            server_timestamp_ms: self.server_timestamp_ms.max(0) as u64,
            client_timestamp_ms: self.client_timestamp_ms.max(0) as u64,
        }
    }

    /// The `Deliver` push's envelope, owned (for the JSON encoding, which
    /// builds frames from the generated types).
    pub fn to_envelope(&self) -> proto::Envelope {
        self.deliver().to_envelope(self.content.clone())
    }
}

/// The id of a message sent with a client message id: the same for every
/// retry, even across a server restart, so recipients can deduplicate and
/// storage refuses a second copy. Without a client id, ids are random.
pub fn message_id(sender: Uuid, client_message_id: Option<&[u8]>) -> Uuid {
    match client_message_id {
        None => Uuid::new_v4(),
        Some(client_id) => {
            let mut hasher = Sha256::new();
            hasher.update(b"signal-relay message id v1");
            hasher.update(sender.as_bytes());
            hasher.update(client_id);
            let digest = hasher.finalize();
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            uuid::Builder::from_custom_bytes(bytes).into_uuid()
        }
    }
}

/// Both clocks, read once where a send begins and passed down: the rate
/// limiter, the message's timestamps, its sequence number and its ack
/// deadline all take the same reading. Read separately, they made four
/// clock reads per send (3-4 % of the relay's CPU under load).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// The wall clock, nanoseconds since the Unix epoch.
    pub wall_ns: i64,
    /// The monotonic clock, for deadlines and durations.
    pub instant: tokio::time::Instant,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Now {
        Now {
            wall_ns: now_ns(),
            instant: tokio::time::Instant::now(),
        }
    }

    /// The wall clock in milliseconds since the Unix epoch, as [`now_ms`].
    pub fn wall_ms(&self) -> i64 {
        self.wall_ns / 1_000_000
    }
}

/// The wall clock in nanoseconds since the Unix epoch (0 before it), read
/// straight from `SystemTime`: sequence numbers take one per message, and
/// chrono's `Utc::now` converted to a calendar date and back (1.5 % of the
/// relay's CPU under load).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
