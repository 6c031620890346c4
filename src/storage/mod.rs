//! PostgreSQL storage: the pool, start-up (create the database if missing,
//! run the migrations in `migrations/`), and one submodule of queries per
//! table family. Nothing above this layer writes SQL.

pub mod keys;
pub mod messages;
pub mod sessions;
pub mod users;

use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// Errors of the storage layer. Only the first variants are the client's
/// fault; a `Query` or `Migrate` error is ours.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("username is already taken")]
    UsernameTaken,
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("storage task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("invalid database URL")]
    Url(#[source] sqlx::Error),
}

/// Connects to the database named in `url`, creating it first if it does not
/// exist, and brings its schema up to date.
pub async fn connect(url: &SecretString, pool_size: u32) -> Result<PgPool, StorageError> {
    let options = PgConnectOptions::from_str(url.expose_secret())
        .map_err(StorageError::Url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    create_database_if_missing(&options).await?;
    let pool = PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// Creates the database `options` names, through the `postgres` maintenance
/// database, unless it already exists.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), StorageError> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    admin.close().await?;
    Ok(())
}

/// True for a unique-constraint violation, optionally of the named constraint.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.code().as_deref() == Some("23505"))
}
