//! Shared test helpers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use signal_relay::client::{Client, ConnectOptions, Event, Events};
use signal_relay::proto::Envelope;
use signal_relay::testing::TestApp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on any single wait, so a broken server fails the test
/// instead of hanging it. Not a sleep: waits end as soon as the event comes.
pub const WAIT: Duration = Duration::from_secs(20);

/// The next push, or panic after [`WAIT`].
pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("timed out waiting for a push")
        .expect("connection closed while waiting for a push")
}

/// The next delivered envelope, skipping nothing: panics on another event.
pub async fn next_delivery(events: &mut Events) -> Envelope {
    match next_event(events).await {
        Event::Deliver(envelope) => envelope,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Waits for queue-empty, panicking on anything else.
pub async fn expect_queue_empty(events: &mut Events) {
    match next_event(events).await {
        Event::QueueEmpty => {}
        other => panic!("expected queue-empty, got {other:?}"),
    }
}

/// Waits for the connection to close and returns its close code.
pub async fn close_code(events: &mut Events) -> Option<u16> {
    tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("timed out waiting for the close")
        .code
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Waits until `condition` holds, re-checking every few milliseconds, and
/// panics with `what` after [`WAIT`]. For state the server changes without
/// telling the client (rows swept, a socket dropped); the wait ends as soon
/// as the condition holds.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The close opcode.
pub const CLOSE: u8 = 0x8;
/// The binary-frame opcode.
pub const BINARY: u8 = 0x2;

/// A masked client frame (the mask is fixed; any mask will do).
pub fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = masked_header(fin, rsv, opcode, payload.len());
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    bytes
}

/// A client frame's header, with the mask bit set.
pub fn masked_header(fin: bool, rsv: u8, opcode: u8, len: usize) -> Vec<u8> {
    let mut bytes = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    match len {
        0..=125 => bytes.push(0x80 | len as u8),
        126..=0xffff => {
            bytes.push(0x80 | 126);
            bytes.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            bytes.push(0x80 | 127);
            bytes.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    bytes
}

/// A WebSocket spoken byte by byte, for what no WebSocket library sends
/// (protocol violations) or does (never reading).
pub struct Raw {
    stream: TcpStream,
    /// Bytes read but not yet parsed into frames.
    buffered: Vec<u8>,
}

impl Raw {
    /// Upgrades a fresh TCP connection, authenticated with `token` if
    /// given.
    pub async fn upgrade(app: &TestApp, token: Option<&[u8]>) -> Raw {
        let stream = TcpStream::connect(app.addr).await.unwrap();
        Raw::upgrade_on(stream, token).await
    }

    /// Upgrades `stream`, authenticated with `token` if given.
    pub async fn upgrade_on(mut stream: TcpStream, token: Option<&[u8]>) -> Raw {
        let authorization = token.map_or_else(String::new, |token| {
            use base64::Engine;
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
            format!("Authorization: Bearer {token}\r\n")
        });
        let request = format!(
            "GET /v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             {authorization}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Raw {
            stream,
            buffered: Vec::new(),
        };
        let end = loop {
            if let Some(end) = raw.buffered.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            raw.fill().await;
        };
        let head = String::from_utf8_lossy(&raw.buffered[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.buffered.drain(..end);
        raw
    }

    /// Reads more bytes; panics if the server closed first.
    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
            .await
            .expect("the server answers in time")
            .expect("read");
        assert!(n > 0, "the server closed the socket without a close frame");
        self.buffered.extend_from_slice(&chunk[..n]);
    }

    /// The next server frame: opcode and payload.
    pub async fn next_frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buffered) {
                self.buffered.drain(..used);
                return (opcode, payload);
            }
            self.fill().await;
        }
    }

    /// Skips the server's other frames (pushes) up to its close frame, and
    /// returns the close code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            let (opcode, payload) = self.next_frame().await;
            if opcode == CLOSE {
                assert!(payload.len() >= 2, "a close frame with a code");
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }
}

/// One whole server frame (never masked) at the front of `bytes`: its
/// opcode, its payload, and how many bytes it used.
fn parse_frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let (&first, &second) = (bytes.first()?, bytes.get(1)?);
    assert_eq!(second & 0x80, 0, "server frames are unmasked");
    let (len, at) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = bytes.get(at..at + len)?.to_vec();
    Some((first & 0x0f, payload, at + len))
}

/// `GET path` over a fresh connection: the status and the body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("read the response");
        response
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("timed out waiting for an HTTP answer");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Every sample of `/metrics`, keyed by name and labels as written.
pub async fn scrape(app: &TestApp) -> HashMap<String, f64> {
    let (status, body) = get(app.admin_addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// One sample of `/metrics` (0 when absent).
pub async fn metric(app: &TestApp, series: &str) -> f64 {
    scrape(app).await.get(series).copied().unwrap_or(0.0)
}

/// `127.0.0.N`: every address of 127.0.0.0/8 is loopback on Linux, so a
/// client bound to one is, to the server, a client from another address.
pub fn loopback(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// An unauthenticated client connected from `127.0.0.N`.
pub async fn connect_from(app: &TestApp, n: u8) -> (Client, Events) {
    connect_to_from(&app.url, n).await
}

/// An unauthenticated client connected to `url` from `127.0.0.N`.
pub async fn connect_to_from(url: &str, n: u8) -> (Client, Events) {
    let options = ConnectOptions {
        bind: Some(loopback(n)),
        ..ConnectOptions::default()
    };
    Client::connect_with(url, options)
        .await
        .expect("connect to test server")
}

/// A raw TCP connection to `addr` from `127.0.0.N`.
pub async fn tcp_from(addr: SocketAddr, n: u8) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(loopback(n), 0))
        .expect("bind a loopback address");
    socket.connect(addr).await.expect("connect")
}

/// Writes `request` (maybe nothing) and reads until the server closes;
/// panics after [`WAIT`].
pub async fn exchange(stream: &mut TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("the server answers and closes")
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

/// Sends SIGTERM to a relay process and waits (at most [`WAIT`]) for it to
/// exit, returning how it exited.
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the relay exits in time after SIGTERM")
        .expect("wait")
}
