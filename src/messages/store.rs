//! The store writer: the single way messages reach PostgreSQL.
//!
//! Senders hand messages to a bounded queue; a few writer tasks each take
//! whatever is waiting (up to a batch) and insert it in one statement, so
//! concurrent senders share one transaction and one fsync. A message's
//! [`StoreTicket`] is released only after its commit, which is what lets the
//! recipient's drain know it is safe to read past it.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::Delivery;
use super::Message;
use super::dedupe::Attempt;
use crate::registry::StoreTicket;
use crate::storage::{self, OwnConnection, StorageError};

/// What became of a message handed to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Committed now.
    Inserted,
    /// A message with this id was already stored: an idempotent retry.
    AlreadyStored,
    /// The recipient does not exist (any more).
    UnknownRecipient,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store writer has shut down")]
    Closed,
    #[error("storing the message failed")]
    Storage(#[source] Arc<StorageError>),
}

struct Job {
    message: Message,
    /// Held until the commit; see the module docs.
    ticket: Option<StoreTicket>,
    /// Completed as `Queued` once the message is stored.
    attempt: Option<Attempt>,
    done: oneshot::Sender<Result<Stored, Arc<StorageError>>>,
}

/// Handle to the writer tasks. Cheap to clone; the tasks stop once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct StoreWriter {
    /// The bounded queue the writers take batches from.
    tx: mpsc::Sender<Job>,
}

impl StoreWriter {
    /// Starts `writers` tasks on `tracker`, sharing one queue of `queue` jobs
    /// and writing at most `batch` messages per statement.
    pub fn spawn(
        db: PgPool,
        queue: usize,
        batch: usize,
        writers: usize,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            tracker.spawn(write_loop(db.clone(), rx.clone(), batch.max(1)));
        }
        StoreWriter { tx }
    }

    /// Stores `message`, waiting for room in the queue and for the commit.
    /// The writer completes `attempt` itself, so the outcome is recorded even
    /// if the caller stops waiting.
    pub async fn store(
        &self,
        message: Message,
        ticket: Option<StoreTicket>,
        attempt: Option<Attempt>,
    ) -> Result<Stored, StoreError> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Job {
                message,
                ticket,
                attempt,
                done,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        match result.await {
            Ok(Ok(stored)) => Ok(stored),
            Ok(Err(err)) => Err(StoreError::Storage(err)),
            Err(_) => Err(StoreError::Closed),
        }
    }
}

async fn write_loop(db: PgPool, rx: Arc<Mutex<mpsc::Receiver<Job>>>, batch: usize) {
    // Its own connection, outside the pool: through the pool every batch
    // cost two extra round trips (sqlx pings a connection when it is taken
    // and again when it is given back) and competed with reconnecting
    // clients for the pool's connections.
    let mut conn = OwnConnection::new(db);
    let mut jobs = Vec::with_capacity(batch);
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, batch).await == 0 {
                break; // every sender is gone and the queue is empty
            }
        }
        let result = write_batch(&mut conn, &jobs).await;
        for job in jobs.drain(..) {
            let Job {
                message,
                ticket,
                attempt,
                done,
            } = job;
            let outcome = match &result {
                Ok((inserted, _)) if inserted.contains(&message.id) => Ok(Stored::Inserted),
                Ok((_, recipients)) if recipients.contains(&message.recipient_id) => {
                    Ok(Stored::AlreadyStored)
                }
                Ok(_) => Ok(Stored::UnknownRecipient),
                Err(err) => Err(err.clone()),
            };
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
    conn.close().await;
}

/// The ids inserted, and of the messages not inserted, the recipients that
/// exist: for those the id was already stored (an idempotent retry, possibly
/// acked since), for the others the recipient is unknown.
type BatchResult = Result<(HashSet<Uuid>, HashSet<Uuid>), Arc<StorageError>>;

async fn write_batch(conn: &mut OwnConnection, jobs: &[Job]) -> BatchResult {
    let messages: Vec<&Message> = jobs.iter().map(|j| &j.message).collect();
    let inserted: HashSet<Uuid> = conn
        .run(async |c| insert_with_retry(c, &messages).await)
        .await
        .map_err(Arc::new)?
        .into_iter()
        .collect();
    let skipped: Vec<Uuid> = messages
        .iter()
        .filter(|m| !inserted.contains(&m.id))
        .map(|m| m.recipient_id)
        .collect();
    let recipients = if skipped.is_empty() {
        HashSet::new()
    } else {
        conn.run(async |c| storage::users::existing(c, &skipped).await)
            .await
            .map_err(Arc::new)?
            .into_iter()
            .collect()
    };
    Ok((inserted, recipients))
}

/// A user deleted between the existence check and the insert makes the
/// statement fail on a foreign key; the retry re-checks and skips them.
async fn insert_with_retry(
    conn: &mut PgConnection,
    messages: &[&Message],
) -> Result<Vec<Uuid>, StorageError> {
    match storage::messages::insert_batch(conn, messages).await {
        Err(StorageError::Query(sqlx::Error::Database(e)))
            if e.code().as_deref() == Some("23503") =>
        {
            storage::messages::insert_batch(conn, messages).await
        }
        other => other,
    }
}
