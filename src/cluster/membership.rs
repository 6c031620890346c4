//! Heartbeats and deaths, kept in PostgreSQL (see the cluster migration).
//!
//! Every tick a node renews its own heartbeat, declares dead every peer
//! whose heartbeat is older than dead-after (by PostgreSQL's clock, so
//! nodes' clocks need not agree), and tells the listener which of the
//! peers it talks to are gone, so sends waiting on them fail at once
//! rather than at their timeout. Redis plays no part: a Redis outage or
//! restart, or one node losing its Redis connection, kills nobody.
//!
//! A node that finds its own row marked dead was paused or cut off for
//! longer than dead-after, and its users may have been claimed elsewhere:
//! it is fenced out, and says so through [`Inner::fenced_out`](super::Inner).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Inbound, Inner, inbox_key};
use crate::storage::cluster as queries;

/// Dead incarnations' rows are kept this long, for operators to see.
const KEEP_DEAD: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn run(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(inner.config.heartbeat());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        ticks += 1;
        match queries::heartbeat(&inner.db, inner.incarnation).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::error!(
                    incarnation = %inner.incarnation,
                    "this node was declared dead by its peers (paused or cut off for longer than cluster-dead-after-ms); it is fenced out and stops"
                );
                inner.fenced_out.cancel();
                return;
            }
            Err(err) => tracing::warn!(error = %err, "cannot renew this node's heartbeat"),
        }
        match queries::declare_dead(&inner.db, inner.config.dead_after()).await {
            Ok(dead) => {
                for peer in dead {
                    tracing::warn!(peer = %peer, "declared a silent node dead and released its users");
                    delete_inbox(&inner, peer).await;
                    peer_gone(&inner, peer);
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot check for dead nodes"),
        }
        let peers: Vec<Uuid> = inner.outboxes.iter().map(|e| *e.key()).collect();
        if !peers.is_empty() {
            match queries::gone(&inner.db, &peers, inner.config.dead_after()).await {
                Ok(gone) => {
                    for peer in gone {
                        peer_gone(&inner, peer);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot check peers"),
            }
        }
        if ticks.is_multiple_of(600)
            && let Err(err) = queries::forget_dead(&inner.db, KEEP_DEAD).await
        {
            tracing::warn!(error = %err, "cannot forget old dead nodes");
        }
    }
}

/// Stops sending to `peer` and fails what waits on it.
fn peer_gone(inner: &Inner, peer: Uuid) {
    inner.mark_gone(peer);
    inner.listener.deliver(Inbound::PeerGone(peer));
}

async fn delete_inbox(inner: &Inner, peer: Uuid) {
    let mut redis = inner.redis.clone();
    let deleted: redis::RedisResult<()> = redis::cmd("DEL")
        .arg(inbox_key(peer))
        .query_async(&mut redis)
        .await;
    if let Err(err) = deleted {
        tracing::debug!(error = %err, "cannot delete a dead node's inbox; it expires by itself");
    }
}
