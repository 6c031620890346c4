//! `relay migrate [--check]`: bring the schema up to date, or report
//! whether it is.

use std::fmt::Write as _;

use clap::Args;

use super::{AdminError, Exit, Outcome, database_name};
use crate::config::Config;
use crate::storage::{self, schema};

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Change nothing: list the pending migrations and exit 3 if there are
    /// any, 0 if there are none.
    #[arg(long)]
    pub check: bool,
}

pub async fn run(args: &MigrateArgs, config: &Config) -> Result<Outcome, AdminError> {
    let options = storage::connect_options(&config.database_url)?;
    let database = database_name(&options);
    if args.check {
        return Ok(check(&database, &schema::status(&options).await?));
    }
    let migrated = schema::migrate(&options).await?;
    let mut output = String::new();
    if migrated.created_database {
        let _ = writeln!(output, "created database {database}");
    }
    for m in &migrated.applied {
        let _ = writeln!(output, "applied {} {}", m.version, m.description);
    }
    let total = schema::MIGRATOR.iter().count();
    let _ = writeln!(
        output,
        "database {database} is up to date ({total} migrations, {} applied now)",
        migrated.applied.len()
    );
    Ok(Outcome::success(output))
}

/// The report of `--check`: one `pending VERSION DESCRIPTION` line per
/// pending migration, then a summary line.
fn check(database: &str, status: &schema::SchemaStatus) -> Outcome {
    let mut output = String::new();
    let total = schema::MIGRATOR.iter().count();
    let mut problem = false;
    if let Some(version) = status.dirty {
        problem = true;
        let _ = writeln!(
            output,
            "problem: migration {version} failed halfway; repair the database by hand"
        );
    }
    for version in &status.changed {
        problem = true;
        let _ = writeln!(
            output,
            "problem: migration {version} was edited after it was applied"
        );
    }
    for version in &status.unknown {
        problem = true;
        let _ = writeln!(
            output,
            "problem: migration {version} is applied but unknown to this build (a newer build \
             migrated this database)"
        );
    }
    for m in &status.pending {
        let _ = writeln!(output, "pending {} {}", m.version, m.description);
    }
    let exit = if problem {
        let _ = writeln!(
            output,
            "database {database} cannot be migrated by this build"
        );
        Exit::Failure
    } else if !status.database_exists {
        let _ = writeln!(
            output,
            "database {database} does not exist; all {total} migrations pending"
        );
        Exit::MigrationsPending
    } else if !status.pending.is_empty() {
        let _ = writeln!(
            output,
            "database {database}: {} of {total} migrations pending",
            status.pending.len()
        );
        Exit::MigrationsPending
    } else {
        let _ = writeln!(
            output,
            "database {database} is up to date ({total} migrations applied)"
        );
        Exit::Success
    };
    Outcome {
        output,
        note: None,
        exit,
    }
}
