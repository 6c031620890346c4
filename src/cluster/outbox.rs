//! One writer per peer incarnation: what this node has for the peer goes
//! into the peer's inbox stream in batches, one `XADD` per batch, so Redis
//! round trips scale with batches rather than messages (about 25–30k
//! unpipelined commands a second on this class of machine).
//!
//! Each writer has a connection of its own, driven in its own task
//! ([`Link`]), and reconnects when it breaks, no sooner than a backoff
//! after a failed attempt.
//!
//! A batch Redis refuses (down, restarting, out of memory) is not retried
//! here: its items go back to this node's own listener as
//! [`Inbound::Undelivered`], which fails the sends waiting on them as
//! retryable. Retrying blindly could deliver a forward twice or out of
//! order; failing it lets the sender retry with the same client message id.

use std::time::{Duration, Instant};

use std::sync::Arc;

use prost::Message as _;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::link::Link;
use super::{Inbound, Listening, inbox_key, wire};

/// How long one write waits for Redis's answer.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest and longest wait after a failed connection attempt before the
/// next; batches meanwhile fail at once.
pub(super) const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What an outbox writer needs besides its queue.
pub(super) struct Writer {
    /// This node incarnation: the `from` of every batch.
    pub me: Uuid,
    /// Where to connect.
    pub redis_info: Arc<redis::ConnectionInfo>,
    /// Hears what could not be written.
    pub listener: Listening,
    /// The peer.
    pub to: Uuid,
    /// Most items per stream entry.
    pub batch: usize,
    /// The peer's stream is trimmed to about this many entries.
    pub maxlen: usize,
    /// The stream's expiry, refreshed by the writes, so the stream of a
    /// peer that died and was never cleaned up goes away by itself.
    pub stream_ttl_ms: u64,
    /// The connection, while it works.
    pub link: Option<Link>,
    /// No connection attempt before this, after a failed one.
    pub retry_at: Option<Instant>,
    /// The wait after the next failed attempt.
    pub backoff: Duration,
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
            // Let the tasks already woken run first: the inbox reader is
            // often mid-way through a read that answers several units, and
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
                Err(err) => {
                    refreshed = None;
                    if !Link::survives(err) {
                        self.link = None;
                    }
                }
            }
            if let Err(err) = written {
                tracing::warn!(peer = %self.to, error = %err, items = batch.items.len(), "could not write to a peer's inbox");
                self.listener.deliver(Inbound::Undelivered {
                    to: self.to,
                    items: batch.items,
                });
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
        let link = self.link().await?;
        let (id,): (Option<String>,) = link.query_pipe(&write).await?;
        Ok(id.is_some())
    }

    /// The connection, made now if there is none and the backoff allows.
    async fn link(&mut self) -> redis::RedisResult<&mut Link> {
        if self.link.as_mut().is_some_and(Link::is_closed) {
            self.link = None;
        }
        if self.link.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "Redis was unreachable a moment ago",
                )));
            }
            match Link::open(&self.redis_info, RESPONSE_TIMEOUT).await {
                Ok(link) => {
                    self.retry_at = None;
                    self.backoff = MIN_BACKOFF;
                    self.link = Some(link);
                }
                Err(err) => {
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return Err(err);
                }
            }
        }
        Ok(self.link.as_mut().expect("made above"))
    }
}
