//! Errors of the protocol layer.
//!
//! [`ProtocolError`] is a frame that cannot be read at all: the socket is
//! closed with the matching WebSocket close code. [`RequestError`] is the
//! outcome of one well-formed request that failed: it becomes a response
//! with a status code and the socket stays open. Every lower layer's error
//! converts into a `RequestError`, which decides whether it was the client's
//! fault (a status and a message the client sees) or ours (`Internal`, whose
//! source is logged and never shown).

use std::time::Duration;

use tokio_tungstenite::tungstenite;

use super::close::{Close, CloseCode};
use super::json::InvalidJson;
use super::proto::Status;

/// A frame the server cannot accept; ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("text frames need the relay.v1.json subprotocol; this socket speaks relay.v1.proto")]
    TextFrame,
    #[error("binary frames need the relay.v1.proto subprotocol; this socket speaks relay.v1.json")]
    BinaryFrame,
    #[error("frame is not a valid ClientFrame")]
    Malformed(#[source] prost::DecodeError),
    /// The close reason carries the detail (which field, where), since
    /// that is what someone typing JSON by hand needs.
    #[error("not a valid ClientFrame: {0}")]
    MalformedJson(#[source] InvalidJson),
    #[error("frame exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// The WebSocket framing itself is broken; see
    /// [`CloseCode::ProtocolError`].
    #[error("websocket protocol violation: {0}")]
    Violation(#[source] tungstenite::error::ProtocolError),
    /// A text payload (a close reason) that is not UTF-8.
    #[error("invalid UTF-8: {0}")]
    InvalidUtf8(String),
    #[error("websocket transport failed")]
    Transport(#[source] tungstenite::Error),
}

impl ProtocolError {
    /// The close telling the peer what it did wrong, if it still can be
    /// told anything.
    pub fn close(&self) -> Option<Close> {
        let code = match self {
            ProtocolError::TextFrame | ProtocolError::BinaryFrame => CloseCode::Unsupported,
            ProtocolError::Malformed(_) | ProtocolError::MalformedJson(_) => {
                CloseCode::InvalidPayload
            }
            ProtocolError::TooLarge { .. } => CloseCode::TooBig,
            ProtocolError::Violation(_) => CloseCode::ProtocolError,
            ProtocolError::InvalidUtf8(_) => CloseCode::InvalidPayload,
            ProtocolError::Transport(_) => return None,
        };
        Some(Close::new(code, self.to_string()))
    }
}

/// The retry hint sent with every `unavailable` answer.
pub const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why a request failed. All variants but `Internal` are the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("rate limited; retry after {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("{0}")]
    Unavailable(String),
    /// Our fault. The source is logged; the client sees only "internal error".
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl RequestError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        RequestError::BadRequest(message.into())
    }

    pub fn internal(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        RequestError::Internal(Box::new(source))
    }

    pub fn status(&self) -> Status {
        match self {
            RequestError::BadRequest(_) => Status::BadRequest,
            RequestError::Unauthorized(_) => Status::Unauthorized,
            RequestError::Forbidden(_) => Status::Forbidden,
            RequestError::NotFound(_) => Status::NotFound,
            RequestError::Conflict(_) => Status::Conflict,
            RequestError::PayloadTooLarge(_) => Status::PayloadTooLarge,
            RequestError::RateLimited { .. } => Status::RateLimited,
            RequestError::Unavailable(_) => Status::Unavailable,
            RequestError::Internal(_) => Status::InternalError,
        }
    }

    /// What the client is told. Never includes an internal error's source.
    pub fn client_message(&self) -> String {
        self.to_string()
    }

    /// When the client may try again: the rate limit's own wait, or a
    /// short pause for a server that is busy or cannot reach its database.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RequestError::RateLimited { retry_after } => Some(*retry_after),
            RequestError::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER),
            _ => None,
        }
    }

    /// True when the server, not the client, is to blame.
    pub fn is_internal(&self) -> bool {
        matches!(self, RequestError::Internal(_))
    }
}
