//! `Login`: authenticate with a password and get a new session token.

use std::net::IpAddr;

use super::register::session_result;
use crate::auth::{Authenticated, Password, Username};
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};
use crate::state::AppState;

pub struct Login {
    username: Username,
    password: Password,
}

impl Login {
    /// A name or password that breaks the rules cannot belong to anyone, but
    /// saying so would be the same "invalid credentials"; a clear
    /// `bad request` helps the honest client more and reveals nothing.
    pub fn from_frame(request: proto::Login) -> Result<Self, RequestError> {
        Ok(Login {
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
            .login(self.username, self.password, from)
            .await?;
        Ok(session_result(issued, state))
    }
}
