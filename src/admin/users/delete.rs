//! `relay users delete NAME --yes`: what DeleteAccount does, without the
//! password: the user row goes, and the database's cascades remove their
//! keys, sessions and queued messages. Messages they sent to others stay
//! deliverable (their sender becomes unknown). Running relays close the
//! user's socket. Without `--yes` it only
//! says what it would delete: nothing brings an account back.

use sqlx::PgPool;

use crate::admin::{AdminError, Outcome};
use crate::storage;

pub async fn run(db: &PgPool, name: &str, confirmed: bool) -> Result<Outcome, AdminError> {
    let user = storage::users::overview(db, name)
        .await?
        .ok_or_else(|| AdminError::UnknownUser(name.to_owned()))?;
    if !confirmed {
        return Err(AdminError::NotConfirmed(format!(
            "would delete {} ({}) with {} live session(s), {} queued message(s) and their keys",
            user.username, user.id, user.live_sessions, user.queued_messages
        )));
    }
    // Gone between the two statements: someone else deleted it.
    if !storage::cut_off::delete_user(db, user.id).await? {
        return Err(AdminError::UnknownUser(name.to_owned()));
    }
    tracing::info!(user_id = %user.id, "account deleted by an admin");
    Ok(Outcome::success(format!(
        "deleted {} ({}) with {} live session(s), {} queued message(s) and their keys\n",
        user.username, user.id, user.live_sessions, user.queued_messages
    )))
}
