//! `SendMessage`: accept an encrypted message and route it, live or stored.
//! The answer waits for the outcome: `delivered` once the recipient acked,
//! `queued` once it is committed, `dropped` for an ephemeral message nobody
//! could take.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use uuid::Uuid;

use super::{Ctx, Done, Pending, Reply, ready};
use crate::config::MessagingLimits;
use crate::envelope::{EnvelopeType, Now};
use crate::messages::{Delivery, MessagingError, Outgoing, Sending, SessionAnswer};
use crate::metrics::Limit;
use crate::protocol::RequestError;
use crate::protocol::ids::{UserId, id_bytes};
use crate::protocol::proto::{self, response};

/// Longest client message id accepted.
pub const MAX_CLIENT_MESSAGE_ID: usize = 64;

pub struct SendMessage {
    recipient: UserId,
    envelope_type: EnvelopeType,
    content: Bytes,
    client_timestamp_ms: i64,
    ephemeral: bool,
    ttl_ms: i64,
    client_message_id: Option<Bytes>,
}

impl SendMessage {
    pub fn from_frame(
        request: proto::SendMessage,
        limits: &MessagingLimits,
    ) -> Result<Self, RequestError> {
        let recipient = UserId::parse(&request.recipient_id, "recipient_id")?;
        let envelope_type = EnvelopeType::from_client(request.r#type).ok_or_else(|| {
            RequestError::bad_request(format!(
                "type must be CIPHERTEXT (1), PREKEY_BUNDLE (3) or PLAINTEXT_CONTENT (8), got {}",
                request.r#type
            ))
        })?;
        if request.content.is_empty() {
            return Err(RequestError::bad_request("content must not be empty"));
        }
        if request.content.len() > limits.max_message_bytes {
            return Err(RequestError::PayloadTooLarge(format!(
                "content is {} bytes; the limit is {}",
                request.content.len(),
                limits.max_message_bytes
            )));
        }
        if let Some(id) = &request.client_message_id
            && (id.is_empty() || id.len() > MAX_CLIENT_MESSAGE_ID)
        {
            return Err(RequestError::bad_request(format!(
                "client_message_id must be 1 to {MAX_CLIENT_MESSAGE_ID} bytes"
            )));
        }
        let max_ttl = limits.max_ttl().as_millis() as i64;
        let ttl_ms = match request.ttl_seconds {
            0 => max_ttl,
            secs => (i64::from(secs) * 1000).min(max_ttl),
        };
        Ok(SendMessage {
            recipient,
            envelope_type,
            content: own_small(request.content),
            client_timestamp_ms: i64::try_from(request.client_timestamp_ms).unwrap_or(i64::MAX),
            ephemeral: request.ephemeral,
            ttl_ms,
            client_message_id: request.client_message_id,
        })
    }

    pub fn apply(self, ctx: &mut Ctx<'_>) -> Reply {
        let sender = ctx.auth.user_id;
        let now = Now::read();
        if let Err(retry_after) = ctx
            .state
            .send_limiter()
            // tokio's clock is std's outside tests with paused time.
            .check_at(sender, now.instant.into_std())
        {
            ctx.state.metrics().rate_limited(Limit::send);
            return ready(Err(RequestError::RateLimited { retry_after }));
        }
        let outgoing = Outgoing {
            sender_id: sender,
            sender_username: ctx.auth.username.clone(),
            recipient: self.recipient.0,
            envelope_type: self.envelope_type,
            content: self.content,
            client_timestamp_ms: self.client_timestamp_ms,
            ephemeral: self.ephemeral,
            ttl_ms: self.ttl_ms,
            client_message_id: self.client_message_id,
        };
        match ctx
            .state
            .relay()
            .send(outgoing, ctx.answers, ctx.request_id, now)
        {
            (_, None) => Reply::Routed,
            (id, Some(sending)) => Reply::Pending(Pending::Send(Outcome { id, sending })),
        }
    }
}

/// Content up to this size is copied out of the frame it arrived in.
const COPY_CONTENT_BELOW: usize = 4096;

/// `content` in an allocation of its own if it is small. Decoded, it is a
/// slice of the WebSocket reader's buffer, and the message keeps it until
/// the recipient acks: a read buffer still shared cannot be reused, so the
/// reader allocates a new one (and promotes it to shared) for the next
/// frame, two allocations and a copy per message read. One allocation and
/// a copy of a small message is cheaper; a large message's frame had a
/// buffer of its own size anyway.
fn own_small(content: Bytes) -> Bytes {
    if content.len() < COPY_CONTENT_BELOW {
        Bytes::copy_from_slice(&content)
    } else {
        content
    }
}

/// A send's answer, once its outcome is known.
pub struct Outcome {
    /// The message's id, which the answer carries.
    id: Uuid,
    sending: Sending,
}

impl Future for Outcome {
    type Output = Result<Done, RequestError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        Pin::new(&mut this.sending)
            .poll(cx)
            .map(|outcome| answer(this.id, outcome))
    }
}

/// The answer to a send of message `id`, from its outcome.
pub fn answer(id: Uuid, outcome: Result<Delivery, MessagingError>) -> Result<Done, RequestError> {
    Ok(Done::reply(response::Result::Send(proto::SendResult {
        message_id: id_bytes(id),
        outcome: outcome?.to_proto() as i32,
    })))
}

/// The answer to a send routed live, from what its session heard.
pub fn answer_routed(routed: SessionAnswer) -> Result<Done, RequestError> {
    let outcome = routed.outcome.ok_or(MessagingError::Interrupted);
    answer(routed.message_id, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `part` points into `whole`'s bytes.
    fn inside(part: &Bytes, whole: &Bytes) -> bool {
        whole.as_ptr_range().contains(&part.as_ptr())
    }

    #[test]
    fn small_contents_leave_the_frame_and_large_ones_stay_in_it() {
        let frame = Bytes::from(vec![7u8; 2 * COPY_CONTENT_BELOW]);
        let small = own_small(frame.slice(10..10 + COPY_CONTENT_BELOW - 1));
        assert!(!inside(&small, &frame), "a small content is copied out");
        assert_eq!(small, vec![7u8; COPY_CONTENT_BELOW - 1]);
        let large = own_small(frame.slice(10..10 + COPY_CONTENT_BELOW));
        assert!(inside(&large, &frame), "a large content stays a view");
    }
}
