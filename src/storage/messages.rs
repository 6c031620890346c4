//! Queries on `messages`: batched inserts, the ordered drain read, batched
//! ack deletes and the expiry sweep.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, PgExecutor, PgPool, Postgres};
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
///
/// Takes a connection rather than the pool because it may run two
/// statements: nearly every batch is new messages to existing users, so it
/// first tries the plain insert, and only a batch that trips the primary key
/// or a foreign key is run again through the guarded statement that skips
/// the offending rows. Each statement commits on its own; a failed one
/// inserts nothing, so the second attempt sees the table as the first did.
pub async fn insert_batch(
    conn: &mut PgConnection,
    messages: &[&Message],
) -> Result<Vec<Uuid>, StorageError> {
    let columns = Columns::new(messages);
    match columns
        .bind(sqlx::query_scalar::<_, Uuid>(PLAIN_INSERT))
        .fetch_optional(&mut *conn)
        .await
    {
        Ok(_) => return Ok(columns.ids),
        Err(sqlx::Error::Database(e))
            if matches!(e.code().as_deref(), Some(UNIQUE_VIOLATION | FK_VIOLATION)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(columns
        .bind(sqlx::query_scalar(GUARDED_INSERT))
        .fetch_all(&mut *conn)
        .await?)
}

const UNIQUE_VIOLATION: &str = "23505";
const FK_VIOLATION: &str = "23503";

/// The common case, measured on this schema at about three quarters of the
/// guarded statement's cost: no join against `users` per row (the foreign
/// keys check the same thing anyway), and no `ON CONFLICT`, whose
/// speculative insertion costs an extra index probe and an extra WAL record
/// per row.
const PLAIN_INSERT: &str = "INSERT INTO messages \
       (id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::bytea[], $5::timestamptz[], \
                          $6::timestamptz[], $7::int8[], $8::int2[], $9::int8[])";

/// Skips rows whose id is stored already or whose recipient is gone. The
/// sender may have deleted their account meanwhile; the message then stays
/// deliverable without one, as ON DELETE SET NULL would leave it.
const GUARDED_INSERT: &str = "INSERT INTO messages \
       (id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
     SELECT u.id, s.id, u.recipient_id, u.content, u.created_at, u.expires_at, u.seq, u.envelope_type, u.client_timestamp \
     FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::bytea[], $5::timestamptz[], \
                 $6::timestamptz[], $7::int8[], $8::int2[], $9::int8[]) \
          AS u(id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
     JOIN users r ON r.id = u.recipient_id \
     LEFT JOIN users s ON s.id = u.sender_id \
     ON CONFLICT (id) DO NOTHING \
     RETURNING id";

/// A batch of messages as one array per column, for `UNNEST`.
struct Columns<'a> {
    /// `messages.id`.
    ids: Vec<Uuid>,
    /// `messages.sender_id`.
    senders: Vec<Option<Uuid>>,
    /// `messages.recipient_id`.
    recipients: Vec<Uuid>,
    /// `messages.content`, borrowed from the messages.
    contents: Vec<&'a [u8]>,
    /// `messages.created_at`.
    created: Vec<DateTime<Utc>>,
    /// `messages.expires_at`.
    expires: Vec<DateTime<Utc>>,
    /// `messages.seq`.
    seqs: Vec<i64>,
    /// `messages.envelope_type`.
    types: Vec<i16>,
    /// `messages.client_timestamp`.
    client_ts: Vec<i64>,
}

impl<'a> Columns<'a> {
    fn new(messages: &[&'a Message]) -> Self {
        let n = messages.len();
        let mut c = Columns {
            ids: Vec::with_capacity(n),
            senders: Vec::with_capacity(n),
            recipients: Vec::with_capacity(n),
            contents: Vec::with_capacity(n),
            created: Vec::with_capacity(n),
            expires: Vec::with_capacity(n),
            seqs: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            client_ts: Vec::with_capacity(n),
        };
        for m in messages {
            c.ids.push(m.id);
            c.senders.push(m.sender_id);
            c.recipients.push(m.recipient_id);
            c.contents.push(&m.content[..]);
            c.created.push(to_time(m.server_timestamp_ms));
            c.expires.push(to_time(m.expires_at_ms));
            c.seqs.push(m.seq);
            c.types.push(m.envelope_type.code());
            c.client_ts.push(m.client_timestamp_ms);
        }
        c
    }

    /// Binds the nine arrays, in column order, to either statement.
    fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryScalar<'q, Postgres, O, PgArguments>,
    ) -> sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.senders)
            .bind(&self.recipients)
            .bind(&self.contents)
            .bind(&self.created)
            .bind(&self.expires)
            .bind(&self.seqs)
            .bind(&self.types)
            .bind(&self.client_ts)
    }
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
    db: impl PgExecutor<'_>,
    recipient: Uuid,
    after: i64,
    below: i64,
    limit: i64,
    byte_budget: i64,
) -> Result<Vec<Message>, StorageError> {
    // One statement: the function (see its migration) pins the plan to the
    // (recipient_id, seq) index whatever the statistics say, without the
    // transaction that used to cost every read four extra round trips.
    let rows: Vec<Row> = sqlx::query_as("SELECT * FROM relay_drain_read($1, $2, $3, $4, $5)")
        .bind(recipient)
        .bind(after)
        .bind(below)
        .bind(limit)
        .bind(byte_budget)
        .fetch_all(db)
        .await?;
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
    // The ids alone find the rows, through the primary key; the recipient
    // check must only filter them. Written `recipient_id = $1`, the planner
    // also scanned the recipient's whole range of the (recipient_id, seq)
    // index and intersected the two bitmaps: during a drain of 200,000
    // messages that was 20-30 ms per 1,000-id ack instead of 3-7, since
    // the range still holds every row already acked until vacuum removes
    // it. `IS NOT DISTINCT FROM` means the same here (neither side is NULL)
    // but no index can serve it.
    Ok(sqlx::query_as(
        "DELETE FROM messages WHERE id = ANY($2) AND recipient_id IS NOT DISTINCT FROM $1 \
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
