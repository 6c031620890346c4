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
        Ok(session_result(issued))
    }
}

/// The response to a successful Register or Login.
pub(crate) fn session_result(issued: IssuedSession) -> (Authenticated, response::Result) {
    let result = response::Result::Auth(proto::AuthResult {
        user_id: Bytes::copy_from_slice(issued.auth.user_id.as_bytes()),
        username: issued.auth.username.to_string(),
        token: Bytes::copy_from_slice(issued.token.as_bytes()),
        token_expires_at_ms: issued.expires_at.timestamp_millis(),
    });
    (issued.auth, result)
}
