//! Accounts for a run, written straight into the relay's database through
//! the library's own storage functions: registering thousands of users over
//! the protocol would cost an Argon2 hash each (minutes of CPU on two cores)
//! and measure nothing the scenarios care about. Every seeded user gets a
//! real Argon2 hash of the same password (so password login works and costs
//! what it costs) and a real session token (so `resume` works).

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
