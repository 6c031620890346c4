//! The store writer: the single way messages reach PostgreSQL.
//!
//! Senders hand a [`ToStore`] to storage's batch workers, so concurrent
//! senders share one statement and one fsync. A message's [`StoreTicket`]
//! is released only after its commit, which is what lets the recipient's
//! drain know it is safe to read past it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::Delivery;
use super::dedupe::Attempt;
use super::registry::StoreTicket;
use crate::config::MessagingLimits;
use crate::envelope::Message;
use crate::metrics::{DbOp, Metrics};
use crate::storage::StorageError;
use crate::storage::batch::{self, Batch, Conn, Source, WorkerLimits, Workers};
use crate::storage::messages::{self as queries, Stored};

/// A message on its way to storage, with what must happen once it is
/// committed. The registry makes it when it routes a message to storage;
/// the writer takes it as it is.
#[derive(Debug)]
pub struct ToStore {
    pub message: Message,
    /// Held until the commit; see the module docs. `None` for a message
    /// the recipient's drain has passed already (written live, then handed
    /// back unacked) or whose connection holds its successor's drain back
    /// itself (everything it held when it ended).
    pub ticket: Option<StoreTicket>,
    /// Completed as `Queued` once the message is stored.
    pub attempt: Option<Attempt>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store writer has shut down")]
    Closed(#[from] batch::Closed),
    #[error("the store writer dropped the message")]
    Dropped,
    #[error("storing the message failed")]
    Storage(#[source] Arc<StorageError>),
}

struct Job {
    order: ToStore,
    done: oneshot::Sender<Result<Stored, Arc<StorageError>>>,
}

/// Handle to the writer tasks. Cheap to clone; the tasks stop once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct StoreWriter {
    workers: Workers<Job>,
}

impl StoreWriter {
    /// Starts the writers on `tasks`, each on a dedicated connection.
    pub fn spawn(
        db: PgPool,
        limits: &MessagingLimits,
        timeout: Duration,
        tasks: &TaskTracker,
        metrics: &Metrics,
    ) -> Self {
        let limits = WorkerLimits {
            timeout,
            workers: limits.store_writers,
            queue: limits.store_queue,
            batch: limits.store_batch,
        };
        let workers = Workers::spawn(db, Source::Dedicated, limits, tasks, || Writes {
            metrics: metrics.clone(),
        });
        metrics.sample_store_queue(workers.depth_reader());
        StoreWriter { workers }
    }

    /// Stores a message, waiting for room in the queue and for the commit.
    /// The writer completes the attempt itself, so the outcome is recorded
    /// even if the caller stops waiting.
    pub async fn store(&self, order: ToStore) -> Result<Stored, StoreError> {
        let permit = self.workers.reserve().await?;
        let (done, result) = oneshot::channel();
        permit.send(Job { order, done });
        match result.await {
            Ok(Ok(stored)) => Ok(stored),
            Ok(Err(err)) => Err(StoreError::Storage(err)),
            Err(_) => Err(StoreError::Dropped),
        }
    }
}

/// One writer worker: a batch is one call to storage.
struct Writes {
    /// Batch sizes and times, and failures.
    metrics: Metrics,
}

impl Batch for Writes {
    type Job = Job;

    async fn run(&mut self, conn: &mut Conn, jobs: &mut Vec<Job>) {
        let started = Instant::now();
        let messages: Vec<&Message> = jobs.iter().map(|j| &j.order.message).collect();
        let result = conn
            .run(|| async |c| queries::store_batch(c, &messages).await)
            .await
            .map_err(Arc::new);
        drop(messages);
        self.metrics.store_batch_size.observe(jobs.len() as u64);
        self.metrics
            .store_batch_seconds
            .observe_duration(started.elapsed());
        if result.is_err() {
            self.metrics.db_error(DbOp::store);
        }
        for (i, Job { order, done }) in jobs.drain(..).enumerate() {
            let outcome = match &result {
                Ok(outcomes) => Ok(outcomes[i]),
                Err(err) => Err(err.clone()),
            };
            let ToStore {
                message: _,
                ticket,
                attempt,
            } = order;
            // Release the drain before telling the sender, so a recipient
            // that is online starts reading it as early as possible.
            drop(ticket);
            if let (Some(attempt), Ok(Stored::Inserted | Stored::AlreadyStored)) =
                (attempt, &outcome)
            {
                attempt.complete(Delivery::Queued);
            }
            let _ = done.send(outcome);
        }
    }
}
