//! The HTTP side of a connection: read the upgrade request, check the path
//! and headers, choose the subprotocol (and so the frames' encoding),
//! authenticate from an `Authorization` header if present, and answer
//! either `101 Switching Protocols` or a proper HTTP error. Done by
//! hand rather than in tungstenite's synchronous callback so credentials
//! can be checked (asynchronously) before the upgrade is accepted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::http::{self, Probe, Response};
use crate::auth::{self, Authenticated, HeaderCredentials};
use crate::metrics::AuthMethod;
use crate::protocol::{Encoding, RequestError, UnsupportedSubprotocols};
use crate::state::AppState;

/// The only path that upgrades.
pub const WEBSOCKET_PATH: &str = "/v1/websocket";

/// What a well-formed request on the public listener asked for.
pub enum Accepted {
    /// A WebSocket, already answered with 101.
    Upgrade(Upgrade),
    /// A health probe, to be answered from the server's health.
    Probe(Probe),
}

/// An accepted upgrade.
pub struct Upgrade {
    /// The frames' encoding, from the negotiated subprotocol.
    pub encoding: Encoding,
    /// Set when the request authenticated itself, with how.
    pub auth: Option<(Authenticated, AuthMethod)>,
    /// Bytes the client sent after the request head (early frames).
    pub leftover: Vec<u8>,
}

/// Why an upgrade was refused. Every variant but `Gone` is answered with
/// an HTTP error ([`UpgradeError::response`]) before the socket is dropped.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The peer closed, failed or stalled before its request head was in;
    /// there is nobody to answer.
    #[error("no request head arrived")]
    Gone,
    #[error("request head too large")]
    HeadTooLarge,
    #[error("malformed HTTP request")]
    Malformed,
    #[error("not found; the WebSocket endpoint is {WEBSOCKET_PATH}")]
    NotFound,
    #[error("use GET with a WebSocket upgrade")]
    MethodNotAllowed,
    #[error("this endpoint speaks WebSocket only")]
    NotWebSocket,
    #[error("WebSocket version 13 is required")]
    UnsupportedVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error(transparent)]
    Subprotocol(#[from] UnsupportedSubprotocols),
    #[error("server is at its connection limit")]
    AtCapacity,
    /// The `Authorization` header's credentials were refused (the client's
    /// fault), or the server could not check them now (`Unavailable`), or
    /// failed (`Internal`): the request error says which.
    #[error("authentication failed")]
    Auth(#[source] RequestError),
}

impl UpgradeError {
    /// The `reason` label of `relay_upgrades_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            UpgradeError::Gone => "gone",
            UpgradeError::HeadTooLarge => "head_too_large",
            UpgradeError::Malformed => "malformed",
            UpgradeError::NotFound => "not_found",
            UpgradeError::MethodNotAllowed => "method_not_allowed",
            UpgradeError::NotWebSocket => "not_websocket",
            UpgradeError::UnsupportedVersion => "unsupported_version",
            UpgradeError::MissingKey => "missing_key",
            UpgradeError::Subprotocol(_) => "unsupported_subprotocol",
            UpgradeError::AtCapacity => "at_capacity",
            UpgradeError::Auth(RequestError::Internal(_)) => "auth_error",
            UpgradeError::Auth(RequestError::Unavailable(_)) => "auth_unavailable",
            UpgradeError::Auth(_) => "unauthorized",
        }
    }

    /// The HTTP answer, if the peer can still be told.
    pub fn response(&self) -> Option<Response> {
        let (status, reason, extra_headers) = match self {
            UpgradeError::Gone => return None,
            UpgradeError::HeadTooLarge => (431, "Request Header Fields Too Large", ""),
            UpgradeError::Malformed | UpgradeError::MissingKey | UpgradeError::Subprotocol(_) => {
                (400, "Bad Request", "")
            }
            UpgradeError::NotFound => (404, "Not Found", ""),
            UpgradeError::MethodNotAllowed => (405, "Method Not Allowed", "Allow: GET\r\n"),
            UpgradeError::NotWebSocket => (
                426,
                "Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            ),
            UpgradeError::UnsupportedVersion => {
                (426, "Upgrade Required", "Sec-WebSocket-Version: 13\r\n")
            }
            UpgradeError::AtCapacity => (503, "Service Unavailable", ""),
            UpgradeError::Auth(err) => match err {
                RequestError::Internal(_) => (500, "Internal Server Error", ""),
                RequestError::Unavailable(_) => (503, "Service Unavailable", ""),
                _ => (
                    401,
                    "Unauthorized",
                    "WWW-Authenticate: Bearer, Basic realm=\"relay\"\r\n",
                ),
            },
        };
        let message = match self {
            // Never an internal error's detail; the client's own mistake in
            // full.
            UpgradeError::Auth(err) => err.client_message(),
            other => other.to_string(),
        };
        Some(Response {
            extra_headers,
            ..Response::text(status, reason, &message)
        })
    }
}

/// Reads the request and, for an upgrade, answers it. On `Err` the caller
/// writes the error's response (if it has one) and drops the socket.
pub async fn accept<S>(
    stream: &mut S,
    state: &AppState,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Accepted, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, leftover) = match tokio::time::timeout(timeout, http::read_head(stream)).await {
        Ok(Ok(Some(read))) => read,
        Ok(Ok(None)) => return Err(UpgradeError::HeadTooLarge),
        Ok(Err(_)) | Err(_) => return Err(UpgradeError::Gone),
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(UpgradeError::Malformed),
    }
    let path = request.path.unwrap_or("").split('?').next().unwrap_or("");
    let probe = Probe::from_path(path);
    if path != WEBSOCKET_PATH && probe.is_none() {
        return Err(UpgradeError::NotFound);
    }
    if request.method != Some("GET") {
        return Err(UpgradeError::MethodNotAllowed);
    }
    if let Some(probe) = probe {
        return Ok(Accepted::Probe(probe));
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let upgrade = header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let connection = header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    });
    if !upgrade || !connection {
        return Err(UpgradeError::NotWebSocket);
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(UpgradeError::UnsupportedVersion);
    }
    let Some(key) = header("sec-websocket-key") else {
        return Err(UpgradeError::MissingKey);
    };
    let accept_key = derive_accept_key(key.trim().as_bytes());
    // Before authentication: a refused upgrade must not cost a password
    // hash, nor issue a session nobody will use.
    let offered = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    let chosen = Encoding::negotiate(offered)?;
    let (auth, issued_token) = match header("authorization") {
        None => (None, None),
        Some(value) => {
            let credentials = HeaderCredentials::parse(value);
            let (method, username) = match &credentials {
                Ok(HeaderCredentials::Basic(user, _)) => {
                    (AuthMethod::basic, Some(user.as_ref().to_owned()))
                }
                Ok(HeaderCredentials::Bearer(_)) => (AuthMethod::bearer, None),
                // Unparsable: counted by the scheme it names.
                Err(_)
                    if value
                        .trim_start()
                        .to_ascii_lowercase()
                        .starts_with("bearer") =>
                {
                    (AuthMethod::bearer, None)
                }
                Err(_) => (AuthMethod::basic, None),
            };
            let authenticated =
                async { Ok::<_, RequestError>(state.auth().from_header(credentials?).await?) }
                    .await;
            let outcome = authenticated.as_ref().map(|_| ());
            auth::record_attempt(state.metrics(), method, username.as_deref(), peer, outcome);
            match authenticated {
                Ok((auth, token)) => (Some((auth, method)), token),
                Err(err) => {
                    if err.is_internal() {
                        tracing::error!(error = %err, source = ?std::error::Error::source(&err), "header authentication failed");
                    }
                    return Err(UpgradeError::Auth(err));
                }
            }
        }
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n"
    );
    if let Some(encoding) = chosen {
        response.push_str(&format!(
            "Sec-WebSocket-Protocol: {}\r\n",
            encoding.subprotocol()
        ));
    }
    if let (Some((auth, _)), Some(token)) = (&auth, issued_token) {
        // Basic authentication issued a session; hand its token over.
        response.push_str(&format!(
            "X-Relay-User-Id: {}\r\nX-Relay-Session-Token: {}\r\n",
            auth.user_id,
            token.to_base64()
        ));
    }
    response.push_str("\r\n");
    if stream.write_all(response.as_bytes()).await.is_err() {
        return Err(UpgradeError::Gone);
    }
    Ok(Accepted::Upgrade(Upgrade {
        encoding: chosen.unwrap_or_default(),
        auth,
        leftover,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each refusal's HTTP answer is what clients and load balancers see;
    /// pin the status of every kind, and that an internal failure's detail
    /// never reaches the client.
    #[test]
    fn every_refusal_has_its_status() {
        let status = |err: UpgradeError| err.response().map(|r| r.status);
        assert_eq!(status(UpgradeError::Gone), None);
        assert_eq!(status(UpgradeError::HeadTooLarge), Some(431));
        assert_eq!(status(UpgradeError::Malformed), Some(400));
        assert_eq!(status(UpgradeError::MissingKey), Some(400));
        assert_eq!(
            status(UpgradeError::Subprotocol(UnsupportedSubprotocols)),
            Some(400)
        );
        assert_eq!(status(UpgradeError::NotFound), Some(404));
        assert_eq!(status(UpgradeError::MethodNotAllowed), Some(405));
        assert_eq!(status(UpgradeError::NotWebSocket), Some(426));
        assert_eq!(status(UpgradeError::UnsupportedVersion), Some(426));
        assert_eq!(status(UpgradeError::AtCapacity), Some(503));
        let auth = |err| status(UpgradeError::Auth(err));
        assert_eq!(auth(RequestError::Unauthorized("no".into())), Some(401));
        assert_eq!(auth(RequestError::bad_request("short")), Some(401));
        assert_eq!(auth(RequestError::Unavailable("busy".into())), Some(503));
        let internal = UpgradeError::Auth(RequestError::internal(std::io::Error::other(
            "secret detail",
        )))
        .response()
        .expect("answered");
        assert_eq!(internal.status, 500);
        assert!(!internal.body.contains("secret"), "{}", internal.body);
    }
}
