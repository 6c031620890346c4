//! `WhoAmI`: the authenticated user's id and username.

use bytes::Bytes;

use super::{Ctx, Done, Reply, ready};
use crate::protocol::proto::{self, response};

pub struct WhoAmI;

impl WhoAmI {
    pub fn from_frame(_: proto::WhoAmI) -> Self {
        WhoAmI
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        ready(Ok(Done::reply(response::Result::WhoAmI(
            proto::WhoAmIResult {
                user_id: Bytes::copy_from_slice(ctx.auth.user_id.as_bytes()),
                username: ctx.auth.username.to_string(),
            },
        ))))
    }
}
