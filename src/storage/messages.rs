//! Queries on `messages`: batched inserts, the ordered drain read, batched
//! ack deletes and the expiry sweep.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::StorageError;
use crate::messages::{EnvelopeType, Message};

fn to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Inserts `messages` in one statement. Returns the ids actually inserted:
/// a message whose id is already stored (an idempotent retry) or whose
/// recipient does not exist is skipped, not an error, so one bad row never
/// fails the batch.
pub async fn insert_batch(db: &PgPool, messages: &[&Message]) -> Result<Vec<Uuid>, StorageError> {
    let n = messages.len();
    let mut ids = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    let mut recipients = Vec::with_capacity(n);
    let mut contents: Vec<&[u8]> = Vec::with_capacity(n);
    let mut created = Vec::with_capacity(n);
    let mut expires = Vec::with_capacity(n);
    let mut seqs = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut client_ts = Vec::with_capacity(n);
    for m in messages {
        ids.push(m.id);
        senders.push(m.sender_id);
        recipients.push(m.recipient_id);
        contents.push(&m.content[..]);
        created.push(to_time(m.server_timestamp_ms));
        expires.push(to_time(m.expires_at_ms));
        seqs.push(m.seq);
        types.push(m.envelope_type.code());
        client_ts.push(m.client_timestamp_ms);
    }
    // The sender may have deleted their account meanwhile; the message then
    // stays deliverable without one, as ON DELETE SET NULL would leave it.
    let inserted = sqlx::query_scalar(
        "INSERT INTO messages \
           (id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
         SELECT u.id, s.id, u.recipient_id, u.content, u.created_at, u.expires_at, u.seq, u.envelope_type, u.client_timestamp \
         FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::bytea[], $5::timestamptz[], \
                     $6::timestamptz[], $7::int8[], $8::int2[], $9::int8[]) \
              AS u(id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
         JOIN users r ON r.id = u.recipient_id \
         LEFT JOIN users s ON s.id = u.sender_id \
         ON CONFLICT (id) DO NOTHING \
         RETURNING id",
    )
    .bind(&ids)
    .bind(&senders)
    .bind(&recipients)
    .bind(&contents)
    .bind(&created)
    .bind(&expires)
    .bind(&seqs)
    .bind(&types)
    .bind(&client_ts)
    .fetch_all(db)
    .await?;
    Ok(inserted)
}

#[derive(sqlx::FromRow)]
struct Row {
    id: Uuid,
    seq: i64,
    sender_id: Option<Uuid>,
    sender_username: Option<String>,
    envelope_type: i16,
    content: Vec<u8>,
    created_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    client_timestamp: i64,
}

/// The recipient's unexpired stored messages with `after < seq < below`, in
/// order: at most `limit` rows, and no more content than `byte_budget`
/// beyond the first row, so one read never holds an unbounded amount.
pub async fn fetch_for_drain(
    db: &PgPool,
    recipient: Uuid,
    after: i64,
    below: i64,
    limit: i64,
    byte_budget: i64,
) -> Result<Vec<Message>, StorageError> {
    // The read must walk the (recipient_id, seq) index and stop after
    // `limit` rows. Right after a burst of stores the table's statistics
    // are stale; the planner then expects a handful of rows and picks a
    // bitmap scan of *all* the recipient's rows plus a sort that spills to
    // disk: 466 ms instead of 3 ms per batch, quadratic over a long queue.
    // Ruling those plans out for this one statement keeps it on the index
    // whatever the statistics say.
    let mut tx = db.begin().await?;
    sqlx::query("SET LOCAL enable_bitmapscan = off")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SET LOCAL enable_sort = off")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.id, t.seq, t.sender_id, u.username AS sender_username, t.envelope_type, \
                t.content, t.created_at, t.expires_at, t.client_timestamp \
         FROM (SELECT m.*, sum(octet_length(m.content)) OVER (ORDER BY m.seq) AS running \
               FROM messages m \
               WHERE m.recipient_id = $1 AND m.seq > $2 AND m.seq < $3 AND m.expires_at > now() \
               ORDER BY m.seq LIMIT $4) t \
         LEFT JOIN users u ON u.id = t.sender_id \
         WHERE t.running - octet_length(t.content) < $5 \
         ORDER BY t.seq",
    )
    .bind(recipient)
    .bind(after)
    .bind(below)
    .bind(limit)
    .bind(byte_budget)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(rows
        .into_iter()
        .map(|r| Message {
            id: r.id,
            seq: r.seq,
            sender_id: r.sender_id,
            sender_username: Arc::from(r.sender_username.unwrap_or_default()),
            recipient_id: recipient,
            envelope_type: EnvelopeType::from_code(r.envelope_type)
                .unwrap_or(EnvelopeType::Ciphertext),
            content: Bytes::from(r.content),
            server_timestamp_ms: r.created_at.map_or(0, |t| t.timestamp_millis()),
            client_timestamp_ms: r.client_timestamp,
            expires_at_ms: r.expires_at.timestamp_millis(),
            ephemeral: false,
        })
        .collect())
}

/// A stored message removed by an ack.
#[derive(Debug, sqlx::FromRow)]
pub struct Acked {
    pub id: Uuid,
    pub sender_id: Option<Uuid>,
    pub envelope_type: i16,
}

/// Deletes those of `ids` that are the recipient's, in one statement.
pub async fn delete_acked(
    db: &PgPool,
    recipient: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Acked>, StorageError> {
    Ok(sqlx::query_as(
        "DELETE FROM messages WHERE recipient_id = $1 AND id = ANY($2) \
         RETURNING id, sender_id, envelope_type",
    )
    .bind(recipient)
    .bind(ids)
    .fetch_all(db)
    .await?)
}

/// Deletes up to `batch` expired messages; returns how many went.
pub async fn sweep_expired(db: &PgPool, batch: i64) -> Result<u64, StorageError> {
    let result = sqlx::query(
        "DELETE FROM messages WHERE id IN \
         (SELECT id FROM messages WHERE expires_at <= now() ORDER BY expires_at LIMIT $1)",
    )
    .bind(batch)
    .execute(db)
    .await?;
    Ok(result.rows_affected())
}

/// The highest sequence number in storage.
pub async fn max_seq(db: &PgPool) -> Result<Option<i64>, StorageError> {
    Ok(sqlx::query_scalar("SELECT max(seq) FROM messages")
        .fetch_one(db)
        .await?)
}
