//! The periodic sweeper: deletes expired messages and sessions in bounded
//! batches, and forgets idle rate-limit buckets, stale pre-key notices and
//! old revocations.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics::DbOp;
use crate::state::AppState;
use crate::storage::{self, StorageError};

/// Deletes every expired message and session, `batch` rows per statement so
/// no statement holds locks for long. Returns how many messages went.
pub async fn sweep_once(db: &PgPool, batch: i64) -> Result<u64, StorageError> {
    let batch = batch.max(1);
    let mut messages = 0;
    loop {
        let n = storage::messages::sweep_expired(db, batch).await?;
        messages += n;
        if n < batch as u64 {
            break;
        }
    }
    while storage::sessions::sweep_expired(db, batch).await? == batch as u64 {}
    Ok(messages)
}

/// Runs [`sweep_once`] at the configured interval until `shutdown`.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let housekeeping = &state.limits().housekeeping;
    let interval = housekeeping.sweep_interval();
    let batch = housekeeping.sweep_batch;
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match sweep_once(state.db(), batch).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(messages = n, "swept expired messages"),
            Err(err) => {
                state.metrics().db_error(DbOp::sweep);
                tracing::warn!(error = %err, source = ?std::error::Error::source(&err), "sweep failed")
            }
        }
        state.send_limiter().prune();
        state.bundle_limiter().prune();
        state.lookup_limiter().prune();
        state.upload_limiter().prune();
        state.prekeys_low().prune(std::time::Instant::now());
        state.auth().prune_revocations();
    }
}
