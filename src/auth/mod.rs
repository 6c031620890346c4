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
use dashmap::DashMap;
use tokio::time::Instant;
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
    /// Recent `Logout{all}`s, for sockets that authenticated just before.
    revocations: Arc<Revocations>,
}

/// When each user last revoked all their sessions (`Logout{all}`), kept for
/// [`REVOCATION_MEMORY`]. A socket that looked its session up before the
/// revocation but took the user's place in the registry only after the
/// revoking socket closed whoever held it there would otherwise live on
/// with a revoked token. The rule: the revocation is recorded after the
/// sessions are deleted and before the user's connection is closed, and a
/// socket checks it after taking its place; so either the close finds the
/// socket, or the socket finds the record. One entry per user at most;
/// pruned by the sweeper.
#[derive(Debug, Default)]
pub struct Revocations(DashMap<Uuid, Instant>);

impl Revocations {
    /// `user` revoked all their sessions just now.
    pub fn record(&self, user: Uuid) {
        self.record_at(user, Instant::now());
    }

    fn record_at(&self, user: Uuid, at: Instant) {
        self.0.insert(user, at);
    }

    /// Whether `user` revoked all their sessions at or after `since`.
    pub fn since(&self, user: Uuid, since: Instant) -> bool {
        self.0.get(&user).is_some_and(|at| *at >= since)
    }

    /// Forgets revocations older than [`REVOCATION_MEMORY`] at `now`.
    pub fn prune(&self, now: Instant) {
        self.0
            .retain(|_, at| now.saturating_duration_since(*at) < REVOCATION_MEMORY);
    }
}

/// How long a `Logout{all}` is remembered: longer than any socket takes
/// from authenticating to taking its place (the auth timeout bounds the
/// first, the displacement grace the second).
pub const REVOCATION_MEMORY: Duration = Duration::from_secs(300);

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
            revocations: Arc::default(),
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

    /// Admits a password attempt under the rate limits, then runs `lookup`
    /// (the account's record). The limits come first, so an attempt they
    /// refuse costs no database round trip: a flood of refused guesses
    /// cannot take the pool from everyone else. A lookup that fails was no
    /// guess, and gives the account's token back.
    async fn admitted_lookup<T>(
        &self,
        username: &Username,
        from: IpAddr,
        lookup: impl Future<Output = Result<T, StorageError>>,
    ) -> Result<(limits::Admitted, T), AuthError> {
        let admitted = self.admit(from, Some(username))?;
        match lookup.await {
            Ok(found) => Ok((admitted, found)),
            Err(err) => {
                self.limits.not_a_guess(admitted);
                Err(err.into())
            }
        }
    }

    /// Checks `password` against `hash` (the dummy hash when there is no
    /// such user, so the answer takes as long) for an admitted attempt;
    /// only a wrong password keeps its account token.
    async fn check_password(
        &self,
        admitted: limits::Admitted,
        password: Password,
        hash: Option<String>,
        from: IpAddr,
    ) -> Result<bool, AuthError> {
        let checked = self.hasher.verify(password, hash, from).await;
        match checked {
            Ok(false) => self.limits.spent(admitted),
            Ok(true) | Err(_) => self.limits.not_a_guess(admitted),
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
        self.limits.spent(admitted);
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
        let (admitted, user) = self
            .admitted_lookup(
                &username,
                from,
                storage::users::find_by_username(&self.db, username.as_ref()),
            )
            .await?;
        // An unknown user still costs one Argon2 verification, against a
        // dummy hash, so response time does not reveal which names exist.
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let ok = self.check_password(admitted, password, hash, from).await?;
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
    /// Remembered after the sessions are gone (see `revocations`), so the
    /// caller closes the user's connection after this returns.
    pub async fn logout_all(&self, auth: &Authenticated) -> Result<u64, AuthError> {
        let revoked = storage::sessions::delete_all_for_user(&self.db, auth.user_id).await?;
        self.revocations.record(auth.user_id);
        Ok(revoked)
    }

    /// Whether `user` revoked all their sessions at or after `since`: a
    /// socket that began authenticating then may hold a revoked session.
    pub fn revoked_since(&self, user: Uuid, since: Instant) -> bool {
        self.revocations.since(user, since)
    }

    /// Forgets old revocations.
    pub fn prune_revocations(&self) {
        self.revocations.prune(Instant::now());
    }

    /// Checks `password` against the user's, for destructive operations,
    /// under the same limits as a login.
    pub async fn confirm_password(
        &self,
        auth: &Authenticated,
        password: Password,
        from: IpAddr,
    ) -> Result<(), AuthError> {
        // The name as the user registered it: it passed the rules then.
        let username =
            Username::parse(&auth.username).map_err(|_| AuthError::InvalidCredentials)?;
        let (admitted, user) = self
            .admitted_lookup(
                &username,
                from,
                storage::users::find_by_id(&self.db, auth.user_id),
            )
            .await?;
        let hash = user.map(|u| u.password_hash);
        let ok = self.check_password(admitted, password, hash, from).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A revocation concerns sockets that began authenticating before it,
    /// not after, and is forgotten after [`REVOCATION_MEMORY`].
    #[test]
    fn revocations_concern_earlier_sockets_and_are_forgotten() {
        let revocations = Revocations::default();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let before = Instant::now();
        let at = before + Duration::from_millis(1);
        let after = at + Duration::from_millis(1);
        revocations.record_at(alice, at);
        assert!(revocations.since(alice, before));
        assert!(revocations.since(alice, at), "at the same instant too");
        assert!(!revocations.since(alice, after), "a later socket is fine");
        assert!(!revocations.since(bob, before), "only that user");
        revocations.prune(at + REVOCATION_MEMORY - Duration::from_secs(1));
        assert!(revocations.since(alice, before), "still remembered");
        revocations.prune(at + REVOCATION_MEMORY);
        assert!(!revocations.since(alice, before), "forgotten");
    }
}
