//! Accounts for a run, written straight into the relay's database through
//! the library's own storage functions: registering thousands of users over
//! the protocol would cost an Argon2 hash each (minutes of CPU on two cores)
//! and measure nothing the scenarios care about. Every seeded user gets a
//! real Argon2 hash of the same password (so password login works and costs
//! what it costs) and a real session token (so `resume` works).
//!
//! `relay-bench seed` does the same for other load generators (Artillery,
//! tsung; see bench/artillery and bench/tsung): it writes the accounts to a
//! CSV file they read.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use futures::StreamExt;
use signal_relay::auth::{Password, PasswordHasher, SessionToken};
use sqlx::PgPool;
use uuid::Uuid;

/// The password of every seeded user.
pub const PASSWORD: &str = "bench-password-1";

/// A seeded account.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: Uuid,
    pub username: String,
    pub token: Vec<u8>,
}

/// Creates `count` users named `<prefix><i>` with sessions, `concurrency`
/// inserts at a time.
pub async fn accounts(db: &PgPool, prefix: &str, count: usize) -> anyhow::Result<Vec<Account>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let password = Password::parse(PASSWORD.to_owned()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let hash = PasswordHasher::new(1, 1, 1)
        .hash(password, std::net::Ipv4Addr::LOCALHOST.into())
        .await?;
    let expires = chrono::Utc::now() + chrono::Duration::days(7);
    let run = &Uuid::new_v4().simple().to_string()[..6];
    let made: Vec<anyhow::Result<Account>> = futures::stream::iter(0..count)
        .map(|i| {
            let hash = hash.clone();
            let username = format!("{prefix}{run}_{i}");
            async move {
                let user_id = signal_relay::storage::users::insert(db, &username, &hash).await?;
                let token = SessionToken::generate();
                signal_relay::storage::sessions::insert(db, &token.hash(), user_id, expires)
                    .await?;
                Ok(Account {
                    user_id,
                    username,
                    token: token.as_bytes().to_vec(),
                })
            }
        })
        .buffered(16)
        .collect()
        .await;
    made.into_iter().collect()
}

/// `relay-bench seed`: accounts for another load generator.
#[derive(Debug, Clone, clap::Args)]
pub struct SeedArgs {
    /// Accounts to create.
    #[arg(long, default_value_t = 100)]
    pub count: usize,
    /// Username prefix; a random run id and the account's index follow.
    #[arg(long, default_value = "load")]
    pub prefix: String,
    /// The CSV file to write, one account per line and no header:
    /// `username,user_id,token`, the user id in standard base64 (as the
    /// JSON encoding writes bytes) and the session token in base64url
    /// without padding (as `Authorization: Bearer` takes it; the JSON
    /// encoding accepts it for bytes fields too).
    #[arg(long, value_name = "FILE.csv")]
    pub out: PathBuf,
}

/// Seeds `args.count` accounts into the relay's database at `database_url`
/// and writes them to `args.out`.
pub async fn export(args: &SeedArgs, database_url: &str) -> anyhow::Result<()> {
    let db = crate::server::connect_db(database_url).await?;
    let made = accounts(&db, &args.prefix, args.count).await?;
    let mut csv = String::new();
    for account in &made {
        csv.push_str(&format!(
            "{},{},{}\n",
            account.username,
            STANDARD.encode(account.user_id.as_bytes()),
            URL_SAFE_NO_PAD.encode(&account.token)
        ));
    }
    std::fs::File::create(&args.out)
        .and_then(|mut file| file.write_all(csv.as_bytes()))
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} accounts (password {PASSWORD:?}) to {}",
        made.len(),
        args.out.display()
    );
    Ok(())
}
