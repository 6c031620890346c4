//! Admin subcommands of the `relay` binary: `migrate`, `check-config` and
//! `users …`, one file per command. They share the server's layered
//! configuration ([`Cli`] flattens [`Config`]) and work on the database
//! directly, so they need no running server. Each returns an [`Outcome`]
//! whose text the binary prints; nothing here writes to stdout.
//!
//! They change rows, not a running server's memory: a socket that is
//! already open stays open after `users delete` or `users revoke-sessions`,
//! and only its next `Resume` (or reconnect) is refused.

pub mod check_config;
pub mod migrate;
pub mod users;

use clap::{Parser, Subcommand};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::config::{Config, Setting};
use crate::storage::{self, StorageError, schema};

/// The `relay` command line: the server's settings, and optionally an admin
/// command. Without one, `relay` serves.
#[derive(Debug, Parser)]
#[command(
    name = "relay",
    version,
    about = "Signal Protocol relay server",
    long_about = "Signal Protocol relay server.\n\nWithout a subcommand, serves. \
                  The subcommands are admin tasks on the same configuration; \
                  server settings go before the subcommand \
                  (`relay --database-url URL migrate`), except --config and \
                  --database-url, which may also follow it."
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,

    /// An admin task to run instead of serving.
    #[command(subcommand)]
    pub command: Option<AdminCommand>,
}

/// The admin tasks.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Create the database if missing, apply pending migrations, and exit.
    Migrate(migrate::MigrateArgs),
    /// Print the effective configuration (defaults < --config file < env <
    /// flags), with where each value came from; secrets masked.
    CheckConfig,
    /// Inspect and manage accounts.
    #[command(subcommand)]
    Users(users::UsersCommand),
}

/// How an admin command ends the process. The codes are part of the
/// interface: scripts test them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done; for `migrate --check`, nothing is pending.
    Success,
    /// 1: the command failed (database unreachable, bad configuration, …).
    Failure,
    /// 3: `migrate --check` found migrations to apply.
    MigrationsPending,
    /// 4: no user has the given name.
    UnknownUser,
}

impl Exit {
    /// The process exit code. 2 is clap's, for a bad command line.
    pub fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::MigrationsPending => 3,
            Exit::UnknownUser => 4,
        }
    }
}

/// What a finished command prints to stdout, and its exit status.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Lines for stdout, newline-terminated.
    pub output: String,
    /// A line for stderr, beside the output rather than in it (how to see
    /// the next page), newline-terminated.
    pub note: Option<String>,
    pub exit: Exit,
}

impl Outcome {
    fn success(output: String) -> Self {
        Outcome {
            output,
            note: None,
            exit: Exit::Success,
        }
    }
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no user is named {0:?}")]
    UnknownUser(String),
    /// An irreversible command run without `--yes`: nothing was changed.
    #[error("{0}; nothing was changed: run again with --yes to do it")]
    NotConfirmed(String),
    #[error(
        "the database {database} is not ready for this command ({why}); run `relay migrate` \
         (or `relay migrate --check` for details)"
    )]
    SchemaNotCurrent { database: String, why: String },
    #[error("the TLS certificate or key cannot be used")]
    Tls(#[from] crate::server::tls::TlsError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AdminError {
    /// The exit status this error ends the process with.
    pub fn exit(&self) -> Exit {
        match self {
            AdminError::UnknownUser(_) => Exit::UnknownUser,
            _ => Exit::Failure,
        }
    }
}

/// Runs `command` with `config`; `settings` are the effective settings as
/// the configuration loader saw them, for `check-config`.
pub async fn run(
    command: &AdminCommand,
    config: &Config,
    settings: &[Setting],
) -> Result<Outcome, AdminError> {
    match command {
        AdminCommand::Migrate(args) => migrate::run(args, config).await,
        AdminCommand::CheckConfig => check_config::run(config, settings),
        AdminCommand::Users(command) => users::run(command, config).await,
    }
}

/// The database name `options` points at, for messages.
fn database_name(options: &PgConnectOptions) -> String {
    options.get_database().unwrap_or("postgres").to_owned()
}

/// A small pool on the configured database, refused unless its schema is
/// exactly what this binary expects: queries on an older or half-migrated
/// schema would fail obscurely, and an admin command must not migrate
/// behind the operator's back.
async fn current_database(config: &Config) -> Result<PgPool, AdminError> {
    let options = storage::connect_options(&config.database_url)?;
    let status = schema::status(&options).await?;
    if !status.is_current() {
        let why = if !status.database_exists {
            "it does not exist".to_owned()
        } else if let Some(version) = status.dirty {
            format!("migration {version} failed halfway")
        } else if !status.changed.is_empty() {
            format!("applied migrations were edited: {:?}", status.changed)
        } else {
            format!("{} migration(s) pending", status.pending.len())
        };
        return Err(AdminError::SchemaNotCurrent {
            database: database_name(&options),
            why,
        });
    }
    Ok(storage::connect_existing(&config.database_url, 2).await?)
}
