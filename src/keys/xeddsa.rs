//! XEdDSA signature verification and key-format constants for libsignal keys.
//!
//! The relay server never signs anything; it only has to check that every
//! signed pre-key and Kyber pre-key a client uploads was signed by that
//! client's identity key. libsignal serializes keys as a type byte followed by
//! the raw key (`0x05 || u` for Curve25519, `0x08 || pk` for Kyber-1024), and
//! the signed message is that *whole* serialization, type byte included.
//!
//! # Why this is hand-rolled
//!
//! libsignal's XEdDSA is not the XEdDSA of the Signal specification. The
//! specification fixes the sign bit of the Edwards public key to 0; libsignal
//! (for compatibility with libsignal-protocol-java) instead stores the real
//! sign bit of the signer's Edwards key in the top bit of `signature[63]`,
//! a bit that is always 0 in a reduced scalar. A verifier that follows the
//! specification therefore rejects about half of genuine libsignal signatures,
//! and libsignal's own Rust crate is not published on crates.io. The
//! algorithm is short, so we implement it directly on the curve25519-dalek
//! primitives and SHA-512 (after libsignal's
//! `rust/core/src/curve/curve25519.rs`, `PrivateKey::verify_signature`):
//!
//! 1. take the sign bit from `signature[63] & 0x80` and use it to lift the
//!    Montgomery u-coordinate of the identity key to an Edwards point `A`;
//! 2. clear that bit; what is left of `signature[32..]` is the scalar `s`;
//! 3. verify as Ed25519: `h = SHA-512(R || A || message) mod l`, and accept
//!    iff `encode([s]B - [h]A) == R`.
//!
//! It is slightly stricter than libsignal, in ways that no signature produced
//! by libsignal can trip over:
//!
//! * `s` must be canonical (`s < l`). libsignal only checks that the top three
//!   bits are clear and then reduces, so it also accepts `s + l`: a second
//!   encoding of the same signature.
//! * An identity key whose Edwards point has small order is rejected (for
//!   such a key, anybody can forge signatures). libsignal keys come from
//!   clamped scalars and always lie in the prime-order subgroup.
//! * The u-coordinate must be canonically encoded (`u < p`, bit 255 clear);
//!   libsignal accepts any 32 bytes, so `u` and `u + 2^255` (or `u + p`)
//!   would be two spellings of one identity key. X25519 public keys are
//!   always canonical.
//! * Keys are exact lengths (the fixed-size arrays enforce it); libsignal
//!   tolerates trailing bytes after a 33-byte EC key.
//!
//! The check runs in variable time, which is fine: keys, messages and
//! signatures are all public.

use curve25519_dalek::edwards::EdwardsPoint;
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::Scalar;
use sha2::{Digest, Sha512};

/// Length of a serialized libsignal EC (Curve25519) public key.
pub const EC_KEY_LEN: usize = 33;
/// Type byte of a serialized libsignal EC (Curve25519, "Djb") public key.
pub const EC_KEY_TYPE: u8 = 0x05;
/// Length of a serialized libsignal Kyber-1024 public key.
pub const KYBER_KEY_LEN: usize = 1569;
/// Type byte of a serialized libsignal Kyber-1024 public key.
pub const KYBER_KEY_TYPE: u8 = 0x08;
/// Length of an XEdDSA signature.
pub const SIGNATURE_LEN: usize = 64;

/// Bit of `signature[63]` where libsignal stores the Edwards sign bit.
const SIGN_BIT: u8 = 0x80;

/// Verifies an XEdDSA signature made by libsignal. `identity_key` is the 33-byte serialized key.
///
/// `message` is whatever was signed; for pre-keys that is the whole
/// serialized pre-key, type byte included. Returns `false` for a wrong type
/// byte, an identity key that is not a usable curve point, a non-canonical
/// `s`, or a signature that does not match. Never panics.
pub fn verify(identity_key: &[u8; 33], message: &[u8], signature: &[u8; 64]) -> bool {
    let [key_type, u @ ..] = *identity_key;
    if key_type != EC_KEY_TYPE {
        return false;
    }

    let Some((r_bytes, s_rest)) = signature.split_first_chunk::<32>() else {
        return false;
    };
    let Ok(mut s_bytes) = <[u8; 32]>::try_from(s_rest) else {
        return false;
    };

    // libsignal's extension: the sign of the signer's Edwards x-coordinate
    // travels in the (otherwise always zero) top bit of the signature.
    let sign = (s_bytes[31] & SIGN_BIT) >> 7;
    s_bytes[31] &= !SIGN_BIT;

    // Montgomery u -> Edwards point. Fails only for u = -1 (no such point)
    // or when u is not on the curve.
    let Some(a) = MontgomeryPoint(u).to_edwards(sign) else {
        return false;
    };
    // Only the canonical encoding of u (u < p, top bit clear) is accepted:
    // dalek ignores bit 255 and reduces mod p, which would let several
    // distinct identity-key byte strings stand for the same key.
    if a.is_small_order() || a.to_montgomery().0 != u {
        return false;
    }

    // Canonical encoding only: s < l.
    let Some(s) = Option::<Scalar>::from(Scalar::from_canonical_bytes(s_bytes)) else {
        return false;
    };

    let a_bytes = a.compress();
    let mut hasher = Sha512::new();
    hasher.update(r_bytes);
    hasher.update(a_bytes.as_bytes());
    hasher.update(message);
    let digest = hasher.finalize();
    let mut wide = [0u8; 64];
    wide.copy_from_slice(digest.as_slice());
    let h = Scalar::from_bytes_mod_order_wide(&wide);

    // [s]B - [h]A must encode to exactly R.
    let r_check = EdwardsPoint::vartime_double_scalar_mul_basepoint(&h, &-a, &s).compress();
    r_check.as_bytes() == r_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
    use serde_json::Value;

    const VECTORS: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/vectors/libsignal-prekeys.json"
    );

    /// Little-endian l = 2^252 + 27742317777372353535851937790883648493.
    const GROUP_ORDER: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];

    fn vectors() -> Value {
        let text = std::fs::read_to_string(VECTORS)
            .unwrap_or_else(|e| panic!("cannot read {VECTORS}: {e}"));
        serde_json::from_str(&text).expect("vectors file is not JSON")
    }

    fn list<'a>(v: &'a Value, field: &str) -> &'a [Value] {
        v[field]
            .as_array()
            .unwrap_or_else(|| panic!("`{field}` is not an array"))
    }

    /// One signature found in an upload: (identity key, signed key, signature).
    type Signed = ([u8; 33], Vec<u8>, [u8; 64]);

    fn hex_field(v: &Value, path: &str) -> Result<Vec<u8>, String> {
        let s = v
            .as_str()
            .ok_or_else(|| format!("{path}: missing or not a string"))?;
        hex::decode(s).map_err(|e| format!("{path}: bad hex: {e}"))
    }

    fn ec_key(v: &Value, path: &str) -> Result<[u8; 33], String> {
        let b = hex_field(v, path)?;
        let key: [u8; EC_KEY_LEN] = b
            .as_slice()
            .try_into()
            .map_err(|_| format!("{path}: EC key must be {EC_KEY_LEN} bytes, got {}", b.len()))?;
        if key[0] != EC_KEY_TYPE {
            return Err(format!(
                "{path}: EC key type byte must be {EC_KEY_TYPE:#04x}, got {:#04x}",
                key[0]
            ));
        }
        Ok(key)
    }

    fn kyber_key(v: &Value, path: &str) -> Result<Vec<u8>, String> {
        let b = hex_field(v, path)?;
        if b.len() != KYBER_KEY_LEN {
            return Err(format!(
                "{path}: Kyber key must be {KYBER_KEY_LEN} bytes, got {}",
                b.len()
            ));
        }
        if b[0] != KYBER_KEY_TYPE {
            return Err(format!(
                "{path}: Kyber key type byte must be {KYBER_KEY_TYPE:#04x}, got {:#04x}",
                b[0]
            ));
        }
        Ok(b)
    }

    fn signature(v: &Value, path: &str) -> Result<[u8; 64], String> {
        let b = hex_field(v, path)?;
        b.as_slice().try_into().map_err(|_| {
            format!(
                "{path}: signature must be {SIGNATURE_LEN} bytes, got {}",
                b.len()
            )
        })
    }

    fn key_id(v: &Value, path: &str) -> Result<u32, String> {
        match v.as_u64() {
            Some(id) if id <= 0x7FFF_FFFF => Ok(id as u32),
            _ => Err(format!("{path}: id must be in 0..=2^31-1, got {v}")),
        }
    }

    /// Reference validation of a whole pre-key upload, as the server must do
    /// it. Returns the signatures it checked; the error names the bad field.
    fn check_upload(u: &Value) -> Result<Vec<Signed>, String> {
        let ik = ec_key(&u["identity_key"], "identity_key")?;
        if !matches!(u["registration_id"].as_u64(), Some(1..=16383)) {
            return Err(format!(
                "registration_id: must be in 1..=16383, got {}",
                u["registration_id"]
            ));
        }

        let mut signed = Vec::new();
        let mut check_signed = |entry: &Value, path: &str, kyber: bool| {
            key_id(&entry["id"], &format!("{path}.id"))?;
            let key = if kyber {
                kyber_key(&entry["public_key"], &format!("{path}.public_key"))?
            } else {
                ec_key(&entry["public_key"], &format!("{path}.public_key"))?.to_vec()
            };
            let sig = signature(&entry["signature"], &format!("{path}.signature"))?;
            if !verify(&ik, &key, &sig) {
                return Err(format!(
                    "{path}.signature: does not verify under identity_key"
                ));
            }
            signed.push((ik, key, sig));
            Ok::<(), String>(())
        };

        check_signed(&u["signed_pre_key"], "signed_pre_key", false)?;
        let kyber = u["kyber_pre_keys"]
            .as_array()
            .ok_or("kyber_pre_keys: missing or not an array")?;
        for (i, k) in kyber.iter().enumerate() {
            check_signed(k, &format!("kyber_pre_keys[{i}]"), true)?;
        }
        check_signed(&u["kyber_last_resort"], "kyber_last_resort", true)?;

        let otpks = u["one_time_pre_keys"]
            .as_array()
            .ok_or("one_time_pre_keys: missing or not an array")?;
        for (i, k) in otpks.iter().enumerate() {
            key_id(&k["id"], &format!("one_time_pre_keys[{i}].id"))?;
            ec_key(
                &k["public_key"],
                &format!("one_time_pre_keys[{i}].public_key"),
            )?;
        }
        Ok(signed)
    }

    /// Every signature of every valid upload, each verified once (shared
    /// between tests: verification is slow in unoptimized builds).
    fn all_valid_signatures() -> &'static [Signed] {
        static SIGS: std::sync::OnceLock<Vec<Signed>> = std::sync::OnceLock::new();
        SIGS.get_or_init(|| {
            let v = vectors();
            let mut out = Vec::new();
            for (i, u) in list(&v, "valid").iter().enumerate() {
                match check_upload(u) {
                    Ok(sigs) => out.extend(sigs),
                    Err(e) => panic!("valid[{i}] rejected: {e}"),
                }
            }
            out
        })
    }

    fn first_upload() -> Value {
        list(&vectors(), "valid")[0].clone()
    }

    fn flip(bytes: &mut [u8], bit: usize) {
        bytes[bit / 8] ^= 1 << (bit % 8);
    }

    #[test]
    fn every_valid_upload_verifies() {
        let v = vectors();
        let uploads = list(&v, "valid");
        assert_eq!(uploads.len(), 48);
        // signed pre-key + every Kyber pre-key + the last-resort key.
        let expected: usize = uploads
            .iter()
            .map(|u| 2 + list(u, "kyber_pre_keys").len())
            .sum();
        assert_eq!(expected, 48 * 4);
        assert_eq!(all_valid_signatures().len(), expected);
    }

    #[test]
    fn every_invalid_upload_is_rejected_at_the_right_field() {
        // `why` of each vector -> the field our validation must blame.
        let expected = [
            (
                "signed pre-key signature altered",
                "signed_pre_key.signature",
            ),
            (
                "signed pre-key altered after signing",
                "signed_pre_key.signature",
            ),
            (
                "kyber pre-key signature altered",
                "kyber_pre_keys[0].signature",
            ),
            (
                "kyber last-resort key altered after signing",
                "kyber_last_resort.signature",
            ),
            (
                "signature made by another identity",
                "signed_pre_key.signature",
            ),
            (
                "identity key without its 0x05 type byte (32 bytes)",
                "identity_key:",
            ),
            (
                "signed pre-key with unknown type byte",
                "signed_pre_key.public_key",
            ),
            (
                "one-time pre-key truncated",
                "one_time_pre_keys[0].public_key",
            ),
            ("kyber pre-key truncated", "kyber_pre_keys[0].public_key"),
            ("signature of 63 bytes", "signed_pre_key.signature"),
        ];
        let v = vectors();
        let invalid = list(&v, "invalid");
        assert_eq!(invalid.len(), 10);
        for (i, entry) in invalid.iter().enumerate() {
            let why = entry["why"].as_str().unwrap_or("?");
            let Err(err) = check_upload(&entry["upload"]) else {
                panic!("invalid[{i}] ({why}) was accepted");
            };
            if let Some((_, field)) = expected.iter().find(|(w, _)| *w == why) {
                assert!(
                    err.starts_with(field),
                    "invalid[{i}] ({why}): expected an error on {field}, got: {err}"
                );
            }
        }
    }

    #[test]
    fn id_and_registration_id_ranges() {
        let base = first_upload();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut u = base.clone();
            f(&mut u);
            check_upload(&u)
        };
        // Ids and registration ids are not signed, so changing them keeps
        // the signatures valid and only the range checks decide.
        assert!(with(&|u| u["registration_id"] = 1.into()).is_ok());
        assert!(with(&|u| u["registration_id"] = 16383.into()).is_ok());
        assert!(with(&|u| u["signed_pre_key"]["id"] = 0.into()).is_ok());
        assert!(with(&|u| u["kyber_last_resort"]["id"] = 0x7FFF_FFFF.into()).is_ok());
        for bad in [0i64, 16384, -1] {
            let err = with(&|u| u["registration_id"] = bad.into()).unwrap_err();
            assert!(err.starts_with("registration_id"), "{err}");
        }
        for bad in [0x8000_0000i64, -1] {
            let err = with(&|u| u["signed_pre_key"]["id"] = bad.into()).unwrap_err();
            assert!(err.starts_with("signed_pre_key.id"), "{err}");
            let err = with(&|u| u["one_time_pre_keys"][1]["id"] = bad.into()).unwrap_err();
            assert!(err.starts_with("one_time_pre_keys[1].id"), "{err}");
            let err = with(&|u| u["kyber_pre_keys"][1]["id"] = bad.into()).unwrap_err();
            assert!(err.starts_with("kyber_pre_keys[1].id"), "{err}");
        }
    }

    #[test]
    fn sign_bit_in_signature_byte_63_is_honoured() {
        let sigs = all_valid_signatures();
        let with_bit = sigs.iter().filter(|(_, _, s)| s[63] & 0x80 != 0).count();
        println!(
            "{with_bit} of {} valid signatures have the sign bit set",
            sigs.len()
        );
        // Both cases occur in real data (roughly half each).
        assert!(with_bit > 0, "no valid signature has the sign bit set");
        assert!(
            with_bit < sigs.len(),
            "every valid signature has the sign bit set"
        );
        for (ik, msg, sig) in sigs {
            // Toggling the bit lifts u to -A instead of A: must fail. With
            // the bit set, clearing it is exactly what a specification-style
            // XEdDSA verifier (sign bit fixed to 0) does, so such a verifier
            // rejects all of these `with_bit` signatures.
            let mut toggled = *sig;
            toggled[63] ^= 0x80;
            assert!(!verify(ik, msg, &toggled));
        }
    }

    #[test]
    fn flipping_any_bit_fails() {
        let u = first_upload();
        let ik = ec_key(&u["identity_key"], "identity_key").unwrap();
        let spk = ec_key(&u["signed_pre_key"]["public_key"], "spk").unwrap();
        let spk_sig = signature(&u["signed_pre_key"]["signature"], "spk sig").unwrap();
        let kpk = kyber_key(&u["kyber_last_resort"]["public_key"], "lr").unwrap();
        let kpk_sig = signature(&u["kyber_last_resort"]["signature"], "lr sig").unwrap();
        assert!(verify(&ik, &spk, &spk_sig));
        assert!(verify(&ik, &kpk, &kpk_sig));

        for bit in 0..SIGNATURE_LEN * 8 {
            let mut s = spk_sig;
            flip(&mut s, bit);
            assert!(!verify(&ik, &spk, &s), "signature bit {bit}");
        }
        // Includes bit 263 (bit 255 of u), which dalek would ignore: a
        // non-canonical spelling of the same key must not verify.
        for bit in 0..EC_KEY_LEN * 8 {
            let mut k = ik;
            flip(&mut k, bit);
            assert!(!verify(&k, &spk, &spk_sig), "identity key bit {bit}");
            let mut m = spk;
            flip(&mut m, bit);
            assert!(!verify(&ik, &m, &spk_sig), "message bit {bit}");
        }
        // Kyber keys are long: every type-byte bit, then a spread of others.
        for bit in (0..8).chain((8..KYBER_KEY_LEN * 8).step_by(8 * 97 + 1)) {
            let mut m = kpk.clone();
            flip(&mut m, bit);
            assert!(!verify(&ik, &m, &kpk_sig), "kyber message bit {bit}");
        }
        // Truncated or extended messages.
        assert!(!verify(&ik, &spk[..32], &spk_sig));
        assert!(!verify(&ik, &spk[1..], &spk_sig));
        assert!(!verify(&ik, &[&spk[..], &[0]].concat(), &spk_sig));
    }

    #[test]
    fn wrong_identity_key_fails() {
        let sigs = all_valid_signatures();
        for (i, (_, msg, sig)) in sigs.iter().enumerate() {
            let (other, _, _) = &sigs[(i + 4) % sigs.len()]; // 4 sigs per upload
            assert!(!verify(other, msg, sig), "signature {i}");
        }
    }

    #[test]
    fn non_canonical_s_is_rejected() {
        // Sanity-check the constant against dalek.
        assert_eq!(Scalar::from_bytes_mod_order(GROUP_ORDER), Scalar::ZERO);

        for (ik, msg, sig) in all_valid_signatures().iter().take(16) {
            let sign = sig[63] & 0x80;
            let mut s = [0u8; 32];
            s.copy_from_slice(&sig[32..]);
            s[31] &= 0x7f;
            // s + l: same value mod l, top three bits still clear, so
            // libsignal (which only reduces) would accept it; we must not.
            let mut carry = 0u16;
            for (b, l) in s.iter_mut().zip(GROUP_ORDER) {
                let t = u16::from(*b) + u16::from(l) + carry;
                *b = t as u8;
                carry = t >> 8;
            }
            assert_eq!(carry, 0);
            assert_eq!(s[31] & 0xe0, 0);
            let mut malleated = *sig;
            malleated[32..].copy_from_slice(&s);
            malleated[63] |= sign;
            assert!(!verify(ik, msg, &malleated));
        }
    }

    #[test]
    fn small_order_identity_key_is_rejected() {
        // u = 0 lifts to (0, -1), a point of order 2, so [h]A is the
        // identity whenever h is even: R = [s]B then "verifies" for any
        // message. Build such a forgery and check that it is refused.
        let mut ik = [0u8; 33];
        ik[0] = EC_KEY_TYPE;
        let a = MontgomeryPoint([0; 32]).to_edwards(0).unwrap();
        assert!(a.is_small_order());
        let msg = b"forged";
        let forged = (1u64..)
            .find_map(|k| {
                let s = Scalar::from(k);
                let r = (ED25519_BASEPOINT_POINT * s).compress();
                let mut hasher = Sha512::new();
                hasher.update(r.as_bytes());
                hasher.update(a.compress().as_bytes());
                hasher.update(msg);
                let mut wide = [0u8; 64];
                wide.copy_from_slice(&hasher.finalize());
                let h = Scalar::from_bytes_mod_order_wide(&wide);
                (h.as_bytes()[0] & 1 == 0).then(|| {
                    let mut sig = [0u8; 64];
                    sig[..32].copy_from_slice(r.as_bytes());
                    sig[32..].copy_from_slice(s.as_bytes());
                    sig
                })
            })
            .unwrap();
        assert!(!verify(&ik, msg, &forged));
    }

    #[test]
    fn garbage_never_panics_and_never_verifies() {
        let mut minus_one = [0xffu8; 32]; // u = p - 1 = -1: no Edwards point
        minus_one[0] = 0xec;
        minus_one[31] = 0x7f;
        let mut keys: Vec<[u8; 33]> = vec![[0; 33], [0xff; 33], [EC_KEY_TYPE; 33]];
        for u in [[0u8; 32], [0xff; 32], minus_one] {
            let mut k = [EC_KEY_TYPE; 33];
            k[1..].copy_from_slice(&u);
            keys.push(k);
        }
        let real = first_upload();
        keys.push(ec_key(&real["identity_key"], "identity_key").unwrap());
        let sigs = [[0u8; 64], [0xff; 64], [0x7f; 64], [0x80; 64]];
        for k in &keys {
            for s in &sigs {
                for m in [&b""[..], b"x", &[0u8; KYBER_KEY_LEN]] {
                    assert!(!verify(k, m, s));
                }
            }
        }
        // Pseudo-random inputs (xorshift64*, fixed seed).
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u8
        };
        for _ in 0..200 {
            let mut k = [0u8; 33];
            k.iter_mut().for_each(|b| *b = next());
            k[0] = EC_KEY_TYPE;
            let mut s = [0u8; 64];
            s.iter_mut().for_each(|b| *b = next());
            assert!(!verify(&k, b"message", &s));
        }
    }
}
