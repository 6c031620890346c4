//! `Logout`: revoke this socket's session token, then close the socket.

use futures::FutureExt;

use super::{Ctx, Done, Reply};
use crate::protocol::{self, Close, proto};

pub struct Logout;

impl Logout {
    pub fn from_frame(_: proto::Logout) -> Self {
        Logout
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let auth = ctx.state.auth().clone();
        let who = ctx.auth.clone();
        async move {
            auth.logout(&who).await?;
            Ok(Done {
                result: protocol::empty(),
                close: Some(Close::LOGGED_OUT),
            })
        }
        .boxed()
    }
}
