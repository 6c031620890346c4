//! The reads every reconnect makes (the session-token lookup, then the
//! drain's first read), batched over a few dedicated connections.
//!
//! Through the pool each of them cost three round trips (sqlx pings a
//! connection when it is taken and again when it is given back) and a
//! statement of its own. Here requests wait in a bounded queue; each reader
//! task takes whatever is waiting, up to a batch, and answers all the
//! session lookups with one statement and all the drain reads with another,
//! on a connection it owns. A request is never cancelled half-way: the
//! task runs every statement to the end even if the requester has gone.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::messages::DrainRead;
use super::{OwnConnection, StorageError};
use crate::messages::Message;

/// The reader's bounds.
#[derive(Debug, Clone, Copy)]
pub struct ReaderLimits {
    /// Dedicated connections, one task each.
    pub connections: usize,
    /// Most requests answered by one statement.
    pub batch: usize,
    /// Requests that may wait for a reader; beyond this, requesters wait
    /// for room.
    pub queue: usize,
}

type Reply<T> = oneshot::Sender<Result<T, Arc<StorageError>>>;

/// A live session's user id and username.
type SessionOwner = Option<(Uuid, String)>;

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
    /// The bounded queue the reader tasks take batches from.
    tx: mpsc::Sender<Request>,
}

impl Reader {
    /// Starts the reader tasks on `tasks`.
    pub fn spawn(db: PgPool, limits: ReaderLimits, tasks: &TaskTracker) -> Self {
        let (tx, rx) = mpsc::channel(limits.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..limits.connections.max(1) {
            tasks.spawn(read_loop(db.clone(), rx.clone(), limits.batch.max(1)));
        }
        Reader { tx }
    }

    /// The user id and username of the live session whose token hashes to
    /// `hash`.
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
        self.tx
            .send(request)
            .await
            .map_err(|_| StorageError::ReaderClosed)?;
        match answer.await {
            Ok(result) => result.map_err(StorageError::Batch),
            Err(_) => Err(StorageError::ReaderClosed),
        }
    }
}

async fn read_loop(db: PgPool, rx: Arc<Mutex<mpsc::Receiver<Request>>>, batch: usize) {
    let mut conn = OwnConnection::new(db);
    let mut requests = Vec::with_capacity(batch);
    let mut sessions = Vec::new();
    let mut drains = Vec::new();
    loop {
        {
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut requests, batch).await == 0 {
                break; // every handle is gone and the queue is empty
            }
        }
        for request in requests.drain(..) {
            match request {
                Request::Session { hash, done } => sessions.push((hash, done)),
                Request::Drain { read, done } => drains.push((read, done)),
            }
        }
        if !sessions.is_empty() {
            look_up_sessions(&mut conn, &mut sessions).await;
        }
        if !drains.is_empty() {
            read_drains(&mut conn, &mut drains).await;
        }
    }
    conn.close().await;
}

async fn look_up_sessions(
    conn: &mut OwnConnection,
    batch: &mut Vec<([u8; 32], Reply<SessionOwner>)>,
) {
    let hashes: Vec<&[u8]> = batch.iter().map(|(hash, _)| &hash[..]).collect();
    let result = conn
        .run(async |c| super::sessions::find_live_many(c, &hashes).await)
        .await;
    match result {
        Ok(found) => {
            let found: HashMap<Vec<u8>, (Uuid, String)> = found
                .into_iter()
                .map(|(hash, user, name)| (hash, (user, name)))
                .collect();
            // Not `remove`: the same token may be asked twice in one batch
            // (a client reconnecting while its old socket is still open).
            for (hash, done) in batch.drain(..) {
                let _ = done.send(Ok(found.get(&hash[..]).cloned()));
            }
        }
        Err(err) => fail_all(batch, err),
    }
}

async fn read_drains(conn: &mut OwnConnection, batch: &mut Vec<(DrainRead, Reply<Vec<Message>>)>) {
    let reads: Vec<DrainRead> = batch.iter().map(|(read, _)| *read).collect();
    let result = conn
        .run(async |c| super::messages::fetch_for_drain_many(c, &reads).await)
        .await;
    match result {
        Ok(rows) => {
            for ((_, done), rows) in batch.drain(..).zip(rows) {
                let _ = done.send(Ok(rows));
            }
        }
        Err(err) => fail_all(batch, err),
    }
}

/// Gives every request of a failed batch the batch's error.
fn fail_all<K, T>(batch: &mut Vec<(K, Reply<T>)>, err: StorageError) {
    let err = Arc::new(err);
    for (_, done) in batch.drain(..) {
        let _ = done.send(Err(err.clone()));
    }
}
