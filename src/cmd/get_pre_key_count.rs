//! `GetPreKeyCount`: how many one-time EC and one-time Kyber pre-keys the
//! user has left, so the client knows when to upload more.

use super::{Ctx, Done, Reply, later};
use crate::keys;
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};

pub struct GetPreKeyCount;

impl GetPreKeyCount {
    pub fn from_frame(_: proto::GetPreKeyCount) -> Result<Self, RequestError> {
        Ok(GetPreKeyCount)
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let state = ctx.state.clone();
        let user = ctx.auth.user_id;
        later(async move {
            let counts = keys::count(state.db(), user).await?;
            Ok(Done::reply(response::Result::PreKeyCount(
                proto::PreKeyCount {
                    one_time_pre_keys: counts.one_time,
                    kyber_pre_keys: counts.kyber,
                },
            )))
        })
    }
}
