//! Key-directory domain types, parsed once at the edge from the wire
//! messages. Each type can only hold a value libsignal would accept (exact
//! length, right type byte, id in range), so nothing below the edge checks
//! formats again. Every parse error names the field it came from.

use std::fmt;

use bytes::Bytes;

use super::KeyError;
use super::xeddsa::{self, EC_KEY_LEN, EC_KEY_TYPE, KYBER_KEY_LEN, KYBER_KEY_TYPE, SIGNATURE_LEN};
use crate::protocol::proto;

/// Where a value sits in a request, for error messages such as
/// `kyber_pre_keys[3].public_key`. `Copy` and allocation-free, so naming the
/// field costs nothing unless an error is actually reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// The request's field: `identity_key`, `signed_pre_key`, …
    name: &'static str,
    /// The position within a repeated field, which the client needs to find
    /// the one bad key among a hundred.
    index: Option<usize>,
    /// The part of a key message: `id`, `public_key` or `signature`.
    part: Option<&'static str>,
}

impl Field {
    pub const fn new(name: &'static str) -> Self {
        Field {
            name,
            index: None,
            part: None,
        }
    }

    pub const fn item(name: &'static str, index: usize) -> Self {
        Field {
            name,
            index: Some(index),
            part: None,
        }
    }

    /// The same field, narrowed to one part of the key message.
    pub const fn part(self, part: &'static str) -> Self {
        Field {
            part: Some(part),
            ..self
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if let Some(index) = self.index {
            write!(f, "[{index}]")?;
        }
        if let Some(part) = self.part {
            write!(f, ".{part}")?;
        }
        Ok(())
    }
}

/// A pre-key id. libsignal's ids are `u32` on the wire, but the relay stores
/// them in PostgreSQL `INTEGER` columns, so they are limited to
/// `0..=2^31-1` (Signal's own clients stay in `1..2^24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(i32);

impl KeyId {
    pub const MAX: u32 = i32::MAX as u32;

    pub fn parse(raw: u32, field: Field) -> Result<Self, KeyError> {
        i32::try_from(raw)
            .map(KeyId)
            .map_err(|_| KeyError::KeyIdRange { field, got: raw })
    }

    /// A stored id; `None` if the row breaks the invariant `parse` keeps.
    pub fn from_db(raw: i32) -> Option<Self> {
        (raw >= 0).then_some(KeyId(raw))
    }

    pub fn get(self) -> u32 {
        // Non-negative by construction, so this is lossless.
        self.0.unsigned_abs()
    }

    pub fn to_db(self) -> i32 {
        self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A libsignal registration id: 14 bits, 0 excluded (`1..=16383`), the
/// range Signal's server and clients check. libsignal's
/// `generate_registration_id` draws from `1..=16380`, but a client may draw
/// its own from the whole range, and refusing 16381-16383 locked such an
/// install out of publishing keys at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistrationId(u16);

impl RegistrationId {
    pub const MIN: u32 = 1;
    pub const MAX: u32 = 0x3fff;

    pub fn parse(raw: u32) -> Result<Self, KeyError> {
        match u16::try_from(raw) {
            Ok(id) if (Self::MIN..=Self::MAX).contains(&raw) => Ok(RegistrationId(id)),
            _ => Err(KeyError::RegistrationIdRange { got: raw }),
        }
    }

    pub fn get(self) -> u32 {
        u32::from(self.0)
    }

    pub fn to_db(self) -> i32 {
        i32::from(self.0)
    }
}

/// Checks length and type byte of a serialized key. `expected` spells out
/// the length for the error, e.g. "33 bytes (0x05 + 32)".
fn typed_key<'a>(
    bytes: &'a [u8],
    len: usize,
    type_byte: u8,
    expected: &'static str,
    field: Field,
) -> Result<&'a [u8], KeyError> {
    if bytes.len() != len {
        return Err(KeyError::Length {
            field,
            expected,
            got: bytes.len(),
        });
    }
    match bytes.first() {
        Some(&got) if got != type_byte => Err(KeyError::KeyType {
            field,
            expected: type_byte,
            got,
        }),
        _ => Ok(bytes),
    }
}

const EC_KEY_EXPECTED: &str = "33 bytes (0x05 + 32)";
const KYBER_KEY_EXPECTED: &str = "1569 bytes (0x08 + 1568)";
const SIGNATURE_EXPECTED: &str = "64 bytes";

fn ec_key_bytes(bytes: &[u8], field: Field) -> Result<[u8; EC_KEY_LEN], KeyError> {
    let key = typed_key(bytes, EC_KEY_LEN, EC_KEY_TYPE, EC_KEY_EXPECTED, field)?;
    key.try_into().map_err(|_| KeyError::Length {
        field,
        expected: EC_KEY_EXPECTED,
        got: key.len(),
    })
}

/// A user's long-term identity key: a serialized Curve25519 key
/// (`0x05 || u`). Kept apart from [`EcPublicKey`] so a pre-key can never be
/// mistaken for the key that signs pre-keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityKey([u8; EC_KEY_LEN]);

impl IdentityKey {
    pub fn parse(bytes: &[u8], field: Field) -> Result<Self, KeyError> {
        ec_key_bytes(bytes, field).map(IdentityKey)
    }

    pub fn as_bytes(&self) -> &[u8; EC_KEY_LEN] {
        &self.0
    }

    /// True when `signature` is this key's XEdDSA signature over `message`.
    pub fn verifies(&self, message: &[u8], signature: &Signature) -> bool {
        xeddsa::verify(&self.0, message, &signature.0)
    }
}

/// A serialized Curve25519 public pre-key (`0x05 || u`). Like libsignal,
/// the relay does not check that `u` is on the curve: X25519 accepts any
/// 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcPublicKey([u8; EC_KEY_LEN]);

impl EcPublicKey {
    pub fn parse(bytes: &[u8], field: Field) -> Result<Self, KeyError> {
        ec_key_bytes(bytes, field).map(EcPublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; EC_KEY_LEN] {
        &self.0
    }
}

/// A serialized Kyber-1024 public key (`0x08 || 1568 bytes`). Boxed so the
/// upload's vectors of keys stay small to move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KyberPublicKey(Box<[u8; KYBER_KEY_LEN]>);

impl KyberPublicKey {
    pub fn parse(bytes: &[u8], field: Field) -> Result<Self, KeyError> {
        let key = typed_key(
            bytes,
            KYBER_KEY_LEN,
            KYBER_KEY_TYPE,
            KYBER_KEY_EXPECTED,
            field,
        )?;
        Box::<[u8]>::from(key)
            .try_into()
            .map(KyberPublicKey)
            .map_err(|_| KeyError::Length {
                field,
                expected: KYBER_KEY_EXPECTED,
                got: key.len(),
            })
    }

    pub fn as_bytes(&self) -> &[u8; KYBER_KEY_LEN] {
        &self.0
    }
}

/// A 64-byte XEdDSA signature, libsignal style (sign bit in byte 63).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; SIGNATURE_LEN]);

impl Signature {
    pub fn parse(bytes: &[u8], field: Field) -> Result<Self, KeyError> {
        bytes
            .try_into()
            .map(Signature)
            .map_err(|_| KeyError::Length {
                field,
                expected: SIGNATURE_EXPECTED,
                got: bytes.len(),
            })
    }

    pub fn as_bytes(&self) -> &[u8; SIGNATURE_LEN] {
        &self.0
    }
}

/// The signed Curve25519 pre-key: the one EC key every bundle carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedEcPreKey {
    /// The client's id for it, echoed in the bundle so the recipient can
    /// find the private half.
    pub id: KeyId,
    /// What a sender agrees a secret with.
    pub public_key: EcPublicKey,
    /// The identity key's signature over `public_key`, which binds the
    /// pre-key to the identity.
    pub signature: Signature,
}

impl SignedEcPreKey {
    pub fn parse(raw: &proto::SignedEcPreKey, field: Field) -> Result<Self, KeyError> {
        Ok(SignedEcPreKey {
            id: KeyId::parse(raw.id, field.part("id"))?,
            public_key: EcPublicKey::parse(&raw.public_key, field.part("public_key"))?,
            signature: Signature::parse(&raw.signature, field.part("signature"))?,
        })
    }

    pub fn to_proto(&self) -> proto::SignedEcPreKey {
        proto::SignedEcPreKey {
            id: self.id.get(),
            public_key: Bytes::copy_from_slice(self.public_key.as_bytes()),
            signature: Bytes::copy_from_slice(self.signature.as_bytes()),
        }
    }
}

/// A one-time Curve25519 pre-key. Unsigned, as in libsignal: it only adds
/// forward secrecy; authenticity comes from the signed keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcPreKey {
    /// The client's id for it, echoed in the bundle.
    pub id: KeyId,
    /// The public half, handed to one sender and then deleted.
    pub public_key: EcPublicKey,
}

impl EcPreKey {
    pub fn parse(raw: &proto::EcPreKey, field: Field) -> Result<Self, KeyError> {
        Ok(EcPreKey {
            id: KeyId::parse(raw.id, field.part("id"))?,
            public_key: EcPublicKey::parse(&raw.public_key, field.part("public_key"))?,
        })
    }
}

/// A signed Kyber-1024 pre-key: one-time, or the last-resort key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKyberPreKey {
    /// The client's id for it, echoed in the bundle.
    pub id: KeyId,
    /// What a sender encapsulates the post-quantum secret to.
    pub public_key: KyberPublicKey,
    /// The identity key's signature over `public_key`; libsignal refuses a
    /// bundle whose Kyber key it cannot verify.
    pub signature: Signature,
}

impl SignedKyberPreKey {
    pub fn parse(raw: &proto::SignedKyberPreKey, field: Field) -> Result<Self, KeyError> {
        Ok(SignedKyberPreKey {
            id: KeyId::parse(raw.id, field.part("id"))?,
            public_key: KyberPublicKey::parse(&raw.public_key, field.part("public_key"))?,
            signature: Signature::parse(&raw.signature, field.part("signature"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_render_as_paths() {
        assert_eq!(Field::new("identity_key").to_string(), "identity_key");
        assert_eq!(
            Field::new("signed_pre_key").part("signature").to_string(),
            "signed_pre_key.signature"
        );
        assert_eq!(
            Field::item("kyber_pre_keys", 3)
                .part("public_key")
                .to_string(),
            "kyber_pre_keys[3].public_key"
        );
    }

    #[test]
    fn key_id_range() {
        let f = Field::new("x").part("id");
        assert_eq!(KeyId::parse(0, f).unwrap().get(), 0);
        assert_eq!(KeyId::parse(KeyId::MAX, f).unwrap().get(), KeyId::MAX);
        let err = KeyId::parse(1 << 31, f).unwrap_err().to_string();
        assert_eq!(err, "x.id must be in 0..=2147483647, got 2147483648");
        assert!(KeyId::parse(u32::MAX, f).is_err());
        assert_eq!(KeyId::from_db(-1), None);
    }

    #[test]
    fn registration_id_range() {
        for ok in [1, 2, 16380, 16381, 16383] {
            assert_eq!(RegistrationId::parse(ok).unwrap().get(), ok);
        }
        for bad in [0, 16384, 65536 + 5, u32::MAX] {
            assert_eq!(
                RegistrationId::parse(bad).unwrap_err().to_string(),
                format!("registration_id must be in 1..=16383, got {bad}")
            );
        }
    }

    #[test]
    fn key_formats_are_exact() {
        let f = Field::item("kyber_pre_keys", 3).part("public_key");
        let err = KyberPublicKey::parse(&[8; 500], f).unwrap_err().to_string();
        assert_eq!(
            err,
            "kyber_pre_keys[3].public_key must be 1569 bytes (0x08 + 1568), got 500"
        );
        let mut kyber = vec![0u8; KYBER_KEY_LEN];
        assert_eq!(
            KyberPublicKey::parse(&kyber, f).unwrap_err().to_string(),
            "kyber_pre_keys[3].public_key must start with type byte 0x08, got 0x00"
        );
        kyber[0] = KYBER_KEY_TYPE;
        assert_eq!(
            KyberPublicKey::parse(&kyber, f).unwrap().as_bytes()[..],
            kyber[..]
        );

        let f = Field::new("identity_key");
        assert_eq!(
            IdentityKey::parse(&[5; 32], f).unwrap_err().to_string(),
            "identity_key must be 33 bytes (0x05 + 32), got 32"
        );
        assert_eq!(
            IdentityKey::parse(&[5; 34], f).unwrap_err().to_string(),
            "identity_key must be 33 bytes (0x05 + 32), got 34"
        );
        assert_eq!(
            EcPublicKey::parse(&[], f).unwrap_err().to_string(),
            "identity_key must be 33 bytes (0x05 + 32), got 0"
        );
        assert!(EcPublicKey::parse(&[5; 33], f).is_ok());
        assert_eq!(
            EcPublicKey::parse(&[6; 33], f).unwrap_err().to_string(),
            "identity_key must start with type byte 0x05, got 0x06"
        );

        let f = Field::new("signed_pre_key").part("signature");
        assert_eq!(
            Signature::parse(&[0; 63], f).unwrap_err().to_string(),
            "signed_pre_key.signature must be 64 bytes, got 63"
        );
        assert!(Signature::parse(&[0; 64], f).is_ok());
    }
}
