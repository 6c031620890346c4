//! What can go wrong for a client. Failures below the client (URL parsing,
//! TLS, I/O, WebSocket) are kept as typed sources rather than flattened to
//! text, so callers can match on them and print the whole chain.

use std::path::PathBuf;
use std::time::Duration;

use tokio_rustls::rustls;
use tokio_tungstenite::tungstenite::{self, http::header::InvalidHeaderValue};

use crate::protocol::proto::Status;

/// Everything that can go wrong for a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid server URL")]
    Url(#[from] UrlError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS set-up failed")]
    Tls(#[from] TlsError),
    #[error("the server refused the connection with HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("WebSocket error")]
    WebSocket(#[source] tungstenite::Error),
    /// The server answered the request with an error status.
    #[error("{status:?}: {message}")]
    Status {
        status: Status,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("connection closed ({})", close_text(.code, .reason))]
    Closed { code: Option<u16>, reason: String },
    #[error("the server sent a response of the wrong kind")]
    UnexpectedResponse,
    /// A [`Pipeline`](super::Pipeline) was given a source it did not
    /// attach, or a connection has had all the pipelines it can (65,535).
    #[error("no such pipeline on this connection")]
    NoLane,
    /// The request cannot be written in the connection's encoding: in JSON,
    /// an enum field holding a number the schema does not name.
    #[error("the request cannot be written as JSON")]
    Encode(#[source] serde_json::Error),
}

/// Why the server URL, or the upgrade request made from it, was refused.
/// Variants that wrap another crate's error are transparent: that error
/// says all there is to say.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error(transparent)]
    Parse(#[from] url::ParseError),
    #[error("scheme must be ws or wss, not {0}")]
    Scheme(String),
    #[error("missing host")]
    MissingHost,
    #[error("missing port")]
    MissingPort,
    /// tungstenite could not make an upgrade request of the URL.
    #[error(transparent)]
    Request(tungstenite::Error),
    /// [`ConnectOptions::authorization`](super::ConnectOptions) is not a
    /// valid header value. Counted with the URL since, like it, it is
    /// what the caller asked to connect with.
    #[error(transparent)]
    Authorization(InvalidHeaderValue),
}

/// Why TLS could not be set up or negotiated.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A malformed PEM section in the CA file.
    #[error(transparent)]
    Pem(std::io::Error),
    /// rustls refused a CA certificate or the client configuration.
    #[error(transparent)]
    Config(rustls::Error),
    /// The URL's host is not a name or address TLS can verify.
    #[error(transparent)]
    ServerName(rustls::pki_types::InvalidDnsNameError),
    /// The handshake failed (an untrusted certificate, most often).
    #[error(transparent)]
    Handshake(std::io::Error),
}

fn close_text(code: &Option<u16>, reason: &str) -> String {
    match code {
        Some(code) => format!("{code} {reason}"),
        None => "no close frame".into(),
    }
}

impl ClientError {
    /// The status, when the server answered with an error.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}
