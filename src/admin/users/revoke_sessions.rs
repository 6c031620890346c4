//! `relay users revoke-sessions NAME`: delete every session of the user,
//! expired or not, so every device has to log in with the password again.
//! Running relays close the user's socket.

use sqlx::PgPool;

use crate::admin::{AdminError, Outcome};
use crate::storage;

pub async fn run(db: &PgPool, name: &str) -> Result<Outcome, AdminError> {
    let user = storage::users::find_by_username(db, name)
        .await?
        .ok_or_else(|| AdminError::UnknownUser(name.to_owned()))?;
    let revoked = storage::cut_off::revoke_sessions(db, user.id).await?;
    tracing::info!(user_id = %user.id, revoked, "sessions revoked by an admin");
    Ok(Outcome::success(format!(
        "revoked {revoked} session(s) of {} ({})\n",
        user.username, user.id
    )))
}
