//! End to end with Signal's libsignal (issue 3): Alice's keys are generated
//! by libsignal and uploaded through the relay client; Bob fetches her
//! bundle through the relay, builds a libsignal `PreKeyBundle` from the
//! bytes, processes it into a PQXDH session and encrypts; the message goes
//! through the relay and Alice decrypts it, then answers. Carol, who comes
//! after Alice's one-time keys are used up, gets the Kyber last-resort key
//! and no one-time EC key, and her session works too.
//!
//! libsignal's futures are `!Send` (its store traits are
//! `async_trait(?Send)`), so every libsignal call is awaited in the test's
//! own body on the current-thread runtime, never in `tokio::spawn`.

use std::time::{Duration, SystemTime};

use libsignal_protocol_syft::{
    CiphertextMessage, CiphertextMessageType, DeviceId, GenericSignedPreKey, IdentityKey,
    IdentityKeyPair, InMemSignalProtocolStore, KeyPair, KyberPreKeyId, KyberPreKeyRecord,
    KyberPreKeyStore, PreKeyBundle, PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore,
    ProtocolAddress, PublicKey, SignalMessage, SignedPreKeyId, SignedPreKeyRecord,
    SignedPreKeyStore, Timestamp, kem, message_decrypt, message_encrypt, process_prekey_bundle,
};
use rand::Rng;
use signal_relay::client::{Client, Event, Events, Outgoing};
use signal_relay::proto::{self, EnvelopeType};
use signal_relay::testing::{TestApp, spawn_app};
use uuid::Uuid;

/// Upper bound on one wait, so a broken relay fails the test instead of
/// hanging it.
const WAIT: Duration = Duration::from_secs(30);

/// Kyber ids: one-time keys from 1, the last-resort key apart.
const LAST_RESORT_ID: u32 = 0x00FF_FFFF;

/// Generates a libsignal identity with a signed pre-key, `one_time`
/// one-time EC pre-keys, `kyber` one-time Kyber pre-keys and a Kyber
/// last-resort key; keeps the private records in a libsignal store and
/// returns the public halves as a relay upload.
async fn libsignal_account(
    one_time: u32,
    kyber: u32,
) -> (InMemSignalProtocolStore, proto::UploadKeys) {
    let mut rng = rand::rng();
    let identity = IdentityKeyPair::generate(&mut rng);
    let registration_id: u32 = rng.random_range(1..=16380);
    let mut store = InMemSignalProtocolStore::new(identity, registration_id).expect("store");
    let now = Timestamp::from_epoch_millis(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis() as u64,
    );

    let signed = KeyPair::generate(&mut rng);
    let signed_signature = identity
        .private_key()
        .calculate_signature(&signed.public_key.serialize(), &mut rng)
        .expect("sign the signed pre-key");
    store
        .save_signed_pre_key(
            SignedPreKeyId::from(1),
            &SignedPreKeyRecord::new(1.into(), now, &signed, &signed_signature),
        )
        .await
        .expect("save signed pre-key");

    let mut one_time_pre_keys = Vec::new();
    for id in 1..=one_time {
        let pair = KeyPair::generate(&mut rng);
        store
            .save_pre_key(PreKeyId::from(id), &PreKeyRecord::new(id.into(), &pair))
            .await
            .expect("save pre-key");
        one_time_pre_keys.push(proto::EcPreKey {
            id,
            public_key: pair.public_key.serialize().to_vec().into(),
        });
    }

    let mut kyber_pre_keys = Vec::new();
    for id in (1..=kyber).chain([LAST_RESORT_ID]) {
        let record = KyberPreKeyRecord::generate(
            kem::KeyType::Kyber1024,
            KyberPreKeyId::from(id),
            identity.private_key(),
        )
        .expect("generate Kyber pre-key");
        store
            .save_kyber_pre_key(id.into(), &record)
            .await
            .expect("save Kyber pre-key");
        kyber_pre_keys.push(proto::SignedKyberPreKey {
            id,
            public_key: record
                .public_key()
                .expect("Kyber public key")
                .serialize()
                .to_vec()
                .into(),
            signature: record.signature().expect("Kyber signature").into(),
        });
    }
    let last_resort = kyber_pre_keys.pop();

    let upload = proto::UploadKeys {
        identity_key: Some(identity.identity_key().serialize().to_vec().into()),
        registration_id: Some(registration_id),
        signed_pre_key: Some(proto::SignedEcPreKey {
            id: 1,
            public_key: signed.public_key.serialize().to_vec().into(),
            signature: signed_signature.to_vec().into(),
        }),
        one_time_pre_keys,
        kyber_pre_keys,
        last_resort_kyber_pre_key: last_resort,
    };
    (store, upload)
}

/// A libsignal bundle from the relay's bytes, exactly as a client would
/// build it.
fn libsignal_bundle(bundle: &proto::PreKeyBundle) -> PreKeyBundle {
    let signed = bundle.signed_pre_key.as_ref().expect("a signed pre-key");
    let kyber = bundle.kyber_pre_key.as_ref().expect("a Kyber pre-key");
    let one_time = bundle.one_time_pre_key.as_ref().map(|k| {
        (
            PreKeyId::from(k.id),
            PublicKey::deserialize(&k.public_key).expect("one-time pre-key"),
        )
    });
    PreKeyBundle::new(
        bundle.registration_id,
        DeviceId::try_from(bundle.device_id).expect("device id"),
        one_time,
        SignedPreKeyId::from(signed.id),
        PublicKey::deserialize(&signed.public_key).expect("signed pre-key"),
        signed.signature.to_vec(),
        KyberPreKeyId::from(kyber.id),
        kem::PublicKey::deserialize(&kyber.public_key).expect("Kyber pre-key"),
        kyber.signature.to_vec(),
        IdentityKey::decode(&bundle.identity_key).expect("identity key"),
    )
    .expect("libsignal accepts the bundle")
}

fn address(user: Uuid) -> ProtocolAddress {
    ProtocolAddress::new(user.to_string(), DeviceId::new(1).expect("device 1"))
}

fn envelope_type(message: &CiphertextMessage) -> EnvelopeType {
    match message.message_type() {
        CiphertextMessageType::PreKey => EnvelopeType::PrekeyBundle,
        CiphertextMessageType::Whisper => EnvelopeType::Ciphertext,
        other => panic!("unexpected message type {other:?}"),
    }
}

/// Sends `message` from `sender` to `recipient` through the relay and
/// returns the envelope the recipient receives (and acks).
async fn relay(
    sender: &Client,
    recipient: (&Client, &mut Events, Uuid),
    message: &CiphertextMessage,
) -> proto::Envelope {
    let (client, events, recipient_id) = recipient;
    let mut outgoing = Outgoing::new(recipient_id, message.serialize().to_vec());
    outgoing.envelope_type = envelope_type(message);
    let receive = async {
        loop {
            match events.next().await.expect("recipient connected") {
                Event::Deliver(envelope) => {
                    let id = Uuid::from_slice(&envelope.message_id).expect("message id");
                    client.ack(&[id]).await.expect("ack");
                    return envelope;
                }
                Event::QueueEmpty | Event::PreKeysLow(_) => {}
            }
        }
    };
    // The send answers once the recipient has acked, so both run at once.
    let (sent, envelope) =
        tokio::time::timeout(WAIT, async { tokio::join!(sender.send(outgoing), receive) })
            .await
            .expect("message relayed in time");
    sent.expect("send");
    envelope
}

/// Decrypts an envelope with libsignal.
async fn decrypt(store: &mut InMemSignalProtocolStore, envelope: &proto::Envelope) -> Vec<u8> {
    let sender = address(Uuid::from_slice(&envelope.sender_id).expect("sender id"));
    let message = match EnvelopeType::try_from(envelope.r#type) {
        Ok(EnvelopeType::PrekeyBundle) => CiphertextMessage::PreKeySignalMessage(
            PreKeySignalMessage::try_from(&envelope.content[..]).expect("PreKey message"),
        ),
        Ok(EnvelopeType::Ciphertext) => CiphertextMessage::SignalMessage(
            SignalMessage::try_from(&envelope.content[..]).expect("Signal message"),
        ),
        other => panic!("unexpected envelope type {other:?}"),
    };
    message_decrypt(
        &message,
        &sender,
        &mut store.session_store,
        &mut store.identity_store,
        &mut store.pre_key_store,
        &store.signed_pre_key_store,
        &mut store.kyber_pre_key_store,
        &mut rand::rng(),
    )
    .await
    .expect("libsignal decrypts")
}

/// Starts a libsignal session from a bundle fetched through the relay and
/// encrypts the first message.
async fn first_message(
    store: &mut InMemSignalProtocolStore,
    to: Uuid,
    bundle: &proto::PreKeyBundle,
    plaintext: &[u8],
) -> CiphertextMessage {
    process_prekey_bundle(
        &address(to),
        &mut store.session_store,
        &mut store.identity_store,
        &libsignal_bundle(bundle),
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .expect("libsignal verifies the bundle and starts a session");
    let message = message_encrypt(
        plaintext,
        &address(to),
        &mut store.session_store,
        &mut store.identity_store,
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .expect("the first message encrypts");
    assert_eq!(message.message_type(), CiphertextMessageType::PreKey);
    message
}

/// A registered user with a libsignal store of their own (keys not
/// uploaded: only Alice publishes).
async fn sender(app: &TestApp, name: &str) -> (Client, Events, Uuid, InMemSignalProtocolStore) {
    let (client, events, auth) = app.register_live(&unique(name)).await;
    let (store, _) = libsignal_account(0, 0).await;
    (client, events, auth.user_id, store)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..10])
}

#[tokio::test]
async fn a_libsignal_session_starts_from_a_bundle_fetched_through_the_relay() {
    let app = spawn_app().await;

    let (mut alice_store, upload) = libsignal_account(1, 1).await;
    let (alice, mut alice_events, alice_auth) = app.register_live(&unique("alice")).await;
    let alice_id = alice_auth.user_id;
    let counts = alice
        .upload_keys(upload.clone())
        .await
        .expect("the relay accepts libsignal's keys");
    assert_eq!((counts.one_time_pre_keys, counts.kyber_pre_keys), (1, 1));

    // Bob: the bundle carries Alice's one-time keys.
    let (bob, mut bob_events, bob_id, mut bob_store) = sender(&app, "bob").await;
    let bundle = bob.fetch_bundle(alice_id).await.expect("fetch bundle");
    assert_eq!(bundle.identity_key, upload.identity_key.clone().unwrap());
    assert_eq!(
        bundle.one_time_pre_key,
        upload.one_time_pre_keys.first().cloned()
    );
    assert_eq!(bundle.kyber_pre_key, upload.kyber_pre_keys.first().cloned());
    assert!(!bundle.kyber_is_last_resort);
    let hello = first_message(&mut bob_store, alice_id, &bundle, b"hello alice").await;
    let envelope = relay(&bob, (&alice, &mut alice_events, alice_id), &hello).await;
    assert_eq!(envelope.r#type, EnvelopeType::PrekeyBundle as i32);
    assert_eq!(decrypt(&mut alice_store, &envelope).await, b"hello alice");

    // The session works both ways: Alice answers, Bob decrypts.
    let reply = message_encrypt(
        b"hello bob",
        &address(bob_id),
        &mut alice_store.session_store,
        &mut alice_store.identity_store,
        SystemTime::now(),
        &mut rand::rng(),
    )
    .await
    .expect("Alice encrypts her answer");
    let envelope = relay(&alice, (&bob, &mut bob_events, bob_id), &reply).await;
    assert_eq!(decrypt(&mut bob_store, &envelope).await, b"hello bob");

    // Carol comes after the one-time keys are gone: no one-time EC key and
    // the Kyber last-resort key, which libsignal must accept as well.
    let (carol, _carol_events, _carol_id, mut carol_store) = sender(&app, "carol").await;
    let bundle = carol.fetch_bundle(alice_id).await.expect("fetch bundle");
    assert!(bundle.one_time_pre_key.is_none());
    assert!(bundle.kyber_is_last_resort);
    assert_eq!(bundle.kyber_pre_key, upload.last_resort_kyber_pre_key);
    let hi = first_message(&mut carol_store, alice_id, &bundle, b"hi from carol").await;
    let envelope = relay(&carol, (&alice, &mut alice_events, alice_id), &hi).await;
    assert_eq!(decrypt(&mut alice_store, &envelope).await, b"hi from carol");
}
