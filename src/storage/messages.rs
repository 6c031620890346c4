//! Queries on `messages`: batched inserts, the ordered drain read, batched
//! ack deletes and the expiry sweep.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use sqlx::postgres::PgArguments;
use sqlx::{PgConnection, PgPool, Postgres};
use uuid::Uuid;

use super::{StorageError, is_foreign_key_violation, is_unique_violation};
use crate::envelope::{EnvelopeType, Message};

fn to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// What became of one message of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Committed now.
    Inserted,
    /// A message with this id was already stored: an idempotent retry
    /// (possibly acked since).
    AlreadyStored,
    /// The recipient does not exist (any more).
    UnknownRecipient,
    /// Not stored: in cluster mode, the recipient is online on another node
    /// incarnation, which alone may store for them (see [`store_batch_fenced`]).
    Moved(Uuid),
}

/// Stores `messages`, returning each one's outcome in order. One bad row
/// never fails the batch: a message whose id is stored already or whose
/// recipient is gone is skipped and reported as such.
pub async fn store_batch(
    conn: &mut PgConnection,
    messages: &[&Message],
) -> Result<Vec<Stored>, StorageError> {
    let inserted: HashSet<Uuid> = match insert_batch(conn, messages).await {
        // A recipient deleted between the guarded statement's join and its
        // insert; running it again skips them.
        Err(StorageError::Query(e)) if is_foreign_key_violation(&e) => {
            insert_batch(conn, messages).await?
        }
        other => other?,
    }
    .into_iter()
    .collect();
    classify(conn, messages, &inserted, &HashMap::new()).await
}

/// Stores `messages` as [`store_batch`] does, but only for recipients that
/// no other node incarnation than `me` owns, in one transaction with the
/// fence (`relay_fence`, see its migration): a message for a recipient
/// owned elsewhere is not stored and comes back as [`Stored::Moved`], and a
/// claim of a recipient waits for this transaction. Cluster mode only.
pub async fn store_batch_fenced(
    conn: &mut PgConnection,
    messages: &[&Message],
    me: Uuid,
) -> Result<Vec<Stored>, StorageError> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let moved = fence(&mut tx, messages, me).await?;
    let allowed: Vec<&Message> = messages
        .iter()
        .filter(|m| !moved.contains_key(&m.recipient_id))
        .copied()
        .collect();
    // The guarded statement at once: a failed statement would abort the
    // transaction, fence and all.
    let inserted: HashSet<Uuid> = if allowed.is_empty() {
        HashSet::new()
    } else {
        Columns::new(&allowed)
            .bind(sqlx::query_scalar(GUARDED_INSERT))
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect()
    };
    let outcomes = classify(&mut tx, messages, &inserted, &moved).await?;
    tx.commit().await?;
    Ok(outcomes)
}

/// Passes the fence for the recipients of `messages`, inside the caller's
/// transaction: a claim of any of them waits for that transaction from
/// now on. Returns those owned by another incarnation than `me`, with
/// their owner: nothing may be stored for them here.
async fn fence(
    conn: &mut PgConnection,
    messages: &[&Message],
    me: Uuid,
) -> Result<HashMap<Uuid, Uuid>, StorageError> {
    let mut recipients: Vec<Uuid> = messages.iter().map(|m| m.recipient_id).collect();
    recipients.sort_unstable();
    recipients.dedup();
    Ok(
        sqlx::query_as("SELECT user_id, incarnation FROM relay_fence($1, $2)")
            .bind(&recipients)
            .bind(me)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect(),
    )
}

/// Each message's outcome, given the ids inserted and the recipients owned
/// elsewhere: a message neither inserted nor moved was stored already, or
/// its recipient is gone.
async fn classify(
    conn: &mut PgConnection,
    messages: &[&Message],
    inserted: &HashSet<Uuid>,
    moved: &HashMap<Uuid, Uuid>,
) -> Result<Vec<Stored>, StorageError> {
    let skipped: Vec<Uuid> = messages
        .iter()
        .filter(|m| !inserted.contains(&m.id) && !moved.contains_key(&m.recipient_id))
        .map(|m| m.recipient_id)
        .collect();
    let existing: HashSet<Uuid> = if skipped.is_empty() {
        HashSet::new()
    } else {
        super::users::existing(conn, &skipped)
            .await?
            .into_iter()
            .collect()
    };
    Ok(messages
        .iter()
        .map(|m| {
            if let Some(owner) = moved.get(&m.recipient_id) {
                Stored::Moved(*owner)
            } else if inserted.contains(&m.id) {
                Stored::Inserted
            } else if existing.contains(&m.recipient_id) {
                Stored::AlreadyStored
            } else {
                Stored::UnknownRecipient
            }
        })
        .collect())
}

/// Inserts `messages`, returning the ids actually inserted.
///
/// Nearly every batch is new messages to existing users, so it first tries
/// the plain copy, and only a batch that trips the primary key or a
/// foreign key is run again through the guarded statement that skips the
/// offending rows. Each statement commits on its own; a failed one inserts
/// nothing, so the second attempt sees the table as the first did.
async fn insert_batch(
    conn: &mut PgConnection,
    messages: &[&Message],
) -> Result<Vec<Uuid>, StorageError> {
    match copy_batch(conn, messages).await {
        Ok(()) => return Ok(messages.iter().map(|m| m.id).collect()),
        Err(e) if is_unique_violation(&e) || is_foreign_key_violation(&e) => {}
        Err(e) => return Err(e.into()),
    }
    let columns = Columns::new(messages);
    Ok(columns
        .bind(sqlx::query_scalar(GUARDED_INSERT))
        .fetch_all(&mut *conn)
        .await?)
}

/// The common case, as `COPY … FROM STDIN BINARY`: no join against
/// `users` per row (the foreign keys check the same thing anyway), and no
/// `ON CONFLICT`, whose speculative insertion costs an extra index probe
/// and an extra WAL record per row (the plain `INSERT … SELECT FROM UNNEST`
/// this replaced was measured at about three quarters of the guarded
/// statement's cost). Against that insert, the copy took 4 % less
/// PostgreSQL CPU per message in each of three alternating pairs of runs,
/// at the same store rate (BENCHMARKS.md, issue #16).
const COPY_IN: &str = "COPY messages \
       (id, sender_id, recipient_id, content, created_at, expires_at, seq, envelope_type, client_timestamp) \
     FROM STDIN (FORMAT binary)";

/// Inserts the batch with [`COPY_IN`]; a key violation fails it whole.
///
/// A failed copy inserts nothing and leaves the connection usable: sqlx
/// reads the error through to `ReadyForQuery`, and PostgreSQL ignores data
/// sent after the error. A copy cut off half-way (the batch worker's
/// timeout) sends `CopyFail` on drop, and the worker discards a connection
/// whose run timed out anyway (`batch::breaks_connection`).
///
/// Public only so a test can see the copy itself succeed: through
/// [`store_batch`], a copy that failed would be hidden by the fallback.
#[doc(hidden)]
pub async fn copy_batch(conn: &mut PgConnection, messages: &[&Message]) -> Result<(), sqlx::Error> {
    let data = copy_rows(messages);
    let mut copy = conn.copy_in_raw(COPY_IN).await?;
    copy.send(data).await?;
    copy.finish().await?;
    Ok(())
}

/// The binary copy format: a header, one tuple per message (a field count,
/// then each field as a length and its bytes, -1 for NULL), a trailer.
fn copy_rows(messages: &[&Message]) -> Vec<u8> {
    /// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
    const PG_EPOCH_US: i64 = 946_684_800_000_000;
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn time(out: &mut Vec<u8>, ms: i64) {
        // Saturating: cannot saturate within chrono's range (±262,000
        // years), but i64::MIN would read as -infinity, not wrap to 292,000
        // AD.
        let micros = to_time(ms).timestamp_micros().saturating_sub(PG_EPOCH_US);
        field(out, &micros.to_be_bytes());
    }
    let size: usize = messages.iter().map(|m| m.content.len() + 120).sum();
    let mut out = Vec::with_capacity(19 + size + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    for m in messages {
        out.extend_from_slice(&9i16.to_be_bytes());
        field(&mut out, m.id.as_bytes());
        match m.sender_id {
            Some(sender) => field(&mut out, sender.as_bytes()),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
        field(&mut out, m.recipient_id.as_bytes());
        field(&mut out, &m.content);
        time(&mut out, m.server_timestamp_ms);
        time(&mut out, m.expires_at_ms);
        field(&mut out, &m.seq.to_be_bytes());
        field(&mut out, &m.envelope_type.code().to_be_bytes());
        field(&mut out, &m.client_timestamp_ms.to_be_bytes());
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

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
    /// `messages.id`.
    id: Uuid,
    /// `messages.seq`.
    seq: i64,
    /// `messages.sender_id`; NULL once the sender deleted their account.
    sender_id: Option<Uuid>,
    /// The sender's current username, if they still exist.
    sender_username: Option<String>,
    /// `messages.envelope_type`.
    envelope_type: i16,
    /// `messages.content`.
    content: Vec<u8>,
    /// `messages.created_at`: when the relay accepted it.
    created_at: Option<DateTime<Utc>>,
    /// `messages.expires_at`.
    expires_at: DateTime<Utc>,
    /// `messages.client_timestamp`.
    client_timestamp: i64,
}

/// One drain read: the recipient's unexpired stored messages with
/// `after < seq < below`, in order: at most `limit` rows, and no more
/// content than `byte_budget` beyond the first row, so one read never holds
/// an unbounded amount.
#[derive(Debug, Clone, Copy)]
pub struct DrainRead {
    /// Whose messages.
    pub recipient: Uuid,
    /// Sequence numbers up to this one were delivered already.
    pub after: i64,
    /// Nothing at or beyond this sequence number may be read yet: a message
    /// before it may still be on its way to storage.
    pub below: i64,
    /// Most rows.
    pub limit: i64,
    /// Most content bytes beyond the first row.
    pub byte_budget: i64,
}

#[derive(sqlx::FromRow)]
struct ReadRow {
    /// Which read of the batch (1-based) the row answers.
    ord: i64,
    #[sqlx(flatten)]
    row: Row,
}

/// Runs several drain reads in one statement; the answer to each, in the
/// order of `reads`.
pub async fn fetch_for_drain_many(
    conn: &mut PgConnection,
    reads: &[DrainRead],
) -> Result<Vec<Vec<Message>>, StorageError> {
    let column = |f: fn(&DrainRead) -> i64| reads.iter().map(f).collect::<Vec<i64>>();
    let recipients: Vec<Uuid> = reads.iter().map(|r| r.recipient).collect();
    // The function (see its migration) pins each read's plan to the
    // (recipient_id, seq) index whatever the statistics say, without the
    // transaction that used to cost every read four extra round trips.
    let rows: Vec<ReadRow> = sqlx::query_as(
        "SELECT r.ord, d.* \
         FROM UNNEST($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) \
              WITH ORDINALITY AS r(recipient, after, below, row_limit, budget, ord) \
         CROSS JOIN LATERAL relay_drain_read(r.recipient, r.after, r.below, r.row_limit, r.budget) d",
    )
    .bind(&recipients)
    .bind(column(|r| r.after))
    .bind(column(|r| r.below))
    .bind(column(|r| r.limit))
    .bind(column(|r| r.byte_budget))
    .fetch_all(&mut *conn)
    .await?;
    let mut answers: Vec<Vec<Message>> = reads.iter().map(|_| Vec::new()).collect();
    for ReadRow { ord, row } in rows {
        let Some(i) = usize::try_from(ord - 1).ok().filter(|&i| i < reads.len()) else {
            continue;
        };
        answers[i].push(row.into_message(reads[i].recipient));
    }
    // Each call returns its rows in order and a nested loop keeps them so,
    // but SQL promises nothing without an ORDER BY: make sure, cheaply.
    for answer in &mut answers {
        if !answer.is_sorted_by_key(|m| m.seq) {
            answer.sort_by_key(|m| m.seq);
        }
    }
    Ok(answers)
}

impl Row {
    fn into_message(self, recipient: Uuid) -> Message {
        Message {
            id: self.id,
            seq: self.seq,
            sender_id: self.sender_id,
            sender_username: Arc::from(self.sender_username.unwrap_or_default()),
            recipient_id: recipient,
            envelope_type: EnvelopeType::from_code(self.envelope_type)
                .unwrap_or(EnvelopeType::Ciphertext),
            content: Bytes::from(self.content),
            server_timestamp_ms: self.created_at.map_or(0, |t| t.timestamp_millis()),
            client_timestamp_ms: self.client_timestamp,
            expires_at_ms: self.expires_at.timestamp_millis(),
            ephemeral: false,
        }
    }
}

/// A stored message removed by an ack.
#[derive(Debug, sqlx::FromRow)]
pub struct Acked {
    pub id: Uuid,
    pub sender_id: Option<Uuid>,
    pub envelope_type: i16,
}

/// Deletes those of `ids` that are the recipient's, in one statement, on
/// `conn`: the ack's transaction, which also stores their receipts (see
/// [`insert_receipts`]).
pub async fn delete_acked(
    conn: &mut PgConnection,
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
    .fetch_all(&mut *conn)
    .await?)
}

/// Those of `ids` that are the recipient's, as [`delete_acked`] would
/// return them, without deleting: cluster mode places the receipts that go
/// through other nodes before the ack's transaction (see
/// `Relay::ack_stored`). The same lookup through the primary key.
pub async fn ackable(
    pool: &PgPool,
    recipient: Uuid,
    ids: &[Uuid],
) -> Result<Vec<Acked>, StorageError> {
    Ok(sqlx::query_as(
        "SELECT id, sender_id, envelope_type FROM messages \
         WHERE id = ANY($2) AND recipient_id IS NOT DISTINCT FROM $1",
    )
    .bind(recipient)
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Stores delivery receipts on `conn`, inside the ack's transaction that
/// deleted the messages they confirm, so a failure (or a crash) cannot
/// keep the delete and lose the receipt. Always the guarded statement: a
/// receipt whose recipient (the original sender) is gone, or that is
/// stored already, is skipped. `store_batch`'s plain insert first would,
/// on such a row, abort the whole transaction and the ack with it.
///
/// In cluster mode (`fence`: this node's incarnation) the receipts pass
/// the fence in the same transaction, as every store does: a claim of a
/// receipt's recipient then waits for the commit, so the new owner's drain
/// cannot miss it. If another node owns any of the recipients, nothing is
/// inserted and the owners come back: the caller must not commit.
pub async fn insert_receipts(
    conn: &mut PgConnection,
    receipts: &[&Message],
    fence_for: Option<Uuid>,
) -> Result<HashMap<Uuid, Uuid>, StorageError> {
    if let Some(me) = fence_for {
        let moved = fence(&mut *conn, receipts, me).await?;
        if !moved.is_empty() {
            return Ok(moved);
        }
    }
    Columns::new(receipts)
        .bind(sqlx::query_scalar::<_, Uuid>(GUARDED_INSERT))
        .fetch_all(&mut *conn)
        .await?;
    Ok(HashMap::new())
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
