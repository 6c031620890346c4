//! A typed async client for the relay: connect (ws:// or wss://) in either
//! encoding ([`ConnectOptions::encoding`]), authenticate, send requests and
//! await their responses, receive pushes.
//! The tests, the CLI and the load generator all speak to the server
//! through it; none of them handle raw frames.
//!
//! [`Client::connect`] returns a cheap-to-clone [`Client`] for requests and
//! an [`Events`] receiver for pushes. A reader task matches responses to
//! requests by id ([`routes`]); a writer task owns the socket's sending
//! half. Requests may be pipelined freely: each awaited where it was made,
//! or, for many at once, through a [`Pipeline`] that gathers their answers.

mod error;
mod pipeline;
mod reader;
mod routes;
mod transport;

use std::collections::HashMap;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Sink, SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use uuid::Uuid;

use routes::{Routes, SEQ_MASK};

use crate::protocol::ids::id_bytes;
use crate::protocol::proto::{
    self, ClientFrame, EnvelopeType, Status, client_frame::Request, response,
};

pub use crate::protocol::Encoding;
pub use error::{ClientError, TlsError, UrlError};
pub use pipeline::{Pipeline, Source};
pub use transport::ConnectOptions;

/// A push from the server.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message (including server-made RECEIPT envelopes); ack it.
    Deliver(proto::Envelope),
    /// Every stored message has been delivered.
    QueueEmpty,
    /// The server asks for more one-time pre-keys.
    PreKeysLow(proto::PreKeysLow),
}

impl Event {
    /// For RECEIPT envelopes: the id of the message that was delivered.
    pub fn receipt_for(&self) -> Option<Uuid> {
        match self {
            Event::Deliver(e) if e.r#type == EnvelopeType::Receipt as i32 => {
                Uuid::from_slice(&e.content).ok()
            }
            _ => None,
        }
    }
}

/// How the connection ended, once it has.
#[derive(Debug, Clone, Default)]
pub struct CloseInfo {
    pub code: Option<u16>,
    pub reason: String,
}

/// What an authentication request returned.
#[derive(Debug, Clone)]
pub struct AuthInfo {
    pub user_id: Uuid,
    pub username: String,
    /// Empty for `resume`.
    pub token: Vec<u8>,
    pub token_expires_at_ms: i64,
    /// The largest message content the server accepts; 0 when it does not
    /// say.
    pub max_message_bytes: u32,
}

/// How long the reader keeps the socket after the server's close frame, to
/// send the answering close frame and see the server hang up.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Who awaits each response; `None` once the connection ended, so a
/// request made after that fails at once instead of waiting forever.
type Pending = Arc<Mutex<Option<Routes>>>;

/// The request half of a connection. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    /// Frames for the writer task.
    out: mpsc::Sender<WsMessage>,
    /// How requests are written and answers read.
    encoding: Encoding,
    /// Who awaits each response, by request id.
    pending: Pending,
    /// Source of the ids of requests awaited one by one (lane 0).
    next_id: Arc<AtomicU64>,
    /// Set once the connection ends.
    closed: watch::Receiver<Option<CloseInfo>>,
    /// Response headers of the upgrade (e.g. the token issued for Basic).
    headers: Arc<HashMap<String, String>>,
}

/// The push half of a connection.
pub struct Events {
    /// Pushes in arrival order. Bounded: a consumer that stops reading
    /// stops the reader task, and so the socket (as a slow client would),
    /// once the reader has also filled its run of pushes read ahead (at
    /// most 64).
    rx: mpsc::Receiver<Event>,
    /// Pushes taken out of `rx` together, last first: taking up to
    /// [`EVENTS_TAKEN`] at once costs the queue's lock and its wake-up once
    /// for all of them.
    taken: Vec<Event>,
    /// Set once the connection ends.
    closed: watch::Receiver<Option<CloseInfo>>,
}

/// The most pushes [`Events`] takes out of its queue at once:
/// half a block of tokio's channel, about 2.5 KiB.
const EVENTS_TAKEN: usize = 16;

impl Events {
    /// The next push; `None` once the connection has ended and every push
    /// before the end was taken. Cancel-safe.
    pub async fn next(&mut self) -> Option<Event> {
        if self.taken.is_empty() {
            self.rx.recv_many(&mut self.taken, EVENTS_TAKEN).await;
            self.taken.reverse();
        }
        self.taken.pop()
    }

    /// Waits for the connection to end and says how.
    pub async fn closed(&mut self) -> CloseInfo {
        while self.next().await.is_some() {}
        wait_closed(&mut self.closed).await
    }
}

async fn wait_closed(closed: &mut watch::Receiver<Option<CloseInfo>>) -> CloseInfo {
    match closed.wait_for(Option::is_some).await {
        Ok(info) => info.clone().unwrap_or_default(),
        Err(_) => CloseInfo::default(),
    }
}

impl Client {
    /// Connects to `url` (`ws://host:port/v1/websocket` or `wss://…`).
    pub async fn connect(url: &str) -> Result<(Client, Events), ClientError> {
        Self::connect_with(url, ConnectOptions::default()).await
    }

    pub async fn connect_with(
        url: &str,
        options: ConnectOptions,
    ) -> Result<(Client, Events), ClientError> {
        let event_buffer = options.event_buffer;
        let encoding = options.encoding;
        let (ws, headers) = transport::connect(url, &options).await?;
        let (mut sink, stream) = ws.split();
        let (out, mut out_rx) = mpsc::channel::<WsMessage>(1024);
        let (events_tx, events_rx) = mpsc::channel(event_buffer.max(1));
        let (closed_tx, closed_rx) = watch::channel(None);
        let pending: Pending = Arc::new(Mutex::new(Some(Routes::default())));

        tokio::spawn(async move {
            write_batched(&mut sink, &mut out_rx).await;
            let _ = sink.close().await;
        });

        tokio::spawn(
            reader::Reader {
                stream,
                encoding,
                pending: pending.clone(),
                events: events_tx,
                closed: closed_tx,
            }
            .run(),
        );

        let client = Client {
            out,
            encoding,
            pending,
            next_id: Arc::new(AtomicU64::new(1)),
            closed: closed_rx.clone(),
            headers: Arc::new(headers),
        };
        let events = Events {
            rx: events_rx,
            taken: Vec::new(),
            closed: closed_rx,
        };
        Ok((client, events))
    }

    /// A response header of the upgrade, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// How the connection ended, if it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.closed.borrow().clone()
    }

    /// Waits for the connection to end.
    pub async fn closed(&self) -> CloseInfo {
        wait_closed(&mut self.closed.clone()).await
    }

    /// Sends a request and waits for its response, whatever its status.
    pub async fn request_raw(&self, request: Request) -> Result<proto::Response, ClientError> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed) & SEQ_MASK;
        let (tx, rx) = oneshot::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(routes) => routes.insert_once(request_id, tx),
            None => return Err(self.closed_error()),
        };
        let frame = ClientFrame {
            request_id,
            request: Some(request),
        };
        let message = match self.encode(&frame) {
            Ok(message) => message,
            Err(err) => {
                self.forget(request_id);
                return Err(err);
            }
        };
        if self.out.send(message).await.is_err() {
            self.forget(request_id);
            return Err(self.closed_error());
        }
        rx.await.map_err(|_| self.closed_error())
    }

    /// The WebSocket message carrying `frame` in this connection's encoding.
    pub fn encode(&self, frame: &ClientFrame) -> Result<WsMessage, ClientError> {
        Ok(match self.encoding {
            Encoding::Proto => WsMessage::Binary(frame.encode_to_vec().into()),
            Encoding::Json => {
                let text = serde_json::to_string(frame).map_err(ClientError::Encode)?;
                WsMessage::Text(text.into())
            }
        })
    }

    /// The encoding this connection speaks.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn forget(&self, request_id: u64) {
        if let Some(routes) = self.pending.lock().expect("pending lock").as_mut() {
            routes.forget_once(request_id);
        }
    }

    /// Sends a request; an error status becomes [`ClientError::Status`].
    pub async fn request(&self, request: Request) -> Result<Option<response::Result>, ClientError> {
        result_of(self.request_raw(request).await?)
    }

    /// Sends any WebSocket message as is (for testing the server's checks).
    pub async fn send_ws(&self, message: WsMessage) -> Result<(), ClientError> {
        self.out
            .send(message)
            .await
            .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> ClientError {
        let info = self.closed.borrow().clone().unwrap_or_default();
        ClientError::Closed {
            code: info.code,
            reason: info.reason,
        }
    }

    /// Sends a request whose answer must be of the one kind `extract`
    /// takes out of the response; any other is
    /// [`ClientError::UnexpectedResponse`].
    async fn request_as<T>(
        &self,
        request: Request,
        extract: impl FnOnce(response::Result) -> Option<T>,
    ) -> Result<T, ClientError> {
        result_as(self.request_raw(request).await?, extract)
    }

    pub async fn register(&self, username: &str, password: &str) -> Result<AuthInfo, ClientError> {
        self.authenticate(Request::Register(proto::Register {
            username: username.into(),
            password: password.into(),
        }))
        .await
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<AuthInfo, ClientError> {
        self.authenticate(Request::Login(proto::Login {
            username: username.into(),
            password: password.into(),
        }))
        .await
    }

    pub async fn resume(&self, token: &[u8]) -> Result<AuthInfo, ClientError> {
        self.authenticate(Request::Resume(proto::Resume {
            token: Bytes::copy_from_slice(token),
        }))
        .await
    }

    /// Register, login and resume all answer with the session.
    async fn authenticate(&self, request: Request) -> Result<AuthInfo, ClientError> {
        let auth = self
            .request_as(request, |r| match r {
                response::Result::Auth(a) => Some(a),
                _ => None,
            })
            .await?;
        Ok(AuthInfo {
            user_id: uuid_from(&auth.user_id)?,
            username: auth.username,
            token: auth.token.to_vec(),
            token_expires_at_ms: auth.token_expires_at_ms,
            max_message_bytes: auth.max_message_bytes,
        })
    }

    /// Revokes this socket's session token; the server then closes it.
    pub async fn logout(&self) -> Result<(), ClientError> {
        self.request(Request::Logout(proto::Logout { all: false }))
            .await?;
        Ok(())
    }

    /// Revokes every session token of the user, closing their other
    /// sockets too; the server then closes this one.
    pub async fn logout_all(&self) -> Result<(), ClientError> {
        self.request(Request::Logout(proto::Logout { all: true }))
            .await?;
        Ok(())
    }

    pub async fn delete_account(&self, password: &str) -> Result<(), ClientError> {
        self.request(Request::DeleteAccount(proto::DeleteAccount {
            password: password.into(),
        }))
        .await?;
        Ok(())
    }

    pub async fn who_am_i(&self) -> Result<proto::WhoAmIResult, ClientError> {
        self.request_as(Request::WhoAmI(proto::WhoAmI {}), |r| match r {
            response::Result::WhoAmI(r) => Some(r),
            _ => None,
        })
        .await
    }

    pub async fn upload_keys(
        &self,
        upload: proto::UploadKeys,
    ) -> Result<proto::UploadKeysResult, ClientError> {
        self.request_as(Request::UploadKeys(upload), |r| match r {
            response::Result::UploadKeys(r) => Some(r),
            _ => None,
        })
        .await
    }

    pub async fn pre_key_count(&self) -> Result<proto::PreKeyCount, ClientError> {
        self.request_as(
            Request::GetPreKeyCount(proto::GetPreKeyCount {}),
            |r| match r {
                response::Result::PreKeyCount(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    pub async fn fetch_bundle(&self, user_id: Uuid) -> Result<proto::PreKeyBundle, ClientError> {
        self.fetch_bundle_for(proto::fetch_bundle::Target::UserId(Bytes::copy_from_slice(
            user_id.as_bytes(),
        )))
        .await
    }

    pub async fn fetch_bundle_by_username(
        &self,
        username: &str,
    ) -> Result<proto::PreKeyBundle, ClientError> {
        self.fetch_bundle_for(proto::fetch_bundle::Target::Username(username.into()))
            .await
    }

    async fn fetch_bundle_for(
        &self,
        target: proto::fetch_bundle::Target,
    ) -> Result<proto::PreKeyBundle, ClientError> {
        let request = Request::FetchBundle(proto::FetchBundle {
            target: Some(target),
        });
        self.request_as(request, |r| match r {
            response::Result::Bundle(r) => Some(r),
            _ => None,
        })
        .await
    }

    /// Looks a user up by username, consuming none of their keys.
    pub async fn lookup_user(&self, username: &str) -> Result<UserInfo, ClientError> {
        let request = Request::LookupUser(proto::LookupUser {
            username: username.into(),
        });
        let found = self
            .request_as(request, |r| match r {
                response::Result::LookupUser(r) => Some(r),
                _ => None,
            })
            .await?;
        Ok(UserInfo {
            user_id: uuid_from(&found.user_id)?,
            username: found.username,
            identity_key: (found.keys_published && !found.identity_key.is_empty())
                .then(|| found.identity_key.to_vec()),
        })
    }

    /// Sends a message; see [`Outgoing`] for the options.
    pub async fn send(&self, message: Outgoing) -> Result<Sent, ClientError> {
        Sent::try_from(self.request_raw(send_request(message)).await?)
    }

    /// Acknowledges messages; returns (acked, unknown).
    pub async fn ack(&self, ids: &[Uuid]) -> Result<(Vec<Uuid>, Vec<Uuid>), ClientError> {
        let acked = Acked::try_from(self.request_raw(ack_request(ids)).await?)?;
        Ok((acked.acked, acked.unknown))
    }

    /// Starts a clean close; pending requests fail.
    pub async fn close(&self) {
        let _ = self.out.send(WsMessage::Close(None)).await;
    }
}

/// A user, as [`Client::lookup_user`] found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub user_id: Uuid,
    /// As registered.
    pub username: String,
    /// The published identity key; `None` until the user has published
    /// keys (a bundle fetch would then fail).
    pub identity_key: Option<Vec<u8>>,
}

/// A message to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub recipient: Uuid,
    pub envelope_type: EnvelopeType,
    pub content: Bytes,
    pub client_timestamp_ms: u64,
    pub ephemeral: bool,
    pub ttl_seconds: u32,
    pub client_message_id: Option<Bytes>,
}

impl Outgoing {
    /// A CIPHERTEXT message with default options.
    pub fn new(recipient: Uuid, content: impl Into<Bytes>) -> Self {
        Outgoing {
            recipient,
            envelope_type: EnvelopeType::Ciphertext,
            content: content.into(),
            client_timestamp_ms: 0,
            ephemeral: false,
            ttl_seconds: 0,
            client_message_id: None,
        }
    }
}

/// The request sending `message`.
fn send_request(message: Outgoing) -> Request {
    Request::SendMessage(proto::SendMessage {
        // Shared, not copied: prost clones a `Bytes` field to encode it.
        recipient_id: id_bytes(message.recipient),
        r#type: message.envelope_type as i32,
        content: message.content,
        client_timestamp_ms: message.client_timestamp_ms,
        ephemeral: message.ephemeral,
        ttl_seconds: message.ttl_seconds,
        client_message_id: message.client_message_id,
    })
}

/// The request acknowledging `ids`.
fn ack_request(ids: &[Uuid]) -> Request {
    // One buffer for all the ids, each a view of it: two allocations per
    // ack (the buffer, and the header its first view shares it through)
    // rather than per id.
    let all = Bytes::from(
        ids.iter()
            .flat_map(|id| *id.as_bytes())
            .collect::<Vec<u8>>(),
    );
    Request::AckMessages(proto::AckMessages {
        message_ids: (0..ids.len())
            .map(|i| all.slice(i * 16..(i + 1) * 16))
            .collect(),
    })
}

/// A response's result; an error status becomes [`ClientError::Status`].
fn result_of(response: proto::Response) -> Result<Option<response::Result>, ClientError> {
    let status = Status::try_from(response.status).unwrap_or(Status::Unspecified);
    if status == Status::Ok {
        Ok(response.result)
    } else {
        Err(ClientError::Status {
            status,
            message: response.message,
            retry_after: (response.retry_after_ms > 0)
                .then(|| Duration::from_millis(response.retry_after_ms)),
        })
    }
}

/// A response's result, which must be of the one kind `extract` takes out;
/// any other is [`ClientError::UnexpectedResponse`].
fn result_as<T>(
    response: proto::Response,
    extract: impl FnOnce(response::Result) -> Option<T>,
) -> Result<T, ClientError> {
    result_of(response)?
        .and_then(extract)
        .ok_or(ClientError::UnexpectedResponse)
}

/// The server's answer to a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub message_id: Uuid,
    pub outcome: proto::SendOutcome,
}

impl TryFrom<proto::Response> for Sent {
    type Error = ClientError;

    /// Reads the response to a send, e.g. one a [`Pipeline`] gathered.
    fn try_from(response: proto::Response) -> Result<Sent, ClientError> {
        let sent = result_as(response, |r| match r {
            response::Result::Send(r) => Some(r),
            _ => None,
        })?;
        Ok(Sent {
            message_id: uuid_from(&sent.message_id)?,
            outcome: proto::SendOutcome::try_from(sent.outcome)
                .unwrap_or(proto::SendOutcome::Unspecified),
        })
    }
}

/// The server's answer to an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    /// Ids it removed from the queue.
    pub acked: Vec<Uuid>,
    /// Ids it did not know (acked before, or never this user's).
    pub unknown: Vec<Uuid>,
}

impl TryFrom<proto::Response> for Acked {
    type Error = ClientError;

    /// Reads the response to an ack, e.g. one a [`Pipeline`] gathered.
    fn try_from(response: proto::Response) -> Result<Acked, ClientError> {
        let acks = result_as(response, |r| match r {
            response::Result::Ack(r) => Some(r),
            _ => None,
        })?;
        let parse = |ids: Vec<Bytes>| {
            ids.iter()
                .filter_map(|b| Uuid::from_slice(b).ok())
                .collect()
        };
        Ok(Acked {
            acked: parse(acks.acked),
            unknown: parse(acks.unknown),
        })
    }
}

/// An id the server sent; one that is not a UUID is a malformed answer.
fn uuid_from(bytes: &[u8]) -> Result<Uuid, ClientError> {
    Uuid::from_slice(bytes).map_err(|_| ClientError::UnexpectedResponse)
}

/// Writes what `rx` yields to `sink`, feeding whatever else is already
/// queued before each flush, so a burst costs one flush (and, with a
/// WebSocket, as few write syscalls as its write buffer allows) instead of
/// one per message. The client's writer task; public so the load generator's
/// raw clients and its baseline forwarder batch exactly alike. Returns when
/// `rx` closes or the sink fails; closing the sink is the caller's.
pub async fn write_batched<T, S>(sink: &mut S, rx: &mut mpsc::Receiver<T>)
where
    S: Sink<T> + Unpin,
{
    while let Some(first) = rx.recv().await {
        let mut result = sink.feed(first).await;
        while result.is_ok() {
            match rx.try_recv() {
                Ok(next) => result = sink.feed(next).await,
                Err(_) => break,
            }
        }
        if result.is_err() || sink.flush().await.is_err() {
            break;
        }
    }
}
