//! The schema's migrations: the set built into the binary (`migrations/`),
//! applying them, and comparing them with what a database has applied,
//! without changing it, for `relay migrate --check` and the admin commands'
//! guard.

use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

use super::StorageError;

/// Every migration this binary knows, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// One migration, as reported to an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationInfo {
    /// The timestamp prefix of its file name.
    pub version: i64,
    /// The rest of the file name, underscores as spaces.
    pub description: String,
}

/// How a database's schema compares with this binary's migrations.
#[derive(Debug, Clone, Default)]
pub struct SchemaStatus {
    /// False when the database itself does not exist yet.
    pub database_exists: bool,
    /// Migrations this binary has that the database has not applied, in
    /// order.
    pub pending: Vec<MigrationInfo>,
    /// Migrations both know whose applied text differs from this binary's:
    /// someone edited a migration after it ran.
    pub changed: Vec<i64>,
    /// Migrations the database applied that this binary does not know: it
    /// was migrated by a newer build.
    pub unknown: Vec<i64>,
    /// A migration that failed halfway and left the database dirty.
    pub dirty: Option<i64>,
    /// How many of this binary's migrations are applied.
    pub applied: usize,
}

impl SchemaStatus {
    /// True when the server can run on this schema as it is.
    pub fn is_current(&self) -> bool {
        self.database_exists
            && self.pending.is_empty()
            && self.changed.is_empty()
            && self.dirty.is_none()
    }
}

fn info(version: i64) -> MigrationInfo {
    let description = MIGRATOR
        .iter()
        .find(|m| m.version == version)
        .map(|m| m.description.to_string())
        .unwrap_or_default();
    MigrationInfo {
        version,
        description,
    }
}

/// Compares the database `options` names with [`MIGRATOR`], creating
/// nothing (not even sqlx's bookkeeping table).
pub async fn status(options: &PgConnectOptions) -> Result<SchemaStatus, StorageError> {
    if !super::database_exists(options).await? {
        return Ok(SchemaStatus {
            database_exists: false,
            pending: MIGRATOR.iter().map(|m| info(m.version)).collect(),
            ..SchemaStatus::default()
        });
    }
    let mut conn = options.connect().await?;
    let status = status_on(&mut conn).await;
    conn.close().await?;
    status
}

async fn status_on(conn: &mut PgConnection) -> Result<SchemaStatus, StorageError> {
    let tracked: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    let (applied, dirty) = if tracked {
        (
            conn.list_applied_migrations().await?,
            conn.dirty_version().await?,
        )
    } else {
        (Vec::new(), None)
    };
    let mut status = SchemaStatus {
        database_exists: true,
        dirty,
        ..SchemaStatus::default()
    };
    for migration in MIGRATOR.iter() {
        match applied.iter().find(|a| a.version == migration.version) {
            Some(a) if a.checksum != migration.checksum => status.changed.push(migration.version),
            Some(_) => status.applied += 1,
            None => status.pending.push(info(migration.version)),
        }
    }
    status.unknown = applied
        .iter()
        .map(|a| a.version)
        .filter(|v| !MIGRATOR.version_exists(*v))
        .collect();
    Ok(status)
}

/// What [`migrate`] did.
#[derive(Debug, Clone)]
pub struct Migrated {
    /// The database did not exist and was created.
    pub created_database: bool,
    /// The migrations applied, in order; empty when it was up to date.
    pub applied: Vec<MigrationInfo>,
}

/// Creates the database if missing and applies the pending migrations, as
/// the server does at start-up.
pub async fn migrate(options: &PgConnectOptions) -> Result<Migrated, StorageError> {
    let created_database = super::create_database_if_missing(options).await?;
    let mut conn = options.connect().await?;
    let before = status_on(&mut conn).await?;
    // The migrator takes an advisory lock, so a server starting meanwhile
    // waits rather than applying the same migrations twice.
    MIGRATOR.run(&mut conn).await?;
    let after = status_on(&mut conn).await?;
    conn.close().await?;
    Ok(Migrated {
        created_database,
        applied: before
            .pending
            .into_iter()
            .filter(|m| !after.pending.contains(m))
            .collect(),
    })
}
