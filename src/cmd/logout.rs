//! `Logout`: revoke this socket's session token (or, with `all`, every
//! session of the user, closing the user's other socket on this server
//! too), then close the socket.

use super::{Ctx, Done, Reply, later};
use crate::protocol::{self, Close, proto};

pub struct Logout {
    /// Revoke every session of the user, not only this socket's.
    all: bool,
}

impl Logout {
    pub fn from_frame(request: proto::Logout) -> Self {
        Logout { all: request.all }
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let state = ctx.state.clone();
        let who = ctx.auth.clone();
        let conn_id = ctx.conn_id;
        later(async move {
            if self.all {
                let revoked = state.auth().logout_all(&who).await?;
                tracing::info!(user_id = %who.user_id, revoked, "all sessions revoked");
                // One user holds one connection, but a newer one may have
                // displaced this one meanwhile: it is authenticated by a
                // token revoked now, so it goes too.
                if let Some(other) = state.relay().registry().connection(who.user_id)
                    && other.id != conn_id
                {
                    other.close(Close::SESSION_REVOKED);
                }
            } else {
                state.auth().logout(&who).await?;
            }
            Ok(Done {
                result: protocol::empty(),
                close: Some(Close::LOGGED_OUT),
            })
        })
    }
}
