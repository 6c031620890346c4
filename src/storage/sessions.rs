//! Queries on `sessions`. Only token hashes reach this module.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;

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

/// Of `token_hashes`, those of live (unexpired) sessions, in one
/// statement: (hash, user id, username).
pub async fn find_live_many(
    conn: &mut sqlx::PgConnection,
    token_hashes: &[&[u8]],
) -> Result<Vec<(Vec<u8>, Uuid, String)>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT s.token_hash, u.id, u.username FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.token_hash = ANY($1) AND s.expires_at > now()",
    )
    .bind(token_hashes)
    .fetch_all(conn)
    .await?)
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
