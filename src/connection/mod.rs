//! One client's WebSocket: [`Connection`] turns WebSocket messages into
//! protocol frames and back, in the encoding the upgrade chose, and
//! [`handler`] runs the connection's life: authentication, then the session
//! loop; [`slots`] are the budgets of unauthenticated and authenticated
//! sockets it moves between, and [`stop`] is how the server tells them all
//! to shut down.

pub mod handler;
pub mod read_ahead;
pub mod slots;
pub mod stop;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::sink::{Feed, Flush, Send};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, Utf8Bytes};

use crate::envelope::Message;
use crate::protocol::proto::{ClientFrame, ServerFrame, push};
use crate::protocol::{self, Close, Encoding, ProtocolError, json};

/// Something read from the socket.
// Not boxed: it is moved once per frame, and boxing would allocate per frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Inbound {
    Frame(ClientFrame),
    /// A ping or pong: proof of life, nothing to answer.
    Heartbeat,
}

/// A WebSocket speaking the relay protocol.
pub struct Connection<S> {
    /// The socket, configured with the server's frame and buffer limits.
    ws: WebSocketStream<S>,
    /// The frame limit, for the error message when a frame exceeds it.
    max_frame: usize,
    /// The subprotocol's encoding, fixed at the upgrade. Matched once per
    /// frame, so the protobuf path pays one predictable branch for the
    /// JSON one existing, and nothing per field.
    encoding: Encoding,
    /// Bytes of the last message read, as received: what keeping the frame
    /// decoded from it may cost (decoded `bytes` fields share its buffer).
    last_len: u32,
    /// Outgoing frames are encoded here. tungstenite copies each into its
    /// write buffer and drops it before the next is encoded, so the
    /// allocation is reclaimed and reused: writing a frame allocates nothing.
    encoded: BytesMut,
}

/// Most encode-buffer capacity kept between frames: one large frame must not
/// leave every idle connection holding its size.
const KEEP_ENCODE_CAPACITY: usize = 16 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(ws: WebSocketStream<S>, max_frame: usize, encoding: Encoding) -> Self {
        Connection {
            ws,
            max_frame,
            encoding,
            last_len: 0,
            encoded: BytesMut::new(),
        }
    }

    /// Reads the next frame. `Ok(None)` means the peer closed.
    ///
    /// Cancel-safe for frames: a read dropped mid-frame leaves what it
    /// had in tungstenite's and the read-ahead's buffers. One exception: a
    /// read dropped while flushing the pong to a `Ping` loses that ping's
    /// `Heartbeat` (the pong stays queued and goes with the next write), so
    /// the idle timer may miss one ping.
    pub async fn read(&mut self) -> Result<Option<Inbound>, ProtocolError> {
        loop {
            let message = match self.ws.next().await {
                None => return Ok(None),
                Some(Ok(message)) => message,
                Some(Err(tungstenite::Error::Capacity(_))) => {
                    return Err(ProtocolError::TooLarge {
                        limit: self.max_frame,
                    });
                }
                Some(Err(
                    tungstenite::Error::ConnectionClosed
                    | tungstenite::Error::AlreadyClosed
                    // The TCP stream ended: nobody left to tell.
                    | tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                    ),
                )) => return Ok(None),
                // The peer broke the framing rules: it is told so (1002)
                // before the socket closes, as RFC 6455 section 7.1.7 asks.
                Some(Err(tungstenite::Error::Protocol(violation))) => {
                    return Err(ProtocolError::Violation(violation));
                }
                Some(Err(tungstenite::Error::Utf8(detail))) => {
                    return Err(ProtocolError::InvalidUtf8(detail));
                }
                Some(Err(err)) => return Err(ProtocolError::Transport(err)),
            };
            self.last_len = u32::try_from(message.len()).unwrap_or(u32::MAX);
            return match message {
                WsMessage::Binary(bytes) => match self.encoding {
                    Encoding::Proto => ClientFrame::decode(bytes)
                        .map(|f| Some(Inbound::Frame(f)))
                        .map_err(ProtocolError::Malformed),
                    Encoding::Json => Err(ProtocolError::BinaryFrame),
                },
                WsMessage::Text(text) => match self.encoding {
                    Encoding::Json => json::decode(&text)
                        .map(|f| Some(Inbound::Frame(f)))
                        .map_err(ProtocolError::MalformedJson),
                    Encoding::Proto => Err(ProtocolError::TextFrame),
                },
                // tungstenite has queued the answer (an echo, or 1002 for
                // a close code no endpoint may send); `close(None)` sends it.
                WsMessage::Close(_) => Ok(None),
                WsMessage::Ping(_) => {
                    // tungstenite queued the pong; send it now.
                    self.ws.flush().await.map_err(ProtocolError::Transport)?;
                    Ok(Some(Inbound::Heartbeat))
                }
                WsMessage::Pong(_) => Ok(Some(Inbound::Heartbeat)),
                WsMessage::Frame(_) => continue,
            };
        }
    }

    /// Bytes of the message the last [`Connection::read`] returned, as
    /// received.
    pub fn last_len(&self) -> usize {
        self.last_len as usize
    }

    /// `frame` in this connection's encoding, for [`Connection::feed`].
    pub fn encode(&mut self, frame: &ServerFrame) -> WsMessage {
        match self.encoding {
            Encoding::Proto => WsMessage::Binary(self.encode_proto(frame)),
            Encoding::Json => WsMessage::Text(self.encode_json(frame)),
        }
    }

    /// The `Deliver` push of `message`, for [`Connection::feed`]: in
    /// protobuf written straight from the message
    /// ([`deliver`](crate::protocol::deliver)), the same
    /// bytes [`Connection::encode`] would give.
    pub fn encode_deliver(&mut self, message: &Message) -> WsMessage {
        match self.encoding {
            Encoding::Proto => {
                message.deliver().encode(&mut self.encoded);
                WsMessage::Binary(self.take_encoded())
            }
            Encoding::Json => {
                self.encode(&protocol::push(push::Event::Deliver(message.to_envelope())))
            }
        }
    }

    /// Queues an encoded frame without flushing; follow with
    /// [`Connection::flush`]. Cancel-safe: it waits only for room, before
    /// queueing, so a feed that did not complete queued nothing. The write
    /// futures here are `Unpin`, so a caller can try one once and move it
    /// elsewhere only if it waits.
    pub fn feed(&mut self, message: WsMessage) -> Feed<'_, WebSocketStream<S>, WsMessage> {
        self.ws.feed(message)
    }

    fn encode_proto(&mut self, frame: &ServerFrame) -> Bytes {
        self.encoded.reserve(frame.encoded_len());
        frame
            .encode(&mut self.encoded)
            .expect("the buffer was reserved for the whole frame");
        self.take_encoded()
    }

    fn encode_json(&mut self, frame: &ServerFrame) -> Utf8Bytes {
        // Fails only for an enum field holding a number the schema does not
        // name, and every enum the server writes comes from a Rust enum
        // (`Status`, `SendOutcome`, `envelope::EnvelopeType`), never from a
        // client's number.
        json::encode_into(frame, &mut self.encoded)
            .expect("server frames hold only named enum values");
        Utf8Bytes::try_from(self.take_encoded()).expect("serde_json writes UTF-8")
    }

    /// The frame just encoded, leaving the buffer's allocation for the next.
    fn take_encoded(&mut self) -> Bytes {
        // Measured before the split, which leaves only the spare room
        // behind while the empty buffer still holds the whole allocation.
        let oversized = self.encoded.capacity() > KEEP_ENCODE_CAPACITY;
        let bytes = self.encoded.split().freeze();
        if oversized {
            self.encoded = BytesMut::new();
        }
        bytes
    }

    pub fn flush(&mut self) -> Flush<'_, WebSocketStream<S>, WsMessage> {
        self.ws.flush()
    }

    /// Writes and flushes one frame.
    pub async fn send(&mut self, frame: &ServerFrame) -> Result<(), tungstenite::Error> {
        let message = self.encode(frame);
        self.feed(message).await?;
        self.flush().await
    }

    pub fn ping(&mut self) -> Send<'_, WebSocketStream<S>, WsMessage> {
        self.ws.send(WsMessage::Ping(Default::default()))
    }

    /// Ends the WebSocket: sends our close frame, or with `None` only what
    /// tungstenite queued itself (the answer to the peer's close frame,
    /// which RFC 6455 section 5.5.1 requires), then waits briefly for the
    /// peer to finish, so the close is clean when the peer is well-behaved
    /// and bounded when it is not.
    pub async fn close(mut self, close: Option<Close>) {
        let closing = async {
            let sent = match close {
                Some(close) => {
                    let frame = CloseFrame {
                        code: CloseCode::from(close.code.code()),
                        reason: close_reason(&close.reason).to_owned().into(),
                    };
                    self.ws.close(Some(frame)).await
                }
                None => self.ws.flush().await,
            };
            if sent.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), closing).await;
    }
}

/// Most bytes of a close reason: a control frame carries at most 125, two
/// of which are the code.
const MAX_CLOSE_REASON: usize = 123;

/// `reason`, cut at a character boundary to fit a close frame: a longer
/// one would make the frame itself a protocol violation.
fn close_reason(reason: &str) -> &str {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason;
    }
    let mut end = MAX_CLOSE_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON && cut.len() >= MAX_CLOSE_REASON - 1);
        assert!(long.starts_with(cut));
    }
}
