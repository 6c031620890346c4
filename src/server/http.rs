//! The little HTTP the relay speaks: reading a request head and writing a
//! whole response, shared by the public listener's upgrade and probes and
//! by the admin endpoint. Every response closes its connection, so nothing
//! here keeps state between requests.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::health::Health;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// A response to write whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub content_type: &'static str,
    /// Whole header lines, each ending in CRLF.
    pub extra_headers: &'static str,
    pub body: String,
}

impl Response {
    /// A plain-text answer; the body gets a trailing newline.
    pub fn text(status: u16, reason: &'static str, message: &str) -> Self {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_headers: "",
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
            extra_headers: "Cache-Control: no-store\r\n",
            body,
        }
    }
}

/// Reads up to the blank line ending the request head. `None` if the head
/// exceeds [`MAX_HEAD`]. Also returns what the client sent after it.
pub async fn read_head<S: AsyncRead + Unpin>(
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

/// Reads a request head within `timeout`: the probe it asks for, if it is
/// a `GET` of one. Read whatever it is, so a refusal that follows reaches
/// the client rather than a reset.
pub async fn read_probe<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> Option<Probe> {
    let Ok(Ok(Some((head, _)))) = tokio::time::timeout(timeout, read_head(stream)).await else {
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
