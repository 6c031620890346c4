//! `Register`: create a user and authenticate the socket.

use std::net::IpAddr;

use bytes::Bytes;

use crate::auth::{Authenticated, IssuedSession, Password, Username};
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};
use crate::state::AppState;

pub struct Register {
    username: Username,
    password: Password,
}

impl Register {
    pub fn from_frame(request: proto::Register) -> Result<Self, RequestError> {
        Ok(Register {
            username: Username::parse(&request.username)?,
            password: Password::parse(request.password)?,
        })
    }

    pub async fn apply(
        self,
        state: &AppState,
        from: IpAddr,
    ) -> Result<(Authenticated, response::Result), RequestError> {
        let issued = state
            .auth()
            .register(self.username, self.password, from)
            .await?;
        Ok(session_result(issued, state))
    }
}

/// The response to a successful Register or Login.
pub(crate) fn session_result(
    issued: IssuedSession,
    state: &AppState,
) -> (Authenticated, response::Result) {
    let result = response::Result::Auth(proto::AuthResult {
        user_id: Bytes::copy_from_slice(issued.auth.user_id.as_bytes()),
        username: issued.auth.username.to_string(),
        token: Bytes::copy_from_slice(issued.token.as_bytes()),
        token_expires_at_ms: issued.expires_at.timestamp_millis(),
        max_message_bytes: max_message_bytes(state),
    });
    (issued.auth, result)
}

/// The content limit as `AuthResult` states it, so clients can check a
/// message's size before encrypting it.
pub(crate) fn max_message_bytes(state: &AppState) -> u32 {
    u32::try_from(state.limits().messaging.max_message_bytes).unwrap_or(u32::MAX)
}
