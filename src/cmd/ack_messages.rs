//! `AckMessages`: the recipient confirms it has messages. Live ones answer
//! their waiting sender `delivered`; stored ones are deleted in one
//! statement, and their senders get a delivery receipt. Ids that match
//! nothing of this user's are reported back as unknown, with no effect.

use std::collections::HashSet;

use bytes::Bytes;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Ctx, Done, Reply, later, ready};
use crate::config::MessagingLimits;
use crate::idhash::IdHasher;
use crate::protocol::RequestError;
use crate::protocol::ids::{MessageId, id_bytes};
use crate::protocol::proto::{self, response};

pub struct AckMessages {
    /// Each id once, with its bytes as the request carried them: the
    /// answer echoes those (views of the received frame) for what was
    /// acked live, rather than a new copy of each.
    ids: Vec<(Uuid, Bytes)>,
}

impl AckMessages {
    pub fn from_frame(
        request: proto::AckMessages,
        limits: &MessagingLimits,
    ) -> Result<Self, RequestError> {
        if request.message_ids.is_empty() {
            return Err(RequestError::bad_request("message_ids must not be empty"));
        }
        if request.message_ids.len() > limits.max_ack_ids {
            return Err(RequestError::bad_request(format!(
                "at most {} message_ids per ack",
                limits.max_ack_ids
            )));
        }
        // Sized once, and hashed like the message path's other maps (see
        // `idhash` for why a client's ids cannot aim at it): SipHash and
        // growing from empty showed in profiles.
        let mut seen =
            HashSet::with_capacity_and_hasher(request.message_ids.len(), IdHasher::default());
        let mut ids = Vec::with_capacity(request.message_ids.len());
        for raw in request.message_ids {
            let id = MessageId::parse(&raw, "message_ids")?.0;
            if seen.insert(id) {
                ids.push((id, raw));
            }
        }
        Ok(AckMessages { ids })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let mut acked = Vec::with_capacity(self.ids.len());
        let mut stored = Vec::new();
        let now = Instant::now();
        for (id, raw) in self.ids {
            if ctx.unacked.ack(id, now) {
                acked.push(raw);
            } else {
                stored.push(id);
            }
        }
        if stored.is_empty() {
            return ready(Ok(result(acked, Vec::new())));
        }
        // What was acked live waits with them, its ids still views of the
        // received frame (holding its buffer) until the answer: bounded by
        // the ack's size, and rare, since live acks rarely mix with stored.
        let acking =
            ctx.state
                .relay()
                .ack_stored(ctx.auth.user_id, ctx.auth.username.clone(), stored);
        later(async move {
            let stored = acking.await?;
            acked.extend(stored.deleted.into_iter().map(id_bytes));
            Ok(result(
                acked,
                stored.unknown.into_iter().map(id_bytes).collect(),
            ))
        })
    }
}

fn result(acked: Vec<Bytes>, unknown: Vec<Bytes>) -> Done {
    Done::reply(response::Result::Ack(proto::AckResult { acked, unknown }))
}
