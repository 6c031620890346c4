//! Messaging: what a relayed message is, and the machinery that moves it.
//!
//! A message is *accepted* when [`Registry::route`](crate::registry::Registry::route)
//! gives it a sequence number; from then on it goes one of two ways:
//! live, through the recipient's connection, which answers the sender
//! `delivered` when the recipient acks; or to PostgreSQL through the
//! batching [`store::StoreWriter`], which answers `queued` once committed.
//! A live message that is not acked in time, or whose recipient goes away,
//! is stored with its original sequence number, so per-recipient order holds
//! across the live/stored boundary. [`drain`] delivers stored messages to a
//! connecting recipient; [`sweeper`] deletes expired ones; [`dedupe`] makes
//! retries with a client message id idempotent.

pub mod dedupe;
pub mod drain;
pub mod store;
pub mod sweeper;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use uuid::Uuid;

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

/// A message the relay has accepted. Immutable; shared by reference between
/// the sender's request, the recipient's connection and the store writer.
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

    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms <= now_ms
    }

    pub fn to_envelope(&self) -> proto::Envelope {
        proto::Envelope {
            message_id: Bytes::copy_from_slice(self.id.as_bytes()),
            sender_id: self
                .sender_id
                .map(|id| Bytes::copy_from_slice(id.as_bytes()))
                .unwrap_or_default(),
            sender_username: self.sender_username.to_string(),
            r#type: match self.envelope_type {
                EnvelopeType::Ciphertext => proto::EnvelopeType::Ciphertext,
                EnvelopeType::PreKeyBundle => proto::EnvelopeType::PrekeyBundle,
                EnvelopeType::Receipt => proto::EnvelopeType::Receipt,
                EnvelopeType::PlaintextContent => proto::EnvelopeType::PlaintextContent,
            } as i32,
            content: self.content.clone(),
            server_timestamp_ms: self.server_timestamp_ms.max(0) as u64,
            client_timestamp_ms: self.client_timestamp_ms.max(0) as u64,
        }
    }
}

/// How a message left the relay's hands, as told to its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The recipient acked it.
    Delivered,
    /// It is committed to storage.
    Queued,
    /// Ephemeral, and the recipient was not there to take it.
    Dropped,
}

impl Delivery {
    pub fn to_proto(self) -> proto::SendOutcome {
        match self {
            Delivery::Delivered => proto::SendOutcome::Delivered,
            Delivery::Queued => proto::SendOutcome::Queued,
            Delivery::Dropped => proto::SendOutcome::Dropped,
        }
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

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
