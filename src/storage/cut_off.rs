//! Users cut off by another process: `relay users delete` and `relay users
//! revoke-sessions` run in the CLI, not in the relays holding the users'
//! sockets. Their statements (here) notify [`CHANNEL`] as they delete
//! (PostgreSQL sends it on commit, to every session listening on the
//! database), and each relay closes the user's socket if it holds it
//! (`server::cut_off`). A user's own DeleteAccount and Logout close their
//! socket themselves, after answering, and notify nobody.
//!
//! NOTIFY is at most once: a relay whose listening connection was down at
//! that moment misses it. In cluster mode the two-second ownership check
//! closes a deleted user's socket anyway; otherwise the socket stays until
//! it reconnects, when its login fails.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use uuid::Uuid;

use super::StorageError;

/// The notification channel.
pub const CHANNEL: &str = "relay_cut_off";

/// What happened to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOff {
    /// The account is gone.
    Deleted,
    /// Every session is gone.
    Revoked,
}

impl CutOff {
    /// The payload's second word.
    const fn word(self) -> &'static str {
        match self {
            CutOff::Deleted => "deleted",
            CutOff::Revoked => "revoked",
        }
    }
}

/// Reads a payload, `<user id> <deleted|revoked>`.
pub fn parse(payload: &str) -> Option<(Uuid, CutOff)> {
    let (id, what) = payload.split_once(' ')?;
    let what = [CutOff::Deleted, CutOff::Revoked]
        .into_iter()
        .find(|c| c.word() == what)?;
    Some((id.parse().ok()?, what))
}

/// Deletes a user as an operator; cascades remove their keys, sessions
/// and queued messages. The same statement notifies [`CHANNEL`]. False: no
/// such user (any more).
pub async fn delete_user(db: &PgPool, id: Uuid) -> Result<bool, StorageError> {
    let result = sqlx::query(
        "WITH gone AS (DELETE FROM users WHERE id = $1 RETURNING id)
         SELECT id FROM gone, LATERAL (SELECT pg_notify($2, id::text || ' ' || $3)) AS told",
    )
    .bind(id)
    .bind(CHANNEL)
    .bind(CutOff::Deleted.word())
    .execute(db)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Deletes every session of a user as an operator, expired or not, and
/// returns how many went. If any did, the same statement notifies
/// [`CHANNEL`].
pub async fn revoke_sessions(db: &PgPool, user_id: Uuid) -> Result<u64, StorageError> {
    let revoked: Option<i64> = sqlx::query_scalar(
        "WITH gone AS (DELETE FROM sessions WHERE user_id = $1 RETURNING 1),
              counted AS (SELECT count(*) AS n FROM gone)
         SELECT n FROM counted, LATERAL (SELECT pg_notify($2, $1::text || ' ' || $3)) AS told
         WHERE n > 0",
    )
    .bind(user_id)
    .bind(CHANNEL)
    .bind(CutOff::Revoked.word())
    .fetch_optional(db)
    .await?;
    Ok(revoked.map_or(0, |n| n as u64))
}

/// Listens on [`CHANNEL`] on a connection of its own, outside `pool` (it
/// is held for the relay's life), made with the same options.
pub async fn listen(pool: &PgPool) -> Result<PgListener, StorageError> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut listener = PgListener::connect_with(&own).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_back_and_nothing_else_is() {
        let id = Uuid::new_v4();
        assert_eq!(parse(&format!("{id} deleted")), Some((id, CutOff::Deleted)));
        assert_eq!(parse(&format!("{id} revoked")), Some((id, CutOff::Revoked)));
        for bad in [
            String::new(),
            id.to_string(),
            format!("{id} gone"),
            format!("{id}  deleted"),
            "not-an-id deleted".to_owned(),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
    }
}
