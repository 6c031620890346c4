//! Live messages written to this connection and waiting for the recipient's
//! ack, oldest first. Their senders are still waiting for an answer.
//!
//! A plain queue in write order: clients ack in the order they received, so
//! the acked message is almost always at the front and an ack costs O(1).
//! An out-of-order ack scans, which the caller's bound on the queue's length
//! (`max_unacked`) keeps cheap; no hashing on the hot path.

use std::collections::VecDeque;

use tokio::time::Instant;
use uuid::Uuid;

use crate::messages::Delivery;
use crate::registry::LiveDelivery;

/// Bounded by the caller: it stops taking live messages when full.
pub struct Unacked {
    /// Deliveries with their ack deadlines, in write order; the deadlines
    /// are therefore ascending.
    entries: VecDeque<(LiveDelivery, Instant)>,
    /// Most entries before the connection stops taking live messages.
    limit: usize,
}

impl Unacked {
    pub fn new(limit: usize) -> Self {
        Unacked {
            entries: VecDeque::new(),
            limit: limit.max(1),
        }
    }

    pub fn has_room(&self) -> bool {
        self.entries.len() < self.limit
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn insert(&mut self, delivery: LiveDelivery, deadline: Instant) {
        self.entries.push_back((delivery, deadline));
    }

    /// Acks a live message: its sender hears `Delivered`. False if `id` is
    /// not waiting here.
    pub fn ack(&mut self, id: Uuid) -> bool {
        let Some(at) = self
            .entries
            .iter()
            .position(|(delivery, _)| delivery.message.id == id)
        else {
            return false;
        };
        let (delivery, _) = self.entries.remove(at).expect("position is in range");
        delivery.waiter.finish(Delivery::Delivered);
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
        self.entries.drain(..due).map(|(d, _)| d).collect()
    }

    pub fn take_all(&mut self) -> Vec<LiveDelivery> {
        self.entries.drain(..).map(|(d, _)| d).collect()
    }
}
