//! Uploading keys: the request parsed into an [`Upload`] at the edge, and
//! the upload rules, applied in one transaction so that an upload is stored
//! whole or not at all.
//!
//! The rules (issue 3):
//! - the first upload sets the identity key (with its registration id), the
//!   signed pre-key and the Kyber last-resort key;
//! - a key whose id the user already has is replaced, anything else is
//!   added, so a retried upload is harmless;
//! - every signature verifies against the identity key: the one in the
//!   upload if there is one, else the stored one;
//! - a *different* identity key must come with a new signed pre-key and
//!   last-resort key, and deletes every older pre-key of the user, since
//!   they were signed by the old identity;
//! - a new signed pre-key replaces the old one (the relay keeps only the
//!   current one; see the module docs of [`crate::keys`]).

use std::collections::HashMap;

use sqlx::PgPool;
use uuid::Uuid;

use super::{
    Against, EcPreKey, Field, IdentityKey, KeyError, KeyId, PreKeyCounts, RegistrationId,
    SignedEcPreKey, SignedKyberPreKey,
};
use crate::protocol::proto;
use crate::storage::{
    self,
    keys::{self as store, NewKey, NewSignedKey},
};

/// Most one-time EC pre-keys in one upload.
pub const MAX_ONE_TIME_PRE_KEYS: usize = 100;
/// Most one-time Kyber pre-keys in one upload.
pub const MAX_KYBER_PRE_KEYS: usize = 100;

const SIGNED_PRE_KEY: &str = "signed_pre_key";
const ONE_TIME_PRE_KEYS: &str = "one_time_pre_keys";
const KYBER_PRE_KEYS: &str = "kyber_pre_keys";
const LAST_RESORT: &str = "last_resort_kyber_pre_key";

/// The identity key and the registration id, which libsignal publishes
/// together: a new identity means a new install, and so a new registration
/// id.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The key that signs every other key.
    pub key: IdentityKey,
    /// Lets a recipient tell a reinstalled peer from the one it knew.
    pub registration_id: RegistrationId,
}

/// A validated upload: every key well-formed, ids in range and unique
/// within their list, counts within limits. Signatures are checked later,
/// when it is known which identity key they must verify against.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Set when the client publishes (or re-publishes) its identity.
    pub identity: Option<Identity>,
    /// A new current signed pre-key.
    pub signed_pre_key: Option<SignedEcPreKey>,
    /// One-time EC pre-keys to add or replace.
    pub one_time_pre_keys: Vec<EcPreKey>,
    /// One-time Kyber pre-keys to add or replace.
    pub kyber_pre_keys: Vec<SignedKyberPreKey>,
    /// A new Kyber last-resort key.
    pub last_resort: Option<SignedKyberPreKey>,
}

impl Upload {
    /// Parses and checks formats, in the order of the request's fields, so
    /// the error names the first bad one.
    pub fn parse(raw: proto::UploadKeys) -> Result<Self, KeyError> {
        let identity = match (&raw.identity_key, raw.registration_id) {
            (Some(key), Some(registration_id)) => Some(Identity {
                key: IdentityKey::parse(key, Field::new("identity_key"))?,
                registration_id: RegistrationId::parse(registration_id)?,
            }),
            (Some(key), None) => {
                // Report a malformed key before the missing id.
                IdentityKey::parse(key, Field::new("identity_key"))?;
                return Err(KeyError::RegistrationIdMissing);
            }
            (None, Some(_)) => return Err(KeyError::RegistrationIdAlone),
            (None, None) => None,
        };
        let signed_pre_key = raw
            .signed_pre_key
            .as_ref()
            .map(|k| SignedEcPreKey::parse(k, Field::new(SIGNED_PRE_KEY)))
            .transpose()?;

        // Count first: never parse (or allocate for) a flood of keys.
        check_count(
            ONE_TIME_PRE_KEYS,
            raw.one_time_pre_keys.len(),
            MAX_ONE_TIME_PRE_KEYS,
        )?;
        let one_time_pre_keys = raw
            .one_time_pre_keys
            .iter()
            .enumerate()
            .map(|(i, k)| EcPreKey::parse(k, Field::item(ONE_TIME_PRE_KEYS, i)))
            .collect::<Result<Vec<_>, _>>()?;
        unique_ids(ONE_TIME_PRE_KEYS, one_time_pre_keys.iter().map(|k| k.id))?;

        check_count(KYBER_PRE_KEYS, raw.kyber_pre_keys.len(), MAX_KYBER_PRE_KEYS)?;
        let kyber_pre_keys = raw
            .kyber_pre_keys
            .iter()
            .enumerate()
            .map(|(i, k)| SignedKyberPreKey::parse(k, Field::item(KYBER_PRE_KEYS, i)))
            .collect::<Result<Vec<_>, _>>()?;
        unique_ids(KYBER_PRE_KEYS, kyber_pre_keys.iter().map(|k| k.id))?;

        let last_resort = raw
            .last_resort_kyber_pre_key
            .as_ref()
            .map(|k| SignedKyberPreKey::parse(k, Field::new(LAST_RESORT)))
            .transpose()?;

        Ok(Upload {
            identity,
            signed_pre_key,
            one_time_pre_keys,
            kyber_pre_keys,
            last_resort,
        })
    }

    /// Checks every signature against `identity`; the error names the first
    /// key (in request order) whose signature fails.
    pub fn verify(&self, identity: &IdentityKey, against: Against) -> Result<(), KeyError> {
        let bad = |field: Field| KeyError::BadSignature {
            field: field.part("signature"),
            against,
        };
        if let Some(k) = &self.signed_pre_key
            && !identity.verifies(k.public_key.as_bytes(), &k.signature)
        {
            return Err(bad(Field::new(SIGNED_PRE_KEY)));
        }
        for (i, k) in self.kyber_pre_keys.iter().enumerate() {
            if !identity.verifies(k.public_key.as_bytes(), &k.signature) {
                return Err(bad(Field::item(KYBER_PRE_KEYS, i)));
            }
        }
        if let Some(k) = &self.last_resort
            && !identity.verifies(k.public_key.as_bytes(), &k.signature)
        {
            return Err(bad(Field::new(LAST_RESORT)));
        }
        Ok(())
    }

    fn has_signatures(&self) -> bool {
        self.signed_pre_key.is_some()
            || !self.kyber_pre_keys.is_empty()
            || self.last_resort.is_some()
    }

    /// The first of the keys a first upload must carry that is missing.
    fn missing_for_first_upload(&self) -> Option<&'static str> {
        if self.identity.is_none() {
            Some("identity_key")
        } else {
            self.missing_for_identity_change()
        }
    }

    /// The first of the keys a new identity must come with that is missing.
    fn missing_for_identity_change(&self) -> Option<&'static str> {
        if self.signed_pre_key.is_none() {
            Some(SIGNED_PRE_KEY)
        } else if self.last_resort.is_none() {
            Some(LAST_RESORT)
        } else {
            None
        }
    }
}

fn check_count(field: &'static str, got: usize, max: usize) -> Result<(), KeyError> {
    if got > max {
        return Err(KeyError::TooMany { field, max, got });
    }
    Ok(())
}

/// One statement cannot insert two rows with the same key (PostgreSQL
/// refuses `ON CONFLICT DO UPDATE` hitting a row twice), and "which of the
/// two wins" has no good answer, so a repeated id is the client's error.
fn unique_ids(name: &'static str, ids: impl Iterator<Item = KeyId>) -> Result<(), KeyError> {
    let mut seen = HashMap::new();
    for (i, id) in ids.enumerate() {
        if let Some(first) = seen.insert(id, i) {
            return Err(KeyError::DuplicateId {
                field: Field::item(name, i).part("id"),
                id,
                first: Field::item(name, first).part("id"),
            });
        }
    }
    Ok(())
}

/// Verifies off the async workers: up to 102 XEdDSA checks take a few
/// milliseconds, too long to hold a worker thread that serves sockets.
async fn verify_blocking(
    upload: Upload,
    identity: IdentityKey,
    against: Against,
) -> Result<Upload, KeyError> {
    if !upload.has_signatures() {
        return Ok(upload);
    }
    tokio::task::spawn_blocking(move || upload.verify(&identity, against).map(|()| upload))
        .await
        .map_err(KeyError::Task)?
}

/// Applies `upload` for `user` in one transaction. Returns the one-time
/// key counts after it. An upload that would leave more than `max_stored`
/// one-time keys of either kind is refused whole, so a client cannot grow
/// its rows without bound 100 keys at a time.
pub async fn store(
    db: &PgPool,
    user: Uuid,
    upload: Upload,
    max_stored: u32,
) -> Result<PreKeyCounts, KeyError> {
    // Detached: a socket that goes away must not cancel the transaction.
    storage::detached(store_in_transaction(db.clone(), user, upload, max_stored)).await?
}

async fn store_in_transaction(
    db: PgPool,
    user: Uuid,
    upload: Upload,
    max_stored: u32,
) -> Result<PreKeyCounts, KeyError> {
    // With the identity key in the upload, the signatures can be checked
    // before the transaction: whatever is stored, they must verify against
    // this key (it is either the stored one or its replacement).
    let mut upload = match &upload.identity {
        Some(identity) => {
            let key = identity.key;
            verify_blocking(upload, key, Against::Uploaded).await?
        }
        None => upload,
    };

    let mut tx = db.begin().await?;
    // Serialises this user's uploads (see `lock_for_upload`): the identity
    // read here stays the identity until commit.
    let stored = store::lock_for_upload(&mut tx, user)
        .await?
        .ok_or(KeyError::AccountGone)?;
    let replaces_identity = match (&stored, &upload.identity) {
        (None, _) => {
            if let Some(missing) = upload.missing_for_first_upload() {
                return Err(KeyError::FirstUpload { missing });
            }
            false
        }
        (Some(stored), Some(new)) if stored.identity_key != new.key.as_bytes()[..] => {
            if let Some(missing) = upload.missing_for_identity_change() {
                return Err(KeyError::IdentityChange { missing });
            }
            true
        }
        (Some(_), Some(_)) => false,
        (Some(stored), None) => {
            let key = IdentityKey::parse(&stored.identity_key, Field::new("identity_key"))
                .map_err(|_| KeyError::Corrupt {
                    user,
                    what: "identity key is not a 33-byte EC key",
                })?;
            upload = verify_blocking(upload, key, Against::Stored).await?;
            false
        }
    };

    if replaces_identity {
        store::delete_pre_keys(&mut tx, user).await?;
        tracing::info!(%user, "identity key replaced; older pre-keys deleted");
    }
    if let Some(identity) = &upload.identity {
        store::upsert_identity(
            &mut tx,
            user,
            identity.key.as_bytes(),
            identity.registration_id.to_db(),
        )
        .await?;
    }
    if let Some(k) = &upload.signed_pre_key {
        store::replace_signed_pre_key(
            &mut tx,
            user,
            signed(k.id, k.public_key.as_bytes(), &k.signature),
        )
        .await?;
    }
    if !upload.one_time_pre_keys.is_empty() {
        let keys: Vec<NewKey<'_>> = upload
            .one_time_pre_keys
            .iter()
            .map(|k| NewKey {
                id: k.id.to_db(),
                public_key: k.public_key.as_bytes(),
            })
            .collect();
        store::upsert_one_time_pre_keys(&mut tx, user, &keys).await?;
    }
    if !upload.kyber_pre_keys.is_empty() {
        let keys: Vec<NewSignedKey<'_>> = upload
            .kyber_pre_keys
            .iter()
            .map(|k| signed(k.id, k.public_key.as_bytes(), &k.signature))
            .collect();
        store::upsert_kyber_pre_keys(&mut tx, user, &keys).await?;
    }
    if let Some(k) = &upload.last_resort {
        store::upsert_last_resort(
            &mut tx,
            user,
            signed(k.id, k.public_key.as_bytes(), &k.signature),
        )
        .await?;
    }
    let counts = store::counts(&mut *tx, user).await?;
    for (kind, have) in [("EC", counts.one_time), ("Kyber", counts.kyber)] {
        if have > i64::from(max_stored) {
            // Dropping the transaction rolls the whole upload back.
            return Err(KeyError::TooManyStored {
                kind,
                have,
                max: max_stored,
            });
        }
    }
    tx.commit().await?;
    Ok(PreKeyCounts::from(counts))
}

fn signed<'a>(
    id: KeyId,
    public_key: &'a [u8],
    signature: &'a super::Signature,
) -> NewSignedKey<'a> {
    NewSignedKey {
        id: id.to_db(),
        public_key,
        signature: signature.as_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::keys::testing::TestIdentity;

    fn upload() -> (TestIdentity, proto::UploadKeys) {
        let me = TestIdentity::generate();
        let raw = me.upload(7, 1..=3, 1..=2, 100);
        (me, raw)
    }

    fn err(raw: proto::UploadKeys) -> String {
        Upload::parse(raw).unwrap_err().to_string()
    }

    #[test]
    fn a_generated_upload_parses_and_verifies() {
        let (me, raw) = upload();
        let parsed = Upload::parse(raw).unwrap();
        assert_eq!(parsed.one_time_pre_keys.len(), 3);
        assert_eq!(parsed.kyber_pre_keys.len(), 2);
        let key = IdentityKey::parse(&me.identity_key(), Field::new("identity_key")).unwrap();
        parsed.verify(&key, Against::Uploaded).unwrap();
        let other = TestIdentity::generate();
        let other = IdentityKey::parse(&other.identity_key(), Field::new("identity_key")).unwrap();
        assert_eq!(
            parsed
                .verify(&other, Against::Stored)
                .unwrap_err()
                .to_string(),
            "signed_pre_key.signature does not verify against the identity key stored for this user"
        );
    }

    #[test]
    fn the_first_bad_signature_is_named() {
        let (me, mut raw) = upload();
        let mut sig = raw.kyber_pre_keys[1].signature.to_vec();
        sig[5] ^= 1;
        raw.kyber_pre_keys[1].signature = Bytes::from(sig);
        let parsed = Upload::parse(raw.clone()).unwrap();
        let key = IdentityKey::parse(&me.identity_key(), Field::new("identity_key")).unwrap();
        assert_eq!(
            parsed
                .verify(&key, Against::Uploaded)
                .unwrap_err()
                .to_string(),
            "kyber_pre_keys[1].signature does not verify against the identity key in this upload"
        );
        raw.last_resort_kyber_pre_key.as_mut().unwrap().signature =
            raw.kyber_pre_keys[0].signature.clone();
        let parsed = Upload::parse(raw).unwrap();
        assert!(matches!(
            parsed.verify(&key, Against::Uploaded),
            Err(KeyError::BadSignature { field, .. }) if field == Field::item(KYBER_PRE_KEYS, 1).part("signature")
        ));
    }

    #[test]
    fn registration_id_travels_with_the_identity_key() {
        let (_, mut raw) = upload();
        raw.registration_id = None;
        assert_eq!(
            err(raw.clone()),
            "registration_id is required with identity_key"
        );
        raw.identity_key = None;
        raw.registration_id = Some(5);
        assert_eq!(
            err(raw),
            "registration_id is only accepted together with identity_key"
        );
    }

    #[test]
    fn counts_and_duplicates() {
        let (me, mut raw) = upload();
        raw.one_time_pre_keys = (0..101)
            .map(crate::keys::testing::one_time_pre_key)
            .collect();
        assert_eq!(
            err(raw.clone()),
            "one_time_pre_keys holds 101 keys; at most 100 are accepted per upload"
        );
        raw.one_time_pre_keys.truncate(100);
        assert!(Upload::parse(raw.clone()).is_ok());
        raw.kyber_pre_keys = (0..101).map(|id| me.kyber_pre_key(id)).collect();
        assert_eq!(
            err(raw.clone()),
            "kyber_pre_keys holds 101 keys; at most 100 are accepted per upload"
        );
        raw.kyber_pre_keys.truncate(100);
        assert!(Upload::parse(raw.clone()).is_ok());
        raw.kyber_pre_keys[7].id = 2;
        assert_eq!(
            err(raw.clone()),
            "kyber_pre_keys[7].id is 2, which kyber_pre_keys[2].id already uses in this upload"
        );
        raw.kyber_pre_keys[7].id = 7;
        raw.one_time_pre_keys[99].id = 0;
        assert_eq!(
            err(raw),
            "one_time_pre_keys[99].id is 0, which one_time_pre_keys[0].id already uses in this upload"
        );
    }

    #[test]
    fn an_empty_upload_parses() {
        let parsed = Upload::parse(proto::UploadKeys::default()).unwrap();
        assert!(parsed.identity.is_none() && !parsed.has_signatures());
        assert_eq!(parsed.missing_for_first_upload(), Some("identity_key"));
    }
}
