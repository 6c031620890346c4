//! Whether the server is alive and ready, as load balancers and operators
//! ask (`/healthz`, `/readyz`), and whether the database is known to be
//! down, so requests that need it fail fast instead of waiting out the
//! pool's acquire timeout.
//!
//! Liveness ends when shutdown begins. Readiness needs migrations applied
//! and a database that answered recently: a [`probe`] asks it every
//! [`PROBE_INTERVAL`], on a connection of its own so a full pool cannot make
//! a healthy database look down.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::metrics::{DbOp, Metrics};

/// How often the database is asked whether it is there.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a probe may take before the database counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How recent the last answer must be for the database to count as up.
const FRESH: Duration = Duration::from_secs(3);

/// The server's health. Cheap to clone; clones share one state.
#[derive(Clone, Debug)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// When this value was made: the origin of `answered_ms`.
    started: Instant,
    /// Set once shutdown has begun.
    shutting_down: AtomicBool,
    /// Set once migrations are applied.
    migrated: AtomicBool,
    /// Milliseconds after `started` of the database's last answer, plus one
    /// (zero: never).
    answered_ms: AtomicU64,
    /// Set when the probe (or start-up) found the database unreachable;
    /// cleared by the next answer.
    down: AtomicBool,
}

/// What `/readyz` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Each thing that is not ready, named for the JSON body.
    pub not_ready: Vec<&'static str>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.not_ready.is_empty()
    }

    /// `{"ready":false,"not_ready":["database"]}`.
    pub fn to_json(&self) -> String {
        let names: Vec<String> = self.not_ready.iter().map(|n| format!("\"{n}\"")).collect();
        format!(
            "{{\"ready\":{},\"not_ready\":[{}]}}",
            self.is_ready(),
            names.join(",")
        )
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Health {
            inner: Arc::new(Inner {
                started: Instant::now(),
                shutting_down: AtomicBool::new(false),
                migrated: AtomicBool::new(false),
                answered_ms: AtomicU64::new(0),
                down: AtomicBool::new(false),
            }),
        }
    }

    /// `/healthz`: alive until shutdown begins.
    pub fn is_live(&self) -> bool {
        !self.inner.shutting_down.load(Ordering::Relaxed)
    }

    pub fn shutting_down(&self) {
        self.inner.shutting_down.store(true, Ordering::Relaxed);
    }

    pub fn migrated(&self) {
        self.inner.migrated.store(true, Ordering::Relaxed);
    }

    /// The database answered just now.
    pub fn database_answered(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64 + 1;
        self.inner.answered_ms.store(ms, Ordering::Relaxed);
        self.inner.down.store(false, Ordering::Relaxed);
    }

    /// The database could not be reached (the probe failed, or start-up
    /// could not connect).
    pub fn database_unreachable(&self) {
        self.inner.down.store(true, Ordering::Relaxed);
    }

    /// True while the database is known to be unreachable: requests that
    /// need it should answer `unavailable` at once.
    pub fn database_down(&self) -> bool {
        self.inner.down.load(Ordering::Relaxed)
    }

    /// The rule: ready when not shutting down, migrated, and the database
    /// answered within [`FRESH`] and is not known to be down since.
    pub fn readiness(&self) -> Readiness {
        let mut not_ready = Vec::new();
        if !self.is_live() {
            not_ready.push("shutting_down");
        }
        if !self.inner.migrated.load(Ordering::Relaxed) {
            not_ready.push("migrations");
        }
        let answered = self.inner.answered_ms.load(Ordering::Relaxed);
        let fresh = answered != 0
            && self.inner.started.elapsed().as_millis() as u64 + 1 - answered
                <= FRESH.as_millis() as u64;
        if !fresh || self.database_down() {
            not_ready.push("database");
        }
        Readiness { not_ready }
    }
}

/// Asks the database `SELECT 1` every [`PROBE_INTERVAL`] until `shutdown`,
/// recording each answer or failure in `health`.
pub async fn probe(db: PgPool, health: Health, metrics: Metrics, shutdown: CancellationToken) {
    let mut conn: Option<PgConnection> = None;
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A probe that times out may be cut off mid-statement; its
        // connection is then dropped, never reused. It holds no
        // transaction, so nothing can be left pending.
        let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
            let c = match &mut conn {
                Some(c) => c,
                None => conn.insert(db.connect_options().connect().await?),
            };
            sqlx::query("SELECT 1").execute(c).await.map(|_| ())
        })
        .await;
        let failure = match answered {
            Ok(Ok(())) => {
                if health.database_down() {
                    tracing::info!("the database answers again");
                }
                health.database_answered();
                continue;
            }
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
        };
        if !health.database_down() {
            tracing::warn!(error = %failure, "the database stopped answering");
        }
        conn = None;
        metrics.db_error(DbOp::probe);
        health.database_unreachable();
    }
    if let Some(conn) = conn {
        let _ = conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_migrated_and_the_database_answered_and_not_shutting_down() {
        let health = Health::new();
        assert!(health.is_live());
        assert_eq!(
            health.readiness().not_ready,
            vec!["migrations", "database"],
            "nothing known at start"
        );
        health.migrated();
        health.database_answered();
        assert!(health.readiness().is_ready());
        assert_eq!(
            health.readiness().to_json(),
            r#"{"ready":true,"not_ready":[]}"#
        );
        health.database_unreachable();
        assert!(health.database_down());
        assert_eq!(health.readiness().not_ready, vec!["database"]);
        health.database_answered();
        assert!(!health.database_down(), "an answer clears it");
        health.shutting_down();
        assert!(!health.is_live());
        assert_eq!(
            health.readiness().to_json(),
            r#"{"ready":false,"not_ready":["shutting_down"]}"#
        );
    }
}
