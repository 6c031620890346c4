//! Delivering stored messages to a connected recipient, oldest first.
//!
//! A [`Drain`] belongs to one connection. It reads storage in batches by
//! sequence number, never past a message that is still on its way to storage
//! (see [`Registry::drain_bound`]), and reads the next batch while the
//! connection writes the current one. When a read comes back empty and the
//! registry agrees nothing arrived meanwhile, the connection goes live and
//! the client is told the queue is empty, once per connection.
//!
//! The drain also owns the registry's wake-up for its user (a store
//! finished, or live delivery overflowed to storage), so the connection
//! waits on one thing, [`Drain::step`], for everything the drain does.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use uuid::Uuid;

use super::registry::{DrainBound, Registry};
use crate::envelope::Message;
use crate::storage::messages::DrainRead;
use crate::storage::{Database, StorageError};

/// A read queued for the storage reader, which runs every statement to the
/// end whether or not anyone still waits for it: dropping this future
/// (the connection ended) drops only the answer.
type Read = Pin<Box<dyn Future<Output = Result<Vec<Message>, StorageError>> + Send>>;

enum State {
    /// Nothing stored is waiting; live delivery is on.
    Live,
    /// Must read storage; waiting for the connection to flush what it had
    /// queued live first.
    Wanted,
    /// A read is in flight, bounded by what the registry allowed when it
    /// started.
    Reading(Read, DrainBound),
    /// Storage was empty but a store is in flight; waiting for it.
    Waiting,
}

/// What the connection should do after a drain step.
#[derive(Debug)]
pub enum Step {
    /// Write these, in order.
    Deliver(Vec<Message>),
    /// Caught up: tell the client its queue is empty.
    QueueEmpty,
    /// Nothing to do until woken.
    Idle,
}

/// One connection's drain. See the module docs.
pub struct Drain {
    /// Storage to read from (through its batched reader).
    db: Database,
    /// Decides when the drain may end.
    registry: Registry,
    /// The recipient.
    user: Uuid,
    /// The connection draining, so a displaced one cannot go live.
    conn_id: u64,
    /// Highest sequence number written to this connection.
    cursor: i64,
    /// Most messages per read.
    batch: i64,
    /// Most content bytes per read beyond its first message.
    batch_bytes: i64,
    state: State,
    /// Queue-empty is sent once per connection.
    announced_empty: bool,
    /// The registry's wake-up for this connection.
    wake: Arc<Notify>,
    /// Waits on `wake`. Made once and re-armed after it fires, rather than
    /// per poll, so an idle connection registers no waiter per frame.
    woken: Pin<Box<OwnedNotified>>,
}

impl Drain {
    /// A drain that starts wanted: a new connection first empties its queue.
    pub(super) fn new(
        db: Database,
        registry: Registry,
        user: Uuid,
        conn_id: u64,
        wake: Arc<Notify>,
        (batch, batch_bytes): (usize, usize),
    ) -> Self {
        Drain {
            woken: Box::pin(wake.clone().notified_owned()),
            wake,
            db,
            registry,
            user,
            conn_id,
            cursor: 0,
            batch: batch.max(1) as i64,
            batch_bytes: i64::try_from(batch_bytes).unwrap_or(i64::MAX),
            state: State::Wanted,
            announced_empty: false,
        }
    }

    /// Records that a message was written live, so the drain never reads it
    /// back if it is stored later (after an ack timeout).
    pub fn delivered_live(&mut self, seq: i64) {
        self.cursor = self.cursor.max(seq);
    }

    /// True when the connection should stop taking live messages from its
    /// queue and start a read as soon as it has written what it holds.
    pub fn wanted(&self) -> bool {
        matches!(self.state, State::Wanted)
    }

    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Live)
    }

    /// Called when the registry's wake-up fires: a store finished, or live
    /// delivery overflowed to storage.
    fn woken(&mut self) {
        match self.state {
            State::Waiting => self.state = State::Wanted,
            State::Live if self.registry.is_draining(self.user) => self.state = State::Wanted,
            _ => {}
        }
    }

    /// Starts a read. The connection calls this once its live queue is
    /// flushed, when [`Drain::wanted`] is true.
    pub fn start(&mut self) {
        let bound = self.registry.drain_bound(self.user);
        let read = DrainRead {
            recipient: self.user,
            after: self.cursor,
            below: bound.below,
            limit: self.batch,
            byte_budget: self.batch_bytes,
        };
        let reader = self.db.reader().clone();
        self.state = State::Reading(Box::pin(async move { reader.drain(read).await }), bound);
    }

    /// Waits for the read in flight or the registry's wake-up, whichever
    /// comes first, and decides the next step. A non-empty batch starts the
    /// next read at once, so reading overlaps writing. Cancel-safe: the
    /// read and the wake-up live in the drain, not in this future.
    pub async fn step(&mut self) -> Result<Step, StorageError> {
        let read = std::future::poll_fn(|cx| {
            if self.woken.as_mut().poll(cx).is_ready() {
                let wake = self.wake.clone();
                self.woken.set(wake.notified_owned());
                return std::task::Poll::Ready(None);
            }
            match &mut self.state {
                State::Reading(read, bound) => read.as_mut().poll(cx).map(|r| Some((r, *bound))),
                _ => std::task::Poll::Pending,
            }
        })
        .await;
        let Some((result, bound)) = read else {
            self.woken();
            return Ok(Step::Idle);
        };
        // Waiting until a store finishes, unless the read found more.
        self.state = State::Waiting;
        let rows = match result {
            Ok(rows) => rows,
            Err(err) => {
                self.state = State::Wanted;
                return Err(err);
            }
        };
        tracing::trace!(user_id = %self.user, after = self.cursor, below = bound.below, ids = ?rows.iter().map(|m| (m.id, m.seq)).collect::<Vec<_>>(), "drain read");
        if let Some(last) = rows.last() {
            self.cursor = self.cursor.max(last.seq);
            self.start();
            return Ok(Step::Deliver(rows));
        }
        if self
            .registry
            .try_go_live(self.user, self.conn_id, bound.generation)
        {
            tracing::trace!(user_id = %self.user, "drain caught up; live");
            self.state = State::Live;
            if !self.announced_empty {
                self.announced_empty = true;
                return Ok(Step::QueueEmpty);
            }
            return Ok(Step::Idle);
        }
        // Something is being stored, or was stored since the read began:
        // wait for the wake-up (or read again at once if it already came).
        if self.registry.drain_bound(self.user).generation != bound.generation {
            self.state = State::Wanted;
        }
        Ok(Step::Idle)
    }
}
