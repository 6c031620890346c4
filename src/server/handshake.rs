//! The HTTP side of a connection: read the upgrade request, check the path
//! and headers, authenticate from an `Authorization` header if present, and
//! answer either `101 Switching Protocols` or a proper HTTP error. Done by
//! hand rather than in tungstenite's synchronous callback so credentials
//! can be checked (asynchronously) before the upgrade is accepted.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::auth::{Authenticated, Password, SessionToken, Username};
use crate::protocol::RequestError;
use crate::state::AppState;

/// The only path that upgrades.
pub const WEBSOCKET_PATH: &str = "/v1/websocket";

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// An accepted upgrade.
pub struct Upgrade {
    /// Set when the request authenticated itself.
    pub auth: Option<Authenticated>,
    /// Bytes the client sent after the request head (early frames).
    pub leftover: Vec<u8>,
}

/// An HTTP error answer.
#[derive(Debug)]
pub struct Reject {
    pub status: u16,
    pub reason: &'static str,
    pub message: String,
    pub extra_headers: &'static str,
}

impl Reject {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Reject {
            status,
            reason,
            message: message.into(),
            extra_headers: "",
        }
    }

    pub fn unavailable(message: &str) -> Self {
        Reject::new(503, "Service Unavailable", message)
    }
}

/// Reads and answers the upgrade request. On `Err` the caller writes the
/// rejection with [`reject`] (if the socket is still usable) and drops it.
pub async fn accept<S>(
    stream: &mut S,
    state: &AppState,
    timeout: Duration,
) -> Result<Upgrade, Option<Reject>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (head, leftover) = match tokio::time::timeout(timeout, read_head(stream)).await {
        Ok(Ok(Some(read))) => read,
        Ok(Ok(None)) => {
            return Err(Some(Reject::new(
                431,
                "Request Header Fields Too Large",
                "request head too large",
            )));
        }
        Ok(Err(_)) | Err(_) => return Err(None),
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => {
            return Err(Some(Reject::new(
                400,
                "Bad Request",
                "malformed HTTP request",
            )));
        }
    }
    let path = request.path.unwrap_or("").split('?').next().unwrap_or("");
    if path != WEBSOCKET_PATH {
        return Err(Some(Reject::new(
            404,
            "Not Found",
            format!("not found; the WebSocket endpoint is {WEBSOCKET_PATH}"),
        )));
    }
    if request.method != Some("GET") {
        return Err(Some(Reject {
            extra_headers: "Allow: GET\r\n",
            ..Reject::new(
                405,
                "Method Not Allowed",
                "use GET with a WebSocket upgrade",
            )
        }));
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
        return Err(Some(Reject {
            extra_headers: "Upgrade: websocket\r\nConnection: Upgrade\r\n",
            ..Reject::new(
                426,
                "Upgrade Required",
                "this endpoint speaks WebSocket only",
            )
        }));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(Some(Reject {
            extra_headers: "Sec-WebSocket-Version: 13\r\n",
            ..Reject::new(426, "Upgrade Required", "WebSocket version 13 is required")
        }));
    }
    let Some(key) = header("sec-websocket-key") else {
        return Err(Some(Reject::new(
            400,
            "Bad Request",
            "missing Sec-WebSocket-Key",
        )));
    };
    let accept_key = derive_accept_key(key.trim().as_bytes());
    let (auth, issued_token) = match header("authorization") {
        None => (None, None),
        Some(value) => match authenticate(state, value).await {
            Ok(found) => found,
            Err(err) if err.is_internal() => {
                tracing::error!(error = %err, source = ?std::error::Error::source(&err), "header authentication failed");
                return Err(Some(Reject::new(
                    500,
                    "Internal Server Error",
                    "internal error",
                )));
            }
            Err(RequestError::Unavailable(m)) => return Err(Some(Reject::unavailable(&m))),
            Err(err) => {
                return Err(Some(Reject {
                    extra_headers: "WWW-Authenticate: Bearer, Basic realm=\"relay\"\r\n",
                    ..Reject::new(401, "Unauthorized", err.client_message())
                }));
            }
        },
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n"
    );
    if let (Some(auth), Some(token)) = (&auth, issued_token) {
        // Basic authentication issued a session; hand its token over.
        response.push_str(&format!(
            "X-Relay-User-Id: {}\r\nX-Relay-Session-Token: {}\r\n",
            auth.user_id,
            token.to_base64()
        ));
    }
    response.push_str("\r\n");
    if stream.write_all(response.as_bytes()).await.is_err() {
        return Err(None);
    }
    Ok(Upgrade { auth, leftover })
}

/// Reads (and discards) a request head, so a refusal reaches the client.
pub async fn accept_head_only<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, read_head(stream)).await,
        Ok(Ok(Some(_)))
    )
}

/// Writes an HTTP error response.
pub async fn reject<S: AsyncWrite + Unpin>(stream: &mut S, reject: &Reject) {
    let body = format!("{}\n", reject.message);
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n{}",
        reject.status,
        reject.reason,
        body.len(),
        reject.extra_headers,
        body
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line ending the request head. `None` if the head
/// exceeds [`MAX_HEAD`].
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let start = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[start..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = start + pos + 4;
            let leftover = buf.split_off(end);
            return Ok(Some((buf, leftover)));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// `Bearer <base64url token>` resumes a session; `Basic` logs in with a
/// password and issues a new session token.
async fn authenticate(
    state: &AppState,
    value: &str,
) -> Result<(Option<Authenticated>, Option<SessionToken>), RequestError> {
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("bearer") {
        let token = SessionToken::from_base64(rest.trim())
            .ok_or_else(|| RequestError::Unauthorized("malformed bearer token".into()))?;
        let auth = state.auth().resume(&token).await?;
        Ok((Some(auth), None))
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| RequestError::Unauthorized("malformed basic credentials".into()))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| RequestError::Unauthorized("malformed basic credentials".into()))?;
        let issued = state
            .auth()
            .login(
                Username::parse(user)?,
                Password::parse(password.to_owned())?,
            )
            .await?;
        Ok((Some(issued.auth), Some(issued.token)))
    } else {
        Err(RequestError::Unauthorized(
            "unsupported authorization scheme; use Bearer or Basic".into(),
        ))
    }
}
