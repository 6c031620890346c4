//! The connection's reader task: reads the server's frames, hands each
//! response to whoever awaits it ([`Routes`]) and each push to the
//! connection's [`Events`](super::Events).
//!
//! It reads in bursts: after a frame, it takes the frames the socket has
//! already delivered behind it, up to [`BURST`], and hands them over in
//! runs. The pushes of a run take their room in the events queue in one
//! reservation and the responses of a run are routed under one lock, so a
//! burst of frames costs the queue, the lock and the consumer's wake-up
//! once, not once per frame. Frame order is kept: a push read before a
//! response is queued before that response's waiter hears, and a response
//! read before a push is routed before the push is queued.

use futures::stream::SplitStream;
use futures::{FutureExt, StreamExt};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::transport::Socket;
use super::{CLOSE_LINGER, CloseInfo, Event, Pending};
use crate::protocol::Encoding;
use crate::protocol::json;
use crate::protocol::proto::{self, Response, ServerFrame, push, server_frame};

/// The most frames read in one burst, so a socket that never runs dry
/// still hands over what it read, and the runs' buffers stay small.
pub(super) const BURST: usize = 64;

/// How many frames' room the runs keep between bursts.
const KEPT: usize = 8;

/// What one WebSocket message said.
enum Frame {
    Response(Response),
    Push(Event),
    /// A frame with nothing for anyone (a ping, an unknown push).
    Nothing,
    /// The server's close frame, and what it said.
    Closed(CloseInfo),
    /// The socket failed or the server broke the protocol.
    Broken,
}

/// The reading half of a connection and where its frames go.
pub(super) struct Reader {
    /// The socket's reading half.
    pub(super) stream: SplitStream<Socket>,
    /// How the server's frames are encoded.
    pub(super) encoding: Encoding,
    /// Who awaits each response; taken at the end, so later requests fail
    /// at once.
    pub(super) pending: Pending,
    /// The connection's pushes. Bounded: when the consumer stops taking
    /// them, the reader stops reading.
    pub(super) events: mpsc::Sender<Event>,
    /// Told how the connection ended, before any waiter is.
    pub(super) closed: watch::Sender<Option<CloseInfo>>,
}

impl Reader {
    /// Reads until the socket ends, then tells every waiter.
    pub(super) async fn run(mut self) {
        let mut answers = Vec::new();
        let mut pushes = Vec::new();
        let close = loop {
            let Some(message) = self.stream.next().await else {
                break CloseInfo::default();
            };
            // `Some` once the socket is done, with the server's close frame
            // if it sent one.
            let mut frame = self.frame(message);
            let mut read = 1;
            let end = loop {
                match frame {
                    Frame::Response(response) => {
                        self.queue(&mut pushes).await;
                        answers.push(response);
                    }
                    Frame::Push(event) => {
                        self.route(&mut answers);
                        pushes.push(event);
                    }
                    Frame::Nothing => {}
                    Frame::Closed(close) => break Some(Some(close)),
                    Frame::Broken => break Some(None),
                }
                if read == BURST {
                    break None;
                }
                match self.stream.next().now_or_never() {
                    Some(Some(message)) => frame = self.frame(message),
                    Some(None) => break Some(None),
                    None => break None,
                }
                read += 1;
            };
            self.route(&mut answers);
            self.queue(&mut pushes).await;
            // A long burst's room is given back: a connection keeps what a
            // short one needs.
            answers.shrink_to(KEPT);
            pushes.shrink_to(KEPT);
            match end {
                Some(Some(close)) => {
                    self.linger().await;
                    break close;
                }
                Some(None) => break CloseInfo::default(),
                None => {}
            }
        };
        let routes = self.pending.lock().expect("pending lock").take();
        // Closed first, then the waiters told: each reads how it ended,
        // and a pipeline's request that saw the connection open is still
        // waiting when its pipeline hears of the end.
        let _ = self.closed.send(Some(close));
        if let Some(routes) = routes {
            routes.end();
        }
    }

    /// After the server's close frame: tungstenite queued the answering
    /// close and writes it on the next read, so the reader keeps reading
    /// until the server drops the connection (it then hears the answer at
    /// once instead of waiting out its close timeout), for [`CLOSE_LINGER`]
    /// at most, for a server that never drops.
    async fn linger(&mut self) {
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(_)) = self.stream.next().await {}
        })
        .await;
    }

    /// Decodes one message.
    fn frame(&mut self, message: Result<WsMessage, tungstenite::Error>) -> Frame {
        let decoded = match (message, self.encoding) {
            (Ok(WsMessage::Binary(bytes)), Encoding::Proto) => ServerFrame::decode(bytes).ok(),
            (Ok(WsMessage::Text(text)), Encoding::Json) => json::decode(&text).ok(),
            // The other encoding's frames: the server broke the protocol,
            // as with a frame that does not decode.
            (Ok(WsMessage::Binary(_) | WsMessage::Text(_)), _) => None,
            (Ok(WsMessage::Close(frame)), _) => {
                let close = frame.map(|frame| CloseInfo {
                    code: Some(frame.code.into()),
                    reason: frame.reason.to_string(),
                });
                return Frame::Closed(close.unwrap_or_default());
            }
            (Ok(_), _) => return Frame::Nothing,
            (Err(_), _) => return Frame::Broken,
        };
        match decoded.map(|frame| frame.kind) {
            None => Frame::Broken,
            Some(Some(server_frame::Kind::Response(response))) => Frame::Response(response),
            Some(Some(server_frame::Kind::Push(proto::Push { event: Some(event) }))) => {
                Frame::Push(match event {
                    push::Event::Deliver(envelope) => Event::Deliver(envelope),
                    push::Event::QueueEmpty(_) => Event::QueueEmpty,
                    push::Event::PreKeysLow(low) => Event::PreKeysLow(low),
                })
            }
            Some(_) => Frame::Nothing,
        }
    }

    /// Hands a run of responses to their waiters, under one lock.
    fn route(&self, answers: &mut Vec<Response>) {
        if answers.is_empty() {
            return;
        }
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(routes) => answers
                .drain(..)
                .for_each(|response| routes.answer(response)),
            None => answers.clear(),
        }
    }

    /// Queues a run of pushes, waiting for room; room for as many as fit
    /// is taken at once. Pushes nobody will take are dropped, and the
    /// reader goes on serving responses.
    async fn queue(&self, pushes: &mut Vec<Event>) {
        while !pushes.is_empty() {
            let n = pushes.len().min(self.events.max_capacity());
            match self.events.reserve_many(n).await {
                Ok(permits) => permits
                    .zip(pushes.drain(..n))
                    .for_each(|(permit, event)| permit.send(event)),
                Err(_) => pushes.clear(),
            }
        }
    }
}
