//! Queries on the key tables: `identity_keys`, `signed_pre_keys`,
//! `one_time_pre_keys`, `kyber_pre_keys` and `kyber_last_resort_keys`.
//!
//! The upload functions take a connection inside the caller's transaction
//! (the key directory decides what an upload does; this module only says
//! how). Fetching a bundle is one statement, autocommitted.

use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use super::StorageError;

/// The identity a user has published.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredIdentity {
    /// The serialized identity key, to compare with an uploaded one and to
    /// verify signatures against.
    pub identity_key: Vec<u8>,
}

/// A key to insert: id and serialized public key.
#[derive(Debug, Clone, Copy)]
pub struct NewKey<'a> {
    /// The client's id for the key.
    pub id: i32,
    /// The serialized public key.
    pub public_key: &'a [u8],
}

/// A signed key to insert.
#[derive(Debug, Clone, Copy)]
pub struct NewSignedKey<'a> {
    /// The client's id for the key.
    pub id: i32,
    /// The serialized public key.
    pub public_key: &'a [u8],
    /// The identity key's signature over `public_key`.
    pub signature: &'a [u8],
}

/// One-time key counts of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Counts {
    /// One-time EC pre-keys.
    pub one_time: i64,
    /// One-time Kyber pre-keys.
    pub kyber: i64,
}

/// Locks the user's row for the rest of the transaction and returns their
/// identity, if they have published one. `None` if the user does not exist.
///
/// Every upload of a user takes this lock first, so uploads of one user run
/// one after the other, and the identity read here cannot change before the
/// transaction ends. The lock is on `users` rather than on `identity_keys`
/// because before the first upload there is no identity row to lock, and
/// two concurrent first uploads must serialise too. `FOR NO KEY UPDATE`
/// rather than `FOR UPDATE`: it does not block the `KEY SHARE` locks that
/// foreign-key checks (messages being stored for this user) take.
///
/// Lock and read are two statements on purpose. Under READ COMMITTED a
/// statement reads from the snapshot it started with, even if it then
/// waited for a lock: had the read been part of the locking statement, an
/// upload that waited for another would not see the identity that one
/// committed, and would take a replacement for a first upload.
pub async fn lock_for_upload(
    tx: &mut PgConnection,
    user: Uuid,
) -> Result<Option<Option<StoredIdentity>>, StorageError> {
    let exists = sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?
        .is_some();
    if !exists {
        return Ok(None);
    }
    let identity = sqlx::query_as("SELECT identity_key FROM identity_keys WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(Some(identity))
}

/// Deletes every pre-key of the user: signed, one-time EC, one-time Kyber
/// and last-resort. Used when the identity key changes, since all of them
/// were signed (or issued) under the old identity.
pub async fn delete_pre_keys(tx: &mut PgConnection, user: Uuid) -> Result<(), StorageError> {
    sqlx::query(
        "WITH s AS (DELETE FROM signed_pre_keys WHERE user_id = $1), \
              o AS (DELETE FROM one_time_pre_keys WHERE user_id = $1), \
              k AS (DELETE FROM kyber_pre_keys WHERE user_id = $1) \
         DELETE FROM kyber_last_resort_keys WHERE user_id = $1",
    )
    .bind(user)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sets the user's identity key and registration id.
pub async fn upsert_identity(
    tx: &mut PgConnection,
    user: Uuid,
    identity_key: &[u8],
    registration_id: i32,
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO identity_keys (user_id, identity_key, registration_id) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO UPDATE \
         SET identity_key = EXCLUDED.identity_key, registration_id = EXCLUDED.registration_id",
    )
    .bind(user)
    .bind(identity_key)
    .bind(registration_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Makes `key` the user's only signed pre-key: the relay keeps just the
/// current one, since a bundle never carries another.
pub async fn replace_signed_pre_key(
    tx: &mut PgConnection,
    user: Uuid,
    key: NewSignedKey<'_>,
) -> Result<(), StorageError> {
    sqlx::query(
        "WITH older AS (DELETE FROM signed_pre_keys WHERE user_id = $1 AND id <> $2) \
         INSERT INTO signed_pre_keys (user_id, id, public_key, signature) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, id) DO UPDATE \
         SET public_key = EXCLUDED.public_key, signature = EXCLUDED.signature, created_at = now()",
    )
    .bind(user)
    .bind(key.id)
    .bind(key.public_key)
    .bind(key.signature)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Adds one-time EC pre-keys; a key with an id the user has replaces it.
/// Ids must be unique within `keys`.
pub async fn upsert_one_time_pre_keys(
    tx: &mut PgConnection,
    user: Uuid,
    keys: &[NewKey<'_>],
) -> Result<(), StorageError> {
    let ids: Vec<i32> = keys.iter().map(|k| k.id).collect();
    let public_keys: Vec<&[u8]> = keys.iter().map(|k| k.public_key).collect();
    sqlx::query(
        "INSERT INTO one_time_pre_keys (user_id, id, public_key) \
         SELECT $1, u.id, u.public_key FROM UNNEST($2::int4[], $3::bytea[]) AS u(id, public_key) \
         ON CONFLICT (user_id, id) DO UPDATE SET public_key = EXCLUDED.public_key",
    )
    .bind(user)
    .bind(&ids)
    .bind(&public_keys)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Adds one-time Kyber pre-keys; a key with an id the user has replaces
/// it. Ids must be unique within `keys`.
pub async fn upsert_kyber_pre_keys(
    tx: &mut PgConnection,
    user: Uuid,
    keys: &[NewSignedKey<'_>],
) -> Result<(), StorageError> {
    let ids: Vec<i32> = keys.iter().map(|k| k.id).collect();
    let public_keys: Vec<&[u8]> = keys.iter().map(|k| k.public_key).collect();
    let signatures: Vec<&[u8]> = keys.iter().map(|k| k.signature).collect();
    sqlx::query(
        "INSERT INTO kyber_pre_keys (user_id, id, public_key, signature) \
         SELECT $1, u.id, u.public_key, u.signature \
         FROM UNNEST($2::int4[], $3::bytea[], $4::bytea[]) AS u(id, public_key, signature) \
         ON CONFLICT (user_id, id) DO UPDATE \
         SET public_key = EXCLUDED.public_key, signature = EXCLUDED.signature",
    )
    .bind(user)
    .bind(&ids)
    .bind(&public_keys)
    .bind(&signatures)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sets the user's one Kyber last-resort key.
pub async fn upsert_last_resort(
    tx: &mut PgConnection,
    user: Uuid,
    key: NewSignedKey<'_>,
) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO kyber_last_resort_keys (user_id, id, public_key, signature) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id) DO UPDATE \
         SET id = EXCLUDED.id, public_key = EXCLUDED.public_key, \
             signature = EXCLUDED.signature, created_at = now()",
    )
    .bind(user)
    .bind(key.id)
    .bind(key.public_key)
    .bind(key.signature)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// How many one-time keys of each kind the user has.
pub async fn counts<'e>(db: impl PgExecutor<'e>, user: Uuid) -> Result<Counts, StorageError> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM one_time_pre_keys WHERE user_id = $1) AS one_time, \
                (SELECT count(*) FROM kyber_pre_keys WHERE user_id = $1) AS kyber",
    )
    .bind(user)
    .fetch_one(db)
    .await?)
}

/// Whose bundle to fetch.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    Id(Uuid),
    /// Matched case-insensitively, through `users_username_lower_key`.
    Username(&'a str),
}

/// A bundle as the fetch statement returns it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BundleRow {
    /// The owner, which a fetch by username learns here.
    pub user_id: Uuid,
    /// The owner's username as registered.
    pub username: String,
    /// The owner's registration id.
    pub registration_id: i32,
    /// The owner's serialized identity key.
    pub identity_key: Vec<u8>,
    /// The current signed pre-key's id, which the recipient needs to find
    /// its private half.
    pub signed_id: i32,
    /// The current signed pre-key.
    pub signed_public_key: Vec<u8>,
    /// The identity key's signature over `signed_public_key`.
    pub signed_signature: Vec<u8>,
    /// The id of the one-time EC pre-key this fetch removed; `None` if none
    /// was left.
    pub one_time_id: Option<i32>,
    /// That one-time EC pre-key.
    pub one_time_public_key: Option<Vec<u8>>,
    /// The id of the one-time Kyber pre-key this fetch removed, or else of
    /// the last-resort key.
    pub kyber_id: i32,
    /// That Kyber key.
    pub kyber_public_key: Vec<u8>,
    /// The identity key's signature over `kyber_public_key`.
    pub kyber_signature: Vec<u8>,
    /// True when the Kyber key is the (unconsumed) last-resort key.
    pub kyber_is_last_resort: bool,
}

/// The fetch statement, for a `WHERE` condition on `users u` naming `$1`.
///
/// How it never hands out a one-time key twice: each `DELETE` removes the
/// row its sub-select picked, and the sub-select locks what it picks with
/// `FOR UPDATE SKIP LOCKED`. A concurrent fetch therefore skips a row that
/// another fetch has picked and not yet committed, and a row another fetch
/// has already deleted is dropped when the lock finds it gone (READ
/// COMMITTED re-checks locked rows), so it moves on to the next-lowest id.
/// A row can only be returned by the one `DELETE` that removed it. Rows an
/// upload is replacing are locked too, and are skipped the same way.
///
/// Why one statement: every part sees one snapshot, so a bundle never
/// mixes an identity with pre-keys of another identity while an identity
/// replacement commits. Keys are only taken from a user who has a complete
/// set (identity, signed pre-key, last-resort key): otherwise `owner` is
/// empty, nothing is deleted and the fetch returns no row.
macro_rules! fetch_bundle_sql {
    ($condition:literal) => {
        concat!(
            "WITH owner AS ( \
                SELECT u.id, u.username, ik.registration_id, ik.identity_key, \
                       spk.id AS signed_id, spk.public_key AS signed_public_key, \
                       spk.signature AS signed_signature, \
                       lr.id AS last_resort_id, lr.public_key AS last_resort_public_key, \
                       lr.signature AS last_resort_signature \
                FROM users u \
                JOIN identity_keys ik ON ik.user_id = u.id \
                JOIN kyber_last_resort_keys lr ON lr.user_id = u.id \
                CROSS JOIN LATERAL ( \
                    SELECT s.id, s.public_key, s.signature FROM signed_pre_keys s \
                    WHERE s.user_id = u.id ORDER BY s.created_at DESC, s.id DESC LIMIT 1 \
                ) spk \
                WHERE ",
            $condition,
            " ), \
             one_time AS ( \
                DELETE FROM one_time_pre_keys \
                WHERE (user_id, id) = ( \
                    SELECT k.user_id, k.id FROM one_time_pre_keys k \
                    WHERE k.user_id = (SELECT id FROM owner) \
                    ORDER BY k.id LIMIT 1 \
                    FOR UPDATE OF k SKIP LOCKED) \
                RETURNING id, public_key \
             ), \
             kyber AS ( \
                DELETE FROM kyber_pre_keys \
                WHERE (user_id, id) = ( \
                    SELECT k.user_id, k.id FROM kyber_pre_keys k \
                    WHERE k.user_id = (SELECT id FROM owner) \
                    ORDER BY k.id LIMIT 1 \
                    FOR UPDATE OF k SKIP LOCKED) \
                RETURNING id, public_key, signature \
             ) \
             SELECT o.id AS user_id, o.username, o.registration_id, o.identity_key, \
                    o.signed_id, o.signed_public_key, o.signed_signature, \
                    ot.id AS one_time_id, ot.public_key AS one_time_public_key, \
                    COALESCE(ky.id, o.last_resort_id) AS kyber_id, \
                    COALESCE(ky.public_key, o.last_resort_public_key) AS kyber_public_key, \
                    COALESCE(ky.signature, o.last_resort_signature) AS kyber_signature, \
                    ky.id IS NULL AS kyber_is_last_resort \
             FROM owner o \
             LEFT JOIN one_time ot ON true \
             LEFT JOIN kyber ky ON true"
        )
    };
}

/// Fetches the owner's bundle, removing the lowest-id one-time EC and
/// one-time Kyber pre-keys it hands out. `None` when the user does not
/// exist or has not published keys.
pub async fn fetch_bundle(
    db: &PgPool,
    owner: Owner<'_>,
) -> Result<Option<BundleRow>, StorageError> {
    let query = match owner {
        Owner::Id(id) => sqlx::query_as(fetch_bundle_sql!("u.id = $1")).bind(id),
        Owner::Username(name) => {
            sqlx::query_as(fetch_bundle_sql!("lower(u.username) = lower($1)")).bind(name)
        }
    };
    Ok(query.fetch_optional(db).await?)
}

/// A user as `LookupUser` describes them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LookupRow {
    /// Who the username belongs to.
    pub user_id: Uuid,
    /// The username as registered (the letter case the user chose).
    pub username: String,
    /// The identity key, present only when the user has the complete set a
    /// bundle needs (identity, signed pre-key, last-resort key), so that
    /// "published" means exactly "a fetch would succeed".
    pub identity_key: Option<Vec<u8>>,
}

/// Finds a user by username (any letter case) and their published
/// identity, in one statement (one snapshot), touching no key. `None` when
/// there is no such user.
pub async fn lookup_user(db: &PgPool, username: &str) -> Result<Option<LookupRow>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT u.id AS user_id, u.username, \
                CASE WHEN EXISTS (SELECT 1 FROM signed_pre_keys s WHERE s.user_id = u.id) \
                      AND EXISTS (SELECT 1 FROM kyber_last_resort_keys l WHERE l.user_id = u.id) \
                     THEN ik.identity_key END AS identity_key \
         FROM users u \
         LEFT JOIN identity_keys ik ON ik.user_id = u.id \
         WHERE lower(u.username) = lower($1)",
    )
    .bind(username)
    .fetch_optional(db)
    .await?)
}

/// Whether the user exists, to tell "no such user" from "no keys".
pub async fn user_exists(db: &PgPool, owner: Owner<'_>) -> Result<bool, StorageError> {
    let query = match owner {
        Owner::Id(id) => {
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)").bind(id)
        }
        Owner::Username(name) => sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM users WHERE lower(username) = lower($1))",
        )
        .bind(name),
    };
    Ok(query.fetch_one(db).await?)
}
