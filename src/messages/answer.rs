//! Where the outcome of a message routed live goes: to whoever waits on a
//! oneshot, or straight into the sending session's queue of answers.
//!
//! A send is nearly always routed live, and its answer then waits for the
//! recipient's ack. Waiting on a oneshot per message cost the sender's
//! session two allocations (the oneshot, and the future's place in its set
//! of requests in flight) and a chain of three wake-ups (oneshot, set,
//! task) per message. The session instead gives the message its own queue
//! and the request's id: whoever settles the message (the recipient's ack,
//! the hand-back to storage after a timeout or a disconnect) pushes the
//! answer there, and the session writes it like any other reply.
//!
//! The rule that keeps a sender from waiting forever is unchanged: a
//! message's waiter that is dropped unanswered (its store failed, or the
//! user moved to another node first) answers `Interrupted`, which the
//! client retries. See [`super::registry::Waiter`].

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::Delivery;

/// Who hears a live message's outcome.
#[derive(Debug)]
pub enum Responder {
    /// The sending half of a oneshot whose receiver a future awaits (a unit
    /// forwarded from another node).
    Once(oneshot::Sender<Delivery>),
    /// The sender's session, which answers the request itself.
    Session(SessionReply),
}

impl Responder {
    /// Tells the outcome; `None` when the message's delivery failed.
    pub fn answer(self, outcome: Option<Delivery>) {
        match (self, outcome) {
            (Responder::Once(tx), Some(outcome)) => {
                let _ = tx.send(outcome);
            }
            // The receiver sees the sender dropped: interrupted.
            (Responder::Once(_), None) => {}
            (Responder::Session(reply), outcome) => reply.answer(outcome),
        }
    }
}

/// A session's request, answered through its [`Answers`] queue.
#[derive(Debug)]
pub struct SessionReply {
    to: mpsc::UnboundedSender<SessionAnswer>,
    request_id: u64,
    /// The message's id, which the answer carries.
    message_id: Uuid,
}

impl SessionReply {
    fn answer(self, outcome: Option<Delivery>) {
        // The session has ended: nobody is left to tell.
        let _ = self.to.send(SessionAnswer {
            request_id: self.request_id,
            message_id: self.message_id,
            outcome,
        });
    }
}

/// A send's outcome, for the session that sent it.
#[derive(Debug)]
pub struct SessionAnswer {
    /// The request to answer.
    pub request_id: u64,
    /// The message's id.
    pub message_id: Uuid,
    /// `None`: the delivery was interrupted, and the client should retry.
    pub outcome: Option<Delivery>,
}

/// A session's queue of answers to its sends routed live.
///
/// Unbounded as a channel, bounded by construction: each entry answers one
/// of the session's own requests in flight, which the session counts
/// ([`Answers::awaiting`]) under its in-flight limit, and each such request
/// is answered exactly once (settled, or its waiter dropped).
#[derive(Default)]
pub struct Answers {
    /// Made at the session's first send (before its route is known), not
    /// with the session: a tokio channel allocates its first block of
    /// slots (about 1 KiB here) when it is made, which every idle
    /// connection would hold.
    queue: Option<Queue>,
    /// Sends routed live whose answer has not been taken yet.
    awaiting: usize,
}

/// The channel behind [`Answers`].
struct Queue {
    /// Cloned into each [`SessionReply`].
    tx: mpsc::UnboundedSender<SessionAnswer>,
    /// Where the session takes its answers.
    rx: mpsc::UnboundedReceiver<SessionAnswer>,
}

impl Answers {
    /// Where the answer to request `request_id`, a send of message
    /// `message_id`, should go if the message is routed live.
    pub(super) fn reply_to(&mut self, request_id: u64, message_id: Uuid) -> SessionReply {
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            Queue { tx, rx }
        });
        SessionReply {
            to: queue.tx.clone(),
            request_id,
            message_id,
        }
    }

    /// Counts a send routed live: its answer will come through here.
    pub(super) fn expect(&mut self) {
        self.awaiting += 1;
    }

    /// Sends routed live and not answered yet.
    pub fn awaiting(&self) -> usize {
        self.awaiting
    }

    /// The next answer; pending while none is due, and for ever when
    /// nothing is awaited (so a `select!` branch on it stays quiet).
    pub async fn next(&mut self) -> SessionAnswer {
        let Some(queue) = self.queue.as_mut().filter(|_| self.awaiting > 0) else {
            return std::future::pending().await;
        };
        let answer = queue
            .rx
            .recv()
            .await
            .expect("the queue holds a sender of its own");
        self.awaiting -= 1;
        answer
    }

    /// An answer already due, if any.
    pub fn try_next(&mut self) -> Option<SessionAnswer> {
        // Every answer in the queue was counted when its send was routed
        // live; checked, so that a miscount cannot wrap the count and make
        // the session take itself for full.
        if self.awaiting == 0 {
            return None;
        }
        let answer = self.queue.as_mut()?.rx.try_recv().ok()?;
        self.awaiting -= 1;
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;

    #[test]
    fn a_session_that_never_sent_holds_no_channel() {
        let mut answers = Answers::default();
        assert!(answers.queue.is_none());
        assert!(answers.try_next().is_none());
        drop(answers.reply_to(1, Uuid::from_u128(1)));
        assert!(answers.queue.is_some(), "made for the first send");
    }

    #[test]
    fn each_reply_answers_its_request_once_and_a_dropped_one_says_interrupted() {
        let mut answers = Answers::default();
        assert!(answers.next().now_or_never().is_none(), "nothing awaited");
        let first = answers.reply_to(7, Uuid::from_u128(1));
        let second = answers.reply_to(8, Uuid::from_u128(2));
        answers.expect();
        answers.expect();
        Responder::Session(second).answer(Some(Delivery::Delivered));
        Responder::Session(first).answer(None);
        let a = answers.try_next().expect("answered");
        assert_eq!((a.request_id, a.outcome), (8, Some(Delivery::Delivered)));
        let b = answers.next().now_or_never().expect("answered");
        assert_eq!((b.request_id, b.message_id), (7, Uuid::from_u128(1)));
        assert_eq!(b.outcome, None);
        assert_eq!(answers.awaiting(), 0);
        assert!(answers.next().now_or_never().is_none());
    }
}
