//! `relay users list`: a header line, then one line per user, columns
//! aligned: USERNAME, ID, CREATED (RFC 3339 UTC). Usernames hold no spaces,
//! so `awk '{print $1}'` works.

use std::fmt::Write as _;

use sqlx::PgPool;

use super::timestamp;
use crate::admin::{AdminError, Outcome};
use crate::storage;

pub async fn run(db: &PgPool) -> Result<Outcome, AdminError> {
    let users = storage::users::list(db).await?;
    let width = users
        .iter()
        .map(|u| u.username.len())
        .max()
        .unwrap_or(0)
        .max("USERNAME".len());
    let mut output = format!("{:width$}  {:36}  CREATED\n", "USERNAME", "ID");
    for user in &users {
        let _ = writeln!(
            output,
            "{:width$}  {}  {}",
            user.username,
            user.id,
            timestamp(user.created_at)
        );
    }
    Ok(Outcome::success(output))
}
