//! The state every connection shares, behind one cheap-to-clone handle.

use std::sync::Arc;

use sqlx::PgPool;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, PasswordHasher};
use crate::config::Limits;
use crate::messages::dedupe::Dedupe;
use crate::messages::store::StoreWriter;
use crate::ratelimit::RateLimiter;
use crate::registry::Registry;
use crate::storage::{self, Database, StorageError};

/// Shared server state. Cloning copies one `Arc`.
///
/// Locking rules: nothing in here is behind a lock a caller can hold. The
/// registry, rate limiters and dedupe cache lock internally, per call, and
/// never across an `.await`; the pool and the store writer are channels.
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
    /// Who is online; where messages are routed.
    registry: Registry,
    /// The batching writer through which messages reach storage.
    store: StoreWriter,
    /// Outcomes of recent idempotent sends.
    dedupe: Dedupe,
    /// Per-sender message rate.
    send_limiter: RateLimiter,
    /// Per-requester bundle fetch rate.
    bundle_limiter: RateLimiter,
}

impl AppState {
    /// Builds the state over a migrated pool. Background writers are
    /// spawned on `tasks`, which shutdown waits for.
    pub async fn new(
        db: PgPool,
        limits: Limits,
        tasks: &TaskTracker,
    ) -> Result<Self, StorageError> {
        // Sequence numbers must exceed every stored one, and should keep
        // growing across restarts even if the table is empty: seed from both
        // the table and the clock (microseconds since the epoch).
        let stored = storage::messages::max_seq(&db).await?.unwrap_or(0);
        let db = Database::new(db, limits.reader(), tasks);
        let clock = chrono::Utc::now().timestamp_micros();
        let registry = Registry::new(stored.max(clock) + 1, limits.outbound_queue);
        let hasher = PasswordHasher::new(limits.argon2_concurrency, limits.argon2_queue);
        let store = StoreWriter::spawn(
            db.pool().clone(),
            limits.store_queue,
            limits.store_batch,
            limits.store_writers,
            tasks,
        );
        Ok(AppState {
            inner: Arc::new(Inner {
                auth: Authenticator::new(db.clone(), hasher, limits.session_ttl()),
                registry,
                store,
                dedupe: Dedupe::new(limits.dedupe_capacity),
                send_limiter: RateLimiter::new(limits.send_rate_per_sec, limits.send_burst),
                bundle_limiter: RateLimiter::new(limits.bundle_rate_per_sec, limits.bundle_burst),
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
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }
    pub fn store(&self) -> &StoreWriter {
        &self.inner.store
    }
    pub fn dedupe(&self) -> &Dedupe {
        &self.inner.dedupe
    }
    pub fn send_limiter(&self) -> &RateLimiter {
        &self.inner.send_limiter
    }
    pub fn bundle_limiter(&self) -> &RateLimiter {
        &self.inner.bundle_limiter
    }
}
