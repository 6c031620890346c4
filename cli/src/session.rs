//! Encrypting to and decrypting from peers with libsignal.
//!
//! A first message to a peer fetches their bundle from the relay, runs PQXDH
//! (`process_prekey_bundle`) and goes out as a PreKeySignalMessage (envelope
//! PREKEY_BUNDLE = 3); once the peer has answered, messages are
//! SignalMessages (CIPHERTEXT = 1; libsignal numbers that type 2).
//!
//! The plaintext is the UTF-8 text padded as Signal pads message bodies
//! (0x80, then zeros up to a multiple of 160 bytes), so the relay learns the
//! length only to within 160 bytes.
//!
//! libsignal's futures are `!Send`: everything here runs on the command's
//! current-thread runtime, never in `tokio::spawn`.

use std::time::SystemTime;

use anyhow::{Context, Result};
use libsignal_protocol_syft::{
    CiphertextMessage, CiphertextMessageType, IdentityKey, KyberPreKeyId, PreKeyBundle, PreKeyId,
    PreKeySignalMessage, PublicKey, SignalMessage, SignalProtocolError, SignedPreKeyId, kem,
    message_decrypt, message_encrypt, process_prekey_bundle,
};
use signal_relay::proto::{self, EnvelopeType};
use uuid::Uuid;

use crate::store::{self, SignalStore};

/// Signal's padding block.
const PAD_BLOCK: usize = 160;

/// The most encryption adds to the padded text, with room to spare. A
/// PreKeySignalMessage (the larger kind) is the padded text plus 16 bytes
/// of AES-CBC padding, an 8-byte MAC, the ratchet, base and identity keys
/// (33 bytes each), the Kyber-1024 ciphertext (1,568 bytes plus its type
/// byte), a few key ids and counters, and protobuf framing: about 1,750
/// bytes in all.
const ENCRYPTION_OVERHEAD: usize = 2048;

/// The longest text, in bytes, whose encrypted form always fits in a
/// relay's `max_content` bytes: checked before encrypting, so a text the
/// relay would refuse costs neither a ratchet step nor a peer's pre-key.
pub fn max_text_len(max_content: usize) -> usize {
    let room = max_content.saturating_sub(ENCRYPTION_OVERHEAD);
    // The padded length is a multiple of PAD_BLOCK holding the text and
    // its 0x80 marker.
    (room / PAD_BLOCK * PAD_BLOCK).saturating_sub(1)
}

/// An encrypted message, ready for the relay.
pub struct Encrypted {
    pub envelope_type: EnvelopeType,
    pub content: Vec<u8>,
}

/// How a session with a fetched bundle was started, for the output.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Started {
    /// The bundle carried a one-time EC pre-key (false once they ran out).
    pub one_time_pre_key: bool,
    /// The Kyber key was the peer's last-resort key.
    pub kyber_last_resort: bool,
}

/// Starts a session with `peer` from a bundle the relay returned. The
/// caller has already checked the bundle's identity against the trusted one.
pub async fn start(
    store: &mut SignalStore,
    peer: Uuid,
    bundle: &proto::PreKeyBundle,
) -> Result<Started> {
    let invalid = || format!("the relay returned an invalid pre-key bundle for {peer}");
    let signed = bundle.signed_pre_key.as_ref().with_context(invalid)?;
    let kyber = bundle.kyber_pre_key.as_ref().with_context(invalid)?;
    let one_time = bundle
        .one_time_pre_key
        .as_ref()
        .map(|k| {
            Ok::<_, SignalProtocolError>((
                PreKeyId::from(k.id),
                PublicKey::deserialize(&k.public_key)?,
            ))
        })
        .transpose()
        .with_context(invalid)?;
    let libsignal_bundle = PreKeyBundle::new(
        bundle.registration_id,
        store::device(),
        one_time,
        SignedPreKeyId::from(signed.id),
        PublicKey::deserialize(&signed.public_key).with_context(invalid)?,
        signed.signature.to_vec(),
        KyberPreKeyId::from(kyber.id),
        kem::PublicKey::deserialize(&kyber.public_key).with_context(invalid)?,
        kyber.signature.to_vec(),
        IdentityKey::decode(&bundle.identity_key).with_context(invalid)?,
    )
    .with_context(invalid)?;
    // Verifies both signatures (EC and Kyber) against the identity key.
    process_prekey_bundle(
        &store::address(peer),
        &mut store.sessions,
        &mut store.identities,
        &libsignal_bundle,
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .with_context(|| format!("starting a session from {peer}'s pre-key bundle"))?;
    Ok(Started {
        one_time_pre_key: bundle.one_time_pre_key.is_some(),
        kyber_last_resort: bundle.kyber_is_last_resort,
    })
}

/// Encrypts `text` for `peer`, with whose session must exist.
pub async fn encrypt(store: &mut SignalStore, peer: Uuid, text: &str) -> Result<Encrypted> {
    let message = message_encrypt(
        &pad(text.as_bytes()),
        &store::address(peer),
        &mut store.sessions,
        &mut store.identities,
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .context("encrypting")?;
    let envelope_type = match message.message_type() {
        CiphertextMessageType::PreKey => EnvelopeType::PrekeyBundle,
        CiphertextMessageType::Whisper => EnvelopeType::Ciphertext,
        other => anyhow::bail!("libsignal produced an unexpected {other:?} message"),
    };
    Ok(Encrypted {
        envelope_type,
        content: message.serialize().to_vec(),
    })
}

/// Why an envelope could not be read.
#[derive(Debug)]
pub enum DecryptError {
    /// The sender's identity key differs from the one we trust.
    UntrustedIdentity,
    /// We already decrypted this message (a redelivery after a crash).
    Duplicate,
    /// Anything else: corrupt, for a lost session, an unknown pre-key, …
    Failed(String),
}

/// Decrypts a CIPHERTEXT or PREKEY_BUNDLE envelope from `sender`.
pub async fn decrypt(
    store: &mut SignalStore,
    sender: Uuid,
    envelope_type: i32,
    content: &[u8],
) -> Result<String, DecryptError> {
    let message = if envelope_type == EnvelopeType::PrekeyBundle as i32 {
        PreKeySignalMessage::try_from(content).map(CiphertextMessage::PreKeySignalMessage)
    } else if envelope_type == EnvelopeType::Ciphertext as i32 {
        SignalMessage::try_from(content).map(CiphertextMessage::SignalMessage)
    } else {
        return Err(DecryptError::Failed(format!(
            "envelope type {envelope_type} is not a message type this client reads"
        )));
    }
    .map_err(|e| DecryptError::Failed(e.to_string()))?;
    let padded = message_decrypt(
        &message,
        &store::address(sender),
        &mut store.sessions,
        &mut store.identities,
        &mut store.pre_keys,
        &store.signed,
        &mut store.kyber,
        &mut rand::rng(),
    )
    .await
    .map_err(|e| match e {
        SignalProtocolError::UntrustedIdentity(_) => DecryptError::UntrustedIdentity,
        SignalProtocolError::DuplicatedMessage(..) => DecryptError::Duplicate,
        other => DecryptError::Failed(other.to_string()),
    })?;
    let text = unpad(&padded).ok_or_else(|| DecryptError::Failed("bad padding".into()))?;
    Ok(String::from_utf8_lossy(text).into_owned())
}

fn pad(text: &[u8]) -> Vec<u8> {
    let padded_len = (text.len() + 1).div_ceil(PAD_BLOCK) * PAD_BLOCK;
    let mut out = Vec::with_capacity(padded_len);
    out.extend_from_slice(text);
    out.push(0x80);
    out.resize(padded_len, 0);
    out
}

fn unpad(padded: &[u8]) -> Option<&[u8]> {
    let end = padded.iter().rposition(|b| *b != 0)?;
    (padded[end] == 0x80).then(|| &padded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_round_trips_and_hides_length() {
        for text in ["", "hi", &"x".repeat(159), &"y".repeat(160), "naïve ✓"] {
            let padded = pad(text.as_bytes());
            assert_eq!(padded.len() % PAD_BLOCK, 0, "{text:?}");
            assert_eq!(unpad(&padded), Some(text.as_bytes()));
        }
        assert_eq!(pad(b"a").len(), pad(b"abc").len());
        assert_eq!(unpad(&[0, 0]), None);
        assert_eq!(unpad(b"abc"), None);
    }

    #[test]
    fn the_longest_text_pads_to_what_fits_with_the_overhead() {
        for max in [0, 100, 2048, 2048 + 159, 2048 + 160, 4096, 96 * 1024] {
            let longest = max_text_len(max);
            if max < ENCRYPTION_OVERHEAD + PAD_BLOCK {
                assert_eq!(longest, 0, "{max}");
                continue;
            }
            assert!(pad(&vec![b'x'; longest]).len() + ENCRYPTION_OVERHEAD <= max);
            assert!(pad(&vec![b'x'; longest + 1]).len() + ENCRYPTION_OVERHEAD > max);
        }
    }
}
