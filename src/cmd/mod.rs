//! Requests, one file per kind. Each parses its protobuf message into a
//! validated command at the edge (`from_frame`) and carries it out
//! (`apply`). Authentication requests run before a socket is authenticated;
//! the rest run in the session, where `apply` does its synchronous part at
//! once (in frame order) and returns a future for the rest, so a connection
//! can have many requests in flight.

pub mod ack_messages;
pub mod delete_account;
pub mod fetch_bundle;
pub mod get_pre_key_count;
pub mod login;
pub mod logout;
pub mod register;
pub mod resume;
pub mod send_message;
pub mod upload_keys;
pub mod who_am_i;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::auth::Authenticated;
use crate::config::MessagingLimits;
use crate::messages::Unacked;
use crate::protocol::proto::client_frame::Request;
use crate::protocol::proto::response;
use crate::protocol::{Close, RequestError};
use crate::state::AppState;

/// A request that authenticates a socket.
pub enum AuthCommand {
    Register(register::Register),
    Login(login::Login),
    Resume(resume::Resume),
}

impl AuthCommand {
    /// `Ok(None)` when `request` is not an authentication request.
    pub fn from_frame(request: Request) -> Result<Option<Self>, RequestError> {
        Ok(Some(match request {
            Request::Register(r) => AuthCommand::Register(register::Register::from_frame(r)?),
            Request::Login(r) => AuthCommand::Login(login::Login::from_frame(r)?),
            Request::Resume(r) => AuthCommand::Resume(resume::Resume::from_frame(r)?),
            _ => return Ok(None),
        }))
    }

    pub async fn apply(
        self,
        state: &AppState,
    ) -> Result<(Authenticated, response::Result), RequestError> {
        match self {
            AuthCommand::Register(c) => c.apply(state).await,
            AuthCommand::Login(c) => c.apply(state).await,
            AuthCommand::Resume(c) => c.apply(state).await,
        }
    }
}

/// A request on an authenticated socket.
pub enum Command {
    Logout(logout::Logout),
    DeleteAccount(delete_account::DeleteAccount),
    WhoAmI(who_am_i::WhoAmI),
    UploadKeys(Box<upload_keys::UploadKeys>),
    GetPreKeyCount(get_pre_key_count::GetPreKeyCount),
    FetchBundle(fetch_bundle::FetchBundle),
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

/// The asynchronous rest of a session command.
pub type Reply = BoxFuture<'static, Result<Done, RequestError>>;

/// Answers at once.
pub fn ready(result: Result<Done, RequestError>) -> Reply {
    futures::future::ready(result).boxed()
}

/// What a session command may touch while it runs synchronously.
pub struct Ctx<'a> {
    pub state: &'a AppState,
    pub auth: &'a Authenticated,
    /// This connection's live messages awaiting ack.
    pub unacked: &'a mut Unacked,
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
            Command::SendMessage(c) => c.apply(ctx),
            Command::AckMessages(c) => c.apply(ctx),
        }
    }
}
