//! Queries on `sessions`. Only token hashes reach this module.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;

/// Inserts a session with no cap on how many the user holds (the bench's
/// seeding; the server issues through [`insert_capped`]).
pub async fn insert(
    db: &PgPool,
    token_hash: &[u8; 32],
    user_id: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<(), StorageError> {
    sqlx::query("INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)")
        .bind(&token_hash[..])
        .bind(user_id)
        .bind(expires_at)
        .execute(db)
        .await?;
    Ok(())
}

/// Inserts a session and, in the same transaction, revokes the user's
/// oldest live sessions (and any expired ones) so that at most `cap` remain,
/// the new one included. Returns how many were revoked.
///
/// The user's row is locked first (`FOR NO KEY UPDATE`, which does not block
/// the key-share locks of message and key inserts), so concurrent logins of
/// one user take turns and the cap holds exactly.
pub async fn insert_capped(
    db: &PgPool,
    token_hash: &[u8; 32],
    user_id: Uuid,
    expires_at: DateTime<Utc>,
    cap: u32,
) -> Result<u64, StorageError> {
    let (db, token_hash) = (db.clone(), *token_hash);
    super::detached(async move {
        let mut tx = db.begin().await?;
        sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let keep_old = i64::from(cap.max(1)) - 1;
        let revoked = sqlx::query(
            "DELETE FROM sessions WHERE user_id = $1 AND (expires_at <= now() OR token_hash IN \
         (SELECT token_hash FROM sessions WHERE user_id = $1 AND expires_at > now() \
          ORDER BY created_at DESC, token_hash DESC OFFSET $2))",
        )
        .bind(user_id)
        .bind(keep_old)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)")
            .bind(&token_hash[..])
            .bind(user_id)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(revoked)
    })
    .await?
}

/// Deletes every session of a user, expired or not; returns how many went.
pub async fn delete_all_for_user(db: &PgPool, user_id: Uuid) -> Result<u64, StorageError> {
    let result = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(result.rows_affected())
}

/// A live session: who holds it, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub user_id: Uuid,
    pub username: String,
    pub expires_at: DateTime<Utc>,
}

/// Of `token_hashes`, those of live (unexpired) sessions, in one
/// statement, by hash.
pub async fn find_live_many(
    conn: &mut sqlx::PgConnection,
    token_hashes: &[&[u8]],
) -> Result<Vec<(Vec<u8>, LiveSession)>, StorageError> {
    let rows: Vec<(Vec<u8>, Uuid, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT s.token_hash, u.id, u.username, s.expires_at \
         FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.token_hash = ANY($1) AND s.expires_at > now()",
    )
    .bind(token_hashes)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(hash, user_id, username, expires_at)| {
            (
                hash,
                LiveSession {
                    user_id,
                    username,
                    expires_at,
                },
            )
        })
        .collect())
}

pub async fn delete(db: &PgPool, token_hash: &[u8; 32]) -> Result<(), StorageError> {
    sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
        .bind(&token_hash[..])
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes up to `batch` expired sessions; returns how many went.
pub async fn sweep_expired(db: &PgPool, batch: i64) -> Result<u64, StorageError> {
    let result = sqlx::query(
        "DELETE FROM sessions WHERE token_hash IN \
         (SELECT token_hash FROM sessions WHERE expires_at <= now() LIMIT $1)",
    )
    .bind(batch)
    .execute(db)
    .await?;
    Ok(result.rows_affected())
}
