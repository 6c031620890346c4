//! The little HTTP the relay speaks: reading a request head and writing a
//! whole response, shared by the public listener's upgrade and probes and
//! by the admin endpoint. Every response closes its connection, so nothing
//! here keeps state between requests.

use std::borrow::Cow;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::health::Health;

/// Largest request head accepted, in bytes, its closing blank line
/// included; a larger one is answered 431.
pub const MAX_HEAD: usize = 8 * 1024;

/// A response to write whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    /// Whole header lines, each ending in CRLF.
    pub extra_headers: Cow<'static, str>,
    pub body: String,
}

impl Response {
    /// A plain-text answer; the body gets a trailing newline.
    pub fn text(status: u16, reason: &'static str, message: &str) -> Self {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Cow::Borrowed(""),
            body: format!("{message}\n"),
        }
    }

    /// Writes the response and closes the write side.
    pub async fn write<S: AsyncWrite + Unpin>(&self, stream: &mut S) {
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
            self.extra_headers,
        );
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(self.body.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}

/// The health probes, answered on both listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: is the process serving?
    Health,
    /// `/readyz`: should traffic be sent here?
    Ready,
}

impl Probe {
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/healthz" => Some(Probe::Health),
            "/readyz" => Some(Probe::Ready),
            _ => None,
        }
    }

    /// 200 when healthy or ready, else 503; `/readyz` names in JSON what
    /// is not ready.
    pub fn answer(self, health: &Health) -> Response {
        let (ok, body) = match self {
            Probe::Health if health.is_live() => (true, "ok\n".to_owned()),
            Probe::Health => (false, "shutting down\n".to_owned()),
            Probe::Ready => {
                let readiness = health.readiness();
                (readiness.is_ready(), readiness.to_json() + "\n")
            }
        };
        let (status, reason) = if ok {
            (200, "OK")
        } else {
            (503, "Service Unavailable")
        };
        let content_type = match self {
            Probe::Health => "text/plain; charset=utf-8",
            Probe::Ready => "application/json",
        };
        Response {
            status,
            reason,
            content_type,
            extra_headers: Cow::Borrowed("Cache-Control: no-store\r\n"),
            body,
        }
    }
}

/// Reads up to the blank line ending the request head. `None` if the head
/// (closing blank line included) is longer than [`MAX_HEAD`]. Also returns
/// what the client sent after it. Never reads past `MAX_HEAD` bytes in all,
/// so the limit is exact whatever the reads return.
pub async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let room = MAX_HEAD - buf.len();
        if room == 0 {
            return Ok(None);
        }
        let n = stream.read(&mut chunk[..room.min(1024)]).await?;
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
    }
}

/// Writes a refusal, then reads and discards what the client sends until it
/// closes or `linger` passes: closing with part of its request unread would
/// reset the connection, and the client might lose the answer. For a
/// socket that gets no slot, the answer comes at once, before anything is
/// read: a slow client must not hold the server's attention.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    response: &Response,
    linger: Duration,
) {
    response.write(stream).await;
    let until = Instant::now() + linger;
    let mut sink = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// Reads a request head by `deadline`: the probe it asks for, if it is a
/// `GET` of one. Read whatever it is, so a refusal that follows reaches
/// the client rather than a reset.
pub async fn read_probe<S: AsyncRead + Unpin>(stream: &mut S, deadline: Instant) -> Option<Probe> {
    let Ok(Ok(Some((head, _)))) = tokio::time::timeout_at(deadline, read_head(stream)).await else {
        return None;
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    request.parse(&head).ok()?;
    if request.method != Some("GET") {
        return None;
    }
    Probe::from_path(request.path?.split('?').next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head of exactly `len` bytes, closing blank line included.
    fn head_of(len: usize) -> Vec<u8> {
        let start = b"GET /v1/websocket HTTP/1.1\r\nX-Pad: ";
        let end = b"\r\n\r\n";
        let mut head = start.to_vec();
        head.resize(len - end.len(), b'a');
        head.extend_from_slice(end);
        head
    }

    /// The limit is exact: a head of `MAX_HEAD` bytes is read, one byte
    /// more is refused, however the bytes arrive and whatever follows.
    #[tokio::test]
    async fn the_head_limit_is_exact() {
        for len in [MAX_HEAD - 1, MAX_HEAD] {
            let mut bytes = head_of(len);
            bytes.extend_from_slice(b"early frame");
            let (head, leftover) = read_head(&mut bytes.as_slice()).await.unwrap().unwrap();
            assert_eq!(head.len(), len);
            assert!(b"early frame".starts_with(&leftover));
        }
        let bytes = head_of(MAX_HEAD + 1);
        assert!(read_head(&mut bytes.as_slice()).await.unwrap().is_none());
        // One byte at a time.
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for byte in head_of(MAX_HEAD + 1) {
                if client.write_all(&[byte]).await.is_err() {
                    break;
                }
            }
        });
        assert!(read_head(&mut server).await.unwrap().is_none());
        drop(server);
        writer.await.unwrap();
    }
}
