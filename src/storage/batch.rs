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
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgDatabaseError, PgSeverity};
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
    /// Longest one run may take, connecting included.
    timeout: Duration,
    /// The dedicated connection: opened on first use, and again after an
    /// error that may have broken it.
    dedicated: Option<PgConnection>,
}

impl Conn {
    pub fn new(db: PgPool, source: Source, timeout: Duration) -> Self {
        Conn {
            db,
            source,
            timeout,
            dedicated: None,
        }
    }

    /// Runs `f` on a connection. A connection that failed in a way that
    /// may have broken it (I/O, protocol, or a FATAL error such as the
    /// server terminating it) is dropped rather than reused. If that
    /// connection was an old one, `f` runs once more on a new connection:
    /// a database restart kills every idle connection, and the first
    /// statement after it must not fail for that. `f` must therefore be
    /// safe to repeat, as every batch here is (reads, and inserts that skip
    /// ids already stored); `make` makes it afresh for each run.
    pub async fn run<T, F, G>(&mut self, make: F) -> Result<T, StorageError>
    where
        F: Fn() -> G,
        G: AsyncFnOnce(&mut PgConnection) -> Result<T, StorageError>,
    {
        match self.source {
            Source::Dedicated => {
                let reused = self.dedicated.is_some();
                let result = self.run_dedicated(make()).await;
                match result {
                    Err(err) if reused && breaks_connection(&err) => {
                        tracing::info!(error = %err, "a database connection died; retrying on a new one");
                        self.run_dedicated(make()).await
                    }
                    other => other,
                }
            }
            Source::Pool => {
                let mut conn: PoolConnection<Postgres> = self.db.acquire().await?;
                let result = match tokio::time::timeout(self.timeout, make()(&mut conn)).await {
                    Ok(result) => result,
                    Err(_) => Err(StorageError::TimedOut(self.timeout)),
                };
                if result.as_ref().is_err_and(breaks_connection) {
                    conn.close_on_drop();
                }
                result
            }
        }
    }

    /// One run on the dedicated connection, within the deadline. A run cut
    /// off by it may have left a statement half done: its connection is
    /// dropped, never reused, and every statement here commits on its own,
    /// so nothing is left pending for anyone else.
    async fn run_dedicated<T, G>(&mut self, f: G) -> Result<T, StorageError>
    where
        G: AsyncFnOnce(&mut PgConnection) -> Result<T, StorageError>,
    {
        let (db, dedicated) = (&self.db, &mut self.dedicated);
        let run = async {
            let conn = match dedicated {
                Some(conn) => conn,
                None => dedicated.insert(db.connect_options().connect().await?),
            };
            f(conn).await
        };
        let result = match tokio::time::timeout(self.timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::TimedOut(self.timeout)),
        };
        if result.as_ref().is_err_and(breaks_connection) {
            self.dedicated = None;
        }
        result
    }

    /// Closes a dedicated connection politely, if open.
    pub async fn close(self) {
        if let Some(conn) = self.dedicated {
            let _ = conn.close().await;
        }
    }
}

/// Whether an error may have left the connection unusable: anything but
/// PostgreSQL refusing one statement. A FATAL error (the server terminating
/// the session, SQLSTATE 57P01 after a restart) or a connection exception
/// (class 08) is reported as a database error, yet the session is gone.
pub fn breaks_connection(err: &StorageError) -> bool {
    match err {
        StorageError::Query(sqlx::Error::Database(db)) => {
            let fatal = db
                .try_downcast_ref::<PgDatabaseError>()
                .is_some_and(|pg| matches!(pg.severity(), PgSeverity::Fatal | PgSeverity::Panic));
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            fatal || code.starts_with("08") || code.starts_with("57P")
        }
        _ => true,
    }
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

/// How many workers, how much each queue and batch may hold, and how long
/// a batch may take.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Longest one batch may take on its connection, connecting included.
    pub timeout: Duration,
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
            let conn = Conn::new(db.clone(), source, limits.timeout);
            tasks.spawn(work(conn, rx.clone(), limits.batch.max(1), make()));
        }
        Workers { tx }
    }

    /// Reads how many jobs wait, without keeping the workers alive: for
    /// the queue-depth metric, which must not hold shutdown up.
    pub fn depth_reader(&self) -> impl Fn() -> i64 + Send + Sync + 'static {
        let tx = self.tx.downgrade();
        move || {
            tx.upgrade()
                .map_or(0, |tx| (tx.max_capacity() - tx.capacity()) as i64)
        }
    }

    /// Waits for room in the queue. Cancel-safe: a wait that did not
    /// complete took no room. The job is made only once there is room, so
    /// a waiting submitter's future does not carry it (twice: the sender's
    /// `send` future holds its own copy of what it sends).
    pub async fn reserve(&self) -> Result<mpsc::Permit<'_, J>, Closed> {
        self.tx.reserve().await.map_err(|_| Closed)
    }

    /// Queues `job`, waiting for room. Cancel-safe: a submit that did not
    /// complete queued nothing.
    pub async fn submit(&self, job: J) -> Result<(), Closed> {
        self.reserve().await?.send(job);
        Ok(())
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
