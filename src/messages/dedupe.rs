//! Idempotent sends. A message sent with a client message id has an id
//! derived from it ([`super::message_id`]); this bounded cache remembers the
//! outcome of recent ones, including those delivered live and never stored,
//! so a retry gets the first attempt's answer instead of a second copy. A
//! retry that arrives while the first attempt is still in progress waits for
//! its outcome. Stored messages are also protected by their primary key, so
//! after a restart (cache empty) a retry is still never stored twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use super::Delivery;

#[derive(Debug)]
enum Entry {
    InProgress(watch::Receiver<Option<Delivery>>),
    Done(Delivery),
}

/// What a send with a client message id should do.
pub enum Begin {
    /// First attempt: send, then report the outcome through the guard.
    New(Attempt),
    /// A retry of a finished attempt: answer this.
    Done(Delivery),
    /// A retry of an attempt still in progress: wait on this. `None` after
    /// the wait means the first attempt failed and this one may go ahead.
    InProgress(watch::Receiver<Option<Delivery>>),
}

/// The bounded outcome cache. Cheap to clone.
///
/// Locking: one std mutex, held only for map operations, never across an
/// await.
#[derive(Clone, Debug)]
pub struct Dedupe {
    inner: Arc<Mutex<Inner>>,
    /// Most entries kept; the oldest are forgotten first.
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    /// Message id to the state of its send.
    entries: HashMap<Uuid, Entry>,
    /// Insertion order, for eviction. May hold ids already removed.
    order: VecDeque<Uuid>,
}

impl Dedupe {
    pub fn new(capacity: usize) -> Self {
        Dedupe {
            inner: Arc::default(),
            capacity: capacity.max(1),
        }
    }

    pub fn begin(&self, id: Uuid) -> Begin {
        let mut inner = self.inner.lock().expect("dedupe lock");
        match inner.entries.get(&id) {
            Some(Entry::Done(outcome)) => return Begin::Done(*outcome),
            Some(Entry::InProgress(rx)) => return Begin::InProgress(rx.clone()),
            None => {}
        }
        while inner.entries.len() >= self.capacity {
            match inner.order.pop_front() {
                Some(old) => {
                    inner.entries.remove(&old);
                }
                None => break,
            }
        }
        let (tx, rx) = watch::channel(None);
        inner.entries.insert(id, Entry::InProgress(rx));
        inner.order.push_back(id);
        Begin::New(Attempt {
            dedupe: self.clone(),
            id,
            tx: Some(tx),
        })
    }

    fn finish(&self, id: Uuid, outcome: Option<Delivery>) {
        let mut inner = self.inner.lock().expect("dedupe lock");
        match outcome {
            Some(outcome) => {
                if let Some(entry) = inner.entries.get_mut(&id) {
                    *entry = Entry::Done(outcome);
                }
            }
            None => {
                inner.entries.remove(&id);
            }
        }
    }
}

/// The first attempt of an idempotent send. Dropping it without
/// [`Attempt::complete`] forgets the attempt, so a retry can go ahead.
pub struct Attempt {
    dedupe: Dedupe,
    id: Uuid,
    tx: Option<watch::Sender<Option<Delivery>>>,
}

impl Attempt {
    pub fn complete(mut self, outcome: Delivery) {
        self.dedupe.finish(self.id, Some(outcome));
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.tx.is_some() {
            self.dedupe.finish(self.id, None);
        }
    }
}
