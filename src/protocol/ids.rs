//! Identifier newtypes parsed at the edge, so the layers below never see a
//! malformed id, and ids on their way out ([`id_bytes`]).

use bytes::Bytes;
use uuid::Uuid;

use super::RequestError;

/// A user id, which in this single-device relay is also the device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub Uuid);

impl UserId {
    /// Parses the 16 raw bytes of a UUID; `field` names the field in errors.
    pub fn parse(bytes: &[u8], field: &str) -> Result<Self, RequestError> {
        parse_uuid(bytes, field).map(UserId)
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A message id, assigned by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageId(pub Uuid);

impl MessageId {
    pub fn parse(bytes: &[u8], field: &str) -> Result<Self, RequestError> {
        parse_uuid(bytes, field).map(MessageId)
    }
}

/// An id as a frame's `bytes` field. One allocation, shared by its clones:
/// prost clones a `Bytes` field to encode it, and a `Bytes` copied from a
/// slice would allocate again on that first clone.
pub fn id_bytes(id: Uuid) -> Bytes {
    Bytes::from_owner(id.into_bytes())
}

fn parse_uuid(bytes: &[u8], field: &str) -> Result<Uuid, RequestError> {
    Uuid::from_slice(bytes).map_err(|_| {
        RequestError::bad_request(format!(
            "{field} must be a 16-byte UUID, got {} bytes",
            bytes.len()
        ))
    })
}
