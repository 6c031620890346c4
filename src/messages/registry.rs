//! The connection registry: which users are online, and the one place where
//! a message's route (live or stored) is decided.
//!
//! One [`Slot`] per user who is connected or has messages on their way to
//! storage. Every decision that must be atomic with respect to connects,
//! disconnects and drains happens in one synchronous method holding that
//! user's DashMap shard lock, so the methods here never `.await` and no
//! guard escapes them.
//!
//! Ordering rule: a message goes live only if the recipient's connection is
//! past its drain and no message for them is on its way to storage;
//! otherwise it is stored. The sequence number is taken under the same lock,
//! so per-recipient sequence order is routing order.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::time::Instant;

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Delivery;
use super::answer::Responder;
use super::dedupe::Attempt;
use super::store::ToStore;
use crate::envelope::{Message, Now};
use crate::idhash::IdHasher;
use crate::protocol::{Close, proto};

/// What a connection is sent through its bounded outbound queue. Boxed so
/// an idle connection's queue costs little.
#[derive(Debug)]
pub enum Outbound {
    Deliver(Box<LiveDelivery>),
    Push(Box<proto::push::Event>),
}

/// A message routed live, and who waits to hear what became of it.
#[derive(Debug)]
pub struct LiveDelivery {
    pub message: Message,
    pub waiter: Waiter,
    /// When it was routed live: `relay_delivery_seconds` runs from here to
    /// the recipient's ack.
    pub routed_at: Instant,
}

/// Who hears a message's outcome: `Delivered` on ack, `Queued` once stored
/// after a timeout or disconnect, `Dropped` for an ephemeral message nobody
/// took. Dropping it unanswered tells the sender the delivery failed
/// (`Interrupted`, which the client retries).
#[derive(Debug, Default)]
pub struct Waiter {
    /// The sender's request, if it is still waiting.
    pub responder: Option<Responder>,
    /// The idempotency record of a send with a client message id. It
    /// travels with the message rather than with the sender's request, so a
    /// retry after the sender disconnected still finds it in progress and
    /// cannot make a second copy.
    pub attempt: Option<Attempt>,
}

impl Waiter {
    pub fn finish(mut self, outcome: Delivery) {
        if let Some(attempt) = self.attempt.take() {
            attempt.complete(outcome);
        }
        if let Some(responder) = self.responder.take() {
            responder.answer(Some(outcome));
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // The attempt first, as `finish` does: a retry woken by the
        // sender's error then finds the attempt already released.
        drop(self.attempt.take());
        if let Some(responder) = self.responder.take() {
            responder.answer(None);
        }
    }
}

/// A connection as the rest of the server sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ConnHandle {
    /// Tells this connection apart from a newer one of the same user.
    pub id: u64,
    /// The connection's bounded outbound queue.
    tx: mpsc::Sender<Outbound>,
    /// Cancelled to make the connection close with `close_reason`.
    kick: CancellationToken,
    /// Set once, before `kick` is cancelled.
    close_reason: Arc<OnceLock<Close>>,
    /// Cancelled by the connection when it has stored everything it held, so
    /// a successor may start draining.
    finished: CancellationToken,
}

/// The connection's own side of its [`ConnHandle`].
pub struct ConnEnds {
    pub rx: mpsc::Receiver<Outbound>,
    pub kick: CancellationToken,
    pub close_reason: Arc<OnceLock<Close>>,
    pub finished: CancellationToken,
}

impl ConnHandle {
    /// Asks the connection to close with `reason`.
    pub fn close(&self, reason: Close) {
        let _ = self.close_reason.set(reason);
        self.kick.cancel();
    }

    /// Resolves when the connection has handed off everything it held.
    pub async fn finished(&self) {
        self.finished.cancelled().await
    }
}

/// One user's routing state. Only touched under the shard lock.
#[derive(Debug)]
struct Slot {
    /// The user's connection, if online.
    conn: Option<ConnHandle>,
    /// True while stored messages must be delivered before anything live:
    /// from connect until the drain catches up, and after an overflow.
    draining: bool,
    /// Sequence numbers of this user's messages on their way to storage. The
    /// drain never reads past the lowest, so it cannot skip one that commits
    /// late.
    storing: BTreeSet<i64>,
    /// How many of those were routed while the user was not connected
    /// here (`ToStore::local` false: in cluster mode they go through the
    /// user's lane, which numbers them again when it places them). While
    /// any is on its way, later messages are routed the same way, behind
    /// them: routed here instead, a later message would be stored first,
    /// under an earlier number than the one the lane then gives the
    /// earlier message, and the drain would deliver them out of order.
    lane: u32,
    /// Bumped whenever a store for this user finishes, so a drain can tell
    /// that something arrived between its last read and going live.
    stored_generation: u64,
    /// Wakes the connection's drain when a store finishes or live delivery
    /// overflowed.
    wake: Arc<Notify>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            conn: None,
            draining: false,
            storing: BTreeSet::new(),
            lane: 0,
            stored_generation: 0,
            wake: Arc::new(Notify::new()),
        }
    }

    fn is_idle(&self) -> bool {
        self.conn.is_none() && self.storing.is_empty()
    }
}

/// How the registry routed a message.
// Returned once per message and matched at once: moving the stored
// variant costs less than a box per stored message would.
#[allow(clippy::large_enum_variant)]
pub enum Route {
    /// Queued on the recipient's connection; the responder given to
    /// [`Registry::route`] hears the outcome.
    Live,
    /// Must be stored; its ticket keeps the drain from passing it until the
    /// store writer drops it after the commit.
    Store(ToStore),
    /// Ephemeral and the recipient is not reachable.
    Dropped,
}

/// Marks a message on its way to storage. Dropping it (after the commit, or
/// on failure) lets the recipient's drain move past it.
#[derive(Debug)]
pub struct StoreTicket {
    registry: Registry,
    recipient: Uuid,
    seq: i64,
    /// Counted in the slot's `lane`.
    lane: bool,
}

impl Drop for StoreTicket {
    fn drop(&mut self) {
        self.registry
            .store_finished(self.recipient, self.seq, self.lane);
    }
}

/// What a drain may read: messages with `seq < below`, and the store
/// generation when it looked.
#[derive(Debug, Clone, Copy)]
pub struct DrainBound {
    pub below: i64,
    pub generation: u64,
}

/// The registry. Cheap to clone; clones share one map.
///
/// Locking: each method takes one user's shard lock (through DashMap) for
/// its whole decision and releases it before returning. Nothing awaits while
/// holding it, and no method calls another that locks the same user.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// User id to routing state.
    slots: DashMap<Uuid, Slot, IdHasher>,
    /// Source of connection ids.
    next_conn_id: AtomicU64,
    /// Source of message sequence numbers; strictly increasing, seeded at
    /// start-up above every stored one.
    next_seq: AtomicI64,
    /// Capacity of each connection's outbound queue.
    outbound_queue: usize,
}

impl Registry {
    /// `first_seq` must exceed every `seq` in storage.
    pub fn new(first_seq: i64, outbound_queue: usize) -> Self {
        Registry {
            inner: Arc::new(Inner {
                slots: DashMap::with_hasher(IdHasher::default()),
                next_conn_id: AtomicU64::new(1),
                next_seq: AtomicI64::new(first_seq),
                outbound_queue: outbound_queue.max(1),
            }),
        }
    }

    /// The next sequence number: above every one handed out before, and
    /// never below the wall clock in nanoseconds. The clock part is what
    /// keeps one sender's messages in order when they move between cluster
    /// nodes, each numbering on its own: a message sent through a second
    /// node after the first confirmed one is numbered later, as long as
    /// the nodes' clocks differ by less than the time a client takes to
    /// reconnect. (On one node it only costs a clock read.)
    pub(super) fn next_seq(&self) -> i64 {
        self.next_seq_at(crate::envelope::now_ns())
    }

    /// [`Registry::next_seq`] with the wall clock already read.
    fn next_seq_at(&self, now: i64) -> i64 {
        let seq = &self.inner.next_seq;
        seq.fetch_max(now, Ordering::Relaxed);
        seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Numbers everything from now on above `seq`: what a node taking over
    /// a user does with the highest sequence number stored for them, so
    /// its messages come after what other nodes stored.
    pub fn raise_seq(&self, seq: i64) {
        self.inner
            .next_seq
            .fetch_max(seq.saturating_add(1), Ordering::Relaxed);
    }

    /// Makes a handle for a new connection of some user, and its own ends.
    pub fn new_connection(&self) -> (ConnHandle, ConnEnds) {
        let (tx, rx) = mpsc::channel(self.inner.outbound_queue);
        let kick = CancellationToken::new();
        let close_reason = Arc::new(OnceLock::new());
        let finished = CancellationToken::new();
        let handle = ConnHandle {
            id: self.inner.next_conn_id.fetch_add(1, Ordering::Relaxed),
            tx,
            kick: kick.clone(),
            close_reason: close_reason.clone(),
            finished: finished.clone(),
        };
        let ends = ConnEnds {
            rx,
            kick,
            close_reason,
            finished,
        };
        (handle, ends)
    }

    /// Makes `handle` the user's connection, in draining mode. Returns the
    /// connection it displaces, which the caller must close and wait for,
    /// and the notifier that wakes the new connection's drain.
    pub fn connect(&self, user: Uuid, handle: ConnHandle) -> (Option<ConnHandle>, Arc<Notify>) {
        let mut slot = self.inner.slots.entry(user).or_insert_with(Slot::new);
        let old = slot.conn.replace(handle);
        slot.draining = true;
        // A fresh notifier: a displaced connection still running must not
        // consume the new one's wake-ups.
        slot.wake = Arc::new(Notify::new());
        (old, slot.wake.clone())
    }

    /// Starts closing `conn_id`: from now on the user's messages go to
    /// storage, behind whatever the connection still holds, while it stays
    /// registered. A successor that connects meanwhile displaces it and so
    /// waits for it to hand off what it held before draining.
    pub fn closing(&self, user: Uuid, conn_id: u64) {
        if let Some(mut slot) = self.inner.slots.get_mut(&user)
            && slot.conn.as_ref().is_some_and(|c| c.id == conn_id)
        {
            slot.draining = true;
        }
    }

    /// Switches the user to storage for `conn_id`, whose recipient stopped
    /// reading, and takes every live message queued on the connection
    /// (`rx`, its own queue), each non-ephemeral one with a ticket marking
    /// it on its way to storage. As after an overflow, everything from now
    /// on is stored until the connection has drained; the tickets keep that
    /// drain from reading past a taken message before it commits, since
    /// those are ahead of what it has delivered. Queued pushes are dropped:
    /// they are advisory, as when the queue is full.
    ///
    /// One decision under the user's lock, which every route to the user
    /// takes too: nothing can be queued live between emptying the queue and
    /// the switch, and any drain bound taken after it sees every ticket.
    pub fn divert(
        &self,
        user: Uuid,
        conn_id: u64,
        rx: &mut mpsc::Receiver<Outbound>,
    ) -> Vec<(LiveDelivery, Option<StoreTicket>)> {
        let mut slot = self.inner.slots.entry(user).or_insert_with(Slot::new);
        if slot.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            slot.draining = true;
            slot.wake.notify_one();
        }
        let mut taken = Vec::new();
        while let Ok(item) = rx.try_recv() {
            let Outbound::Deliver(delivery) = item else {
                continue;
            };
            let ticket = (!delivery.message.ephemeral).then(|| {
                slot.storing.insert(delivery.message.seq);
                StoreTicket {
                    registry: self.clone(),
                    recipient: user,
                    seq: delivery.message.seq,
                    lane: false,
                }
            });
            taken.push((*delivery, ticket));
        }
        taken
    }

    /// Removes the user's connection if it is still `conn_id`. After this
    /// returns, nothing new is routed to that connection.
    pub fn disconnect(&self, user: Uuid, conn_id: u64) {
        if let Some(mut slot) = self.inner.slots.get_mut(&user)
            && slot.conn.as_ref().is_some_and(|c| c.id == conn_id)
        {
            slot.conn = None;
        }
        self.inner.slots.remove_if(&user, |_, slot| slot.is_idle());
    }

    /// The user's current connection, if online.
    pub fn connection(&self, user: Uuid) -> Option<ConnHandle> {
        self.inner.slots.get(&user).and_then(|s| s.conn.clone())
    }

    pub fn is_online(&self, user: Uuid) -> bool {
        self.connection(user).is_some()
    }

    /// Accepts a message for `recipient`: assigns its sequence number and
    /// decides its route, atomically with respect to connects and drains.
    /// `build` makes the message from its sequence number; `responder`, if
    /// any, hears the outcome of a message routed live (for other routes it
    /// is dropped unanswered: the caller learns the outcome from the route).
    pub fn route(
        &self,
        recipient: Uuid,
        ephemeral: bool,
        attempt: Option<Attempt>,
        responder: Option<Responder>,
        build: impl FnOnce(i64) -> Message,
    ) -> Route {
        self.route_at(Now::read(), recipient, ephemeral, attempt, responder, build)
    }

    /// [`Registry::route`] with the clocks already read.
    pub fn route_at(
        &self,
        now: Now,
        recipient: Uuid,
        ephemeral: bool,
        mut attempt: Option<Attempt>,
        responder: Option<Responder>,
        build: impl FnOnce(i64) -> Message,
    ) -> Route {
        if ephemeral {
            return self.route_ephemeral(now, recipient, attempt, responder, build);
        }
        let mut slot = self.inner.slots.entry(recipient).or_insert_with(Slot::new);
        let seq = self.next_seq_at(now.wall_ns);
        let mut message = build(seq);
        if slot.conn.is_some() && !slot.draining && slot.storing.is_empty() {
            let live = Box::new(LiveDelivery {
                message,
                waiter: Waiter { responder, attempt },
                routed_at: now.instant,
            });
            let conn = slot.conn.as_ref().expect("checked above");
            match conn.tx.try_send(Outbound::Deliver(live)) {
                Ok(()) => return Route::Live,
                Err(refused) => {
                    let Outbound::Deliver(mut live) = refused.into_inner() else {
                        unreachable!("try_send hands back the item it was given")
                    };
                    // The recipient is not keeping up (or is closing).
                    // Everything from here on goes through storage, behind
                    // what is already queued, until the connection drains it.
                    // The store's outcome is the caller's to hear, so the
                    // responder leaves unanswered.
                    drop(live.waiter.responder.take());
                    attempt = live.waiter.attempt.take();
                    message = live.message;
                    slot.draining = true;
                    slot.wake.notify_one();
                }
            }
        }
        slot.storing.insert(seq);
        let lane = slot.conn.is_none() || slot.lane > 0;
        slot.lane += u32::from(lane);
        let ticket = StoreTicket {
            registry: self.clone(),
            recipient,
            seq,
            lane,
        };
        Route::Store(ToStore {
            message,
            ticket: Some(ticket),
            attempt,
            local: !lane,
        })
    }

    fn route_ephemeral(
        &self,
        now: Now,
        recipient: Uuid,
        attempt: Option<Attempt>,
        responder: Option<Responder>,
        build: impl FnOnce(i64) -> Message,
    ) -> Route {
        let slot = self.inner.slots.get(&recipient);
        let Some(conn) = slot.as_ref().and_then(|s| s.conn.as_ref()) else {
            if let Some(attempt) = attempt {
                attempt.complete(Delivery::Dropped);
            }
            return Route::Dropped;
        };
        // Ephemeral messages (typing indicators) skip the queue order: they
        // are never stored, so there is nothing to wait behind.
        let seq = self.next_seq_at(now.wall_ns);
        let live = Box::new(LiveDelivery {
            message: build(seq),
            waiter: Waiter { responder, attempt },
            routed_at: now.instant,
        });
        match conn.tx.try_send(Outbound::Deliver(live)) {
            Ok(()) => Route::Live,
            Err(refused) => {
                if let Outbound::Deliver(mut live) = refused.into_inner() {
                    // `Dropped` is the route's answer, not the responder's.
                    drop(live.waiter.responder.take());
                    live.waiter.finish(Delivery::Dropped);
                }
                Route::Dropped
            }
        }
    }

    /// Pushes an event to the user if online and their queue has room.
    /// Advisory events are dropped rather than waited for.
    pub fn push(&self, user: Uuid, event: proto::push::Event) -> bool {
        match self.inner.slots.get(&user).and_then(|s| s.conn.clone()) {
            Some(conn) => conn.tx.try_send(Outbound::Push(Box::new(event))).is_ok(),
            None => false,
        }
    }

    /// What a drain may read now: only sequence numbers already allocated,
    /// and none at or past a message still on its way to storage. Reading
    /// past either could move the drain's cursor beyond a message that
    /// commits later. Taken under the user's lock, so every sequence number
    /// the user gets from now on is at or above `below`.
    pub fn drain_bound(&self, user: Uuid) -> DrainBound {
        let slot = self.inner.slots.get(&user);
        let next = self.inner.next_seq.load(Ordering::Relaxed);
        match slot {
            Some(slot) => DrainBound {
                below: slot.storing.first().copied().unwrap_or(next),
                generation: slot.stored_generation,
            },
            None => DrainBound {
                below: next,
                generation: 0,
            },
        }
    }

    /// Whether the user's connection must (again) drain storage.
    pub fn is_draining(&self, user: Uuid) -> bool {
        self.inner.slots.get(&user).is_some_and(|s| s.draining)
    }

    /// Ends the drain of `conn_id` if storage holds nothing it has not read:
    /// no store in flight and none finished since `generation`.
    pub fn try_go_live(&self, user: Uuid, conn_id: u64, generation: u64) -> bool {
        let Some(mut slot) = self.inner.slots.get_mut(&user) else {
            return false;
        };
        let mine = slot.conn.as_ref().is_some_and(|c| c.id == conn_id);
        if mine && slot.storing.is_empty() && slot.stored_generation == generation {
            slot.draining = false;
            true
        } else {
            false
        }
    }

    fn store_finished(&self, user: Uuid, seq: i64, lane: bool) {
        if let Some(mut slot) = self.inner.slots.get_mut(&user) {
            slot.storing.remove(&seq);
            slot.lane -= u32::from(lane);
            slot.stored_generation += 1;
            slot.wake.notify_one();
        }
        self.inner.slots.remove_if(&user, |_, slot| slot.is_idle());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Answers;

    fn message(recipient: Uuid, seq: i64) -> Message {
        Message::for_test(Uuid::new_v4(), recipient, seq)
    }

    #[test]
    fn the_drain_never_reads_past_a_message_on_its_way_to_storage() {
        let registry = Registry::new(100, 8);
        let user = Uuid::new_v4();
        // Offline: stored, with a ticket.
        let Route::Store(first) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("offline messages are stored")
        };
        let Route::Store(later) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("stored")
        };
        let (first, ticket) = (first.message, first.ticket);
        assert!(later.message.seq > first.seq);
        assert_eq!(registry.drain_bound(user).below, first.seq);
        drop(ticket);
        assert_eq!(registry.drain_bound(user).below, later.message.seq);
        let later_seq = later.message.seq;
        drop(later);
        // Nothing in flight: the bound is past everything allocated, and a
        // read cannot cover one allocated after it.
        let below = registry.drain_bound(user).below;
        assert!(below > later_seq);
        assert!(registry.next_seq() >= below);
        assert_eq!(
            registry.drain_bound(user).generation,
            0,
            "slot removed once idle"
        );
    }

    /// A message routed while the user was elsewhere goes through the lane
    /// (in cluster mode), and every later one follows it there until it is
    /// placed, even once the user is connected here: the lane numbers its
    /// messages when it places them, so one routed here meanwhile would be
    /// numbered, and drained, first.
    #[test]
    fn messages_follow_one_on_its_way_through_the_lane() {
        let registry = Registry::new(100, 8);
        let user = Uuid::new_v4();
        let Route::Store(first) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("offline messages are stored")
        };
        assert!(!first.local, "not connected here: the lane");
        let (handle, _ends) = registry.new_connection();
        registry.connect(user, handle.clone());
        let Route::Store(second) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("stored while draining")
        };
        assert!(!second.local, "connected now, but behind the first");
        drop(first);
        let Route::Store(third) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("stored while draining")
        };
        assert!(!third.local, "still behind the second");
        drop((second, third));
        let Route::Store(fourth) = registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("stored while draining")
        };
        assert!(fourth.local, "the lane is empty: stored here");
    }

    #[test]
    fn live_only_after_the_drain_and_behind_stores() {
        let registry = Registry::new(1, 8);
        let user = Uuid::new_v4();
        let (handle, mut ends) = registry.new_connection();
        let (displaced, _wake) = registry.connect(user, handle.clone());
        assert!(displaced.is_none());
        // Draining: stored.
        let Route::Store(ToStore { ticket, .. }) =
            registry.route(user, false, None, None, |s| message(user, s))
        else {
            panic!("stored while draining")
        };
        let bound = registry.drain_bound(user);
        assert!(
            !registry.try_go_live(user, handle.id, bound.generation),
            "a store is in flight"
        );
        drop(ticket);
        assert!(
            !registry.try_go_live(user, handle.id, bound.generation),
            "one finished since"
        );
        let bound = registry.drain_bound(user);
        assert!(registry.try_go_live(user, handle.id, bound.generation));
        assert!(matches!(
            registry.route(user, false, None, None, |s| message(user, s)),
            Route::Live
        ));
        assert!(ends.rx.try_recv().is_ok());
    }

    #[test]
    fn overflow_switches_to_storage_until_drained() {
        let registry = Registry::new(1, 1);
        let user = Uuid::new_v4();
        let (handle, _ends) = registry.new_connection();
        registry.connect(user, handle.clone());
        let bound = registry.drain_bound(user);
        assert!(registry.try_go_live(user, handle.id, bound.generation));
        assert!(matches!(
            registry.route(user, false, None, None, |s| message(user, s)),
            Route::Live
        ));
        // The queue (capacity 1) is full: this one and every later one is stored.
        assert!(matches!(
            registry.route(user, false, None, None, |s| message(user, s)),
            Route::Store(..)
        ));
        assert!(registry.is_draining(user));
        assert!(matches!(
            registry.route(user, false, None, None, |s| message(user, s)),
            Route::Store(..)
        ));
    }

    /// The rule for a send's responder: it hears the outcome of a message
    /// routed live exactly once (settled, or `Interrupted` when the message
    /// is dropped unanswered), and nothing when the message is routed
    /// otherwise, whose outcome the route itself tells.
    #[test]
    fn a_responder_hears_only_messages_routed_live_and_each_once() {
        let registry = Registry::new(1, 2);
        let user = Uuid::new_v4();
        let mut answers = Answers::default();
        let route = |request_id: u64, ephemeral: bool, answers: &mut Answers| {
            let reply = answers.reply_to(request_id, Uuid::from_u128(request_id.into()));
            let responder = Some(Responder::Session(reply));
            registry.route(user, ephemeral, None, responder, |s| message(user, s))
        };
        // Offline: stored, and dropped unanswered.
        assert!(matches!(route(1, false, &mut answers), Route::Store(..)));
        assert!(matches!(route(2, true, &mut answers), Route::Dropped));
        let (handle, mut ends) = registry.new_connection();
        registry.connect(user, handle.clone());
        let bound = registry.drain_bound(user);
        assert!(registry.try_go_live(user, handle.id, bound.generation));
        assert!(matches!(route(3, false, &mut answers), Route::Live));
        assert!(matches!(route(4, true, &mut answers), Route::Live));
        // The queue (capacity 2) is full: routed to storage, or dropped.
        assert!(matches!(route(5, true, &mut answers), Route::Dropped));
        assert!(matches!(route(6, false, &mut answers), Route::Store(..)));
        answers.expect();
        answers.expect();
        let Ok(Outbound::Deliver(settled)) = ends.rx.try_recv() else {
            panic!("routed live")
        };
        settled.waiter.finish(Delivery::Delivered);
        drop(ends.rx.try_recv().expect("routed live"));
        let first = answers.try_next().expect("settled");
        assert_eq!(
            (first.request_id, first.outcome),
            (3, Some(Delivery::Delivered))
        );
        let second = answers.try_next().expect("dropped unanswered");
        assert_eq!((second.request_id, second.outcome), (4, None));
        assert!(answers.try_next().is_none(), "nothing else was answered");
    }

    #[test]
    fn a_closing_connection_stays_registered_but_takes_nothing_live() {
        let registry = Registry::new(1, 8);
        let user = Uuid::new_v4();
        let (old, _old_ends) = registry.new_connection();
        registry.connect(user, old.clone());
        let bound = registry.drain_bound(user);
        assert!(registry.try_go_live(user, old.id, bound.generation));
        registry.closing(user, old.id);
        assert!(matches!(
            registry.route(user, false, None, None, |s| message(user, s)),
            Route::Store(..)
        ));
        // A successor displaces it (and so waits for it) rather than finding
        // an empty slot.
        let (new, _new_ends) = registry.new_connection();
        let (displaced, _) = registry.connect(user, new.clone());
        assert_eq!(displaced.map(|c| c.id), Some(old.id));
        registry.disconnect(user, old.id);
        assert_eq!(
            registry.connection(user).map(|c| c.id),
            Some(new.id),
            "the old id no longer matches"
        );
    }

    #[test]
    fn a_diverted_connection_takes_nothing_live_and_its_drain_waits_for_the_diverted() {
        let registry = Registry::new(1, 8);
        let user = Uuid::new_v4();
        let (handle, mut ends) = registry.new_connection();
        registry.connect(user, handle.clone());
        let bound = registry.drain_bound(user);
        assert!(registry.try_go_live(user, handle.id, bound.generation));
        for _ in 0..2 {
            assert!(matches!(
                registry.route(user, false, None, None, |s| message(user, s)),
                Route::Live
            ));
        }
        let ephemeral = |seq| Message {
            ephemeral: true,
            ..message(user, seq)
        };
        assert!(matches!(
            registry.route(user, true, None, None, ephemeral),
            Route::Live
        ));
        assert!(registry.push(user, proto::push::Event::QueueEmpty(Default::default())));
        let taken = registry.divert(user, handle.id, &mut ends.rx);
        assert_eq!(taken.len(), 3, "every delivery, and no push");
        assert!(ends.rx.try_recv().is_err(), "the queue is empty");
        let tickets: Vec<bool> = taken.iter().map(|(_, t)| t.is_some()).collect();
        assert_eq!(
            tickets,
            [true, true, false],
            "ephemeral ones are not stored"
        );
        assert!(registry.is_draining(user));
        assert!(
            matches!(
                registry.route(user, false, None, None, |s| message(user, s)),
                Route::Store(..)
            ),
            "everything new is stored"
        );
        let first = taken[0].0.message.seq;
        assert_eq!(registry.drain_bound(user).below, first);
        let bound = registry.drain_bound(user);
        assert!(!registry.try_go_live(user, handle.id, bound.generation));
        drop(taken);
        assert!(registry.drain_bound(user).below > first + 2);
    }

    #[test]
    fn ephemeral_messages_are_dropped_for_offline_users() {
        let registry = Registry::new(1, 8);
        let user = Uuid::new_v4();
        assert!(matches!(
            registry.route(user, true, None, None, |s| message(user, s)),
            Route::Dropped
        ));
        assert!(!registry.is_online(user));
    }
}
