//! Batch workers: the one mechanism behind every hot database path (the
//! store writer, the batched reader). Requests wait in one bounded queue; a
//! few worker tasks each take whatever is waiting, up to a batch, and answer
//! all of it with as few statements as possible, each on a connection it
//! alone uses. Concurrent requesters so share round trips, transactions and
//! fsyncs instead of each paying for their own.
//!
//! A worker runs every batch to the end, whether or not its requesters still
//! wait: a requester that gives up only drops its answer. Nothing can leave a
//! connection mid-statement or mid-transaction, which is the lesson of the
//! cancelled drain that once handed on its connection with a rollback
//! pending.

use std::future::Future;
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool, Postgres};
use tokio::sync::{Mutex, mpsc};
use tokio_util::task::TaskTracker;

use super::StorageError;

/// Where a worker's connection comes from; the caller chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One connection of its own, outside the pool, kept between batches.
    /// Through the pool every batch costs two extra round trips (sqlx pings
    /// a connection when it is taken and again when it is given back) and
    /// competes with requests for the pool's connections.
    Dedicated,
    /// A pool connection taken for each batch and given back after it.
    Pool,
}

/// A connection that one task uses for one batch at a time.
pub struct Conn {
    /// Where connections come from (and, for dedicated ones, the settings
    /// to open them with).
    db: PgPool,
    source: Source,
    /// The dedicated connection: opened on first use, and again after an
    /// error that may have broken it.
    dedicated: Option<PgConnection>,
}

impl Conn {
    pub fn new(db: PgPool, source: Source) -> Self {
        Conn {
            db,
            source,
            dedicated: None,
        }
    }

    /// Runs `f` on a connection. After an error that is not PostgreSQL
    /// refusing a statement (I/O, protocol), the connection is dropped
    /// rather than reused: the next call opens or takes another.
    pub async fn run<T, F>(&mut self, f: F) -> Result<T, StorageError>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, StorageError>,
    {
        match self.source {
            Source::Dedicated => {
                let conn = match &mut self.dedicated {
                    Some(conn) => conn,
                    None => {
                        let conn = self.db.connect_options().connect().await?;
                        self.dedicated.insert(conn)
                    }
                };
                let result = f(conn).await;
                if result.as_ref().is_err_and(breaks_connection) {
                    self.dedicated = None;
                }
                result
            }
            Source::Pool => {
                let mut conn: PoolConnection<Postgres> = self.db.acquire().await?;
                let result = f(&mut conn).await;
                if result.as_ref().is_err_and(breaks_connection) {
                    conn.close_on_drop();
                }
                result
            }
        }
    }

    /// Closes a dedicated connection politely, if open.
    pub async fn close(self) {
        if let Some(conn) = self.dedicated {
            let _ = conn.close().await;
        }
    }
}

/// Whether an error may have left the connection unusable.
fn breaks_connection(err: &StorageError) -> bool {
    !matches!(err, StorageError::Query(sqlx::Error::Database(_)))
}

/// What one worker does with a batch. Each worker has its own value, so it
/// may keep scratch buffers between batches.
pub trait Batch: Send + 'static {
    type Job: Send + 'static;

    /// Answers every job in `jobs`, leaving it empty.
    fn run(
        &mut self,
        conn: &mut Conn,
        jobs: &mut Vec<Self::Job>,
    ) -> impl Future<Output = ()> + Send;
}

/// How many workers, and how much each queue and batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Worker tasks, one connection each.
    pub workers: usize,
    /// Jobs that may wait for a worker; beyond this, submitters wait for
    /// room.
    pub queue: usize,
    /// Most jobs one worker takes at once.
    pub batch: usize,
}

/// Handle to a set of batch workers. Cheap to clone; the workers stop once
/// every handle is dropped and the queue is empty.
pub struct Workers<J> {
    /// The bounded queue the workers take batches from.
    tx: mpsc::Sender<J>,
}

impl<J> Clone for Workers<J> {
    fn clone(&self) -> Self {
        Workers {
            tx: self.tx.clone(),
        }
    }
}

/// The workers have stopped (the server is shutting down).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the batch workers have shut down")]
pub struct Closed;

impl<J: Send + 'static> Workers<J> {
    /// Starts `limits.workers` tasks on `tasks`, each running its own
    /// `make()` on connections from `source`.
    pub fn spawn<B>(
        db: PgPool,
        source: Source,
        limits: WorkerLimits,
        tasks: &TaskTracker,
        make: impl Fn() -> B,
    ) -> Self
    where
        B: Batch<Job = J>,
    {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..limits.workers.max(1) {
            let conn = Conn::new(db.clone(), source);
            tasks.spawn(work(conn, rx.clone(), limits.batch.max(1), make()));
        }
        Workers { tx }
    }

    /// Queues `job`, waiting for room. Cancel-safe: a submit that did not
    /// complete queued nothing.
    pub async fn submit(&self, job: J) -> Result<(), Closed> {
        self.tx.send(job).await.map_err(|_| Closed)
    }
}

async fn work<B: Batch>(
    mut conn: Conn,
    rx: Arc<Mutex<mpsc::Receiver<B::Job>>>,
    limit: usize,
    mut batch: B,
) {
    let mut jobs = Vec::with_capacity(limit);
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, limit).await == 0 {
                break; // every handle is gone and the queue is empty
            }
        }
        batch.run(&mut conn, &mut jobs).await;
        jobs.clear();
    }
    conn.close().await;
}
