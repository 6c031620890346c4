//! Authentication: registration, password login, session tokens, logout and
//! password confirmation. Passwords are hashed with Argon2id off the async
//! workers ([`password`]); sessions are random tokens stored hashed
//! ([`token`]); usernames and passwords are parsed at the edge
//! ([`credentials`]).

pub mod credentials;
pub mod password;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::health::Health;
use crate::metrics::{AuthMethod, AuthResult, Metrics};
use crate::protocol::RequestError;
use crate::storage::{self, Database, StorageError};
pub use credentials::{HeaderCredentials, Password, Username};
pub use password::PasswordHasher;
pub use token::SessionToken;

/// Errors of the auth layer.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Deliberately the same for an unknown user and a wrong password.
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("session token is invalid or expired")]
    InvalidToken,
    #[error("username is already taken")]
    UsernameTaken,
    #[error("too many password checks in progress; retry shortly")]
    Busy,
    #[error("the database is unreachable; retry shortly")]
    DatabaseDown,
    #[error("password hashing failed")]
    Hashing(#[source] argon2::password_hash::Error),
    #[error("password hashing worker stopped")]
    WorkerGone,
    #[error("auth storage failed")]
    Storage(#[source] StorageError),
}

impl From<StorageError> for AuthError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::UsernameTaken => AuthError::UsernameTaken,
            other => AuthError::Storage(other),
        }
    }
}

impl From<AuthError> for RequestError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::InvalidCredentials | AuthError::InvalidToken => {
                RequestError::Unauthorized(err.to_string())
            }
            AuthError::UsernameTaken => RequestError::Conflict(err.to_string()),
            AuthError::Busy | AuthError::DatabaseDown => RequestError::Unavailable(err.to_string()),
            AuthError::Hashing(_) | AuthError::WorkerGone | AuthError::Storage(_) => {
                RequestError::internal(err)
            }
        }
    }
}

/// Counts an authentication attempt, and logs a failed one with the
/// username tried and where it came from (never the password or token).
pub fn record_attempt(
    metrics: &Metrics,
    method: AuthMethod,
    username: Option<&str>,
    peer: SocketAddr,
    outcome: Result<(), &RequestError>,
) {
    let result = AuthResult::of(outcome);
    metrics.auth(method, result);
    if let Err(err) = outcome {
        // Only a name that is a valid username is logged: anything else is
        // unbounded, and often a password typed into the wrong field.
        let username = match username.map(Username::parse) {
            Some(Ok(name)) => name.into_inner(),
            Some(Err(_)) => "(not a valid username)".to_owned(),
            None => String::new(),
        };
        tracing::info!(
            ?method,
            ?result,
            %username,
            %peer,
            reason = %err.client_message(),
            "authentication failed"
        );
    }
}

/// An authenticated identity, and the session it holds.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub user_id: Uuid,
    /// Shared, because every message this user sends carries it.
    pub username: Arc<str>,
    /// The hash of the session token this socket is bound to; `Logout`
    /// revokes it.
    pub token_hash: [u8; 32],
}

/// A freshly issued session, returned to the client once.
#[derive(Debug)]
pub struct IssuedSession {
    pub auth: Authenticated,
    pub token: SessionToken,
    pub expires_at: DateTime<Utc>,
}

/// The authentication service. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    /// Where users and sessions live.
    db: Database,
    /// Bounded Argon2 worker.
    hasher: PasswordHasher,
    /// Lifetime of issued session tokens.
    session_ttl: Duration,
    /// While the database is known to be down, authentication fails at
    /// once rather than after the pool's acquire timeout.
    health: Health,
    /// Live sessions one user may hold; issuing one more revokes the oldest.
    max_sessions: u32,
}

impl Authenticator {
    pub fn new(
        db: Database,
        hasher: PasswordHasher,
        session_ttl: Duration,
        health: Health,
        max_sessions: u32,
    ) -> Self {
        Self {
            db,
            hasher,
            session_ttl,
            max_sessions,
            health,
        }
    }

    fn database_up(&self) -> Result<(), AuthError> {
        if self.health.database_down() {
            Err(AuthError::DatabaseDown)
        } else {
            Ok(())
        }
    }

    pub async fn register(
        &self,
        username: Username,
        password: Password,
    ) -> Result<IssuedSession, AuthError> {
        self.database_up()?;
        let hash = self.hasher.hash(password).await?;
        let user_id = storage::users::insert(&self.db, username.as_ref(), &hash).await?;
        tracing::info!(%user_id, "user registered");
        self.issue(user_id, username.into_inner()).await
    }

    pub async fn login(
        &self,
        username: Username,
        password: Password,
    ) -> Result<IssuedSession, AuthError> {
        self.database_up()?;
        let user = storage::users::find_by_username(&self.db, username.as_ref()).await?;
        // An unknown user still costs one Argon2 verification, against a
        // dummy hash, so response time does not reveal which names exist.
        let ok = self
            .hasher
            .verify(password, user.as_ref().map(|u| u.password_hash.clone()))
            .await?;
        match user {
            Some(user) if ok => self.issue(user.id, user.username).await,
            _ => Err(AuthError::InvalidCredentials),
        }
    }

    /// Authenticates an upgrade request's `Authorization` header. A `Basic`
    /// login also returns the session token it issued, to hand over.
    pub async fn from_header(
        &self,
        credentials: HeaderCredentials,
    ) -> Result<(Authenticated, Option<SessionToken>), AuthError> {
        match credentials {
            HeaderCredentials::Bearer(token) => Ok((self.resume(&token).await?, None)),
            HeaderCredentials::Basic(username, password) => {
                let issued = self.login(username, password).await?;
                Ok((issued.auth, Some(issued.token)))
            }
        }
    }

    /// Authenticates with a session token. No password hashing.
    pub async fn resume(&self, token: &SessionToken) -> Result<Authenticated, AuthError> {
        self.database_up()?;
        let token_hash = token.hash();
        // Through the batched reader: every reconnect makes this lookup, and
        // a storm of them shares statements instead of pool round trips.
        match self.db.reader().session(token_hash).await? {
            Some((user_id, username)) => Ok(Authenticated {
                user_id,
                username: username.into(),
                token_hash,
            }),
            None => Err(AuthError::InvalidToken),
        }
    }

    pub async fn logout(&self, auth: &Authenticated) -> Result<(), AuthError> {
        storage::sessions::delete(&self.db, &auth.token_hash).await?;
        Ok(())
    }

    /// Checks `password` against the user's, for destructive operations.
    pub async fn confirm_password(
        &self,
        user_id: Uuid,
        password: Password,
    ) -> Result<(), AuthError> {
        let user = storage::users::find_by_id(&self.db, user_id).await?;
        let ok = self
            .hasher
            .verify(password, user.map(|u| u.password_hash))
            .await?;
        if ok {
            Ok(())
        } else {
            Err(AuthError::InvalidCredentials)
        }
    }

    async fn issue(&self, user_id: Uuid, username: String) -> Result<IssuedSession, AuthError> {
        let token = SessionToken::generate();
        let token_hash = token.hash();
        let expires_at = Utc::now()
            + chrono::Duration::from_std(self.session_ttl).unwrap_or(chrono::Duration::MAX);
        let revoked = storage::sessions::insert_capped(
            &self.db,
            &token_hash,
            user_id,
            expires_at,
            self.max_sessions,
        )
        .await?;
        if revoked > 0 {
            tracing::info!(%user_id, revoked, "oldest sessions revoked to stay within the cap");
        }
        Ok(IssuedSession {
            auth: Authenticated {
                user_id,
                username: username.into(),
                token_hash,
            },
            token,
            expires_at,
        })
    }
}
