//! The state every connection shares, behind one cheap-to-clone handle.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthSettings, Authenticator, PasswordHasher, PasswordLimits};
use crate::config::Limits;
use crate::health::Health;
use crate::keys::low::LowNotices;
use crate::messages::{ClusterLink, Relay};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::storage::{Database, StorageError};

/// Shared server state. Cloning copies one `Arc`.
///
/// Locking rules: nothing in here is behind a lock a caller can hold. The
/// relay and the rate limiters lock internally, per call, and never across
/// an `.await`; the pool is a channel.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every bound the server enforces.
    limits: Limits,
    /// The PostgreSQL pool and the batched reader.
    db: Database,
    /// Registration, login and sessions.
    auth: Authenticator,
    /// The messaging front: routing, storing, draining, hand-backs.
    relay: Relay,
    /// Per-sender message rate.
    send_limiter: RateLimiter,
    /// Per-requester bundle fetch rate.
    bundle_limiter: RateLimiter,
    /// Per-requester user lookup rate.
    lookup_limiter: RateLimiter,
    /// Per-user key upload rate: each upload's signature checks cost CPU.
    upload_limiter: RateLimiter,
    /// Who was told their pre-keys run low, so they are told once.
    prekeys_low: LowNotices,
    /// What the server counts.
    metrics: Metrics,
    /// Whether the server is live and ready, and the database up.
    health: Health,
}

impl AppState {
    /// Builds the state over a migrated pool. Background workers are
    /// spawned on `tasks`, which shutdown waits for.
    pub async fn new(
        db: PgPool,
        limits: Limits,
        cluster: Option<ClusterLink>,
        tasks: &TaskTracker,
        metrics: Metrics,
        health: Health,
    ) -> Result<Self, StorageError> {
        let db = Database::new(db, &limits.reader, tasks, &metrics);
        let batch_timeout = std::time::Duration::from_secs(limits.reader.db_batch_timeout_secs);
        let relay = Relay::start(
            db.clone(),
            &limits.messaging,
            batch_timeout,
            cluster,
            tasks,
            &metrics,
        )
        .await?;
        // Off the async workers: making the hasher hashes its dummy
        // password, a whole Argon2 run.
        let (concurrency, queue, per_address) = (
            limits.auth.argon2_concurrency,
            limits.auth.argon2_queue,
            limits.auth.argon2_queue_per_address,
        );
        let hasher = tokio::task::spawn_blocking(move || {
            PasswordHasher::new(concurrency, queue, per_address)
        })
        .await
        .unwrap_or_else(|panicked| std::panic::resume_unwind(panicked.into_panic()));
        metrics.sample_argon2_queue(hasher.depth_reader());
        metrics.sample_argon2_abandoned(hasher.abandoned_reader());
        let pool = db.pool().clone();
        metrics.sample_pool(move || {
            let idle = pool.num_idle() as i64;
            (idle, i64::from(pool.size()) - idle)
        });
        let rates = &limits.rates;
        Ok(AppState {
            inner: Arc::new(Inner {
                auth: Authenticator::new(
                    db.clone(),
                    hasher,
                    AuthSettings {
                        session_ttl: limits.auth.session_ttl(),
                        max_sessions: limits.auth.max_sessions_per_user,
                        limits: PasswordLimits::new(&limits.auth),
                    },
                    health.clone(),
                    metrics.clone(),
                ),
                metrics,
                health,
                relay,
                send_limiter: RateLimiter::new(rates.send_rate_per_sec, rates.send_burst),
                bundle_limiter: RateLimiter::new(rates.bundle_rate_per_sec, rates.bundle_burst),
                lookup_limiter: RateLimiter::new(rates.lookup_rate_per_sec, rates.lookup_burst),
                upload_limiter: RateLimiter::new(
                    rates.upload_keys_rate_per_sec,
                    rates.upload_keys_burst,
                ),
                prekeys_low: LowNotices::new(limits.keys.prekey_low_interval()),
                db,
                limits,
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }
    pub fn db(&self) -> &Database {
        &self.inner.db
    }
    pub fn auth(&self) -> &Authenticator {
        &self.inner.auth
    }
    pub fn relay(&self) -> &Relay {
        &self.inner.relay
    }
    pub fn send_limiter(&self) -> &RateLimiter {
        &self.inner.send_limiter
    }
    pub fn bundle_limiter(&self) -> &RateLimiter {
        &self.inner.bundle_limiter
    }
    pub fn lookup_limiter(&self) -> &RateLimiter {
        &self.inner.lookup_limiter
    }
    pub fn upload_limiter(&self) -> &RateLimiter {
        &self.inner.upload_limiter
    }
    pub fn prekeys_low(&self) -> &LowNotices {
        &self.inner.prekeys_low
    }
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    pub fn health(&self) -> &Health {
        &self.inner.health
    }
}
