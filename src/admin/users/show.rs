//! `relay users show NAME`: `key: value` lines about one user. Counts only:
//! no password hash, token hash or key material.

use sqlx::PgPool;

use super::timestamp;
use crate::admin::{AdminError, Outcome};
use crate::storage;

pub async fn run(db: &PgPool, name: &str) -> Result<Outcome, AdminError> {
    let user = storage::users::overview(db, name)
        .await?
        .ok_or_else(|| AdminError::UnknownUser(name.to_owned()))?;
    let present = |yes: bool| if yes { "present" } else { "absent" };
    let output = format!(
        "username:           {}\n\
         id:                 {}\n\
         created:            {}\n\
         identity key:       {}\n\
         signed pre-key:     {}\n\
         one-time EC keys:   {}\n\
         one-time Kyber keys: {}\n\
         Kyber last resort:  {}\n\
         queued messages:    {}\n\
         live sessions:      {}\n",
        user.username,
        user.id,
        timestamp(user.created_at),
        present(user.identity_key),
        present(user.signed_pre_key),
        user.one_time_pre_keys,
        user.kyber_pre_keys,
        present(user.kyber_last_resort_key),
        user.queued_messages,
        user.live_sessions,
    );
    Ok(Outcome::success(output))
}
