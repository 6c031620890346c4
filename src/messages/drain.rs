//! Delivering stored messages to a connected recipient, oldest first.
//!
//! A [`Drain`] belongs to one connection. It reads storage in batches by
//! sequence number, never past a message that is still on its way to storage
//! (see [`Registry::drain_bound`]), and reads the next batch while the
//! connection writes the current one. When a read comes back empty and the
//! registry agrees nothing arrived meanwhile, the connection goes live and
//! the client is told the queue is empty, once per connection.

use tokio::task::JoinHandle;
use uuid::Uuid;

use super::Message;
use crate::registry::{DrainBound, Registry};
use crate::storage::messages::DrainRead;
use crate::storage::{Database, StorageError};

type Read = JoinHandle<Result<(Vec<Message>, DrainBound), StorageError>>;

#[derive(Debug)]
enum State {
    /// Nothing stored is waiting; live delivery is on.
    Live,
    /// Must read storage; waiting for the connection to flush what it had
    /// queued live first.
    Wanted,
    /// A read is in flight, queued for the storage reader, which runs every
    /// statement to the end whether or not anyone still waits for it.
    Reading(Read),
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
}

impl Drain {
    /// A drain that starts wanted: a new connection first empties its queue.
    pub fn new(
        db: Database,
        registry: Registry,
        user: Uuid,
        conn_id: u64,
        batch: usize,
        batch_bytes: usize,
    ) -> Self {
        Drain {
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
    pub fn woken(&mut self) {
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
        let db = self.db.clone();
        let (user, after, limit, byte_budget) =
            (self.user, self.cursor, self.batch, self.batch_bytes);
        self.state = State::Reading(tokio::spawn(async move {
            let read = DrainRead {
                recipient: user,
                after,
                below: bound.below,
                limit,
                byte_budget,
            };
            let rows = db.reader().drain(read).await?;
            Ok((rows, bound))
        }));
    }

    /// Waits for the read in flight, if any (pending forever otherwise, for
    /// use in `select!`), and decides the next step. A non-empty batch
    /// starts the next read at once, so reading overlaps writing.
    pub async fn step(&mut self) -> Result<Step, StorageError> {
        let State::Reading(read) = &mut self.state else {
            return std::future::pending().await;
        };
        let result = read.await;
        self.state = State::Waiting;
        let (rows, bound) = match result {
            Ok(result) => result?,
            Err(join) => {
                self.state = State::Wanted;
                return Err(StorageError::Task(join));
            }
        };
        if let Some(last) = rows.last() {
            self.cursor = self.cursor.max(last.seq);
            self.start();
            return Ok(Step::Deliver(rows));
        }
        if self
            .registry
            .try_go_live(self.user, self.conn_id, bound.generation)
        {
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
