//! Requests, one file per kind. Each parses its protobuf message into a
//! validated command at the edge (`from_frame`) and carries it out
//! (`apply`). Authentication requests run before a socket is authenticated;
//! the rest run in the session, where `apply` does its synchronous part at
//! once (in frame order) and returns the answer, or a [`Pending`] future
//! for the rest, so a connection can have many requests in flight.

pub mod ack_messages;
pub mod delete_account;
pub mod fetch_bundle;
pub mod get_pre_key_count;
pub mod login;
pub mod logout;
pub mod lookup_user;
pub mod register;
pub mod resume;
pub mod send_message;
pub mod upload_keys;
pub mod who_am_i;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::auth::Authenticated;
use crate::config::MessagingLimits;
use crate::messages::{Answers, Unacked};
use crate::metrics::{AuthMethod, DbOp, FetchResult, Metrics};
use crate::protocol::proto;
use crate::protocol::proto::client_frame::Request;
use crate::protocol::proto::response;
use crate::protocol::{Close, RequestError};
use crate::state::AppState;
use crate::storage::StorageError;

/// A request that authenticates a socket.
pub enum AuthCommand {
    Register(register::Register),
    Login(login::Login),
    Resume(resume::Resume),
}

impl AuthCommand {
    /// How `request` tries to authenticate, and the username it names, if
    /// it is an authentication request: read before parsing, so a refused
    /// attempt is counted and logged too.
    pub fn attempt(request: &Request) -> Option<(AuthMethod, Option<&str>)> {
        match request {
            Request::Register(r) => Some((AuthMethod::register, Some(&r.username))),
            Request::Login(r) => Some((AuthMethod::login, Some(&r.username))),
            Request::Resume(_) => Some((AuthMethod::resume, None)),
            _ => None,
        }
    }

    /// `Ok(None)` when `request` is not an authentication request.
    pub fn from_frame(request: Request) -> Result<Option<Self>, RequestError> {
        Ok(Some(match request {
            Request::Register(r) => AuthCommand::Register(register::Register::from_frame(r)?),
            Request::Login(r) => AuthCommand::Login(login::Login::from_frame(r)?),
            Request::Resume(r) => AuthCommand::Resume(resume::Resume::from_frame(r)?),
            _ => return Ok(None),
        }))
    }

    /// Authenticates a socket from client address `from`.
    pub async fn apply(
        self,
        state: &AppState,
        from: IpAddr,
    ) -> Result<(Authenticated, response::Result), RequestError> {
        match self {
            AuthCommand::Register(c) => c.apply(state, from).await,
            AuthCommand::Login(c) => c.apply(state, from).await,
            AuthCommand::Resume(c) => c.apply(state).await,
        }
    }
}

/// The requests whose answers the server counts; the rest are `Other`.
/// Known from the frame before it is parsed, so a request refused as
/// invalid is counted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Send,
    Ack,
    FetchBundle,
    Other,
}

impl Counted {
    pub fn of(request: &Request) -> Self {
        match request {
            Request::SendMessage(_) => Counted::Send,
            Request::AckMessages(_) => Counted::Ack,
            Request::FetchBundle(_) => Counted::FetchBundle,
            _ => Counted::Other,
        }
    }

    /// Counts one answer: sends by outcome (an error answer is a
    /// rejection), acked ids, bundle fetches by result.
    pub fn record(self, metrics: &Metrics, outcome: &Result<Done, RequestError>) {
        // Each failure is counted once: a send's by the store writer, per
        // batch; the others here.
        if let Err(err @ RequestError::Internal(_)) = outcome
            && caused_by_storage(err)
        {
            match self {
                Counted::Send => {}
                Counted::Ack => metrics.db_error(DbOp::ack),
                Counted::FetchBundle | Counted::Other => metrics.db_error(DbOp::request),
            }
        }
        match (self, outcome) {
            (Counted::Other, _) => {}
            (Counted::Send, Ok(done)) => {
                if let response::Result::Send(sent) = &done.result {
                    match proto::SendOutcome::try_from(sent.outcome) {
                        Ok(proto::SendOutcome::Delivered) => metrics.messages_delivered.inc(),
                        Ok(proto::SendOutcome::Queued) => metrics.messages_queued.inc(),
                        Ok(proto::SendOutcome::Dropped) => metrics.messages_dropped.inc(),
                        _ => {}
                    }
                }
            }
            (Counted::Send, Err(_)) => metrics.messages_rejected.inc(),
            (Counted::Ack, Ok(done)) => {
                if let response::Result::Ack(acked) = &done.result {
                    metrics.acks.inc_by(acked.acked.len() as u64);
                }
            }
            (Counted::Ack, Err(_)) => {}
            (Counted::FetchBundle, outcome) => metrics.prekey_fetch(match outcome {
                Ok(_) => FetchResult::ok,
                Err(RequestError::NotFound(_)) => FetchResult::not_found,
                Err(RequestError::Internal(_)) => FetchResult::error,
                Err(_) => FetchResult::rejected,
            }),
        }
    }
}

/// Whether a storage error is somewhere in `err`'s chain of sources.
fn caused_by_storage(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err.is::<StorageError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A request on an authenticated socket.
pub enum Command {
    Logout(logout::Logout),
    DeleteAccount(delete_account::DeleteAccount),
    WhoAmI(who_am_i::WhoAmI),
    UploadKeys(Box<upload_keys::UploadKeys>),
    GetPreKeyCount(get_pre_key_count::GetPreKeyCount),
    FetchBundle(fetch_bundle::FetchBundle),
    LookupUser(lookup_user::LookupUser),
    SendMessage(send_message::SendMessage),
    AckMessages(ack_messages::AckMessages),
}

/// What a session command's future resolves to.
pub struct Done {
    pub result: response::Result,
    /// Close the socket after answering.
    pub close: Option<Close>,
}

impl Done {
    pub fn reply(result: response::Result) -> Self {
        Done {
            result,
            close: None,
        }
    }
}

/// What a session command answers: known at once, or later. Returned and
/// matched at once, never kept, so its size costs nothing; boxing the
/// ready answer would cost the allocation this type exists to avoid.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    Ready(Result<Done, RequestError>),
    Pending(Pending),
    /// A send routed live: its answer will come through the session's
    /// [`Answers`], which counts it.
    Routed,
}

/// The asynchronous rest of a session command, kept while the request is
/// in flight. An enum rather than one boxed future, so that a send not
/// routed live (stored, forwarded, or answered from the dedupe cache) costs
/// no second allocation; a send routed live is not kept here at all, but
/// answered through the session's [`Answers`].
pub enum Pending {
    /// A send's outcome.
    Send(send_message::Outcome),
    /// Any other work.
    Later(BoxFuture<'static, Result<Done, RequestError>>),
}

impl Future for Pending {
    type Output = Result<Done, RequestError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unpin: both variants are.
        match self.get_mut() {
            Pending::Send(outcome) => Pin::new(outcome).poll(cx),
            Pending::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// Answers at once.
pub fn ready(result: Result<Done, RequestError>) -> Reply {
    Reply::Ready(result)
}

/// Answers once `work` is done.
pub fn later(work: impl Future<Output = Result<Done, RequestError>> + Send + 'static) -> Reply {
    Reply::Pending(Pending::Later(work.boxed()))
}

/// What a session command may touch while it runs synchronously.
pub struct Ctx<'a> {
    pub state: &'a AppState,
    pub auth: &'a Authenticated,
    /// The client's address, for the limits on password checks.
    pub peer: IpAddr,
    /// This connection, told apart from the user's others (`Logout{all}`
    /// closes those).
    pub conn_id: u64,
    /// This connection's live messages awaiting ack.
    pub unacked: &'a mut Unacked,
    /// Where the answers to this connection's sends routed live arrive.
    pub answers: &'a mut Answers,
    /// The request being applied, for an answer that comes later through
    /// `answers`.
    pub request_id: u64,
}

impl Command {
    pub fn from_frame(request: Request, limits: &MessagingLimits) -> Result<Self, RequestError> {
        Ok(match request {
            Request::Register(_) | Request::Login(_) | Request::Resume(_) => {
                return Err(RequestError::bad_request(
                    "this socket is already authenticated",
                ));
            }
            Request::Logout(r) => Command::Logout(logout::Logout::from_frame(r)),
            Request::DeleteAccount(r) => {
                Command::DeleteAccount(delete_account::DeleteAccount::from_frame(r)?)
            }
            Request::WhoAmI(r) => Command::WhoAmI(who_am_i::WhoAmI::from_frame(r)),
            Request::UploadKeys(r) => {
                Command::UploadKeys(Box::new(upload_keys::UploadKeys::from_frame(r)?))
            }
            Request::GetPreKeyCount(r) => {
                Command::GetPreKeyCount(get_pre_key_count::GetPreKeyCount::from_frame(r)?)
            }
            Request::FetchBundle(r) => {
                Command::FetchBundle(fetch_bundle::FetchBundle::from_frame(r)?)
            }
            Request::LookupUser(r) => Command::LookupUser(lookup_user::LookupUser::from_frame(r)?),
            Request::SendMessage(r) => {
                Command::SendMessage(send_message::SendMessage::from_frame(r, limits)?)
            }
            Request::AckMessages(r) => {
                Command::AckMessages(ack_messages::AckMessages::from_frame(r, limits)?)
            }
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        match self {
            Command::Logout(c) => c.apply(ctx),
            Command::DeleteAccount(c) => c.apply(ctx),
            Command::WhoAmI(c) => c.apply(ctx),
            Command::UploadKeys(c) => c.apply(ctx),
            Command::GetPreKeyCount(c) => c.apply(ctx),
            Command::FetchBundle(c) => c.apply(ctx),
            Command::LookupUser(c) => c.apply(ctx),
            Command::SendMessage(c) => c.apply(ctx),
            Command::AckMessages(c) => c.apply(ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(outcome: proto::SendOutcome) -> Result<Done, RequestError> {
        Ok(Done::reply(response::Result::Send(proto::SendResult {
            message_id: Default::default(),
            outcome: outcome as i32,
        })))
    }

    /// Every answer to a send is counted once, by its outcome; an error
    /// answer is a rejection; other requests leave the send counters alone.
    #[test]
    fn answers_are_counted_by_kind_and_outcome() {
        let metrics = Metrics::new();
        Counted::Send.record(&metrics, &sent(proto::SendOutcome::Delivered));
        Counted::Send.record(&metrics, &sent(proto::SendOutcome::Queued));
        Counted::Send.record(&metrics, &sent(proto::SendOutcome::Queued));
        Counted::Send.record(&metrics, &sent(proto::SendOutcome::Dropped));
        Counted::Send.record(&metrics, &Err(RequestError::bad_request("no")));
        Counted::Other.record(&metrics, &Err(RequestError::bad_request("no")));
        assert_eq!(metrics.messages_delivered.get(), 1);
        assert_eq!(metrics.messages_queued.get(), 2);
        assert_eq!(metrics.messages_dropped.get(), 1);
        assert_eq!(metrics.messages_rejected.get(), 1);
        let acked = Ok(Done::reply(response::Result::Ack(proto::AckResult {
            acked: vec![Default::default(); 3],
            unknown: vec![Default::default()],
        })));
        Counted::Ack.record(&metrics, &acked);
        assert_eq!(metrics.acks.get(), 3, "acked ids, not unknown ones");
        let text = metrics.encode();
        Counted::FetchBundle.record(&metrics, &Err(RequestError::NotFound("x".into())));
        assert!(!text.contains(r#"relay_prekey_fetches_total{result="not_found"} 1"#));
        assert!(
            metrics
                .encode()
                .contains(r#"relay_prekey_fetches_total{result="not_found"} 1"#)
        );
    }
}
