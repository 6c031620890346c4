//! `DeleteAccount`: with the password confirmed, delete the user; cascades
//! remove their keys, sessions and queued messages. Then close the socket.

use super::{Ctx, Done, Reply, later};
use crate::auth::Password;
use crate::protocol::{self, Close, RequestError, proto};
use crate::storage;

pub struct DeleteAccount {
    password: Password,
}

impl DeleteAccount {
    pub fn from_frame(request: proto::DeleteAccount) -> Result<Self, RequestError> {
        Ok(DeleteAccount {
            password: Password::parse(request.password)?,
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let state = ctx.state.clone();
        let (auth, peer) = (ctx.auth.clone(), ctx.peer);
        let user_id = auth.user_id;
        later(async move {
            state
                .auth()
                .confirm_password(&auth, self.password, peer)
                .await?;
            storage::users::delete(state.db(), user_id)
                .await
                .map_err(RequestError::internal)?;
            tracing::info!(%user_id, "account deleted");
            Ok(Done {
                result: protocol::empty(),
                close: Some(Close::ACCOUNT_DELETED),
            })
        })
    }
}
