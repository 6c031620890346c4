//! This node incarnation's inbox: one Redis stream that peers append to,
//! read in order by one task on its own connection (a blocking `XREAD`
//! would stall a shared one), which hands each batch to the listener as it
//! reads it.
//!
//! A stream, not pub/sub: the reader resumes from the last entry it read
//! after a reconnect, so a dropped connection loses nothing, and a paused
//! node reads what arrived meanwhile when it wakes (up to the stream's
//! length limit). Entries read are trimmed away, since nobody reads them
//! twice. If Redis itself restarts empty, what it held is lost: the sends
//! waiting on it fail as retryable when their forward times out.

use std::time::Duration;

use std::sync::Arc;

use prost::Message as _;
use redis::streams::StreamReadReply;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::link::Link;
use super::{Inbound, Listening, inbox_key, wire};

/// Entries per read.
const READ_COUNT: usize = 64;
/// How long one read blocks in Redis when the stream is empty.
const BLOCK: Duration = Duration::from_millis(1000);
/// Longest wait between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

pub(super) struct Reader {
    /// This node incarnation, whose stream this is.
    pub me: Uuid,
    /// Where to connect.
    pub redis_info: Arc<redis::ConnectionInfo>,
    /// Gets what is read.
    pub listener: Listening,
    /// Ends the reading.
    pub shutdown: CancellationToken,
}

impl Reader {
    pub async fn run(self) {
        let key = inbox_key(self.me);
        // The stream is new with this incarnation: everything in it is ours.
        let mut last = "0-0".to_owned();
        let mut conn: Option<Link> = None;
        let mut backoff = Duration::from_millis(50);
        let mut read_since_trim = 0usize;
        loop {
            let c = match &mut conn {
                Some(c) => c,
                None => match self.connect().await {
                    Some(c) => conn.insert(c),
                    None if self.shutdown.is_cancelled() => return,
                    None => {
                        self.pause(&mut backoff).await;
                        continue;
                    }
                },
            };
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last);
            let read = c.query::<Option<StreamReadReply>>(&xread);
            let reply = tokio::select! {
                reply = read => reply,
                () = self.shutdown.cancelled() => return,
            };
            match reply {
                Ok(reply) => {
                    backoff = Duration::from_millis(50);
                    for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                        last = entry.id.clone();
                        read_since_trim += 1;
                        let Some(inbound) = decode(&entry.map) else {
                            tracing::warn!(entry = %entry.id, "skipping an undecodable inbox entry");
                            continue;
                        };
                        self.listener.deliver(inbound);
                    }
                    if read_since_trim >= READ_COUNT {
                        read_since_trim = 0;
                        // Entries up to `last` are read: free them.
                        let mut trim = redis::cmd("XTRIM");
                        trim.arg(&key).arg("MINID").arg("~").arg(&last);
                        let trimmed: redis::RedisResult<()> = c.query(&trim).await;
                        if let Err(err) = trimmed {
                            tracing::debug!(error = %err, "trimming the inbox failed");
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reading the inbox failed; reconnecting");
                    conn = None;
                    self.pause(&mut backoff).await;
                }
            }
        }
    }

    async fn connect(&self) -> Option<Link> {
        let connect = Link::open(&self.redis_info, BLOCK + Duration::from_secs(2));
        tokio::select! {
            conn = connect => match conn {
                Ok(conn) => Some(conn),
                Err(err) => {
                    tracing::debug!(error = %err, "cannot reach Redis for the inbox");
                    None
                }
            },
            () = self.shutdown.cancelled() => None,
        }
    }

    async fn pause(&self, backoff: &mut Duration) {
        tokio::select! {
            () = tokio::time::sleep(*backoff) => {}
            () = self.shutdown.cancelled() => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
    }
}

fn decode(fields: &std::collections::HashMap<String, redis::Value>) -> Option<Inbound> {
    let redis::Value::BulkString(bytes) = fields.get("b")? else {
        return None;
    };
    let batch = wire::Batch::decode(&bytes[..]).ok()?;
    let from = wire::parse_id(&batch.from, "from").ok()?;
    Some(Inbound::Items {
        from,
        items: batch.items,
    })
}
