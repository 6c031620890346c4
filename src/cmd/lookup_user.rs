//! `LookupUser`: who a username belongs to and whether they have published
//! keys, consuming nothing, so a client can tell "no such user" from "no
//! keys yet" before it encrypts anything, and can check the identity the
//! relay holds for its own account. Rate-limited per requester like bundle
//! fetches, since it answers the same "who exists" question.

use bytes::Bytes;

use super::{Ctx, Done, Reply, later, ready};
use crate::auth::Username;
use crate::keys;
use crate::metrics::Limit;
use crate::protocol::RequestError;
use crate::protocol::proto::{self, response};

pub struct LookupUser {
    /// Whom to look up; a name that breaks the username rules cannot exist,
    /// and is refused at the edge as at login.
    username: Username,
}

impl LookupUser {
    pub fn from_frame(request: proto::LookupUser) -> Result<Self, RequestError> {
        Ok(LookupUser {
            username: Username::parse(&request.username)?,
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let state = ctx.state.clone();
        if let Err(retry_after) = state.lookup_limiter().check(ctx.auth.user_id) {
            state.metrics().rate_limited(Limit::lookup);
            return ready(Err(RequestError::RateLimited { retry_after }));
        }
        later(async move {
            let found = keys::lookup(state.db(), &self.username).await?;
            Ok(Done::reply(response::Result::LookupUser(
                proto::LookupUserResult {
                    user_id: Bytes::copy_from_slice(found.user_id.as_bytes()),
                    username: found.username,
                    keys_published: found.identity_key.is_some(),
                    identity_key: found.identity_key.map(Bytes::from).unwrap_or_default(),
                },
            )))
        })
    }
}
