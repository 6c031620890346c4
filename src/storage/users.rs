//! Queries on `users`.

use chrono::{DateTime, Utc};
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

/// A user as an operator lists them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserSummary {
    pub id: Uuid,
    pub username: String,
    /// Nullable in the spec's schema, though always set by the default.
    pub created_at: Option<DateTime<Utc>>,
}

/// Users, oldest first (ties by id), without password hashes: at most
/// `limit`, and only those after the user named `after` in that order.
/// None: no user is named `after`.
///
/// A keyset, not an offset: users created or deleted meanwhile neither
/// repeat nor skip others. (If the user named `after` is deleted, there is
/// nothing to continue from: None, and the caller starts again.) Each page
/// scans the table, as nothing indexes `created_at`; memory stays bounded
/// by `limit`. `created_at` may be NULL in the spec's schema; such rows
/// come last.
pub async fn list(
    db: &PgPool,
    limit: u32,
    after: Option<&str>,
) -> Result<Option<Vec<UserSummary>>, StorageError> {
    let cursor: Option<(Option<DateTime<Utc>>, Uuid)> = match after {
        None => None,
        Some(name) => {
            let found = sqlx::query_as(
                "SELECT created_at, id FROM users WHERE lower(username) = lower($1)",
            )
            .bind(name)
            .fetch_optional(db)
            .await?;
            match found {
                Some(cursor) => Some(cursor),
                None => return Ok(None),
            }
        }
    };
    let (after_at, after_id) = cursor.unzip();
    let users = sqlx::query_as(
        "SELECT id, username, created_at FROM users
         WHERE $3::uuid IS NULL
            OR ($2::timestamptz IS NOT NULL AND (created_at IS NULL OR (created_at, id) > ($2, $3)))
            OR ($2::timestamptz IS NULL AND created_at IS NULL AND id > $3)
         ORDER BY created_at NULLS LAST, id
         LIMIT $1",
    )
    .bind(i64::from(limit))
    .bind(after_at.flatten())
    .bind(after_id)
    .fetch_all(db)
    .await?;
    Ok(Some(users))
}

/// What the relay holds for one user, as counts: never a hash or a key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserOverview {
    pub id: Uuid,
    pub username: String,
    pub created_at: Option<DateTime<Utc>>,
    /// Whether keys were ever published (an identity key is stored).
    pub identity_key: bool,
    pub signed_pre_key: bool,
    pub one_time_pre_keys: i64,
    pub kyber_pre_keys: i64,
    pub kyber_last_resort_key: bool,
    /// Unexpired messages waiting for the user.
    pub queued_messages: i64,
    /// Unexpired sessions.
    pub live_sessions: i64,
}

/// The overview of the user named `username`, in any letter case, read in
/// one statement so the counts are of one moment.
pub async fn overview(db: &PgPool, username: &str) -> Result<Option<UserOverview>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT u.id, u.username, u.created_at, \
           EXISTS (SELECT 1 FROM identity_keys k WHERE k.user_id = u.id) AS identity_key, \
           EXISTS (SELECT 1 FROM signed_pre_keys k WHERE k.user_id = u.id) AS signed_pre_key, \
           (SELECT count(*) FROM one_time_pre_keys k WHERE k.user_id = u.id) AS one_time_pre_keys, \
           (SELECT count(*) FROM kyber_pre_keys k WHERE k.user_id = u.id) AS kyber_pre_keys, \
           EXISTS (SELECT 1 FROM kyber_last_resort_keys k WHERE k.user_id = u.id) \
             AS kyber_last_resort_key, \
           (SELECT count(*) FROM messages m WHERE m.recipient_id = u.id AND m.expires_at > now()) \
             AS queued_messages, \
           (SELECT count(*) FROM sessions s WHERE s.user_id = u.id AND s.expires_at > now()) \
             AS live_sessions \
         FROM users u WHERE lower(u.username) = lower($1)",
    )
    .bind(username)
    .fetch_optional(db)
    .await?)
}
