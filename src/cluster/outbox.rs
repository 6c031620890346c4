//! One writer per peer incarnation: what this node has for the peer goes
//! into the peer's inbox stream in batches, one `XADD` per batch, so Redis
//! round trips scale with batches rather than messages (about 25–30k
//! unpipelined commands a second on this class of machine).
//!
//! A batch Redis refuses (down, restarting, out of memory) is not retried
//! here: its items go back to this node's own dispatcher as
//! [`Inbound::Undelivered`], which fails the sends waiting on them as
//! retryable. Retrying blindly could deliver a forward twice or out of
//! order; failing it lets the sender retry with the same client message id.

use std::time::{Duration, Instant};

use prost::Message as _;
use redis::aio::ConnectionManager;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Inbound, inbox_key, wire};

/// What an outbox writer needs besides its queue.
pub(super) struct Writer {
    /// This node incarnation: the `from` of every batch.
    pub me: Uuid,
    /// The peer.
    pub to: Uuid,
    /// Shared, multiplexed, reconnecting connection.
    pub redis: ConnectionManager,
    /// Most items per stream entry.
    pub batch: usize,
    /// The peer's stream is trimmed to about this many entries.
    pub maxlen: usize,
    /// The stream's expiry, refreshed by the writes, so the stream of a
    /// peer that died and was never cleaned up goes away by itself.
    pub stream_ttl_ms: u64,
    /// Where undelivered items go.
    pub inbound: mpsc::Sender<Inbound>,
}

impl Writer {
    pub async fn run(mut self, mut queue: mpsc::Receiver<wire::Item>) {
        let key = inbox_key(self.to);
        // The expiry is refreshed with a write at most this often, not
        // with every one: under load a `PEXPIRE` per `XADD` was a third of
        // the cluster's Redis commands. The stream then outlives its last
        // write by nine tenths of the expiry at least.
        let refresh_every = Duration::from_millis(self.stream_ttl_ms / 10);
        let mut refreshed: Option<Instant> = None;
        let mut items = Vec::with_capacity(self.batch);
        while queue.recv_many(&mut items, self.batch.max(1)).await > 0 {
            // Let the tasks already woken run first: the dispatcher is often
            // mid-way through an inbox read that answers several units, and
            // what it adds joins this batch rather than costing its own
            // round trip. No timer: nothing waits when nothing else is ready.
            if items.len() < self.batch {
                tokio::task::yield_now().await;
                let room = self.batch.max(1) - items.len();
                if room > 0 && !queue.is_empty() {
                    queue.recv_many(&mut items, room).await;
                }
            }
            let batch = wire::Batch {
                from: wire::id_bytes(self.me),
                items: std::mem::take(&mut items),
            };
            let entry = batch.encode_to_vec();
            let now = Instant::now();
            let refresh = refreshed.is_none_or(|at| now - at >= refresh_every);
            // `NOMKSTREAM`: a write never creates the stream without its
            // expiry, which this writer's own clock cannot tell it lacks
            // (deleted with a dead peer, or lost with a Redis restart that
            // the shared connection rode through without an error).
            let appended = self.append(&key, &entry, false, refresh).await;
            let written = match appended {
                Ok(true) => Ok(refresh),
                Ok(false) => self.append(&key, &entry, true, true).await.map(|_| true),
                Err(err) => Err(err),
            };
            match &written {
                Ok(true) => refreshed = Some(now),
                Ok(false) => {}
                Err(_) => refreshed = None,
            }
            if let Err(err) = written {
                tracing::warn!(peer = %self.to, error = %err, items = batch.items.len(), "could not write to a peer's inbox");
                let undelivered = Inbound::Undelivered {
                    to: self.to,
                    items: batch.items,
                };
                if self.inbound.send(undelivered).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Appends one entry to the peer's stream, creating the stream only if
    /// `create` (and then with its expiry), and refreshing the expiry if
    /// `expire`. False: the stream did not exist, and nothing was written.
    async fn append(
        &mut self,
        key: &str,
        entry: &[u8],
        create: bool,
        expire: bool,
    ) -> redis::RedisResult<bool> {
        let mut write = redis::pipe();
        let xadd = write.cmd("XADD").arg(key);
        if !create {
            xadd.arg("NOMKSTREAM");
        }
        xadd.arg("MAXLEN")
            .arg("~")
            .arg(self.maxlen)
            .arg("*")
            .arg("b")
            .arg(entry);
        if expire {
            write
                .cmd("PEXPIRE")
                .arg(key)
                .arg(self.stream_ttl_ms)
                .ignore();
        }
        let (id,): (Option<String>,) = write.query_async(&mut self.redis).await?;
        Ok(id.is_some())
    }
}
