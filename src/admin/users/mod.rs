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
    /// Users, oldest first: username, id, created. A page at a time.
    List {
        /// Most users shown; stderr says how to go on when more follow.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        limit: u32,
        /// Start after this user (the last name of the previous page).
        #[arg(long, value_name = "NAME")]
        after: Option<String>,
    },
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
        UsersCommand::List { limit, after } => list::run(&db, *limit, after.as_deref()).await,
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
