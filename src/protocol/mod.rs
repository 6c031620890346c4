//! The wire protocol: the generated protobuf types of `proto/relay.proto`
//! and their JSON mapping, the two encodings a connection may choose
//! ([`Encoding`], [`json`]), the frames the server builds from them, the
//! errors that become a response's status or a close ([`RequestError`],
//! [`ProtocolError`]), the close codes ([`close`]), the `Deliver` push
//! written straight from a message ([`deliver`]), and the id newtypes
//! requests are parsed into at the edge ([`ids`]).

pub mod close;
pub mod deliver;
mod encoding;
mod error;
pub mod ids;
pub mod json;

pub use close::{Close, CloseCode};
pub use encoding::{Encoding, SUBPROTOCOLS, UnsupportedSubprotocols};
pub use error::{ProtocolError, RequestError};

/// Types generated from `proto/relay.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/relay.v1.rs"));
    // Their proto3 JSON mapping, for the relay.v1.json subprotocol.
    include!(concat!(env!("OUT_DIR"), "/relay.v1.serde.rs"));
}

use proto::{Response, ServerFrame, response, server_frame};

/// Builds the frame answering `request_id` with `result`.
pub fn ok(request_id: u64, result: response::Result) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Response(Response {
            request_id,
            status: proto::Status::Ok as i32,
            message: String::new(),
            retry_after_ms: 0,
            result: Some(result),
        })),
    }
}

/// Builds the frame answering `request_id` with an error.
pub fn error(request_id: u64, err: &RequestError) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Response(Response {
            request_id,
            status: err.status() as i32,
            message: err.client_message(),
            retry_after_ms: err.retry_after().map_or(0, |d| d.as_millis() as u64),
            result: None,
        })),
    }
}

/// Wraps a push event in a frame.
pub fn push(event: proto::push::Event) -> ServerFrame {
    ServerFrame {
        kind: Some(server_frame::Kind::Push(proto::Push { event: Some(event) })),
    }
}

/// The empty OK result.
pub fn empty() -> response::Result {
    response::Result::Empty(proto::Empty {})
}
