//! Queries on `users`.

use sqlx::PgPool;
use uuid::Uuid;

use super::{StorageError, is_unique_violation};

/// What login needs to know about a user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRecord {
    pub id: Uuid,
    pub username: String,
    pub password_hash: String,
}

/// Inserts a user; a username taken in any letter case is `UsernameTaken`.
pub async fn insert(
    db: &PgPool,
    username: &str,
    password_hash: &str,
) -> Result<Uuid, StorageError> {
    sqlx::query_scalar("INSERT INTO users (username, password_hash) VALUES ($1, $2) RETURNING id")
        .bind(username)
        .bind(password_hash)
        .fetch_one(db)
        .await
        .map_err(|e| {
            if is_unique_violation(&e) {
                StorageError::UsernameTaken
            } else {
                e.into()
            }
        })
}

/// Finds a user by username, in any letter case.
pub async fn find_by_username(
    db: &PgPool,
    username: &str,
) -> Result<Option<UserRecord>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT id, username, password_hash FROM users WHERE lower(username) = lower($1)",
    )
    .bind(username)
    .fetch_optional(db)
    .await?)
}

pub async fn find_by_id(db: &PgPool, id: Uuid) -> Result<Option<UserRecord>, StorageError> {
    Ok(
        sqlx::query_as("SELECT id, username, password_hash FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?,
    )
}

/// Deletes a user; cascades remove their keys, sessions and queued messages.
pub async fn delete(db: &PgPool, id: Uuid) -> Result<bool, StorageError> {
    let result = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Of `ids`, those of existing users.
pub async fn existing(
    db: impl sqlx::PgExecutor<'_>,
    ids: &[Uuid],
) -> Result<Vec<Uuid>, StorageError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM users WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(db)
            .await?,
    )
}
