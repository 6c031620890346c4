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
    /// The recipient was connected to this node when the message was
    /// routed, and nothing routed before it for them was on its way through
    /// the lane. In cluster mode a message for anyone else may belong to
    /// another node, and takes the forwarding lane rather than the writer.
    pub local: bool,
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

/// Messages stored together: in cluster mode one recipient's forwarding
/// unit, which the fence keeps or refuses as a whole.
impl StoreError {
    /// The same error again, for each of several waiters.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Closed(_) => StoreError::Closed(batch::Closed),
            StoreError::Dropped => StoreError::Dropped,
            StoreError::Storage(err) => StoreError::Storage(err.clone()),
        }
    }
}

struct Job {
    orders: Vec<ToStore>,
    done: oneshot::Sender<Result<Report, Arc<StorageError>>>,
}

/// What became of a job's messages.
#[derive(Debug)]
pub struct Report {
    /// Each message's outcome, in order.
    pub results: Vec<Stored>,
    /// The messages refused because another node owns their recipient
    /// ([`Stored::Moved`]), handed back whole (ticket and attempt kept) so
    /// the caller can forward them.
    pub moved: Vec<ToStore>,
}

/// Handle to the writer tasks. Cheap to clone; the tasks stop once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct StoreWriter {
    workers: Workers<Job>,
}

impl StoreWriter {
    /// Starts the writers on `tasks`, each on a dedicated connection.
    /// `fence`: in cluster mode, this node's incarnation; every batch is
    /// then stored through the ownership fence.
    pub fn spawn(
        db: PgPool,
        limits: &MessagingLimits,
        timeout: Duration,
        fence: Option<uuid::Uuid>,
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
            fence,
        });
        metrics.sample_store_queue(workers.depth_reader());
        StoreWriter { workers }
    }

    /// Stores a message, waiting for room in the queue and for the commit.
    /// The writer completes the attempt itself, so the outcome is recorded
    /// even if the caller stops waiting.
    pub async fn store(&self, order: ToStore) -> Result<Stored, StoreError> {
        let report = self.store_all(vec![order]).await?;
        Ok(report.results[0])
    }

    /// Stores `orders` in one batch, so the fence keeps or refuses them
    /// together.
    pub async fn store_all(&self, orders: Vec<ToStore>) -> Result<Report, StoreError> {
        let permit = self.workers.reserve().await?;
        let (done, result) = oneshot::channel();
        permit.send(Job { orders, done });
        match result.await {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(err)) => Err(StoreError::Storage(err)),
            Err(_) => Err(StoreError::Dropped),
        }
    }
}

/// One writer worker: a batch is one call to storage.
struct Writes {
    /// Batch sizes and times, and failures.
    metrics: Metrics,
    /// This node's incarnation in cluster mode: store through the fence.
    fence: Option<uuid::Uuid>,
}

impl Batch for Writes {
    type Job = Job;

    async fn run(&mut self, conn: &mut Conn, jobs: &mut Vec<Job>) {
        let started = Instant::now();
        let messages: Vec<&Message> = jobs
            .iter()
            .flat_map(|j| j.orders.iter().map(|o| &o.message))
            .collect();
        let fence = self.fence;
        let result = conn
            .run(|| {
                async |c| match fence {
                    None => queries::store_batch(c, &messages).await,
                    Some(me) => queries::store_batch_fenced(c, &messages, me).await,
                }
            })
            .await
            .map_err(Arc::new);
        self.metrics.store_batch_size.observe(messages.len() as u64);
        drop(messages);
        self.metrics
            .store_batch_seconds
            .observe_duration(started.elapsed());
        if result.is_err() {
            self.metrics.db_error(DbOp::store);
        }
        let mut outcomes = match result {
            Ok(outcomes) => outcomes.into_iter(),
            Err(err) => {
                for Job { done, .. } in jobs.drain(..) {
                    let _ = done.send(Err(err.clone()));
                }
                return;
            }
        };
        for Job { orders, done } in jobs.drain(..) {
            let mut report = Report {
                results: Vec::with_capacity(orders.len()),
                moved: Vec::new(),
            };
            for order in orders {
                let stored = outcomes.next().expect("one outcome per message");
                report.results.push(stored);
                if let Stored::Moved(_) = stored {
                    report.moved.push(order);
                    continue;
                }
                let ToStore {
                    ticket, attempt, ..
                } = order;
                // Release the drain before telling the sender, so a
                // recipient that is online starts reading it as early as
                // possible.
                drop(ticket);
                if let (Some(attempt), Stored::Inserted | Stored::AlreadyStored) = (attempt, stored)
                {
                    attempt.complete(Delivery::Queued);
                }
            }
            let _ = done.send(Ok(report));
        }
    }
}
