//! Idempotent sends. A message sent with a client message id has an id
//! derived from it ([`crate::envelope::message_id`]); this bounded cache remembers the
//! outcome of recent ones, including those delivered live and never stored,
//! so a retry gets the first attempt's answer instead of a second copy. A
//! retry that arrives while the first attempt is still in progress waits for
//! its outcome. Stored messages are also protected by their primary key, so
//! after a restart (cache empty) a retry is still never stored twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use uuid::Uuid;

use crate::idhash::IdHasher;

use super::Delivery;

#[derive(Debug)]
enum State {
    InProgress(watch::Receiver<Option<Delivery>>),
    Done(Delivery),
}

#[derive(Debug)]
struct Entry {
    /// Tells this entry apart from an earlier one for the same id in the
    /// eviction order.
    generation: u64,
    state: State,
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
    entries: HashMap<Uuid, Entry, IdHasher>,
    /// Insertion order, for eviction, with each entry's generation; stale
    /// items (removed or re-added ids) are skipped and compacted away.
    order: VecDeque<(Uuid, u64)>,
    /// Source of generations.
    next_generation: u64,
}

impl Inner {
    fn evict_oldest(&mut self) {
        while let Some((id, generation)) = self.order.pop_front() {
            if self
                .entries
                .get(&id)
                .is_some_and(|e| e.generation == generation)
            {
                self.entries.remove(&id);
                return;
            }
        }
    }
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
        match inner.entries.get(&id).map(|e| &e.state) {
            Some(State::Done(outcome)) => return Begin::Done(*outcome),
            Some(State::InProgress(rx)) => return Begin::InProgress(rx.clone()),
            None => {}
        }
        while inner.entries.len() >= self.capacity && !inner.order.is_empty() {
            inner.evict_oldest();
        }
        // Failed attempts leave stale ids behind in the order; keep it
        // within a constant factor of the live entries.
        if inner.order.len() > 2 * self.capacity {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(id, g)| entries.get(id).is_some_and(|e| e.generation == *g));
        }
        let (tx, rx) = watch::channel(None);
        inner.next_generation += 1;
        let generation = inner.next_generation;
        inner.entries.insert(
            id,
            Entry {
                generation,
                state: State::InProgress(rx),
            },
        );
        inner.order.push_back((id, generation));
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
                    entry.state = State::Done(outcome);
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
#[derive(Debug)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_remembered_and_failures_forgotten() {
        let dedupe = Dedupe::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let Begin::New(first) = dedupe.begin(a) else {
            panic!("new")
        };
        assert!(matches!(dedupe.begin(a), Begin::InProgress(_)));
        first.complete(Delivery::Queued);
        assert!(matches!(dedupe.begin(a), Begin::Done(Delivery::Queued)));

        let Begin::New(failed) = dedupe.begin(b) else {
            panic!("new")
        };
        drop(failed);
        assert!(
            matches!(dedupe.begin(b), Begin::New(_)),
            "a failed attempt may be retried"
        );

        // Capacity 2: with a and c remembered, a third id evicts a.
        let Begin::New(third) = dedupe.begin(c) else {
            panic!("new")
        };
        third.complete(Delivery::Delivered);
        let Begin::New(fourth) = dedupe.begin(Uuid::new_v4()) else {
            panic!("new")
        };
        fourth.complete(Delivery::Queued);
        assert!(matches!(dedupe.begin(c), Begin::Done(Delivery::Delivered)));
        assert!(matches!(dedupe.begin(a), Begin::New(_)), "oldest evicted");
    }

    #[test]
    fn failed_attempts_do_not_grow_the_order_without_bound() {
        let dedupe = Dedupe::new(4);
        for _ in 0..1000 {
            let Begin::New(attempt) = dedupe.begin(Uuid::new_v4()) else {
                panic!("new")
            };
            drop(attempt);
        }
        let inner = dedupe.inner.lock().unwrap();
        assert!(inner.order.len() <= 2 * 4 + 1, "{}", inner.order.len());
    }
}
