//! Test support (feature `testing`): XEdDSA *signing* exactly as libsignal
//! does it, and ready-made key uploads. Tests and the load generator can
//! then publish keys the relay accepts without depending on libsignal
//! itself, whose crate needs `protoc` and whose futures are `!Send`.
//!
//! The Kyber keys made here are random bytes behind the 0x08 type byte: the
//! relay checks only the format and the signature, as libsignal's own
//! server does, so they are accepted; they are no use to a real libsignal
//! client (use libsignal's keys for end-to-end tests).

use bytes::Bytes;
use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::scalar::Scalar;
use rand::RngCore;
use sha2::{Digest, Sha512};

use super::xeddsa::{EC_KEY_LEN, EC_KEY_TYPE, KYBER_KEY_LEN, KYBER_KEY_TYPE, SIGNATURE_LEN};
use crate::protocol::proto;

/// An identity key pair that signs the way libsignal's
/// `PrivateKey::calculate_signature` does.
pub struct TestIdentity {
    /// The private scalar: the clamped X25519 secret, reduced mod l.
    secret: Scalar,
    /// The clamped X25519 secret as bytes; libsignal hashes these (not the
    /// reduced scalar) into the signing nonce.
    secret_bytes: [u8; 32],
    /// `secret · B`, whose encoding goes into the hash and whose sign bit
    /// goes into signature byte 63.
    edwards_public: EdwardsPoint,
}

impl TestIdentity {
    pub fn generate() -> Self {
        let mut secret_bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut secret_bytes);
        // X25519 clamping, as libsignal's key generation does.
        secret_bytes[0] &= 248;
        secret_bytes[31] &= 127;
        secret_bytes[31] |= 64;
        let secret = Scalar::from_bytes_mod_order(secret_bytes);
        TestIdentity {
            secret,
            secret_bytes,
            edwards_public: EdwardsPoint::mul_base(&secret),
        }
    }

    /// The serialized public identity key, `0x05 || u`.
    pub fn identity_key(&self) -> Bytes {
        let mut key = [0u8; EC_KEY_LEN];
        key[0] = EC_KEY_TYPE;
        key[1..].copy_from_slice(self.edwards_public.to_montgomery().as_bytes());
        Bytes::copy_from_slice(&key)
    }

    /// libsignal's XEdDSA: Ed25519 with the Edwards key derived from the
    /// X25519 secret, a hashed nonce with 64 random bytes, and the public
    /// key's sign bit stored in the top bit of `s`.
    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut random = [0u8; 64];
        rand::rng().fill_bytes(&mut random);
        let mut prefix = [0xFFu8; 32];
        prefix[0] = 0xFE;
        let r = Scalar::from_hash(
            Sha512::new()
                .chain_update(prefix)
                .chain_update(self.secret_bytes)
                .chain_update(message)
                .chain_update(random),
        );
        let r_point = EdwardsPoint::mul_base(&r).compress();
        let a_point = self.edwards_public.compress();
        let h = Scalar::from_hash(
            Sha512::new()
                .chain_update(r_point.as_bytes())
                .chain_update(a_point.as_bytes())
                .chain_update(message),
        );
        let s = h * self.secret + r;
        let mut signature = [0u8; SIGNATURE_LEN];
        signature[..32].copy_from_slice(r_point.as_bytes());
        signature[32..].copy_from_slice(s.as_bytes());
        signature[63] &= 0x7F;
        signature[63] |= a_point.as_bytes()[31] & 0x80;
        signature
    }

    /// A signed EC pre-key with a fresh random key.
    pub fn signed_pre_key(&self, id: u32) -> proto::SignedEcPreKey {
        let public_key = ec_public_key();
        proto::SignedEcPreKey {
            id,
            signature: Bytes::copy_from_slice(&self.sign(&public_key)),
            public_key,
        }
    }

    /// A signed Kyber pre-key: random bytes in the Kyber-1024 format.
    pub fn kyber_pre_key(&self, id: u32) -> proto::SignedKyberPreKey {
        let mut key = vec![0u8; KYBER_KEY_LEN];
        rand::rng().fill_bytes(&mut key);
        key[0] = KYBER_KEY_TYPE;
        proto::SignedKyberPreKey {
            id,
            signature: Bytes::copy_from_slice(&self.sign(&key)),
            public_key: Bytes::from(key),
        }
    }

    /// A complete first upload: identity, signed pre-key (id 1), one-time
    /// EC keys and one-time Kyber keys with the given ids, and a last-resort
    /// key with id `last_resort_id`.
    pub fn upload(
        &self,
        registration_id: u32,
        one_time: impl IntoIterator<Item = u32>,
        kyber: impl IntoIterator<Item = u32>,
        last_resort_id: u32,
    ) -> proto::UploadKeys {
        proto::UploadKeys {
            identity_key: Some(self.identity_key()),
            registration_id: Some(registration_id),
            signed_pre_key: Some(self.signed_pre_key(1)),
            one_time_pre_keys: one_time.into_iter().map(one_time_pre_key).collect(),
            kyber_pre_keys: kyber.into_iter().map(|id| self.kyber_pre_key(id)).collect(),
            last_resort_kyber_pre_key: Some(self.kyber_pre_key(last_resort_id)),
        }
    }
}

/// A fresh, valid X25519 public key, serialized (`0x05 || u`).
pub fn ec_public_key() -> Bytes {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let point = EdwardsPoint::mul_base_clamped(secret).to_montgomery();
    let mut key = [0u8; EC_KEY_LEN];
    key[0] = EC_KEY_TYPE;
    key[1..].copy_from_slice(point.as_bytes());
    Bytes::copy_from_slice(&key)
}

/// A one-time EC pre-key (unsigned, as in libsignal).
pub fn one_time_pre_key(id: u32) -> proto::EcPreKey {
    proto::EcPreKey {
        id,
        public_key: ec_public_key(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::xeddsa::verify;

    #[test]
    fn signatures_verify_the_libsignal_way_with_either_sign_bit() {
        let mut sign_bits = [0usize; 2];
        for _ in 0..64 {
            let me = TestIdentity::generate();
            let ik: [u8; 33] = me.identity_key()[..].try_into().unwrap();
            let message = ec_public_key();
            let signature = me.sign(&message);
            sign_bits[usize::from(signature[63] >> 7)] += 1;
            assert!(verify(&ik, &message, &signature));
            assert!(!verify(&ik, b"something else", &signature));
            // The nonce is randomised, as in libsignal.
            assert_ne!(signature, me.sign(&message));
        }
        assert!(sign_bits[0] > 0 && sign_bits[1] > 0, "{sign_bits:?}");
    }
}
