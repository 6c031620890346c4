//! Live messages written to this connection and waiting for the recipient's
//! ack, oldest first. Their senders are still waiting for an answer.

use indexmap::IndexMap;
use tokio::time::Instant;
use uuid::Uuid;

use crate::messages::Delivery;
use crate::registry::LiveDelivery;

/// Bounded by the caller: it stops taking live messages when full.
pub struct Unacked {
    /// Message id to the delivery and its ack deadline, in write order; the
    /// deadlines are therefore ascending.
    entries: IndexMap<Uuid, (LiveDelivery, Instant)>,
    /// Most entries before the connection stops taking live messages.
    limit: usize,
}

impl Unacked {
    pub fn new(limit: usize) -> Self {
        Unacked {
            entries: IndexMap::new(),
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
        self.entries
            .insert(delivery.message.id, (delivery, deadline));
    }

    /// Acks a live message: its sender hears `Delivered`. False if `id` is
    /// not waiting here.
    pub fn ack(&mut self, id: Uuid) -> bool {
        match self.entries.shift_remove(&id) {
            Some((delivery, _)) => {
                delivery.waiter.finish(Delivery::Delivered);
                true
            }
            None => false,
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.first().map(|(_, (_, deadline))| *deadline)
    }

    /// Removes the deliveries whose deadline has passed.
    pub fn take_expired(&mut self, now: Instant) -> Vec<LiveDelivery> {
        let due = self
            .entries
            .values()
            .take_while(|(_, deadline)| *deadline <= now)
            .count();
        self.entries.drain(..due).map(|(_, (d, _))| d).collect()
    }

    pub fn take_all(&mut self) -> Vec<LiveDelivery> {
        self.entries.drain(..).map(|(_, (d, _))| d).collect()
    }
}
