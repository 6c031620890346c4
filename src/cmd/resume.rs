//! `Resume`: authenticate with a session token. No password hashing.

use bytes::Bytes;

use crate::auth::{Authenticated, SessionToken};
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};
use crate::state::AppState;

pub struct Resume {
    token: SessionToken,
}

impl Resume {
    pub fn from_frame(request: proto::Resume) -> Result<Self, RequestError> {
        Ok(Resume {
            token: SessionToken::parse(&request.token)?,
        })
    }

    pub async fn apply(
        self,
        state: &AppState,
    ) -> Result<(Authenticated, response::Result), RequestError> {
        let auth = state.auth().resume(&self.token).await?;
        let result = response::Result::Auth(proto::AuthResult {
            user_id: Bytes::copy_from_slice(auth.user_id.as_bytes()),
            username: auth.username.to_string(),
            token: Bytes::new(),
            token_expires_at_ms: auth.expires_at.timestamp_millis(),
            max_message_bytes: super::register::max_message_bytes(state),
        });
        Ok((auth, result))
    }
}
