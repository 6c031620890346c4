//! PostgreSQL storage: the pool, start-up (create the database if missing,
//! run the migrations in `migrations/`), the batch workers of the hot paths,
//! and one submodule of queries per table family. Nothing above this layer
//! writes SQL or knows an SQLSTATE.

pub mod batch;
pub mod cluster;
pub mod cut_off;
pub mod keys;
pub mod messages;
pub mod reader;
pub mod schema;
pub mod sessions;
pub mod users;

use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio_util::task::TaskTracker;

use crate::config::ReaderLimits;
use crate::metrics::Metrics;
pub use reader::Reader;

/// The SQLSTATE codes the storage layer tells apart.
mod sqlstate {
    pub const UNIQUE_VIOLATION: &str = "23505";
    pub const FOREIGN_KEY_VIOLATION: &str = "23503";
    pub const DUPLICATE_DATABASE: &str = "42P04";
}

/// Errors of the storage layer. `UsernameTaken` is the client's fault; the
/// rest are ours.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("username is already taken")]
    UsernameTaken,
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid database URL")]
    Url(#[source] sqlx::Error),
    /// A batched read failed; every request in the batch gets the same error.
    #[error("batched database read failed")]
    Batch(#[source] Arc<StorageError>),
    #[error("the database reader has shut down")]
    ReaderClosed,
    /// A batch on a dedicated connection took longer than its deadline.
    #[error("the database did not answer within {0:?}")]
    TimedOut(std::time::Duration),
    /// A [`detached`] transaction's task was cancelled: the runtime is
    /// going down, and the transaction was rolled back with its connection.
    #[error("the database task was cancelled by the shutdown")]
    Abandoned,
}

/// The database as the server uses it: the pool, plus the [`Reader`]'s
/// dedicated connections for the reads every reconnect makes. It derefs to
/// the pool, so everything that runs ordinary queries takes `&PgPool` as
/// before.
#[derive(Clone)]
pub struct Database {
    /// The shared pool.
    pool: PgPool,
    /// Batched session lookups and drain reads on dedicated connections.
    reader: Reader,
}

impl Database {
    /// Wraps `pool`, starting the reader's tasks on `tasks`.
    pub fn new(
        pool: PgPool,
        reader: &ReaderLimits,
        tasks: &TaskTracker,
        metrics: &Metrics,
    ) -> Self {
        let reader = Reader::spawn(pool.clone(), reader, tasks, metrics);
        Database { pool, reader }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }
}

impl Deref for Database {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.pool
    }
}

/// Runs `work`, which holds a transaction on a pooled connection, on a task
/// of its own: whoever awaits it may be dropped (a socket that went away, a
/// deadline), the transaction is not, and it commits or rolls back whole.
///
/// Why every pooled transaction goes through here: with sqlx 0.8, a
/// `BEGIN` cancelled while in flight leaves the transaction open on the
/// server while sqlx counts none, so the connection goes back to the pool
/// inside it. Its next borrowers' statements then run in that transaction,
/// uncommitted and invisible to everyone else, holding their locks until
/// some later `COMMIT` on the same connection. (Cluster mode met exactly
/// that: a heartbeat never committed, and a claim's lock held for seconds.)
pub async fn detached<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, StorageError> {
    match tokio::spawn(work).await {
        Ok(done) => Ok(done),
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(StorageError::Abandoned),
    }
}

/// Connects to the database named in `url`, creating it first if it does not
/// exist, and brings its schema up to date.
pub async fn connect(url: &SecretString, pool_size: u32) -> Result<PgPool, StorageError> {
    let options = connect_options(url)?;
    create_database_if_missing(&options).await?;
    let pool = pool(options, pool_size).await?;
    schema::MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// Connects to the database named in `url` as it is: not created, not
/// migrated. For the admin commands, which must not change a schema.
pub async fn connect_existing(url: &SecretString, pool_size: u32) -> Result<PgPool, StorageError> {
    pool(connect_options(url)?, pool_size).await
}

/// Parses `url`, with statement logging as the server wants it.
pub fn connect_options(url: &SecretString) -> Result<PgConnectOptions, StorageError> {
    Ok(PgConnectOptions::from_str(url.expose_secret())
        .map_err(StorageError::Url)?
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

async fn pool(options: PgConnectOptions, pool_size: u32) -> Result<PgPool, StorageError> {
    Ok(PgPoolOptions::new()
        .max_connections(pool_size)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?)
}

/// True when the database `options` names exists, asked of the `postgres`
/// maintenance database.
pub async fn database_exists(options: &PgConnectOptions) -> Result<bool, StorageError> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options.clone().database("postgres").connect().await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    admin.close().await?;
    Ok(exists)
}

/// Creates the database `options` names, through the `postgres` maintenance
/// database, unless it already exists. True when this call created it.
pub async fn create_database_if_missing(options: &PgConnectOptions) -> Result<bool, StorageError> {
    if !database_exists(options).await? {
        let name = options.get_database().unwrap_or("postgres").to_owned();
        let mut admin = options.clone().database("postgres").connect().await?;
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it between our check and our CREATE:
            // 42P04 if it had committed by then, 23505 on pg_database's
            // unique index if both CREATEs ran at the same moment (several
            // cluster nodes starting together on a new database).
            Err(sqlx::Error::Database(e))
                if matches!(
                    e.code().as_deref(),
                    Some(sqlstate::DUPLICATE_DATABASE | sqlstate::UNIQUE_VIOLATION)
                ) =>
            {
                admin.close().await?;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        admin.close().await?;
        return Ok(true);
    }
    Ok(false)
}

/// True for an error that retrying cannot cure: a bad URL or migration,
/// wrong credentials (SQLSTATE class 28), a database that does not exist
/// and cannot be created (3D000), no permission (42501).
pub fn is_permanent(err: &StorageError) -> bool {
    match err {
        StorageError::Url(_) | StorageError::Migrate(_) => true,
        StorageError::Query(sqlx::Error::Database(e)) => {
            let code = e.code();
            let code = code.as_deref().unwrap_or("");
            code.starts_with("28") || code == "3D000" || code == "42501"
        }
        _ => false,
    }
}

/// True for a unique-constraint violation.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    has_code(err, sqlstate::UNIQUE_VIOLATION)
}

/// True for a foreign-key violation.
pub(crate) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    has_code(err, sqlstate::FOREIGN_KEY_VIOLATION)
}

fn has_code(err: &sqlx::Error, code: &str) -> bool {
    matches!(err, sqlx::Error::Database(e) if e.code().as_deref() == Some(code))
}
