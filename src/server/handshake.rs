//! The HTTP side of a connection: read the upgrade request, check the path
//! and headers, choose the subprotocol (and so the frames' encoding),
//! authenticate from an `Authorization` header if present, and answer
//! either `101 Switching Protocols` or a proper HTTP error. Done by
//! hand rather than in tungstenite's synchronous callback so credentials
//! can be checked (asynchronously) before the upgrade is accepted.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::http::{self, MAX_HEAD, Probe, Response};
use crate::auth::{self, Authenticated, HeaderCredentials};
use crate::connection::slots::Ticket;
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
    /// Set when the request authenticated itself, with how; the ticket
    /// then holds its reserved authenticated slot.
    pub auth: Option<(Authenticated, AuthMethod)>,
    /// Bytes the client sent after the request head (early frames).
    pub leftover: Vec<u8>,
}

/// Why an upgrade was refused. Every variant but `Gone` is answered with
/// an HTTP error ([`UpgradeError::response`]) before the socket is dropped.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The peer closed or failed before its request head was in, or left
    /// while its credentials were checked: there is nobody to answer.
    #[error("the client went away")]
    Gone,
    /// The request head was not complete by the handshake deadline.
    #[error("the request head did not arrive in time")]
    Timeout,
    #[error("request head too large (the limit is {MAX_HEAD} bytes)")]
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
    /// Too many sockets not yet authenticated, from everyone.
    #[error("server has too many connections in progress")]
    UnauthenticatedFull,
    /// Too many sockets not yet authenticated from this client address.
    #[error("too many connections in progress from this address")]
    AddressFull,
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
            UpgradeError::Timeout => "timeout",
            UpgradeError::HeadTooLarge => "head_too_large",
            UpgradeError::Malformed => "malformed",
            UpgradeError::NotFound => "not_found",
            UpgradeError::MethodNotAllowed => "method_not_allowed",
            UpgradeError::NotWebSocket => "not_websocket",
            UpgradeError::UnsupportedVersion => "unsupported_version",
            UpgradeError::MissingKey => "missing_key",
            UpgradeError::Subprotocol(_) => "unsupported_subprotocol",
            UpgradeError::AtCapacity => "at_capacity",
            UpgradeError::UnauthenticatedFull => "unauthenticated_full",
            UpgradeError::AddressFull => "address_full",
            UpgradeError::Auth(RequestError::Internal(_)) => "auth_error",
            UpgradeError::Auth(RequestError::Unavailable(_)) => "auth_unavailable",
            UpgradeError::Auth(RequestError::RateLimited { .. }) => "auth_rate_limited",
            UpgradeError::Auth(_) => "unauthorized",
        }
    }

    /// The HTTP answer, if the peer can still be told.
    pub fn response(&self) -> Option<Response> {
        let (status, reason, extra_headers): (u16, &'static str, Cow<'static, str>) = match self {
            UpgradeError::Gone => return None,
            UpgradeError::Timeout => (408, "Request Timeout", "".into()),
            UpgradeError::HeadTooLarge => (431, "Request Header Fields Too Large", "".into()),
            UpgradeError::Malformed | UpgradeError::MissingKey | UpgradeError::Subprotocol(_) => {
                (400, "Bad Request", "".into())
            }
            UpgradeError::NotFound => (404, "Not Found", "".into()),
            UpgradeError::MethodNotAllowed => (405, "Method Not Allowed", "Allow: GET\r\n".into()),
            UpgradeError::NotWebSocket => (
                426,
                "Upgrade Required",
                "Upgrade: websocket\r\nConnection: Upgrade\r\n".into(),
            ),
            UpgradeError::UnsupportedVersion => (
                426,
                "Upgrade Required",
                "Sec-WebSocket-Version: 13\r\n".into(),
            ),
            UpgradeError::AtCapacity | UpgradeError::UnauthenticatedFull => {
                (503, "Service Unavailable", retry_after(BUSY_RETRY_AFTER))
            }
            UpgradeError::AddressFull => (429, "Too Many Requests", retry_after(BUSY_RETRY_AFTER)),
            UpgradeError::Auth(err) => match err {
                RequestError::Internal(_) => (500, "Internal Server Error", "".into()),
                RequestError::Unavailable(_) => {
                    (503, "Service Unavailable", retry_after(BUSY_RETRY_AFTER))
                }
                RequestError::RateLimited { retry_after: wait } => {
                    (429, "Too Many Requests", retry_after(*wait))
                }
                _ => (
                    401,
                    "Unauthorized",
                    "WWW-Authenticate: Bearer, Basic realm=\"relay\"\r\n".into(),
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

/// The retry hint of a busy or full server.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A `Retry-After` header line: whole seconds, rounded up, at least 1.
fn retry_after(wait: Duration) -> Cow<'static, str> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    format!("Retry-After: {}\r\n", secs.max(1)).into()
}

/// When a new socket's steps must be done by.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// The whole request head in (after TLS, if any).
    pub head: Instant,
    /// Authenticated (credentials checked), if it authenticates at all.
    pub auth: Instant,
}

/// Reads the request and, for an upgrade, answers it. On `Err` the caller
/// writes the error's response (if it has one) and drops the socket. An
/// `Authorization` header is checked only with an authenticated slot
/// reserved on `ticket` (none free: `AtCapacity`), and while the socket is
/// watched: a client that leaves withdraws its password check.
pub async fn accept<S>(
    stream: &mut S,
    state: &AppState,
    peer: SocketAddr,
    ticket: &mut Ticket,
    deadlines: Deadlines,
) -> Result<Accepted, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, mut leftover) = match timeout_at(deadlines.head, http::read_head(stream)).await {
        Ok(Ok(Some(read))) => read,
        Ok(Ok(None)) => return Err(UpgradeError::HeadTooLarge),
        Ok(Err(_)) => return Err(UpgradeError::Gone),
        Err(_) => return Err(UpgradeError::Timeout),
    };
    let (accept_key, chosen, authorization) = match parse(&head)? {
        Requested::Probe(probe) => return Ok(Accepted::Probe(probe)),
        Requested::Upgrade {
            accept_key,
            encoding,
            authorization,
        } => (accept_key, encoding, authorization),
    };
    let (auth, issued_token) = match authorization {
        None => (None, None),
        Some(value) => {
            if !ticket.reserve() {
                return Err(UpgradeError::AtCapacity);
            }
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
            let checking = async {
                let credentials = credentials?;
                let checked = timeout_at(
                    deadlines.auth,
                    state.auth().from_header(credentials, peer.ip()),
                )
                .await;
                match checked {
                    Ok(checked) => Ok::<_, RequestError>(checked?),
                    Err(_) => Err(RequestError::Unavailable(
                        "authentication did not finish in time; retry".into(),
                    )),
                }
            };
            let Some(authenticated) = while_connected(stream, &mut leftover, checking).await else {
                return Err(UpgradeError::Gone);
            };
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

/// What a well-formed request head asks for, before any credentials are
/// checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requested<'h> {
    /// A health probe.
    Probe(Probe),
    /// A WebSocket upgrade: the `Sec-WebSocket-Accept` value to answer,
    /// the subprotocol chosen (`None` when the client offered none), and
    /// the `Authorization` header's value, if any.
    Upgrade {
        accept_key: String,
        encoding: Option<Encoding>,
        authorization: Option<&'h str>,
    },
}

/// Parses a request head (as [`http::read_head`] returns it) and checks
/// it is a WebSocket upgrade at [`WEBSOCKET_PATH`] or a probe. Pure, so it
/// can be fuzzed without a socket (`tests/fuzz`).
pub fn parse(head: &[u8]) -> Result<Requested<'_>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
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
        return Ok(Requested::Probe(probe));
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
    // Before authentication: a refused upgrade must not cost a password
    // hash, nor issue a session nobody will use.
    let offered = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok());
    let encoding = Encoding::negotiate(offered)?;
    Ok(Requested::Upgrade {
        accept_key: derive_accept_key(key.trim().as_bytes()),
        encoding,
        authorization: header("authorization"),
    })
}

/// Runs `work` while watching the socket: `None` if the peer closes (or
/// the socket fails) first, and `work` is dropped unfinished. Bytes that
/// arrive meanwhile (early frames) are kept in `leftover`. A client may not
/// send anything after its request until it has the answer (RFC 6455,
/// 4.1), so one that sends more than [`MAX_HEAD`] meanwhile is dropped
/// like one that left: watching never stops while `work` runs.
async fn while_connected<S, F>(stream: &mut S, leftover: &mut Vec<u8>, work: F) -> Option<F::Output>
where
    S: AsyncRead + Unpin,
    F: Future,
{
    let mut work = pin!(work);
    let mut chunk = [0u8; 512];
    loop {
        tokio::select! {
            done = &mut work => return Some(done),
            read = stream.read(&mut chunk) => match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    leftover.extend_from_slice(&chunk[..n]);
                    if leftover.len() > MAX_HEAD {
                        return None;
                    }
                }
            },
        }
    }
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
        assert_eq!(status(UpgradeError::Timeout), Some(408));
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
        assert_eq!(status(UpgradeError::UnauthenticatedFull), Some(503));
        assert_eq!(status(UpgradeError::AddressFull), Some(429));
        let auth = |err| status(UpgradeError::Auth(err));
        assert_eq!(auth(RequestError::Unauthorized("no".into())), Some(401));
        assert_eq!(auth(RequestError::bad_request("short")), Some(401));
        assert_eq!(auth(RequestError::Unavailable("busy".into())), Some(503));
        let limited = UpgradeError::Auth(RequestError::RateLimited {
            retry_after: Duration::from_millis(2_100),
        })
        .response()
        .expect("answered");
        assert_eq!(limited.status, 429);
        assert_eq!(limited.extra_headers, "Retry-After: 3\r\n");
        let internal = UpgradeError::Auth(RequestError::internal(std::io::Error::other(
            "secret detail",
        )))
        .response()
        .expect("answered");
        assert_eq!(internal.status, 500);
        assert!(!internal.body.contains("secret"), "{}", internal.body);
    }
}
