//! Handing out pre-key bundles. One statement reads the owner's identity
//! and signed pre-key and removes the lowest-id one-time EC and one-time
//! Kyber keys (see `storage::keys::fetch_bundle` for why no two fetches can
//! get the same key); the Kyber last-resort key stands in when no one-time
//! Kyber key is left, and is never removed.

use std::fmt;

use bytes::Bytes;
use sqlx::PgPool;
use uuid::Uuid;

use super::{KeyError, KeyId};
use crate::auth::Username;
use crate::protocol::ids::UserId;
use crate::protocol::proto;
use crate::storage::keys::{self as store, BundleRow, Owner as StoreOwner};

/// One user is one device, so every bundle is for device 1.
pub const DEVICE_ID: u32 = 1;

/// Whose bundle is wanted.
#[derive(Debug, Clone)]
pub enum Owner {
    Id(UserId),
    /// Matched regardless of letter case, as at login.
    Username(Username),
}

impl Owner {
    /// Parses the request's target at the edge.
    pub fn parse(
        target: Option<proto::fetch_bundle::Target>,
    ) -> Result<Self, crate::protocol::RequestError> {
        match target {
            Some(proto::fetch_bundle::Target::UserId(id)) => {
                Ok(Owner::Id(UserId::parse(&id, "user_id")?))
            }
            Some(proto::fetch_bundle::Target::Username(name)) => {
                Ok(Owner::Username(Username::parse(&name)?))
            }
            None => Err(KeyError::NoTarget.into()),
        }
    }

    /// True when this names the user `id` / `username`.
    pub fn is(&self, id: Uuid, username: &str) -> bool {
        match self {
            Owner::Id(owner) => owner.0 == id,
            // Usernames are ASCII (see `Username`), and PostgreSQL's lower()
            // agrees with ASCII case folding on them.
            Owner::Username(name) => name.as_ref().eq_ignore_ascii_case(username),
        }
    }

    fn to_store(&self) -> StoreOwner<'_> {
        match self {
            Owner::Id(id) => StoreOwner::Id(id.0),
            Owner::Username(name) => StoreOwner::Username(name.as_ref()),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Id(id) => write!(f, "with id {id}"),
            Owner::Username(name) => write!(f, "named {:?}", name.as_ref()),
        }
    }
}

/// A fetched bundle, and whose it is (needed when it was asked for by
/// username, to tell the owner their keys run low).
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The owner's user id.
    pub owner: Uuid,
    /// The bundle, ready for the wire.
    pub bundle: proto::PreKeyBundle,
}

/// Fetches `owner`'s bundle, consuming one one-time key of each kind if
/// any is left. `UnknownUser` or `NoKeys` when there is nothing to hand out.
pub async fn fetch(db: &PgPool, owner: &Owner) -> Result<Fetched, KeyError> {
    match store::fetch_bundle(db, owner.to_store()).await? {
        Some(row) => to_bundle(row),
        None if store::user_exists(db, owner.to_store()).await? => {
            Err(KeyError::NoKeys(owner.to_string()))
        }
        None => Err(KeyError::UnknownUser(owner.to_string())),
    }
}

fn to_bundle(row: BundleRow) -> Result<Fetched, KeyError> {
    let user = row.user_id;
    let id = |raw: i32, what: &'static str| {
        KeyId::from_db(raw)
            .map(KeyId::get)
            .ok_or(KeyError::Corrupt { user, what })
    };
    let registration_id = u32::try_from(row.registration_id).map_err(|_| KeyError::Corrupt {
        user,
        what: "negative registration id",
    })?;
    let one_time_pre_key = match (row.one_time_id, row.one_time_public_key) {
        (Some(raw), Some(public_key)) => Some(proto::EcPreKey {
            id: id(raw, "negative one-time pre-key id")?,
            public_key: Bytes::from(public_key),
        }),
        _ => None,
    };
    let bundle = proto::PreKeyBundle {
        user_id: Bytes::copy_from_slice(user.as_bytes()),
        username: row.username,
        registration_id,
        device_id: DEVICE_ID,
        identity_key: Bytes::from(row.identity_key),
        signed_pre_key: Some(proto::SignedEcPreKey {
            id: id(row.signed_id, "negative signed pre-key id")?,
            public_key: Bytes::from(row.signed_public_key),
            signature: Bytes::from(row.signed_signature),
        }),
        one_time_pre_key,
        kyber_pre_key: Some(proto::SignedKyberPreKey {
            id: id(row.kyber_id, "negative Kyber pre-key id")?,
            public_key: Bytes::from(row.kyber_public_key),
            signature: Bytes::from(row.kyber_signature),
        }),
        kyber_is_last_resort: row.kyber_is_last_resort,
    };
    Ok(Fetched {
        owner: user,
        bundle,
    })
}
