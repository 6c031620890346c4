//! `relay users …`: list, inspect, delete accounts and revoke their
//! sessions, one file per subcommand. Output never includes a password
//! hash, a token hash or a key.

pub mod delete;
pub mod list;
pub mod revoke_sessions;
pub mod show;

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Subcommand;

use super::{AdminError, Outcome, current_database};
use crate::config::Config;

#[derive(Debug, Clone, Subcommand)]
pub enum UsersCommand {
    /// Every user: username, id, created (oldest first).
    List,
    /// One user's id, creation time, key counts, queued messages and live
    /// sessions.
    Show {
        /// The username, in any letter case.
        name: String,
    },
    /// Delete a user as DeleteAccount does: their keys, sessions and queued
    /// messages go with them.
    Delete {
        /// The username, in any letter case.
        name: String,
        /// Do it. Without this, the command says what it would delete and
        /// changes nothing: a mistyped name can be someone else's.
        #[arg(long)]
        yes: bool,
    },
    /// Delete all of a user's sessions: every device must log in again.
    RevokeSessions {
        /// The username, in any letter case.
        name: String,
    },
}

pub async fn run(command: &UsersCommand, config: &Config) -> Result<Outcome, AdminError> {
    let db = current_database(config).await?;
    let outcome = match command {
        UsersCommand::List => list::run(&db).await,
        UsersCommand::Show { name } => show::run(&db, name).await,
        UsersCommand::Delete { name, yes } => delete::run(&db, name, *yes).await,
        UsersCommand::RevokeSessions { name } => revoke_sessions::run(&db, name).await,
    };
    db.close().await;
    outcome
}

/// A timestamp as RFC 3339 UTC to the second, `-` when missing.
fn timestamp(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |at| at.to_rfc3339_opts(SecondsFormat::Secs, true),
    )
}
