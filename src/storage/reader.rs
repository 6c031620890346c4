//! The reads every reconnect makes (the session-token lookup, then the
//! drain's first read), batched over a few dedicated connections.
//!
//! Through the pool each of them cost three round trips (sqlx pings a
//! connection when it is taken and again when it is given back) and a
//! statement of its own. Here they go through [`batch`](super::batch)
//! workers: each answers all the session lookups it took with one statement
//! and all the drain reads with another.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::StorageError;
use super::batch::{Batch, Conn, Source, WorkerLimits, Workers};
use super::messages::DrainRead;
use super::sessions::LiveSession;
use crate::config::ReaderLimits;
use crate::envelope::Message;
use crate::metrics::{DbOp, Metrics};

type Reply<T> = oneshot::Sender<Result<T, Arc<StorageError>>>;

/// The live session of a token, if it has one.
type SessionOwner = Option<LiveSession>;

enum Request {
    /// Who holds this live session (by token hash), if anyone.
    Session {
        hash: [u8; 32],
        done: Reply<SessionOwner>,
    },
    /// One drain read.
    Drain {
        read: DrainRead,
        done: Reply<Vec<Message>>,
    },
}

/// Handle to the reader tasks. Cheap to clone; the tasks stop once every
/// handle is dropped and the queue is empty.
#[derive(Clone)]
pub struct Reader {
    workers: Workers<Request>,
}

impl Reader {
    /// Starts the reader tasks on `tasks`.
    pub fn spawn(
        db: PgPool,
        limits: &ReaderLimits,
        tasks: &TaskTracker,
        metrics: &Metrics,
    ) -> Self {
        let limits = WorkerLimits {
            timeout: Duration::from_secs(limits.db_batch_timeout_secs),
            workers: limits.db_readers,
            queue: limits.db_read_queue,
            batch: limits.db_read_batch,
        };
        let workers = Workers::spawn(db, Source::Dedicated, limits, tasks, || Reads {
            metrics: metrics.clone(),
            sessions: Vec::new(),
            drains: Vec::new(),
        });
        Reader { workers }
    }

    /// The live session whose token hashes to `hash`, if there is one.
    pub async fn session(&self, hash: [u8; 32]) -> Result<SessionOwner, StorageError> {
        let (done, answer) = oneshot::channel();
        self.ask(Request::Session { hash, done }, answer).await
    }

    /// See [`DrainRead`].
    pub async fn drain(&self, read: DrainRead) -> Result<Vec<Message>, StorageError> {
        let (done, answer) = oneshot::channel();
        self.ask(Request::Drain { read, done }, answer).await
    }

    async fn ask<T>(
        &self,
        request: Request,
        answer: oneshot::Receiver<Result<T, Arc<StorageError>>>,
    ) -> Result<T, StorageError> {
        self.workers
            .submit(request)
            .await
            .map_err(|_| StorageError::ReaderClosed)?;
        match answer.await {
            Ok(result) => result.map_err(StorageError::Batch),
            Err(_) => Err(StorageError::ReaderClosed),
        }
    }
}

/// One reader worker: sorts a batch by kind, then answers each kind with
/// one statement. The vectors are kept between batches.
struct Reads {
    /// Counts failed batches.
    metrics: Metrics,
    sessions: Vec<([u8; 32], Reply<SessionOwner>)>,
    drains: Vec<(DrainRead, Reply<Vec<Message>>)>,
}

impl Batch for Reads {
    type Job = Request;

    async fn run(&mut self, conn: &mut Conn, jobs: &mut Vec<Request>) {
        for request in jobs.drain(..) {
            match request {
                Request::Session { hash, done } => self.sessions.push((hash, done)),
                Request::Drain { read, done } => self.drains.push((read, done)),
            }
        }
        let mut ok = true;
        if !self.sessions.is_empty() {
            ok &= look_up_sessions(conn, &mut self.sessions).await;
        }
        if !self.drains.is_empty() {
            ok &= read_drains(conn, &mut self.drains).await;
        }
        if !ok {
            self.metrics.db_error(DbOp::read);
        }
    }
}

/// Answers the session lookups; false if the statement failed.
async fn look_up_sessions(
    conn: &mut Conn,
    batch: &mut Vec<([u8; 32], Reply<SessionOwner>)>,
) -> bool {
    let hashes: Vec<&[u8]> = batch.iter().map(|(hash, _)| &hash[..]).collect();
    let result = conn
        .run(|| async |c| super::sessions::find_live_many(c, &hashes).await)
        .await;
    match result {
        Ok(found) => {
            let found: HashMap<Vec<u8>, LiveSession> = found.into_iter().collect();
            // Not `remove`: the same token may be asked twice in one batch
            // (a client reconnecting while its old socket is still open).
            for (hash, done) in batch.drain(..) {
                let _ = done.send(Ok(found.get(&hash[..]).cloned()));
            }
            true
        }
        Err(err) => fail_all(batch, err),
    }
}

/// Answers the drain reads; false if the statement failed.
async fn read_drains(conn: &mut Conn, batch: &mut Vec<(DrainRead, Reply<Vec<Message>>)>) -> bool {
    let reads: Vec<DrainRead> = batch.iter().map(|(read, _)| *read).collect();
    let result = conn
        .run(|| async |c| super::messages::fetch_for_drain_many(c, &reads).await)
        .await;
    match result {
        Ok(rows) => {
            for ((_, done), rows) in batch.drain(..).zip(rows) {
                let _ = done.send(Ok(rows));
            }
            true
        }
        Err(err) => fail_all(batch, err),
    }
}

/// Gives every request of a failed batch the batch's error. False, for
/// the caller to return.
fn fail_all<K, T>(batch: &mut Vec<(K, Reply<T>)>, err: StorageError) -> bool {
    let err = Arc::new(err);
    for (_, done) in batch.drain(..) {
        let _ = done.send(Err(err.clone()));
    }
    false
}
