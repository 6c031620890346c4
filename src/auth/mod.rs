//! Authentication: registration, password login, session tokens, logout and
//! password confirmation. Passwords are hashed with Argon2id off the async
//! workers, fairly between clients ([`password`]), after the attempt passed
//! the per-address and per-account rate limits ([`limits`]); sessions are
//! random tokens stored hashed ([`token`]); usernames and passwords are
//! parsed at the edge ([`credentials`]).

pub mod credentials;
pub mod limits;
pub mod password;
pub mod token;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::health::Health;
use crate::metrics::{AuthMethod, AuthResult, Limit, Metrics};
use crate::protocol::RequestError;
use crate::storage::{self, Database, StorageError};
pub use credentials::{HeaderCredentials, Password, Username};
pub use limits::PasswordLimits;
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
    /// Over a password rate limit, or this address already has its share
    /// of password checks waiting.
    #[error("too many password attempts; retry later")]
    RateLimited { retry_after: Duration },
    #[error("too many password checks from this address in progress")]
    TooManyPending,
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
            AuthError::RateLimited { retry_after } => RequestError::RateLimited { retry_after },
            AuthError::TooManyPending => RequestError::RateLimited {
                retry_after: PENDING_RETRY_AFTER,
            },
            AuthError::Hashing(_) | AuthError::WorkerGone | AuthError::Storage(_) => {
                RequestError::internal(err)
            }
        }
    }
}

/// The retry hint when an address has its share of password checks
/// waiting: about one hash's time on a busy server.
const PENDING_RETRY_AFTER: Duration = Duration::from_millis(500);

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
    /// When that token expires: the socket is closed then.
    pub expires_at: DateTime<Utc>,
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
    /// Per-address and per-account limits on password attempts. Shared by
    /// clones.
    limits: Arc<PasswordLimits>,
    /// Counts attempts refused by `limits`.
    metrics: Metrics,
    /// Lifetime of issued session tokens.
    session_ttl: Duration,
    /// While the database is known to be down, authentication fails at
    /// once rather than after the pool's acquire timeout.
    health: Health,
    /// Live sessions one user may hold; issuing one more revokes the oldest.
    max_sessions: u32,
}

/// How an [`Authenticator`] is set up.
pub struct AuthSettings {
    /// Lifetime of issued session tokens.
    pub session_ttl: Duration,
    /// Live sessions one user may hold.
    pub max_sessions: u32,
    /// Limits on password attempts.
    pub limits: PasswordLimits,
}

impl Authenticator {
    pub fn new(
        db: Database,
        hasher: PasswordHasher,
        settings: AuthSettings,
        health: Health,
        metrics: Metrics,
    ) -> Self {
        Self {
            db,
            hasher,
            limits: Arc::new(settings.limits),
            metrics,
            session_ttl: settings.session_ttl,
            max_sessions: settings.max_sessions,
            health,
        }
    }

    /// Admits a password attempt under the rate limits, counting a refusal.
    fn admit(
        &self,
        from: IpAddr,
        account: Option<&Username>,
    ) -> Result<limits::Admitted, AuthError> {
        self.limits.admit(from, account).map_err(|refused| {
            self.metrics.rate_limited(match refused {
                limits::Refused::Address(_) => Limit::password_address,
                limits::Refused::Account(_) => Limit::password_account,
            });
            AuthError::RateLimited {
                retry_after: refused.retry_after(),
            }
        })
    }

    /// Checks `password` against `user`'s (a dummy hash when there is no
    /// such user, so the answer takes as long), after the rate limits; a
    /// right password gives its account token back.
    async fn check_password(
        &self,
        username: &Username,
        password: Password,
        hash: Option<String>,
        from: IpAddr,
    ) -> Result<bool, AuthError> {
        let admitted = self.admit(from, Some(username))?;
        let checked = self.hasher.verify(password, hash, from).await;
        match checked {
            Ok(true) => self.limits.succeeded(admitted),
            Ok(false) | Err(_) => self.limits.failed(admitted),
        }
        if matches!(checked, Err(AuthError::TooManyPending)) {
            self.metrics.rate_limited(Limit::password_queue);
        }
        checked
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
        from: IpAddr,
    ) -> Result<IssuedSession, AuthError> {
        self.database_up()?;
        let admitted = self.admit(from, None)?;
        self.limits.failed(admitted);
        let hash = self.hasher.hash(password, from).await.inspect_err(|err| {
            if matches!(err, AuthError::TooManyPending) {
                self.metrics.rate_limited(Limit::password_queue);
            }
        })?;
        let user_id = storage::users::insert(&self.db, username.as_ref(), &hash).await?;
        tracing::info!(%user_id, "user registered");
        self.issue(user_id, username.into_inner()).await
    }

    pub async fn login(
        &self,
        username: Username,
        password: Password,
        from: IpAddr,
    ) -> Result<IssuedSession, AuthError> {
        self.database_up()?;
        let user = storage::users::find_by_username(&self.db, username.as_ref()).await?;
        // An unknown user still costs one Argon2 verification, against a
        // dummy hash, so response time does not reveal which names exist.
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let ok = self.check_password(&username, password, hash, from).await?;
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
        from: IpAddr,
    ) -> Result<(Authenticated, Option<SessionToken>), AuthError> {
        match credentials {
            HeaderCredentials::Bearer(token) => Ok((self.resume(&token).await?, None)),
            HeaderCredentials::Basic(username, password) => {
                let issued = self.login(username, password, from).await?;
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
            Some(session) => Ok(Authenticated {
                user_id: session.user_id,
                username: session.username.into(),
                token_hash,
                expires_at: session.expires_at,
            }),
            None => Err(AuthError::InvalidToken),
        }
    }

    pub async fn logout(&self, auth: &Authenticated) -> Result<(), AuthError> {
        storage::sessions::delete(&self.db, &auth.token_hash).await?;
        Ok(())
    }

    /// Revokes every session of the user; returns how many there were.
    pub async fn logout_all(&self, auth: &Authenticated) -> Result<u64, AuthError> {
        Ok(storage::sessions::delete_all_for_user(&self.db, auth.user_id).await?)
    }

    /// Checks `password` against the user's, for destructive operations,
    /// under the same limits as a login.
    pub async fn confirm_password(
        &self,
        auth: &Authenticated,
        password: Password,
        from: IpAddr,
    ) -> Result<(), AuthError> {
        let user = storage::users::find_by_id(&self.db, auth.user_id).await?;
        // The name as the user registered it: it passed the rules then.
        let username =
            Username::parse(&auth.username).map_err(|_| AuthError::InvalidCredentials)?;
        let hash = user.map(|u| u.password_hash);
        let ok = self.check_password(&username, password, hash, from).await?;
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
                expires_at,
            },
            token,
            expires_at,
        })
    }
}
