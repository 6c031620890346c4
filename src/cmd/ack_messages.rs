//! `AckMessages`: the recipient confirms it has messages. Live ones answer
//! their waiting sender `delivered`; stored ones are deleted in one
//! statement, and their senders get a delivery receipt. Ids that match
//! nothing of this user's are reported back as unknown, with no effect.

use std::collections::HashSet;

use bytes::Bytes;
use futures::FutureExt;
use uuid::Uuid;

use super::{Ctx, Done, Reply, ready};
use crate::auth::Authenticated;
use crate::config::Limits;
use crate::messages::{self, EnvelopeType, Message};
use crate::protocol::RequestError;
use crate::protocol::ids::MessageId;
use crate::protocol::proto::{self, response};
use crate::registry::Route;
use crate::state::AppState;
use crate::storage::{self, messages::Acked};

pub struct AckMessages {
    ids: Vec<Uuid>,
}

impl AckMessages {
    pub fn from_frame(request: proto::AckMessages, limits: &Limits) -> Result<Self, RequestError> {
        if request.message_ids.is_empty() {
            return Err(RequestError::bad_request("message_ids must not be empty"));
        }
        if request.message_ids.len() > limits.max_ack_ids {
            return Err(RequestError::bad_request(format!(
                "at most {} message_ids per ack",
                limits.max_ack_ids
            )));
        }
        let mut seen = HashSet::new();
        let mut ids = Vec::with_capacity(request.message_ids.len());
        for raw in &request.message_ids {
            let id = MessageId::parse(raw, "message_ids")?.0;
            if seen.insert(id) {
                ids.push(id);
            }
        }
        Ok(AckMessages { ids })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let mut acked = Vec::with_capacity(self.ids.len());
        let mut stored = Vec::new();
        for id in self.ids {
            if ctx.unacked.ack(id) {
                acked.push(id);
            } else {
                stored.push(id);
            }
        }
        if stored.is_empty() {
            return ready(Ok(result(acked, Vec::new())));
        }
        let state = ctx.state.clone();
        let acker = ctx.auth.clone();
        async move {
            let deleted = storage::messages::delete_acked(state.db(), acker.user_id, &stored)
                .await
                .map_err(RequestError::internal)?;
            let deleted_ids: HashSet<Uuid> = deleted.iter().map(|a| a.id).collect();
            let unknown = stored
                .into_iter()
                .filter(|id| !deleted_ids.contains(id))
                .collect();
            acked.extend(deleted_ids);
            send_receipts(&state, &acker, deleted).await;
            Ok(result(acked, unknown))
        }
        .boxed()
    }
}

/// Tells each sender of a stored message that it was delivered: live if
/// they are online, else as a stored RECEIPT envelope. Receipts for
/// receipts are not sent.
async fn send_receipts(state: &AppState, acker: &Authenticated, acked: Vec<Acked>) {
    let now = messages::now_ms();
    let ttl = state.limits().max_ttl().as_millis() as i64;
    let username = acker.username.clone();
    let stores = acked
        .into_iter()
        .filter(|a| a.envelope_type != EnvelopeType::Receipt.code())
        .filter_map(|a| Some((a.id, a.sender_id?)))
        .filter_map(|(original, sender)| {
            // Derived from the original id, so a repeated ack after a crash
            // cannot store a second receipt.
            let mut key = b"receipt:".to_vec();
            key.extend_from_slice(original.as_bytes());
            let id = messages::message_id(acker.user_id, Some(&key));
            let route = state.registry().route(sender, false, None, |seq| Message {
                id,
                seq,
                sender_id: Some(acker.user_id),
                sender_username: username.clone(),
                recipient_id: sender,
                envelope_type: EnvelopeType::Receipt,
                content: Bytes::copy_from_slice(original.as_bytes()),
                server_timestamp_ms: now,
                client_timestamp_ms: now,
                expires_at_ms: now.saturating_add(ttl),
                ephemeral: false,
            });
            match route {
                // The sender's connection stores it if they never ack it.
                Route::Live(_) | Route::Dropped => None,
                Route::Store(message, ticket, _) => Some((message, ticket)),
            }
        })
        .map(|(message, ticket)| async move {
            if let Err(err) = state.store().store(message, Some(ticket), None).await {
                tracing::warn!(error = %err, "storing a delivery receipt failed");
            }
        });
    futures::future::join_all(stores).await;
}

fn result(acked: Vec<Uuid>, unknown: Vec<Uuid>) -> Done {
    let bytes = |ids: Vec<Uuid>| {
        ids.into_iter()
            .map(|id| Bytes::copy_from_slice(id.as_bytes()))
            .collect()
    };
    Done::reply(response::Result::Ack(proto::AckResult {
        acked: bytes(acked),
        unknown: bytes(unknown),
    }))
}
