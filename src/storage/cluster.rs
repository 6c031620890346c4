//! Queries on `relay_nodes` and `relay_presence`: cluster membership and
//! the per-user ownership that fences stores (see the cluster migration for
//! why these live in PostgreSQL rather than Redis).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;

/// Registers a new incarnation of `node_id`, and declares every earlier
/// incarnation of the same node dead: a restarted node is never confused
/// with its previous life, and the users that life held are released at
/// once rather than after the dead-after delay. Returns those incarnations.
pub async fn register_node(
    db: &PgPool,
    incarnation: Uuid,
    node_id: &str,
) -> Result<Vec<Uuid>, StorageError> {
    let (db, node_id) = (db.clone(), node_id.to_owned());
    super::detached(async move {
        let mut tx = db.begin().await?;
        let previous: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE relay_nodes SET dead = true WHERE node_id = $1 AND NOT dead RETURNING incarnation",
    )
    .bind(&node_id)
    .fetch_all(&mut *tx)
    .await?;
        sqlx::query("DELETE FROM relay_presence WHERE incarnation = ANY($1)")
            .bind(&previous)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO relay_nodes (incarnation, node_id) VALUES ($1, $2)")
            .bind(incarnation)
            .bind(&node_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(previous)
    })
    .await?
}

/// Renews this incarnation's heartbeat. False when it was declared dead
/// meanwhile: it has been fenced out and must stop serving.
pub async fn heartbeat(db: &PgPool, incarnation: Uuid) -> Result<bool, StorageError> {
    let renewed = sqlx::query(
        "UPDATE relay_nodes SET heartbeat_at = now() WHERE incarnation = $1 AND NOT dead",
    )
    .bind(incarnation)
    .execute(db)
    .await?
    .rows_affected();
    Ok(renewed == 1)
}

/// Declares dead every incarnation whose heartbeat is older than
/// `dead_after`, by the database's clock, and releases the users they
/// held. Any node may run it; each death is declared once. Returns the
/// incarnations declared dead now.
pub async fn declare_dead(db: &PgPool, dead_after: Duration) -> Result<Vec<Uuid>, StorageError> {
    let db = db.clone();
    super::detached(async move {
        let mut tx = db.begin().await?;
        let dead: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE relay_nodes SET dead = true \
         WHERE NOT dead AND heartbeat_at < now() - make_interval(secs => $1) \
         RETURNING incarnation",
        )
        .bind(dead_after.as_secs_f64())
        .fetch_all(&mut *tx)
        .await?;
        if !dead.is_empty() {
            sqlx::query("DELETE FROM relay_presence WHERE incarnation = ANY($1)")
                .bind(&dead)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(dead)
    })
    .await?
}

/// Of `incarnations`, those that are dead or have not sent a heartbeat for
/// `dead_after` (declared or not yet).
pub async fn gone(
    db: &PgPool,
    incarnations: &[Uuid],
    dead_after: Duration,
) -> Result<Vec<Uuid>, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT i FROM unnest($1::uuid[]) AS i \
         WHERE NOT EXISTS (SELECT 1 FROM relay_nodes n WHERE n.incarnation = i AND NOT n.dead \
                           AND n.heartbeat_at >= now() - make_interval(secs => $2))",
    )
    .bind(incarnations)
    .bind(dead_after.as_secs_f64())
    .fetch_all(db)
    .await?)
}

/// Forgets incarnations dead for longer than `keep`.
pub async fn forget_dead(db: &PgPool, keep: Duration) -> Result<u64, StorageError> {
    Ok(sqlx::query(
        "DELETE FROM relay_nodes WHERE dead AND heartbeat_at < now() - make_interval(secs => $1)",
    )
    .bind(keep.as_secs_f64())
    .execute(db)
    .await?
    .rows_affected())
}

/// A claim on a user: which node incarnation holds them, under which
/// epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    pub incarnation: Uuid,
    pub epoch: i64,
}

/// What [`claim_if_free`] found.
#[derive(Debug, Clone, Copy, sqlx::FromRow)]
pub struct FirstClaim {
    /// Set when the claim was made; `None` when another claim holds the
    /// user (then `previous` names it, and the want was recorded).
    pub epoch: Option<i64>,
    /// Who owned the user just before, if anyone.
    pub previous: Option<Uuid>,
    /// The epoch of their claim.
    pub previous_epoch: Option<i64>,
    /// The highest sequence number stored for the user, which the new
    /// owner's numbering must exceed.
    pub max_seq: Option<i64>,
}

impl FirstClaim {
    /// The claim found holding the user, if it was not this one's.
    pub fn held_by(&self) -> Option<Holder> {
        match (self.epoch, self.previous, self.previous_epoch) {
            (None, Some(incarnation), Some(epoch)) => Some(Holder { incarnation, epoch }),
            _ => None,
        }
    }
}

/// Claims the user for `me` unless a claim other than `take_from` holds
/// them; then records that `me` wants them, and names that claim (see
/// `relay_claim_if_free`). A claim waits for stores in flight for the user.
pub async fn claim_if_free(
    db: &PgPool,
    user: Uuid,
    me: Uuid,
    take_from: Option<Holder>,
) -> Result<FirstClaim, StorageError> {
    Ok(sqlx::query_as(
        "SELECT epoch, previous, previous_epoch, max_seq \
         FROM relay_claim_if_free($1, $2, $3, $4)",
    )
    .bind(user)
    .bind(me)
    .bind(take_from.map(|h| h.incarnation))
    .bind(take_from.map(|h| h.epoch))
    .fetch_one(db)
    .await?)
}

/// The claim holding the user, if any.
pub async fn holder(db: &PgPool, user: Uuid) -> Result<Option<Holder>, StorageError> {
    let row: Option<(Uuid, i64)> =
        sqlx::query_as("SELECT incarnation, epoch FROM relay_presence WHERE user_id = $1")
            .bind(user)
            .fetch_optional(db)
            .await?;
    Ok(row.map(|(incarnation, epoch)| Holder { incarnation, epoch }))
}

/// Releases the user's claim under `epoch`, if `me` still owns them under
/// it: a late release of an earlier connection cannot remove a newer
/// connection's claim.
pub async fn release(db: &PgPool, user: Uuid, me: Uuid, epoch: i64) -> Result<bool, StorageError> {
    let released = sqlx::query(
        "DELETE FROM relay_presence WHERE user_id = $1 AND incarnation = $2 AND epoch = $3",
    )
    .bind(user)
    .bind(me)
    .bind(epoch)
    .execute(db)
    .await?
    .rows_affected();
    Ok(released == 1)
}

/// The incarnation that owns the user, if any.
pub async fn owner(db: &PgPool, user: Uuid) -> Result<Option<Uuid>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT incarnation FROM relay_presence WHERE user_id = $1")
            .bind(user)
            .fetch_optional(db)
            .await?,
    )
}

/// Why a claim this node holds must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimCheck {
    /// Another node claimed the user, or the user is gone; `exists` tells
    /// which, for the close code.
    Lost { exists: bool },
    /// Still this node's, but another node waits to take the user over.
    Wanted,
}

/// Of `users`, held by `me` under the given epochs, those whose claims must
/// end: lost (another node claimed them, or they were deleted) or wanted by
/// another node. The rest are still this node's, and nobody waits for them.
pub async fn check_claims(
    db: impl sqlx::PgExecutor<'_>,
    me: Uuid,
    users: &[Uuid],
    epochs: &[i64],
) -> Result<Vec<(Uuid, i64, ClaimCheck)>, StorageError> {
    let rows: Vec<(Uuid, i64, bool, bool)> = sqlx::query_as(
        "SELECT c.u, c.e, p.user_id IS NOT NULL, EXISTS (SELECT 1 FROM users WHERE id = c.u) \
         FROM unnest($1::uuid[], $2::int8[]) AS c(u, e) \
         LEFT JOIN relay_presence p \
                ON p.user_id = c.u AND p.incarnation = $3 AND p.epoch = c.e \
         WHERE p.user_id IS NULL OR p.wanted_by IS NOT NULL",
    )
    .bind(users)
    .bind(epochs)
    .bind(me)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(user, epoch, held, exists)| {
            let check = if held {
                ClaimCheck::Wanted
            } else {
                ClaimCheck::Lost { exists }
            };
            (user, epoch, check)
        })
        .collect())
}
