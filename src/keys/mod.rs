//! The key directory: validation of uploaded pre-keys exactly as libsignal
//! does it, and the bundle a sender fetches to start a session.
//!
//! - [`types`] — the domain types uploads are parsed into at the edge;
//! - [`xeddsa`] — libsignal-exact signature verification;
//! - [`upload`] — the upload rules, applied in one transaction;
//! - [`bundle`] — handing out a bundle, consuming one-time keys;
//! - [`low`] — when to tell an owner their one-time keys run low.
//!
//! What the relay keeps per user: the identity key and registration id, the
//! *current* signed pre-key only (older ones are deleted when a new one is
//! uploaded: the bundle only ever carries the current one, and the client,
//! not the relay, keeps old private halves for sessions still being set
//! up), one-time EC pre-keys, one-time Kyber pre-keys and one Kyber
//! last-resort key.

pub mod bundle;
pub mod low;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod types;
pub mod upload;
pub mod xeddsa;

use std::fmt;

use sqlx::PgPool;
use uuid::Uuid;

use crate::auth::Username;
use crate::protocol::RequestError;
use crate::storage::{self, StorageError};
pub use types::{
    EcPreKey, EcPublicKey, Field, IdentityKey, KeyId, KyberPublicKey, RegistrationId, Signature,
    SignedEcPreKey, SignedKyberPreKey,
};

/// Which identity key a signature was checked against, for the error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// The identity key sent in the same upload.
    Uploaded,
    /// The identity key the relay already holds for the user.
    Stored,
}

impl fmt::Display for Against {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Against::Uploaded => "in this upload",
            Against::Stored => "stored for this user",
        })
    }
}

/// Errors of the key directory. Every variant but `Storage`, `Task` and
/// `Corrupt` is the client's fault, and its message names the offending
/// field so the client can tell which key to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{field} must be {expected}, got {got}")]
    Length {
        field: Field,
        expected: &'static str,
        got: usize,
    },
    #[error("{field} must start with type byte {expected:#04x}, got {got:#04x}")]
    KeyType { field: Field, expected: u8, got: u8 },
    #[error("{field} must be in 0..={}, got {got}", KeyId::MAX)]
    KeyIdRange { field: Field, got: u32 },
    #[error(
        "registration_id must be in {}..={}, got {got}",
        RegistrationId::MIN,
        RegistrationId::MAX
    )]
    RegistrationIdRange { got: u32 },
    #[error("{field} holds {got} keys; at most {max} are accepted per upload")]
    TooMany {
        field: &'static str,
        max: usize,
        got: usize,
    },
    #[error("{field} is {id}, which {first} already uses in this upload")]
    DuplicateId {
        field: Field,
        id: KeyId,
        first: Field,
    },
    #[error(
        "this upload would leave {have} one-time {kind} pre-keys stored; \
         at most {max} are kept per user"
    )]
    TooManyStored {
        kind: &'static str,
        have: i64,
        max: u32,
    },
    #[error("registration_id is required with identity_key")]
    RegistrationIdMissing,
    #[error("registration_id is only accepted together with identity_key")]
    RegistrationIdAlone,
    #[error(
        "the first upload must set identity_key, signed_pre_key and \
         last_resort_kyber_pre_key; {missing} is missing"
    )]
    FirstUpload { missing: &'static str },
    #[error(
        "a new identity_key must come with a new signed_pre_key and \
         last_resort_kyber_pre_key signed by it; {missing} is missing"
    )]
    IdentityChange { missing: &'static str },
    #[error("{field} does not verify against the identity key {against}")]
    BadSignature { field: Field, against: Against },
    #[error("fetch_bundle needs a target: user_id or username")]
    NoTarget,
    #[error(
        "you cannot fetch your own bundle: one user is one device here, so \
         there is no other device of yours to start a session with, and the \
         fetch would only use up your one-time pre-keys"
    )]
    OwnBundle,
    #[error("no user {0}")]
    UnknownUser(String),
    #[error("user {0} has not published keys")]
    NoKeys(String),
    /// The uploading user was deleted (from another connection) meanwhile.
    #[error("this account no longer exists")]
    AccountGone,
    #[error("key storage failed")]
    Storage(#[from] StorageError),
    #[error("signature verification task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A stored row breaks an invariant the upload path keeps.
    #[error("stored keys of user {user} are corrupt: {what}")]
    Corrupt { user: Uuid, what: &'static str },
}

impl From<sqlx::Error> for KeyError {
    fn from(err: sqlx::Error) -> Self {
        KeyError::Storage(StorageError::Query(err))
    }
}

impl From<KeyError> for RequestError {
    fn from(err: KeyError) -> Self {
        match err {
            KeyError::Length { .. }
            | KeyError::KeyType { .. }
            | KeyError::KeyIdRange { .. }
            | KeyError::RegistrationIdRange { .. }
            | KeyError::TooMany { .. }
            | KeyError::TooManyStored { .. }
            | KeyError::DuplicateId { .. }
            | KeyError::RegistrationIdMissing
            | KeyError::RegistrationIdAlone
            | KeyError::FirstUpload { .. }
            | KeyError::IdentityChange { .. }
            | KeyError::BadSignature { .. }
            | KeyError::NoTarget => RequestError::BadRequest(err.to_string()),
            KeyError::OwnBundle => RequestError::Forbidden(err.to_string()),
            KeyError::UnknownUser(_) | KeyError::NoKeys(_) | KeyError::AccountGone => {
                RequestError::NotFound(err.to_string())
            }
            KeyError::Storage(_) | KeyError::Task(_) | KeyError::Corrupt { .. } => {
                RequestError::internal(err)
            }
        }
    }
}

/// A user as `LookupUser` shows them: no key is consumed.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub user_id: Uuid,
    /// As registered.
    pub username: String,
    /// The published identity key; `None` until the user has published a
    /// complete set of keys (what a bundle needs).
    pub identity_key: Option<Vec<u8>>,
}

/// Looks `username` up (any letter case). `UnknownUser` when nobody has it.
pub async fn lookup(db: &PgPool, username: &Username) -> Result<Lookup, KeyError> {
    let row = storage::keys::lookup_user(db, username.as_ref())
        .await?
        .ok_or_else(|| KeyError::UnknownUser(format!("named {:?}", username.as_ref())))?;
    Ok(Lookup {
        user_id: row.user_id,
        username: row.username,
        identity_key: row.identity_key,
    })
}

/// How many one-time keys of each kind a user has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreKeyCounts {
    /// One-time Curve25519 pre-keys.
    pub one_time: u32,
    /// One-time Kyber pre-keys (the last-resort key is not counted: it is
    /// never used up).
    pub kyber: u32,
}

/// The user's one-time key counts.
pub async fn count(db: &PgPool, user: Uuid) -> Result<PreKeyCounts, KeyError> {
    let counts = storage::keys::counts(db, user).await?;
    Ok(PreKeyCounts::from(counts))
}

impl From<storage::keys::Counts> for PreKeyCounts {
    fn from(c: storage::keys::Counts) -> Self {
        // A user holds at most a few hundred keys; saturate rather than wrap
        // if that ever stops being true.
        PreKeyCounts {
            one_time: u32::try_from(c.one_time).unwrap_or(u32::MAX),
            kyber: u32::try_from(c.kyber).unwrap_or(u32::MAX),
        }
    }
}
