//! Live messages written to this connection and waiting for the recipient's
//! ack, oldest first. Their senders are still waiting for an answer.
//!
//! A queue in write order: clients ack in the order they received, so the
//! acked message is almost always at the front and an ack pops it. A count
//! per id answers acks of ids not waiting here (stored messages, during a
//! drain) without a scan; an out-of-order ack scans, which the caller's
//! bound on the queue's length (`max_unacked`) keeps cheap.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use tokio::time::Instant;
use uuid::Uuid;

use super::Delivery;
use super::registry::LiveDelivery;
use crate::idhash::IdHasher;
use crate::metrics::AtomicHistogram;

/// Bounded by the caller: it stops taking live messages when full.
pub struct Unacked {
    /// Deliveries with their ack deadlines, in write order; the deadlines
    /// are therefore ascending. Kept in the box they were routed in: a
    /// delivery is a few hundred bytes, which moving into the queue and out
    /// again copied twice per message.
    entries: VecDeque<(Box<LiveDelivery>, Instant)>,
    /// How many entries carry each id. Usually one; a send retried with the
    /// same client message id can be delivered again before the first copy
    /// is acked, and one ack then settles both.
    ids: HashMap<Uuid, u32, IdHasher>,
    /// Most entries before the connection stops taking live messages.
    limit: usize,
    /// Where the time from send to ack is recorded.
    delivery_seconds: AtomicHistogram,
}

impl Unacked {
    pub fn new(limit: usize, delivery_seconds: AtomicHistogram) -> Self {
        Unacked {
            entries: VecDeque::new(),
            ids: HashMap::default(),
            limit: limit.max(1),
            delivery_seconds,
        }
    }

    /// Answers the sender `Delivered` and records how long since it was
    /// sent.
    fn delivered(&self, delivery: Box<LiveDelivery>, now: Instant) {
        self.delivery_seconds
            .observe_duration(now.saturating_duration_since(delivery.routed_at));
        delivery.waiter.finish(Delivery::Delivered);
    }

    pub fn has_room(&self) -> bool {
        self.entries.len() < self.limit
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, delivery: Box<LiveDelivery>, deadline: Instant) {
        *self.ids.entry(delivery.message.id).or_default() += 1;
        self.entries.push_back((delivery, deadline));
    }

    /// Acks a live message at `now`: its sender hears `Delivered`. False if
    /// `id` is not waiting here.
    pub fn ack(&mut self, id: Uuid, now: Instant) -> bool {
        let Some(copies) = self.ids.remove(&id) else {
            return false;
        };
        if copies == 1 {
            let at = self
                .entries
                .iter()
                .position(|(delivery, _)| delivery.message.id == id)
                .expect("a counted id is queued");
            let (delivery, _) = self.entries.remove(at).expect("position is in range");
            self.delivered(delivery, now);
        } else {
            let mut kept = VecDeque::with_capacity(self.entries.len());
            for (delivery, deadline) in std::mem::take(&mut self.entries) {
                if delivery.message.id == id {
                    self.delivered(delivery, now);
                } else {
                    kept.push_back((delivery, deadline));
                }
            }
            self.entries = kept;
        }
        true
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.front().map(|(_, deadline)| *deadline)
    }

    /// Removes the deliveries whose deadline has passed.
    pub fn take_expired(&mut self, now: Instant) -> Vec<LiveDelivery> {
        let due = self
            .entries
            .iter()
            .take_while(|(_, deadline)| *deadline <= now)
            .count();
        let expired: Vec<LiveDelivery> = self.entries.drain(..due).map(|(d, _)| *d).collect();
        for delivery in &expired {
            if let Entry::Occupied(mut copies) = self.ids.entry(delivery.message.id) {
                *copies.get_mut() -= 1;
                if *copies.get() == 0 {
                    copies.remove();
                }
            }
        }
        expired
    }

    pub fn take_all(&mut self) -> Vec<LiveDelivery> {
        self.ids.clear();
        self.entries.drain(..).map(|(d, _)| *d).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::envelope::Message;
    use crate::messages::Responder;
    use crate::messages::registry::Waiter;
    use crate::metrics::Metrics;

    fn delivery(id: Uuid) -> (Box<LiveDelivery>, oneshot::Receiver<Delivery>) {
        let (responder, outcome) = oneshot::channel();
        let message = Message::for_test(id, Uuid::new_v4(), 1);
        let waiter = Waiter {
            responder: Some(Responder::Once(responder)),
            attempt: None,
        };
        (
            Box::new(LiveDelivery {
                message,
                waiter,
                routed_at: Instant::now(),
            }),
            outcome,
        )
    }

    #[test]
    fn acks_in_any_order_answer_delivered_and_unknown_ids_are_refused() {
        let metrics = Metrics::new();
        let mut unacked = Unacked::new(10, metrics.delivery_seconds.clone());
        let now = Instant::now();
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let mut outcomes = Vec::new();
        for id in &ids {
            let (d, outcome) = delivery(*id);
            unacked.insert(d, now);
            outcomes.push(outcome);
        }
        assert!(!unacked.ack(Uuid::new_v4(), now));
        assert!(unacked.ack(ids[1], now));
        assert!(!unacked.ack(ids[1], now), "an id is acked once");
        assert!(unacked.ack(ids[0], now));
        assert!(unacked.ack(ids[2], now));
        assert!(unacked.is_empty());
        assert_eq!(metrics.delivery_seconds.count(), 3, "each ack is timed");
        for mut outcome in outcomes {
            assert_eq!(outcome.try_recv().unwrap(), Delivery::Delivered);
        }
    }

    #[test]
    fn one_ack_settles_every_copy_of_a_retried_message() {
        let mut unacked = Unacked::new(10, Metrics::new().delivery_seconds.clone());
        let now = Instant::now();
        let id = Uuid::new_v4();
        let other = Uuid::new_v4();
        let (first, mut first_outcome) = delivery(id);
        let (between, _between_outcome) = delivery(other);
        let (second, mut second_outcome) = delivery(id);
        unacked.insert(first, now);
        unacked.insert(between, now);
        unacked.insert(second, now);
        assert!(unacked.ack(id, now));
        assert_eq!(first_outcome.try_recv().unwrap(), Delivery::Delivered);
        assert_eq!(second_outcome.try_recv().unwrap(), Delivery::Delivered);
        assert!(!unacked.ack(id, now));
        assert!(unacked.ack(other, now));
        assert!(unacked.is_empty());
    }

    #[test]
    fn expired_deliveries_leave_and_cannot_be_acked_here_any_more() {
        let mut unacked = Unacked::new(10, Metrics::new().delivery_seconds.clone());
        let now = Instant::now();
        let (early, late) = (Uuid::new_v4(), Uuid::new_v4());
        unacked.insert(delivery(early).0, now);
        unacked.insert(delivery(late).0, now + Duration::from_secs(5));
        assert_eq!(unacked.next_deadline(), Some(now));
        let expired = unacked.take_expired(now + Duration::from_secs(1));
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].message.id, early);
        assert!(
            !unacked.ack(early, now),
            "handed off to storage; acked there"
        );
        assert_eq!(unacked.next_deadline(), Some(now + Duration::from_secs(5)));
        assert!(unacked.ack(late, now));
    }
}
