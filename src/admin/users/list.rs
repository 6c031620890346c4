//! `relay users list [--limit N] [--after NAME]`: a header line, then one
//! line per user, oldest first, columns aligned: USERNAME, ID, CREATED
//! (RFC 3339 UTC). Usernames hold no spaces, so `awk '{print $1}'` works.
//!
//! At most `--limit` users at a time (1,000 by default), so a large table
//! is never read into memory whole; when more follow, stderr says how to
//! go on (`--after` the last name shown) and stdout stays only the list.

use std::fmt::Write as _;

use sqlx::PgPool;

use super::timestamp;
use crate::admin::{AdminError, Outcome};
use crate::storage;

pub async fn run(db: &PgPool, limit: u32, after: Option<&str>) -> Result<Outcome, AdminError> {
    // One more than shown, to tell whether more follow.
    let mut users = storage::users::list(db, limit.saturating_add(1), after)
        .await?
        .ok_or_else(|| AdminError::UnknownUser(after.unwrap_or_default().to_owned()))?;
    let more = users.len() > limit as usize;
    users.truncate(limit as usize);
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
    let mut outcome = Outcome::success(output);
    if more && let Some(last) = users.last() {
        outcome.note = Some(format!(
            // `=`: a name may start with `-`, which would read as a flag.
            "more users follow: relay users list --limit {limit} --after={}\n",
            last.username
        ));
    }
    Ok(outcome)
}
