//! The key-upload validator: `Upload::parse` checks formats, ids and counts
//! at the edge, `Upload::verify` every signature against the identity key.
//! Neither may panic. `parse` accepts exactly the uploads the protocol's
//! rules allow (a small model of them below) and refuses the rest as the
//! client's fault. A genuine upload verifies against its own identity; one
//! with any signed byte changed (a key, a signature, the identity) does not,
//! while a change to an unsigned one-time key leaves it verifying.

use std::collections::HashSet;
use std::sync::LazyLock;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use signal_relay::keys::testing::TestIdentity;
use signal_relay::keys::upload::{MAX_KYBER_PRE_KEYS, MAX_ONE_TIME_PRE_KEYS, Upload};
use signal_relay::keys::xeddsa::{EC_KEY_LEN, EC_KEY_TYPE, KYBER_KEY_LEN, KYBER_KEY_TYPE};
use signal_relay::keys::{Against, Field, IdentityKey, KeyId, RegistrationId};
use signal_relay::proto;
use signal_relay::protocol::RequestError;

use crate::support;

/// Most bytes of a signature.
const SIGNATURE_LEN: usize = 64;

/// A key of the right length and type, shared: cloning `Bytes` copies
/// nothing, so an upload of 100 Kyber keys costs no 157 KiB per input.
fn well_formed(len: usize, type_byte: u8, fill: u8) -> Bytes {
    static KEYS: LazyLock<Vec<Bytes>> = LazyLock::new(|| {
        let make = |len: usize, type_byte: u8| -> Vec<Bytes> {
            (0..=255u8)
                .map(|fill| {
                    let mut key = vec![fill; len];
                    key[0] = type_byte;
                    Bytes::from(key)
                })
                .collect()
        };
        let mut all = make(EC_KEY_LEN, EC_KEY_TYPE);
        all.extend(make(KYBER_KEY_LEN, KYBER_KEY_TYPE));
        all
    });
    let base = if type_byte == EC_KEY_TYPE && len == EC_KEY_LEN {
        0
    } else {
        256
    };
    KEYS[base + usize::from(fill)].clone()
}

/// Bytes for a key field: mostly well-formed, sometimes off by a length or
/// a type byte, sometimes anything.
fn key(len: usize, type_byte: u8) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        6 => any::<u8>().prop_map(move |fill| well_formed(len, type_byte, fill)),
        1 => (any::<u8>(), prop::sample::select(vec![len - 1, len + 1])).prop_map(move |(fill, len)| {
            let mut key = vec![fill; len];
            key[0] = type_byte;
            Bytes::from(key)
        }),
        1 => (any::<u8>(), any::<u8>()).prop_map(move |(fill, other)| {
            let mut key = well_formed(len, type_byte, fill).to_vec();
            key[0] = if other == type_byte { other ^ 1 } else { other };
            Bytes::from(key)
        }),
        1 => vec(any::<u8>(), 0..40).prop_map(Bytes::from),
    ]
}

fn signature() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        8 => vec(any::<u8>(), SIGNATURE_LEN).prop_map(Bytes::from),
        1 => vec(any::<u8>(), 0..80).prop_map(Bytes::from),
    ]
}

/// Ids from a small range (so duplicates happen), valid ones, and any.
fn id() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0..8u32, 2 => 0..=KeyId::MAX, 1 => any::<u32>()]
}

/// List lengths: short, or around the per-upload limit.
fn count(max: usize) -> impl Strategy<Value = std::ops::RangeInclusive<usize>> {
    prop_oneof![8 => Just(0..=3), 1 => Just(max - 1..=max + 1)]
}

fn random_upload() -> impl Strategy<Value = proto::UploadKeys> {
    let signed_ec = (id(), key(EC_KEY_LEN, EC_KEY_TYPE), signature()).prop_map(
        |(id, public_key, signature)| proto::SignedEcPreKey {
            id,
            public_key,
            signature,
        },
    );
    let kyber = || {
        (id(), key(KYBER_KEY_LEN, KYBER_KEY_TYPE), signature()).prop_map(
            |(id, public_key, signature)| proto::SignedKyberPreKey {
                id,
                public_key,
                signature,
            },
        )
    };
    let one_time = count(MAX_ONE_TIME_PRE_KEYS).prop_flat_map(move |n| {
        vec(
            (id(), key(EC_KEY_LEN, EC_KEY_TYPE))
                .prop_map(|(id, public_key)| proto::EcPreKey { id, public_key }),
            n,
        )
    });
    let kybers = count(MAX_KYBER_PRE_KEYS).prop_flat_map(move |n| vec(kyber(), n));
    (
        proptest::option::of(key(EC_KEY_LEN, EC_KEY_TYPE)),
        proptest::option::of(prop_oneof![
            3 => RegistrationId::MIN..=RegistrationId::MAX,
            1 => any::<u32>(),
        ]),
        proptest::option::of(signed_ec),
        one_time,
        kybers,
        proptest::option::of(kyber()),
    )
        .prop_map(
            |(identity_key, registration_id, signed_pre_key, one_time, kyber, last_resort)| {
                proto::UploadKeys {
                    identity_key,
                    registration_id,
                    signed_pre_key,
                    one_time_pre_keys: one_time,
                    kyber_pre_keys: kyber,
                    last_resort_kyber_pre_key: last_resort,
                }
            },
        )
}

/// The protocol's rules for an upload's formats, written apart from the
/// validator.
fn allowed(raw: &proto::UploadKeys) -> bool {
    let id_ok = |id: u32| id <= KeyId::MAX;
    let ec_ok = |k: &[u8]| k.len() == EC_KEY_LEN && k[0] == EC_KEY_TYPE;
    let kyber_ok = |k: &[u8]| k.len() == KYBER_KEY_LEN && k[0] == KYBER_KEY_TYPE;
    let sig_ok = |s: &[u8]| s.len() == SIGNATURE_LEN;
    let unique = |ids: Vec<u32>| ids.len() == ids.iter().collect::<HashSet<_>>().len();
    let identity_ok = match (&raw.identity_key, raw.registration_id) {
        (Some(key), Some(id)) => {
            ec_ok(key) && (RegistrationId::MIN..=RegistrationId::MAX).contains(&id)
        }
        (None, None) => true,
        _ => false,
    };
    let signed_ok = raw
        .signed_pre_key
        .as_ref()
        .is_none_or(|k| id_ok(k.id) && ec_ok(&k.public_key) && sig_ok(&k.signature));
    let kyber_key_ok = |k: &proto::SignedKyberPreKey| {
        id_ok(k.id) && kyber_ok(&k.public_key) && sig_ok(&k.signature)
    };
    identity_ok
        && signed_ok
        && raw.one_time_pre_keys.len() <= MAX_ONE_TIME_PRE_KEYS
        && raw
            .one_time_pre_keys
            .iter()
            .all(|k| id_ok(k.id) && ec_ok(&k.public_key))
        && unique(raw.one_time_pre_keys.iter().map(|k| k.id).collect())
        && raw.kyber_pre_keys.len() <= MAX_KYBER_PRE_KEYS
        && raw.kyber_pre_keys.iter().all(kyber_key_ok)
        && unique(raw.kyber_pre_keys.iter().map(|k| k.id).collect())
        && raw
            .last_resort_kyber_pre_key
            .as_ref()
            .is_none_or(kyber_key_ok)
}

fn has_signatures(raw: &proto::UploadKeys) -> bool {
    raw.signed_pre_key.is_some()
        || !raw.kyber_pre_keys.is_empty()
        || raw.last_resort_kyber_pre_key.is_some()
}

/// An identity that signed nothing here: random signatures must fail
/// against it.
static STRANGER: LazyLock<IdentityKey> = LazyLock::new(|| {
    IdentityKey::parse(
        &TestIdentity::generate().identity_key(),
        Field::new("identity_key"),
    )
    .expect("a generated identity key parses")
});

#[test]
fn random_uploads() {
    support::run("random_uploads", 1, random_upload(), |raw| {
        let expected = allowed(&raw);
        let signed = has_signatures(&raw);
        match Upload::parse(raw) {
            Ok(upload) => {
                prop_assert!(expected, "parse accepted an upload the rules refuse");
                // Random signatures verify against no identity.
                let verified = upload.verify(&STRANGER, Against::Stored);
                prop_assert_eq!(verified.is_ok(), !signed);
            }
            Err(err) => {
                prop_assert!(!expected, "parse refused an allowed upload: {err}");
                prop_assert!(matches!(
                    RequestError::from(err),
                    RequestError::BadRequest(_)
                ));
            }
        }
        Ok(())
    });
}

/// Genuine uploads, made (and signed) once: signing is what costs.
static GENUINE: LazyLock<Vec<proto::UploadKeys>> = LazyLock::new(|| {
    (0..8)
        .map(|i| TestIdentity::generate().upload(7 + i, 1..=(i % 3 + 1), 1..=(i % 2 + 1), 1000))
        .collect()
});

/// Which byte of a genuine upload to change.
#[derive(Debug, Clone, Copy)]
enum Part {
    Identity,
    SignedKey,
    SignedSignature,
    OneTimeKey,
    KyberKey,
    KyberSignature,
    LastResortKey,
    LastResortSignature,
}

impl Part {
    /// Whether a signature covers the part (or checks against it).
    fn signed(self) -> bool {
        !matches!(self, Part::OneTimeKey)
    }

    /// Whether the part is a key (whose first byte is its type), not a
    /// signature.
    fn is_key(self) -> bool {
        !matches!(
            self,
            Part::SignedSignature | Part::KyberSignature | Part::LastResortSignature
        )
    }

    fn bytes(self, raw: &mut proto::UploadKeys) -> &mut Bytes {
        let some = "genuine uploads have every part";
        match self {
            Part::Identity => raw.identity_key.as_mut().expect(some),
            Part::SignedKey => &mut raw.signed_pre_key.as_mut().expect(some).public_key,
            Part::SignedSignature => &mut raw.signed_pre_key.as_mut().expect(some).signature,
            Part::OneTimeKey => &mut raw.one_time_pre_keys[0].public_key,
            Part::KyberKey => &mut raw.kyber_pre_keys[0].public_key,
            Part::KyberSignature => &mut raw.kyber_pre_keys[0].signature,
            Part::LastResortKey => {
                &mut raw
                    .last_resort_kyber_pre_key
                    .as_mut()
                    .expect(some)
                    .public_key
            }
            Part::LastResortSignature => {
                &mut raw
                    .last_resort_kyber_pre_key
                    .as_mut()
                    .expect(some)
                    .signature
            }
        }
    }
}

#[test]
fn changed_genuine_uploads() {
    let parts = prop::sample::select(vec![
        Part::Identity,
        Part::SignedKey,
        Part::SignedSignature,
        Part::OneTimeKey,
        Part::KyberKey,
        Part::KyberSignature,
        Part::LastResortKey,
        Part::LastResortSignature,
    ]);
    let change = (
        0..GENUINE.len(),
        proptest::option::of((parts, any::<usize>(), 1..=255u8)),
    );
    // Each input verifies up to five signatures: a tenth as many inputs.
    support::run("changed_genuine_uploads", 10, change, |(which, change)| {
        let mut raw = GENUINE[which].clone();
        let identity = IdentityKey::parse(
            raw.identity_key.as_ref().expect("genuine"),
            Field::new("identity_key"),
        )
        .expect("genuine");
        let (signed, malformed) = match change {
            None => (false, false),
            Some((part, at, flip)) => {
                let bytes = part.bytes(&mut raw);
                let mut changed = bytes.to_vec();
                let at = at % changed.len();
                changed[at] ^= flip;
                *bytes = Bytes::from(changed);
                (part.signed(), at == 0 && part.is_key())
            }
        };
        let uploaded = match Upload::parse(raw) {
            Ok(upload) => upload,
            Err(err) => {
                prop_assert!(malformed, "only a changed type byte is malformed: {err}");
                prop_assert!(matches!(
                    RequestError::from(err),
                    RequestError::BadRequest(_)
                ));
                return Ok(());
            }
        };
        prop_assert!(!malformed, "a key with a wrong type byte was accepted");
        // Verified against the identity in the (possibly changed) upload,
        // as the relay does for an upload that carries one.
        let own = uploaded.identity.as_ref().expect("genuine").key;
        prop_assert_eq!(uploaded.verify(&own, Against::Uploaded).is_ok(), !signed);
        // The untouched identity accepts it only if no signed byte changed
        // (a changed identity leaves the signatures as they were).
        let untouched_ok = uploaded.verify(&identity, Against::Stored).is_ok();
        let changed_signed = signed && !matches!(change, Some((Part::Identity, ..)));
        prop_assert_eq!(untouched_ok, !changed_signed);
        Ok(())
    });
}
