//! Requests sent back to back over one or more connections, their answers
//! gathered in one queue the caller owns: the way to keep thousands of
//! requests in flight without a future, a task and a channel for each.
//!
//! [`Client::request`](super::Client::request) suits a caller that awaits
//! each answer where it asked. A caller that sends many and handles the
//! answers as they come (a load generator, a bulk sender) pays there, per
//! request, for a oneshot, an entry in the connection's shared map of
//! waiters, and the future it keeps in a set of its own. A [`Pipeline`]
//! pays for one entry in a map it alone holds: it numbers its requests
//! itself, each connection's reader task passes the answers of the
//! pipeline's lane into its queue, and the caller gets each answer back
//! with the tag it gave the request.

use std::collections::{HashMap, VecDeque};

use tokio::sync::mpsc;
use uuid::Uuid;

use super::routes::{LANE_SHIFT, Note, SEQ_MASK};
use super::{Client, ClientError, Outgoing, ack_request, send_request};
use crate::idhash::IdHasher;
use crate::protocol::proto::{ClientFrame, Response, client_frame::Request};

/// The most notes [`Pipeline::next`] takes out of its queue at once.
const NOTES_TAKEN: usize = 16;

/// One of a pipeline's connections, as [`Pipeline::attach`] named it.
/// It is the connection's place in that pipeline: given to another
/// pipeline, it names whichever connection holds the same place there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source(u32);

/// A connection attached to a pipeline.
struct Attached {
    client: Client,
    /// Its lane's bits in a request id.
    lane: u64,
}

/// Requests in flight over attached connections, with their answers in one
/// queue. Answers come in the order the server gives them, which is not
/// the order of the requests (a message delivered live is answered at the
/// recipient's ack).
///
/// The queue holds at most one answer per request in flight: the caller
/// bounds it by bounding [`in_flight`](Pipeline::in_flight).
pub struct Pipeline<T> {
    /// The attached connections, by [`Source`].
    sources: Vec<Attached>,
    /// Handed to each attached connection's reader.
    notes_tx: mpsc::UnboundedSender<Note>,
    /// Answers and endings, in the order the readers gave them.
    notes: mpsc::UnboundedReceiver<Note>,
    /// Notes taken out of `notes` together, last first: one wake-up and one
    /// pass over the queue for up to [`NOTES_TAKEN`] answers.
    taken: Vec<Note>,
    /// The tag and connection of each request in flight, by sequence
    /// number. The pipeline makes the numbers (unique across its
    /// connections), and only the server echoing them picks the key.
    waiting: HashMap<u64, (u32, T), IdHasher>,
    /// Requests whose connection ended before their answer came.
    failed: VecDeque<(u32, T)>,
    /// The next request's sequence number.
    next_seq: u64,
}

impl<T> Default for Pipeline<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Pipeline<T> {
    pub fn new() -> Self {
        let (notes_tx, notes) = mpsc::unbounded_channel();
        Pipeline {
            sources: Vec::new(),
            notes_tx,
            notes,
            waiting: HashMap::default(),
            taken: Vec::new(),
            failed: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// Attaches a connection: requests sent through the returned source
    /// are answered in this pipeline. Fails if the connection has ended,
    /// or has had 65,535 pipelines attached already.
    pub fn attach(&mut self, client: &Client) -> Result<Source, ClientError> {
        let source = u32::try_from(self.sources.len()).map_err(|_| ClientError::NoLane)?;
        let lane = {
            let mut routes = client.pending.lock().expect("pending lock");
            let routes = routes.as_mut().ok_or_else(|| client.closed_error())?;
            routes
                .open_lane(source, self.notes_tx.clone())
                .ok_or(ClientError::NoLane)?
        };
        self.sources.push(Attached {
            client: client.clone(),
            lane: u64::from(lane) << LANE_SHIFT,
        });
        Ok(Source(source))
    }

    /// Sends `request` through `source`; its answer comes out of
    /// [`next`](Pipeline::next) with `tag`. Returns once the request is
    /// queued for the socket (it waits while the writer's queue is full).
    /// Cancel-safe: a request cancelled here was not sent.
    pub async fn request(
        &mut self,
        source: Source,
        request: Request,
        tag: T,
    ) -> Result<(), ClientError> {
        let attached = self
            .sources
            .get(source.0 as usize)
            .ok_or(ClientError::NoLane)?;
        let client = &attached.client;
        // The reader marks the connection closed before it tells the
        // pipeline, and the pipeline reads that only in `next`, which
        // cannot run while this does: a request that passes this check is
        // answered or failed, never left waiting.
        if client.closed.borrow().is_some() {
            return Err(client.closed_error());
        }
        let seq = self.next_seq & SEQ_MASK;
        let message = client.encode(&ClientFrame {
            request_id: attached.lane | seq,
            request: Some(request),
        })?;
        client
            .out
            .send(message)
            .await
            .map_err(|_| client.closed_error())?;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.waiting.insert(seq, (source.0, tag));
        Ok(())
    }

    /// Sends a message; read its answer with [`Sent::try_from`]
    /// (super::Sent).
    pub async fn send(
        &mut self,
        source: Source,
        message: Outgoing,
        tag: T,
    ) -> Result<(), ClientError> {
        self.request(source, send_request(message), tag).await
    }

    /// Acknowledges messages; read the answer with [`Acked::try_from`]
    /// (super::Acked).
    pub async fn ack(&mut self, source: Source, ids: &[Uuid], tag: T) -> Result<(), ClientError> {
        self.request(source, ack_request(ids), tag).await
    }

    /// Requests sent whose answer has not been taken yet.
    pub fn in_flight(&self) -> usize {
        self.waiting.len() + self.failed.len()
    }

    /// The next answer, with its request's tag: the server's response
    /// whatever its status, or the error that the request's connection
    /// ended first. `None` when nothing is in flight. Cancel-safe.
    pub async fn next(&mut self) -> Option<(T, Result<Response, ClientError>)> {
        loop {
            if let Some((source, tag)) = self.failed.pop_front() {
                let error = self.sources[source as usize].client.closed_error();
                return Some((tag, Err(error)));
            }
            if self.waiting.is_empty() {
                return None;
            }
            if self.taken.is_empty() {
                // The pipeline holds a sender, so the queue never ends.
                self.notes.recv_many(&mut self.taken, NOTES_TAKEN).await;
                self.taken.reverse();
            }
            match self.taken.pop()? {
                Note::Answer(response) => {
                    if let Some((_, tag)) = self.waiting.remove(&(response.request_id & SEQ_MASK)) {
                        return Some((tag, Ok(response)));
                    }
                }
                Note::Ended(source) => {
                    let ended: Vec<u64> = self
                        .waiting
                        .iter()
                        .filter(|(_, (s, _))| *s == source)
                        .map(|(seq, _)| *seq)
                        .collect();
                    for seq in ended {
                        if let Some(entry) = self.waiting.remove(&seq) {
                            self.failed.push_back(entry);
                        }
                    }
                }
            }
        }
    }
}

impl<T> Drop for Pipeline<T> {
    fn drop(&mut self) {
        for attached in &self.sources {
            let lane = (attached.lane >> LANE_SHIFT) as u16;
            if let Some(routes) = attached
                .client
                .pending
                .lock()
                .expect("pending lock")
                .as_mut()
            {
                routes.close_lane(lane);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt, StreamExt};
    use prost::Message as _;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message as WsMessage;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    use super::*;
    use crate::protocol::proto::{ServerFrame, Status, WhoAmI, server_frame};

    /// What the peer does once it has read its requests.
    enum Then {
        /// Answers them, last first.
        AnswerInReverse,
        /// Closes with 4409, answering none.
        Close,
    }

    /// A WebSocket peer on a free port that reads `n` requests, then does
    /// `then`; returns its URL.
    async fn peer(n: usize, then: Then) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/v1/websocket", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let mut ids = Vec::new();
            while ids.len() < n {
                let Some(Ok(WsMessage::Binary(bytes))) = ws.next().await else {
                    return;
                };
                ids.push(ClientFrame::decode(bytes).unwrap().request_id);
            }
            match then {
                Then::AnswerInReverse => {
                    for request_id in ids.into_iter().rev() {
                        let frame = ServerFrame {
                            kind: Some(server_frame::Kind::Response(Response {
                                request_id,
                                status: Status::Ok as i32,
                                ..Response::default()
                            })),
                        };
                        let bytes = frame.encode_to_vec();
                        ws.send(WsMessage::Binary(bytes.into())).await.unwrap();
                    }
                }
                Then::Close => {
                    let close = CloseFrame {
                        code: 4409.into(),
                        reason: "displaced".into(),
                    };
                    let _ = ws.close(Some(close)).await;
                }
            }
            while let Some(Ok(_)) = ws.next().await {}
        });
        url
    }

    fn who_am_i() -> Request {
        Request::WhoAmI(WhoAmI {})
    }

    #[tokio::test]
    async fn each_answer_comes_back_with_its_tag_from_whichever_connection() {
        let (one, _e1) = Client::connect(&peer(3, Then::AnswerInReverse).await)
            .await
            .unwrap();
        let (two, _e2) = Client::connect(&peer(2, Then::AnswerInReverse).await)
            .await
            .unwrap();
        let mut pipeline = Pipeline::new();
        let (a, b) = (
            pipeline.attach(&one).unwrap(),
            pipeline.attach(&two).unwrap(),
        );
        for (source, tag) in [(a, "a1"), (b, "b1"), (a, "a2"), (b, "b2"), (a, "a3")] {
            pipeline.request(source, who_am_i(), tag).await.unwrap();
        }
        assert_eq!(pipeline.in_flight(), 5);
        let mut tags = Vec::new();
        while let Some((tag, answer)) = pipeline.next().await {
            assert_eq!(answer.unwrap().status, Status::Ok as i32);
            tags.push(tag);
        }
        // Each peer answered its own requests last first.
        let of =
            |p: char| -> Vec<&str> { tags.iter().copied().filter(|t| t.starts_with(p)).collect() };
        assert_eq!(of('a'), ["a3", "a2", "a1"]);
        assert_eq!(of('b'), ["b2", "b1"]);
        assert_eq!(pipeline.in_flight(), 0);
    }

    #[tokio::test]
    async fn what_an_ended_connection_left_unanswered_fails_and_later_requests_fail_at_once() {
        let (gone, _e1) = Client::connect(&peer(2, Then::Close).await).await.unwrap();
        let (open, _e2) = Client::connect(&peer(1, Then::AnswerInReverse).await)
            .await
            .unwrap();
        let mut pipeline = Pipeline::new();
        let (g, o) = (
            pipeline.attach(&gone).unwrap(),
            pipeline.attach(&open).unwrap(),
        );
        pipeline.request(g, who_am_i(), 1).await.unwrap();
        pipeline.request(g, who_am_i(), 2).await.unwrap();
        let mut failed = Vec::new();
        while failed.len() < 2 {
            let (tag, answer) = pipeline.next().await.unwrap();
            match answer {
                Err(ClientError::Closed { code, .. }) => {
                    assert_eq!(code, Some(4409));
                    failed.push(tag);
                }
                other => panic!("{tag}: {other:?}"),
            }
        }
        failed.sort();
        assert_eq!(failed, [1, 2]);
        assert!(matches!(
            pipeline.request(g, who_am_i(), 3).await,
            Err(ClientError::Closed {
                code: Some(4409),
                ..
            })
        ));
        assert_eq!(pipeline.in_flight(), 0);
        assert!(pipeline.next().await.is_none(), "nothing is in flight");

        // The other connection is unaffected.
        pipeline.request(o, who_am_i(), 4).await.unwrap();
        let (tag, answer) = pipeline.next().await.unwrap();
        assert_eq!((tag, answer.unwrap().status), (4, Status::Ok as i32));
        assert!(matches!(
            Pipeline::<()>::new().attach(&gone),
            Err(ClientError::Closed { .. })
        ));
    }
}
