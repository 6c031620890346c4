//! The key directory: uploads validated as libsignal does (against the
//! libsignal-generated vectors and keys signed here the libsignal way), the
//! upload rules, counts, bundles handed out lowest-first without ever
//! repeating a one-time key, the last-resort fallback, the pre-keys-low
//! push and the fetch rate limit; user lookups, which consume nothing.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use signal_relay::client::{Client, ClientError, Event, Events};
use signal_relay::keys::testing::{TestIdentity, one_time_pre_key};
use signal_relay::proto::{self, Status};
use signal_relay::testing::{TestApp, spawn_app, spawn_app_with};
use uuid::Uuid;

use crate::helpers::{WAIT, close_code, expect_queue_empty, next_event, unique};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/vectors/libsignal-prekeys.json"
);

pub(crate) fn vectors() -> Value {
    let text =
        std::fs::read_to_string(VECTORS).unwrap_or_else(|e| panic!("cannot read {VECTORS}: {e}"));
    serde_json::from_str(&text).expect("vectors file is not JSON")
}

pub(crate) fn hex_bytes(v: &Value) -> Bytes {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected hex, got {v}"));
    Bytes::from(hex::decode(s).expect("valid hex"))
}

pub(crate) fn id(v: &Value) -> u32 {
    v.as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .unwrap_or_else(|| panic!("expected an id, got {v}"))
}

pub(crate) fn signed_ec(v: &Value) -> proto::SignedEcPreKey {
    proto::SignedEcPreKey {
        id: id(&v["id"]),
        public_key: hex_bytes(&v["public_key"]),
        signature: hex_bytes(&v["signature"]),
    }
}

pub(crate) fn signed_kyber(v: &Value) -> proto::SignedKyberPreKey {
    proto::SignedKyberPreKey {
        id: id(&v["id"]),
        public_key: hex_bytes(&v["public_key"]),
        signature: hex_bytes(&v["signature"]),
    }
}

/// A vector upload (field names as in the vectors file) as a request.
/// Shared with the JSON tests, which upload the same vectors.
pub(crate) fn vector_upload(u: &Value) -> proto::UploadKeys {
    let list = |field: &str| u[field].as_array().expect("an array").clone();
    proto::UploadKeys {
        identity_key: Some(hex_bytes(&u["identity_key"])),
        registration_id: Some(id(&u["registration_id"])),
        signed_pre_key: Some(signed_ec(&u["signed_pre_key"])),
        one_time_pre_keys: list("one_time_pre_keys")
            .iter()
            .map(|k| proto::EcPreKey {
                id: id(&k["id"]),
                public_key: hex_bytes(&k["public_key"]),
            })
            .collect(),
        kyber_pre_keys: list("kyber_pre_keys").iter().map(signed_kyber).collect(),
        last_resort_kyber_pre_key: Some(signed_kyber(&u["kyber_last_resort"])),
    }
}

/// The status and message of a failed request.
fn failure<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (Status, String) {
    match result {
        Err(ClientError::Status {
            status, message, ..
        }) => (status, message),
        other => panic!("expected an error status, got {other:?}"),
    }
}

/// Asserts `bad request` with a message starting with `prefix`.
#[track_caller]
fn assert_bad_request<T: std::fmt::Debug>(result: Result<T, ClientError>, prefix: &str) {
    let (status, message) = failure(result);
    assert_eq!(status, Status::BadRequest, "{message}");
    assert!(
        message.starts_with(prefix),
        "expected a message starting with {prefix:?}, got {message:?}"
    );
}

/// Rows in each key table for `user`: identity, signed, one-time EC,
/// one-time Kyber, last-resort.
async fn key_rows(app: &TestApp, user: Uuid) -> [i64; 5] {
    let row: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM identity_keys WHERE user_id = $1), \
                (SELECT count(*) FROM signed_pre_keys WHERE user_id = $1), \
                (SELECT count(*) FROM one_time_pre_keys WHERE user_id = $1), \
                (SELECT count(*) FROM kyber_pre_keys WHERE user_id = $1), \
                (SELECT count(*) FROM kyber_last_resort_keys WHERE user_id = $1)",
    )
    .bind(user)
    .fetch_one(&app.db)
    .await
    .expect("count key rows");
    [row.0, row.1, row.2, row.3, row.4]
}

/// The ids stored in `table` (a key table with an `id` column) for `user`.
async fn stored_ids(app: &TestApp, table: &str, user: Uuid) -> Vec<i32> {
    sqlx::query_scalar(&format!(
        "SELECT id FROM {table} WHERE user_id = $1 ORDER BY id"
    ))
    .bind(user)
    .fetch_all(&app.db)
    .await
    .expect("read key ids")
}

fn counts(c: &proto::UploadKeysResult) -> (u32, u32) {
    (c.one_time_pre_keys, c.kyber_pre_keys)
}

async fn count(client: &Client) -> (u32, u32) {
    let c = client.pre_key_count().await.expect("pre-key count");
    (c.one_time_pre_keys, c.kyber_pre_keys)
}

/// The (one-time EC id, Kyber id, Kyber is last resort) a bundle carries.
fn handed_out(bundle: &proto::PreKeyBundle) -> (Option<u32>, u32, bool) {
    (
        bundle.one_time_pre_key.as_ref().map(|k| k.id),
        bundle.kyber_pre_key.as_ref().expect("a Kyber key").id,
        bundle.kyber_is_last_resort,
    )
}

/// A registered user who has uploaded `upload`.
async fn user_with(
    app: &TestApp,
    prefix: &str,
    upload: proto::UploadKeys,
) -> (Client, Events, Uuid) {
    let (client, events, auth) = app.register(&unique(prefix)).await;
    client.upload_keys(upload).await.expect("upload keys");
    (client, events, auth.user_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_libsignal_vector_is_accepted_and_served_back() {
    let app = spawn_app().await;
    let v = vectors();
    let valid = v["valid"].as_array().expect("valid uploads").clone();
    assert_eq!(valid.len(), 48);
    let (bob, _bob_events, _) = app.register(&unique("bob")).await;

    let results = futures::stream::iter(valid.iter().enumerate())
        .map(|(i, u)| {
            let app = &app;
            let bob = bob.clone();
            async move {
                let (alice, _events, auth) = app.register(&unique("vec")).await;
                let result = alice
                    .upload_keys(vector_upload(u))
                    .await
                    .unwrap_or_else(|e| panic!("valid[{i}] rejected: {e}"));
                let n_otk = u["one_time_pre_keys"].as_array().map_or(0, Vec::len);
                let n_kyber = u["kyber_pre_keys"].as_array().map_or(0, Vec::len);
                assert_eq!(
                    counts(&result),
                    (n_otk as u32, n_kyber as u32),
                    "valid[{i}]"
                );

                // What was stored is exactly what libsignal made.
                let bundle = bob.fetch_bundle(auth.user_id).await.expect("fetch bundle");
                assert_eq!(bundle.user_id.as_ref(), auth.user_id.as_bytes());
                assert_eq!(bundle.username, auth.username);
                assert_eq!(bundle.device_id, 1);
                assert_eq!(bundle.registration_id, id(&u["registration_id"]));
                assert_eq!(bundle.identity_key, hex_bytes(&u["identity_key"]));
                assert_eq!(bundle.signed_pre_key, Some(signed_ec(&u["signed_pre_key"])));
                let lowest = |field: &str| {
                    u[field]
                        .as_array()
                        .and_then(|keys| keys.iter().min_by_key(|k| id(&k["id"])))
                        .cloned()
                };
                match lowest("one_time_pre_keys") {
                    Some(k) => {
                        let got = bundle.one_time_pre_key.clone().expect("a one-time key");
                        assert_eq!(got.id, id(&k["id"]));
                        assert_eq!(got.public_key, hex_bytes(&k["public_key"]));
                    }
                    None => assert!(bundle.one_time_pre_key.is_none()),
                }
                let expected_kyber = match lowest("kyber_pre_keys") {
                    Some(k) => signed_kyber(&k),
                    None => signed_kyber(&u["kyber_last_resort"]),
                };
                assert_eq!(bundle.kyber_pre_key, Some(expected_kyber));
                assert_eq!(bundle.kyber_is_last_resort, n_kyber == 0);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    assert_eq!(results.len(), 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_vector_is_rejected_naming_the_field_and_nothing_is_stored() {
    // `why` of each vector -> how the error must begin (fields are named as
    // in the wire protocol: the vectors' `kyber_last_resort` is
    // `last_resort_kyber_pre_key`).
    let expected = [
        (
            "signed pre-key signature altered",
            "signed_pre_key.signature does not verify against the identity key",
        ),
        (
            "signed pre-key altered after signing",
            "signed_pre_key.signature does not verify against the identity key",
        ),
        (
            "kyber pre-key signature altered",
            "kyber_pre_keys[0].signature does not verify against the identity key",
        ),
        (
            "kyber last-resort key altered after signing",
            "last_resort_kyber_pre_key.signature does not verify against the identity key",
        ),
        (
            "signature made by another identity",
            "signed_pre_key.signature does not verify against the identity key",
        ),
        (
            "identity key without its 0x05 type byte (32 bytes)",
            "identity_key must be 33 bytes (0x05 + 32), got 32",
        ),
        (
            "signed pre-key with unknown type byte",
            "signed_pre_key.public_key must start with type byte 0x05",
        ),
        (
            "one-time pre-key truncated",
            "one_time_pre_keys[0].public_key must be 33 bytes (0x05 + 32), got",
        ),
        (
            "kyber pre-key truncated",
            "kyber_pre_keys[0].public_key must be 1569 bytes (0x08 + 1568), got",
        ),
        (
            "signature of 63 bytes",
            "signed_pre_key.signature must be 64 bytes, got 63",
        ),
    ];
    let app = spawn_app().await;
    let v = vectors();
    let invalid = v["invalid"].as_array().expect("invalid uploads");
    assert_eq!(invalid.len(), 10);
    for (i, entry) in invalid.iter().enumerate() {
        let why = entry["why"].as_str().expect("a reason");
        let (_, prefix) = expected
            .iter()
            .find(|(w, _)| *w == why)
            .unwrap_or_else(|| panic!("invalid[{i}]: unknown vector {why:?}"));
        let (alice, _events, auth) = app.register(&unique("inv")).await;
        assert_bad_request(
            alice.upload_keys(vector_upload(&entry["upload"])).await,
            prefix,
        );
        assert_eq!(
            key_rows(&app, auth.user_id).await,
            [0; 5],
            "invalid[{i}] ({why}) stored something"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_upload_must_set_identity_signed_pre_key_and_last_resort() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _events, auth) = app.register(&unique("alice")).await;
    let full = me.upload(42, 1..=3, 1..=2, 100);

    let only_pre_keys = proto::UploadKeys {
        one_time_pre_keys: full.one_time_pre_keys.clone(),
        ..Default::default()
    };
    assert_bad_request(
        alice.upload_keys(only_pre_keys).await,
        "the first upload must set identity_key, signed_pre_key and last_resort_kyber_pre_key; \
         identity_key is missing",
    );
    let mut no_signed = full.clone();
    no_signed.signed_pre_key = None;
    assert_bad_request(
        alice.upload_keys(no_signed).await,
        "the first upload must set identity_key, signed_pre_key and last_resort_kyber_pre_key; \
         signed_pre_key is missing",
    );
    let mut no_last_resort = full.clone();
    no_last_resort.last_resort_kyber_pre_key = None;
    assert_bad_request(
        alice.upload_keys(no_last_resort).await,
        "the first upload must set identity_key, signed_pre_key and last_resort_kyber_pre_key; \
         last_resort_kyber_pre_key is missing",
    );
    let mut no_registration_id = full.clone();
    no_registration_id.registration_id = None;
    assert_bad_request(
        alice.upload_keys(no_registration_id).await,
        "registration_id is required with identity_key",
    );
    assert_eq!(key_rows(&app, auth.user_id).await, [0; 5]);
    assert_eq!(count(&alice).await, (0, 0));

    let result = alice.upload_keys(full).await.unwrap();
    assert_eq!(counts(&result), (3, 2));
    assert_eq!(key_rows(&app, auth.user_id).await, [1, 1, 3, 2, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_uploads_add_or_replace_by_id_and_verify_against_the_stored_identity() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _events, alice_id) =
        user_with(&app, "alice", me.upload(7, 1..=3, 1..=2, 100)).await;

    // Adding one new key and replacing one: a retry changes nothing more.
    let new_three = one_time_pre_key(3);
    let more = proto::UploadKeys {
        one_time_pre_keys: vec![new_three.clone(), one_time_pre_key(4)],
        ..Default::default()
    };
    assert_eq!(
        counts(&alice.upload_keys(more.clone()).await.unwrap()),
        (4, 2)
    );
    assert_eq!(counts(&alice.upload_keys(more).await.unwrap()), (4, 2));
    let stored: Vec<u8> = sqlx::query_scalar(
        "SELECT public_key FROM one_time_pre_keys WHERE user_id = $1 AND id = 3",
    )
    .bind(alice_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(stored, new_three.public_key);

    // Kyber keys without the identity key verify against the stored one.
    let new_kyber_two = me.kyber_pre_key(2);
    let kyber = proto::UploadKeys {
        kyber_pre_keys: vec![new_kyber_two.clone(), me.kyber_pre_key(3)],
        ..Default::default()
    };
    assert_eq!(counts(&alice.upload_keys(kyber).await.unwrap()), (4, 3));
    let (key, signature): (Vec<u8>, Vec<u8>) = sqlx::query_as(
        "SELECT public_key, signature FROM kyber_pre_keys WHERE user_id = $1 AND id = 2",
    )
    .bind(alice_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(
        (key, signature),
        (
            new_kyber_two.public_key.to_vec(),
            new_kyber_two.signature.to_vec()
        )
    );

    // ... and keys signed by anyone else are refused.
    let stranger = TestIdentity::generate();
    for upload in [
        proto::UploadKeys {
            kyber_pre_keys: vec![me.kyber_pre_key(9), stranger.kyber_pre_key(10)],
            ..Default::default()
        },
        proto::UploadKeys {
            signed_pre_key: Some(stranger.signed_pre_key(2)),
            ..Default::default()
        },
        proto::UploadKeys {
            last_resort_kyber_pre_key: Some(stranger.kyber_pre_key(101)),
            ..Default::default()
        },
    ] {
        let field = if !upload.kyber_pre_keys.is_empty() {
            "kyber_pre_keys[1]"
        } else if upload.signed_pre_key.is_some() {
            "signed_pre_key"
        } else {
            "last_resort_kyber_pre_key"
        };
        assert_bad_request(
            alice.upload_keys(upload).await,
            &format!(
                "{field}.signature does not verify against the identity key stored for this user"
            ),
        );
    }
    assert_eq!(count(&alice).await, (4, 3));
    assert_eq!(
        stored_ids(&app, "kyber_pre_keys", alice_id).await,
        [1, 2, 3]
    );

    // A new signed pre-key replaces the old one: only the current is kept.
    let signed = me.signed_pre_key(2);
    alice
        .upload_keys(proto::UploadKeys {
            signed_pre_key: Some(signed.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stored_ids(&app, "signed_pre_keys", alice_id).await, [2]);
    let last_resort = me.kyber_pre_key(200);
    alice
        .upload_keys(proto::UploadKeys {
            last_resort_kyber_pre_key: Some(last_resort.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        stored_ids(&app, "kyber_last_resort_keys", alice_id).await,
        [200]
    );

    // Re-sending the same identity (say, with a new registration id) is
    // not a replacement: nothing is deleted.
    let same_identity = proto::UploadKeys {
        identity_key: Some(me.identity_key()),
        registration_id: Some(8),
        ..Default::default()
    };
    assert_eq!(
        counts(&alice.upload_keys(same_identity).await.unwrap()),
        (4, 3)
    );
    // An empty upload is harmless too.
    assert_eq!(
        counts(
            &alice
                .upload_keys(proto::UploadKeys::default())
                .await
                .unwrap()
        ),
        (4, 3)
    );

    let (bob, _e, _) = app.register(&unique("bob")).await;
    let bundle = bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(bundle.registration_id, 8);
    assert_eq!(bundle.signed_pre_key, Some(signed));
    assert_eq!(handed_out(&bundle), (Some(1), 1, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_identity_replaces_every_older_pre_key() {
    let app = spawn_app().await;
    let old = TestIdentity::generate();
    let (alice, _events, alice_id) =
        user_with(&app, "alice", old.upload(7, 1..=5, 1..=5, 100)).await;
    let new = TestIdentity::generate();
    let replacement = proto::UploadKeys {
        identity_key: Some(new.identity_key()),
        registration_id: Some(9),
        signed_pre_key: Some(new.signed_pre_key(7)),
        one_time_pre_keys: vec![one_time_pre_key(10), one_time_pre_key(11)],
        kyber_pre_keys: vec![new.kyber_pre_key(10)],
        last_resort_kyber_pre_key: Some(new.kyber_pre_key(200)),
    };

    let mut without_signed = replacement.clone();
    without_signed.signed_pre_key = None;
    assert_bad_request(
        alice.upload_keys(without_signed).await,
        "a new identity_key must come with a new signed_pre_key and last_resort_kyber_pre_key \
         signed by it; signed_pre_key is missing",
    );
    let mut without_last_resort = replacement.clone();
    without_last_resort.last_resort_kyber_pre_key = None;
    assert_bad_request(
        alice.upload_keys(without_last_resort).await,
        "a new identity_key must come with a new signed_pre_key and last_resort_kyber_pre_key \
         signed by it; last_resort_kyber_pre_key is missing",
    );
    // Keys signed by the old identity do not go with the new one.
    let mut old_signatures = replacement.clone();
    old_signatures.signed_pre_key = Some(old.signed_pre_key(7));
    assert_bad_request(
        alice.upload_keys(old_signatures).await,
        "signed_pre_key.signature does not verify against the identity key in this upload",
    );
    let mut old_last_resort = replacement.clone();
    old_last_resort.last_resort_kyber_pre_key = Some(old.kyber_pre_key(200));
    assert_bad_request(
        alice.upload_keys(old_last_resort).await,
        "last_resort_kyber_pre_key.signature does not verify against the identity key in this upload",
    );
    // Nothing of the refused uploads was applied.
    assert_eq!(key_rows(&app, alice_id).await, [1, 1, 5, 5, 1]);
    let identity: Vec<u8> =
        sqlx::query_scalar("SELECT identity_key FROM identity_keys WHERE user_id = $1")
            .bind(alice_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(identity, old.identity_key());

    assert_eq!(
        counts(&alice.upload_keys(replacement).await.unwrap()),
        (2, 1)
    );
    assert_eq!(stored_ids(&app, "signed_pre_keys", alice_id).await, [7]);
    assert_eq!(
        stored_ids(&app, "one_time_pre_keys", alice_id).await,
        [10, 11]
    );
    assert_eq!(stored_ids(&app, "kyber_pre_keys", alice_id).await, [10]);
    assert_eq!(
        stored_ids(&app, "kyber_last_resort_keys", alice_id).await,
        [200]
    );

    let (bob, _e, _) = app.register(&unique("bob")).await;
    let bundle = bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(bundle.identity_key, new.identity_key());
    assert_eq!(bundle.registration_id, 9);
    assert_eq!(bundle.signed_pre_key.as_ref().map(|k| k.id), Some(7));
    assert_eq!(handed_out(&bundle), (Some(10), 10, false));
    // Later uploads verify against the new identity.
    assert_bad_request(
        alice
            .upload_keys(proto::UploadKeys {
                kyber_pre_keys: vec![old.kyber_pre_key(1)],
                ..Default::default()
            })
            .await,
        "kyber_pre_keys[0].signature does not verify against the identity key stored for this user",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_is_stored_whole_or_not_at_all() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _events, auth) = app.register(&unique("alice")).await;
    let alice_id = auth.user_id;

    // A first upload with one bad Kyber signature among good keys.
    let mut first = me.upload(7, 1..=5, 1..=5, 100);
    let mut signature = first.kyber_pre_keys[3].signature.to_vec();
    signature[10] ^= 0x40;
    first.kyber_pre_keys[3].signature = Bytes::from(signature);
    assert_bad_request(
        alice.upload_keys(first).await,
        "kyber_pre_keys[3].signature does not verify against the identity key in this upload",
    );
    assert_eq!(key_rows(&app, alice_id).await, [0; 5]);

    alice
        .upload_keys(me.upload(7, 1..=5, 1..=5, 100))
        .await
        .unwrap();
    let before = key_rows(&app, alice_id).await;
    let signed_before: Vec<u8> =
        sqlx::query_scalar("SELECT public_key FROM signed_pre_keys WHERE user_id = $1")
            .bind(alice_id)
            .fetch_one(&app.db)
            .await
            .unwrap();

    // A later upload: a new signed pre-key, new and replacing one-time keys,
    // good Kyber keys, and one bad Kyber key at the end.
    let mut kyber: Vec<_> = (4..=8).map(|id| me.kyber_pre_key(id)).collect();
    kyber.push(TestIdentity::generate().kyber_pre_key(9));
    let later = proto::UploadKeys {
        signed_pre_key: Some(me.signed_pre_key(2)),
        one_time_pre_keys: (1..=50).map(one_time_pre_key).collect(),
        kyber_pre_keys: kyber,
        ..Default::default()
    };
    assert_bad_request(
        alice.upload_keys(later).await,
        "kyber_pre_keys[5].signature does not verify against the identity key stored for this user",
    );
    assert_eq!(key_rows(&app, alice_id).await, before);
    assert_eq!(stored_ids(&app, "signed_pre_keys", alice_id).await, [1]);
    let signed_after: Vec<u8> =
        sqlx::query_scalar("SELECT public_key FROM signed_pre_keys WHERE user_id = $1")
            .bind(alice_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(signed_after, signed_before);
    assert_eq!(count(&alice).await, (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_time_keys_go_lowest_first_then_the_last_resort_key_stays() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let mut upload = me.upload(7, [], [], 100);
    upload.one_time_pre_keys = [5, 3, 9, 1].map(one_time_pre_key).to_vec();
    upload.kyber_pre_keys = [7, 2].map(|id| me.kyber_pre_key(id)).to_vec();
    let (alice, _events, alice_id) = user_with(&app, "Alice_K", upload.clone()).await;
    let username: String = sqlx::query_scalar("SELECT username FROM users WHERE id = $1")
        .bind(alice_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(count(&alice).await, (4, 2));

    let (bob, _e, _) = app.register(&unique("bob")).await;
    // By id and by username in any letter case: the same directory.
    let first = bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(handed_out(&first), (Some(1), 2, false));
    let key = |id: u32| {
        upload
            .one_time_pre_keys
            .iter()
            .find(|k| k.id == id)
            .cloned()
    };
    assert_eq!(first.one_time_pre_key, key(1));
    assert_eq!(
        first.kyber_pre_key,
        upload.kyber_pre_keys.iter().find(|k| k.id == 2).cloned()
    );
    assert_eq!(
        stored_ids(&app, "one_time_pre_keys", alice_id).await,
        [3, 5, 9]
    );
    assert_eq!(stored_ids(&app, "kyber_pre_keys", alice_id).await, [7]);
    assert_eq!(count(&alice).await, (3, 1));

    let second = bob
        .fetch_bundle_by_username(&username.to_uppercase())
        .await
        .unwrap();
    assert_eq!(second.user_id.as_ref(), alice_id.as_bytes());
    assert_eq!(handed_out(&second), (Some(3), 7, false));
    let third = bob
        .fetch_bundle_by_username(&username.to_lowercase())
        .await
        .unwrap();
    assert_eq!(handed_out(&third), (Some(5), 100, true));
    assert_eq!(third.kyber_pre_key, upload.last_resort_kyber_pre_key);
    assert_eq!(
        handed_out(&bob.fetch_bundle(alice_id).await.unwrap()),
        (Some(9), 100, true)
    );
    // Nothing one-time is left; the last-resort key is never used up.
    for _ in 0..3 {
        let bundle = bob.fetch_bundle(alice_id).await.unwrap();
        assert_eq!(handed_out(&bundle), (None, 100, true));
        assert!(bundle.signed_pre_key.is_some());
    }
    assert_eq!(count(&alice).await, (0, 0));
    assert_eq!(key_rows(&app, alice_id).await, [1, 1, 0, 0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_fetches_never_share_a_one_time_key() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _events, alice_id) =
        user_with(&app, "alice", me.upload(7, 1..=100, 1..=100, 1000)).await;
    assert_eq!(count(&alice).await, (100, 100));

    // Four requesters, fifty fetches each, all in flight at once (within
    // the default burst of 100 per requester).
    let mut requesters = Vec::new();
    for _ in 0..4 {
        let (bob, _e, _) = app.register(&unique("bob")).await;
        requesters.push(bob);
    }
    let fetches = requesters.iter().flat_map(|bob| {
        (0..50).map(move |_| async move { bob.fetch_bundle(alice_id).await.expect("fetch") })
    });
    let bundles = futures::future::join_all(fetches).await;
    assert_eq!(bundles.len(), 200);

    let ec: Vec<u32> = bundles
        .iter()
        .filter_map(|b| b.one_time_pre_key.as_ref().map(|k| k.id))
        .collect();
    let kyber: Vec<u32> = bundles
        .iter()
        .filter(|b| !b.kyber_is_last_resort)
        .map(|b| b.kyber_pre_key.as_ref().unwrap().id)
        .collect();
    let unique_ec: HashSet<u32> = ec.iter().copied().collect();
    let unique_kyber: HashSet<u32> = kyber.iter().copied().collect();
    assert_eq!(ec.len(), 100, "every one-time EC key handed out once");
    assert_eq!(unique_ec, (1..=100).collect::<HashSet<_>>());
    assert_eq!(kyber.len(), 100, "every one-time Kyber key handed out once");
    assert_eq!(unique_kyber, (1..=100).collect::<HashSet<_>>());
    assert!(
        bundles.iter().filter(|b| b.kyber_is_last_resort).all(|b| b
            .kyber_pre_key
            .as_ref()
            .unwrap()
            .id
            == 1000)
    );
    assert_eq!(count(&alice).await, (0, 0));
}

/// The next push, which must be `PreKeysLow`.
async fn next_low(events: &mut Events) -> proto::PreKeysLow {
    match next_event(events).await {
        Event::PreKeysLow(low) => low,
        other => panic!("expected pre-keys-low, got {other:?}"),
    }
}

fn low(one_time: u32, kyber: u32) -> proto::PreKeysLow {
    proto::PreKeysLow {
        one_time_pre_keys: one_time,
        kyber_pre_keys: kyber,
        threshold: 10,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_is_told_when_a_fetch_leaves_few_keys() {
    let app = spawn_app().await;
    assert_eq!(app.config.limits.keys.prekey_low_threshold, 10);
    let me = TestIdentity::generate();
    let (alice, mut events, alice_id) =
        user_with(&app, "alice", me.upload(7, 1..=11, 1..=11, 1000)).await;
    expect_queue_empty(&mut events).await;
    let (bob, _e, _) = app.register(&unique("bob")).await;

    // 10 of each left: not fewer than the threshold, no push. (The next
    // push proves it: it carries the counts of the second fetch.)
    bob.fetch_bundle(alice_id).await.unwrap();
    bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(next_low(&mut events).await, low(9, 9));

    // Either kind alone is enough.
    alice
        .upload_keys(proto::UploadKeys {
            one_time_pre_keys: (100..=129).map(one_time_pre_key).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(next_low(&mut events).await, low(38, 8));

    // Replenished: no push.
    alice
        .upload_keys(proto::UploadKeys {
            kyber_pre_keys: (100..=129).map(|id| me.kyber_pre_key(id)).collect(),
            ..Default::default()
        })
        .await
        .unwrap();
    bob.fetch_bundle(alice_id).await.unwrap();
    // A new identity with no one-time keys: the next fetch pushes zeros,
    // and it must be the next push.
    let new = TestIdentity::generate();
    alice
        .upload_keys(new.upload(8, [], [], 1000))
        .await
        .unwrap();
    let bundle = bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(handed_out(&bundle), (None, 1000, true));
    assert_eq!(next_low(&mut events).await, low(0, 0));

    // An offline owner is simply not told; the fetch still works.
    alice.close().await;
    tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("alice's socket closes");
    bob.fetch_bundle(alice_id).await.unwrap();
}

/// 100 pipelined fetches below the threshold tell the owner once, not 100
/// times (issue 14); an upload makes the next crossing news again (see
/// the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_low_fetches_push_pre_keys_low_once() {
    let app = spawn_app_with(|c| c.limits.rates.bundle_burst = 1_000.0).await;
    let me = TestIdentity::generate();
    let (alice, mut events, alice_id) =
        user_with(&app, "alice", me.upload(7, 1..=5, 1..=5, 1000)).await;
    expect_queue_empty(&mut events).await;
    let (bob, _e, _) = app.register(&unique("bob")).await;
    let fetches = (0..100).map(|_| bob.fetch_bundle(alice_id));
    for fetched in futures::future::join_all(fetches).await {
        fetched.unwrap();
    }
    // Every push those fetches made is queued for Alice ahead of this
    // message, so counting up to it counts them all.
    let send = tokio::spawn({
        let bob = bob.clone();
        async move {
            bob.send(signal_relay::client::Outgoing::new(
                alice_id,
                b"after".to_vec(),
            ))
            .await
        }
    });
    let mut lows = 0;
    loop {
        match next_event(&mut events).await {
            Event::PreKeysLow(_) => lows += 1,
            Event::Deliver(envelope) => {
                assert_eq!(envelope.content.as_ref(), b"after");
                let id = Uuid::from_slice(&envelope.message_id).unwrap();
                alice.ack(&[id]).await.unwrap();
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(lows, 1, "one push for one crossing");
    send.await.unwrap().unwrap();
}

/// Each upload verifies up to 102 signatures: uploads are rate-limited per
/// user, answered RATE_LIMITED with a retry hint like the other limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_uploads_are_rate_limited_per_user() {
    let app = spawn_app_with(|config| {
        config.limits.rates.upload_keys_burst = 2.0;
        config.limits.rates.upload_keys_rate_per_sec = 5.0;
    })
    .await;
    let me = TestIdentity::generate();
    // The first upload is one of the two.
    let (alice, _events, _) = user_with(&app, "alice", me.upload(7, 1..=5, 1..=5, 1000)).await;
    let more = |ids: std::ops::RangeInclusive<u32>| proto::UploadKeys {
        one_time_pre_keys: ids.map(one_time_pre_key).collect(),
        ..Default::default()
    };
    alice.upload_keys(more(10..=14)).await.unwrap();
    let retry_after = match alice.upload_keys(more(20..=24)).await {
        Err(ClientError::Status {
            status: Status::RateLimited,
            retry_after: Some(retry_after),
            ..
        }) => retry_after,
        other => panic!("expected rate limited with a retry-after, got {other:?}"),
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
        "{retry_after:?}"
    );
    assert_eq!(
        count(&alice).await,
        (10, 5),
        "the refused upload stored nothing"
    );
    // Another user has a bucket of its own.
    let other = TestIdentity::generate();
    user_with(&app, "bob", other.upload(7, 1..=5, 1..=5, 1000)).await;
    // Waiting as told is enough. (This wait is the behaviour under test,
    // not a stand-in for synchronisation.)
    tokio::time::sleep(retry_after).await;
    alice.upload_keys(more(20..=24)).await.unwrap();
    assert_eq!(count(&alice).await, (15, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_fetches_are_rate_limited_per_requester() {
    let app = spawn_app_with(|config| {
        config.limits.rates.bundle_burst = 3.0;
        config.limits.rates.bundle_rate_per_sec = 5.0;
    })
    .await;
    let me = TestIdentity::generate();
    let (alice, _events, alice_id) =
        user_with(&app, "alice", me.upload(7, 1..=20, 1..=20, 1000)).await;
    let (bob, _e, _) = app.register(&unique("bob")).await;
    for _ in 0..3 {
        bob.fetch_bundle(alice_id).await.unwrap();
    }
    let retry_after = match bob.fetch_bundle(alice_id).await {
        Err(ClientError::Status {
            status: Status::RateLimited,
            retry_after: Some(retry_after),
            ..
        }) => retry_after,
        other => panic!("expected rate limited with a retry-after, got {other:?}"),
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
        "{retry_after:?}"
    );
    // The refused fetch took no key.
    assert_eq!(count(&alice).await, (17, 17));
    // Another requester has a bucket of its own.
    let (carol, _e, _) = app.register(&unique("carol")).await;
    carol.fetch_bundle(alice_id).await.unwrap();
    // Waiting as told is enough. (This wait is the behaviour under test,
    // not a stand-in for synchronisation.)
    tokio::time::sleep(retry_after).await;
    bob.fetch_bundle(alice_id).await.unwrap();
    assert_eq!(count(&alice).await, (15, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sizes_and_ids_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _events, auth) = app.register(&unique("alice")).await;
    let base = me.upload(7, 1..=3, 1..=3, 100);
    type Edit = Box<dyn Fn(&mut proto::UploadKeys)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|u| u.signed_pre_key.as_mut().unwrap().id = 1 << 31),
            "signed_pre_key.id must be in 0..=2147483647, got 2147483648",
        ),
        (
            Box::new(|u| u.one_time_pre_keys[2].id = u32::MAX),
            "one_time_pre_keys[2].id must be in 0..=2147483647, got 4294967295",
        ),
        (
            Box::new(|u| u.kyber_pre_keys[1].id = 1 << 31),
            "kyber_pre_keys[1].id must be in 0..=2147483647, got 2147483648",
        ),
        (
            Box::new(|u| u.last_resort_kyber_pre_key.as_mut().unwrap().id = 1 << 31),
            "last_resort_kyber_pre_key.id must be in 0..=2147483647, got 2147483648",
        ),
        (
            Box::new(|u| u.registration_id = Some(0)),
            "registration_id must be in 1..=16383, got 0",
        ),
        (
            Box::new(|u| u.registration_id = Some(16384)),
            "registration_id must be in 1..=16383, got 16384",
        ),
        (
            Box::new(|u| u.one_time_pre_keys = (1..=101).map(one_time_pre_key).collect()),
            "one_time_pre_keys holds 101 keys; at most 100 are accepted per upload",
        ),
        (
            Box::new(move |u| {
                u.kyber_pre_keys = (1..=101).map(|id| me.kyber_pre_key(id)).collect()
            }),
            "kyber_pre_keys holds 101 keys; at most 100 are accepted per upload",
        ),
        (
            Box::new(|u| u.kyber_pre_keys[2].public_key = Bytes::from(vec![8u8; 500])),
            "kyber_pre_keys[2].public_key must be 1569 bytes (0x08 + 1568), got 500",
        ),
        (
            Box::new(|u| {
                let mut key = u
                    .last_resort_kyber_pre_key
                    .as_ref()
                    .unwrap()
                    .public_key
                    .to_vec();
                key[0] = 0x05;
                u.last_resort_kyber_pre_key.as_mut().unwrap().public_key = Bytes::from(key);
            }),
            "last_resort_kyber_pre_key.public_key must start with type byte 0x08, got 0x05",
        ),
        (
            Box::new(|u| u.one_time_pre_keys[1].public_key = Bytes::from(vec![5u8; 32])),
            "one_time_pre_keys[1].public_key must be 33 bytes (0x05 + 32), got 32",
        ),
        (
            Box::new(|u| u.identity_key = Some(Bytes::from(vec![5u8; 34]))),
            "identity_key must be 33 bytes (0x05 + 32), got 34",
        ),
        (
            Box::new(|u| u.signed_pre_key.as_mut().unwrap().signature = Bytes::from(vec![0u8; 65])),
            "signed_pre_key.signature must be 64 bytes, got 65",
        ),
        (
            Box::new(|u| u.kyber_pre_keys[2].signature = Bytes::new()),
            "kyber_pre_keys[2].signature must be 64 bytes, got 0",
        ),
        (
            Box::new(|u| u.one_time_pre_keys[2].id = 1),
            "one_time_pre_keys[2].id is 1, which one_time_pre_keys[0].id already uses in this upload",
        ),
        (
            Box::new(|u| u.identity_key = None),
            "registration_id is only accepted together with identity_key",
        ),
    ];
    for (edit, message) in &cases {
        let mut upload = base.clone();
        edit(&mut upload);
        assert_bad_request(alice.upload_keys(upload).await, message);
    }
    assert_eq!(key_rows(&app, auth.user_id).await, [0; 5]);

    // The bounds themselves are accepted.
    let mut edge = base.clone();
    edge.registration_id = Some(0x3fff);
    edge.signed_pre_key.as_mut().unwrap().id = 0;
    edge.one_time_pre_keys = (0..100).map(one_time_pre_key).collect();
    edge.one_time_pre_keys[99].id = (1 << 31) - 1;
    edge.last_resort_kyber_pre_key.as_mut().unwrap().id = (1 << 31) - 1;
    assert_eq!(counts(&alice.upload_keys(edge).await.unwrap()), (100, 3));
    let (carol, _e, _) = app.register(&unique("carol")).await;
    let low_edge = TestIdentity::generate().upload(1, [], [], 0);
    carol.upload_keys(low_edge).await.unwrap();

    // Bad fetch targets.
    let raw = |target| {
        alice.request(proto::client_frame::Request::FetchBundle(
            proto::FetchBundle { target },
        ))
    };
    assert_bad_request(
        raw(Some(proto::fetch_bundle::Target::UserId(Bytes::from(
            vec![1u8; 15],
        ))))
        .await,
        "user_id must be a 16-byte UUID, got 15 bytes",
    );
    assert_bad_request(
        raw(None).await,
        "fetch_bundle needs a target: user_id or username",
    );
    assert_bad_request(
        alice.fetch_bundle_by_username("x").await,
        "username must be at least 3",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_and_users_without_keys_are_not_found_and_own_bundle_is_forbidden() {
    let app = spawn_app().await;
    let (bob, _e, bob_auth) = app.register(&unique("Bob")).await;
    let nobody = Uuid::new_v4();
    let (status, message) = failure(bob.fetch_bundle(nobody).await);
    assert_eq!(status, Status::NotFound);
    assert_eq!(message, format!("no user with id {nobody}"));
    let (status, message) = failure(bob.fetch_bundle_by_username("nobody_here").await);
    assert_eq!(status, Status::NotFound);
    assert_eq!(message, "no user named \"nobody_here\"");

    let (_carol, _e, carol) = app.register(&unique("carol")).await;
    let (status, message) = failure(bob.fetch_bundle(carol.user_id).await);
    assert_eq!(status, Status::NotFound);
    assert_eq!(
        message,
        format!("user with id {} has not published keys", carol.user_id)
    );
    let (status, _) = failure(bob.fetch_bundle_by_username(&carol.username).await);
    assert_eq!(status, Status::NotFound);

    // One's own bundle: forbidden, by id or by name in any case, and no
    // key is used up.
    let me = TestIdentity::generate();
    bob.upload_keys(me.upload(7, 1..=3, 1..=3, 100))
        .await
        .unwrap();
    let (status, message) = failure(bob.fetch_bundle(bob_auth.user_id).await);
    assert_eq!(status, Status::Forbidden);
    assert!(
        message.starts_with("you cannot fetch your own bundle"),
        "{message}"
    );
    let (status, _) = failure(
        bob.fetch_bundle_by_username(&bob_auth.username.to_lowercase())
            .await,
    );
    assert_eq!(status, Status::Forbidden);
    assert_eq!(count(&bob).await, (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_requests_need_authentication() {
    let app = spawn_app().await;
    let me = TestIdentity::generate();
    let (alice, _e, alice_id) = user_with(&app, "alice", me.upload(7, 1..=3, 1..=3, 100)).await;
    let requests = [
        proto::client_frame::Request::UploadKeys(me.upload(7, 4..=6, 4..=6, 100)),
        proto::client_frame::Request::GetPreKeyCount(proto::GetPreKeyCount {}),
        proto::client_frame::Request::FetchBundle(proto::FetchBundle {
            target: Some(proto::fetch_bundle::Target::UserId(Bytes::copy_from_slice(
                alice_id.as_bytes(),
            ))),
        }),
        proto::client_frame::Request::LookupUser(proto::LookupUser {
            username: "alice".into(),
        }),
    ];
    for request in requests {
        let (client, mut events) = app.connect().await;
        let (status, _) = failure(client.request(request).await);
        assert_eq!(status, Status::Unauthorized);
        assert_eq!(close_code(&mut events).await, Some(1008));
    }
    // Nothing was taken or added.
    assert_eq!(count(&alice).await, (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_of_one_user_apply_one_after_the_other() {
    let app = spawn_app().await;
    // A race needs luck to show, so several rounds, each a fresh user.
    for _ in 0..4 {
        concurrent_first_uploads(&app).await;
    }
}

async fn concurrent_first_uploads(app: &TestApp) {
    let (alice, _events, auth) = app.register(&unique("alice")).await;
    // Twelve first uploads, each with its own identity and its own ids, all
    // in flight at once on the one socket.
    let identities: Vec<TestIdentity> = (0..12).map(|_| TestIdentity::generate()).collect();
    let uploads = identities.iter().enumerate().map(|(i, me)| {
        let base = 10 * i as u32;
        let upload = me.upload(7, base + 1..=base + 3, base + 1..=base + 2, 1000 + base);
        let alice = alice.clone();
        async move { alice.upload_keys(upload).await.expect("upload") }
    });
    futures::future::join_all(uploads).await;

    // Whichever came last won, whole: its identity, and only its keys (each
    // later upload replaced the identity, deleting what came before).
    let identity: Vec<u8> =
        sqlx::query_scalar("SELECT identity_key FROM identity_keys WHERE user_id = $1")
            .bind(auth.user_id)
            .fetch_one(&app.db)
            .await
            .unwrap();
    let winner = identities
        .iter()
        .position(|me| me.identity_key() == identity)
        .expect("the stored identity is one of the uploads'");
    let base = 10 * winner as i32;
    assert_eq!(
        stored_ids(app, "one_time_pre_keys", auth.user_id).await,
        [base + 1, base + 2, base + 3]
    );
    assert_eq!(
        stored_ids(app, "kyber_pre_keys", auth.user_id).await,
        [base + 1, base + 2]
    );
    assert_eq!(
        stored_ids(app, "kyber_last_resort_keys", auth.user_id).await,
        [1000 + base]
    );
    assert_eq!(key_rows(app, auth.user_id).await, [1, 1, 3, 2, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_one_time_keys_are_capped_per_user() {
    let app = spawn_app_with(|c| c.limits.keys.max_stored_pre_keys = 150).await;
    let me = TestIdentity::generate();
    let (alice, _events, _) = app.register(&unique("alice")).await;
    alice
        .upload_keys(me.upload(7, 1..=100, 1..=100, 1000))
        .await
        .unwrap();
    let more = proto::UploadKeys {
        one_time_pre_keys: (101..=200).map(one_time_pre_key).collect(),
        ..Default::default()
    };
    assert_bad_request(
        alice.upload_keys(more).await,
        "this upload would leave 200 one-time EC pre-keys stored; at most 150 are kept per user",
    );
    assert_eq!(
        count(&alice).await,
        (100, 100),
        "nothing of the refused upload was stored"
    );
    // Replacing existing ids does not grow the count, so it is allowed.
    let replace = proto::UploadKeys {
        one_time_pre_keys: (51..=150).map(one_time_pre_key).collect(),
        ..Default::default()
    };
    alice.upload_keys(replace).await.unwrap();
    assert_eq!(count(&alice).await, (150, 100));
}

/// `LookupUser` tells an unknown user from one without keys from one with
/// keys (and which identity they published), for others and for oneself,
/// and never consumes a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_tell_unknown_from_keyless_from_published_and_consume_nothing() {
    let app = spawn_app().await;
    let (bob, _e, bob_auth) = app.register(&unique("Bob")).await;
    let (status, message) = failure(bob.lookup_user("nobody_here").await);
    assert_eq!(status, Status::NotFound);
    assert_eq!(message, "no user named \"nobody_here\"");
    assert_bad_request(bob.lookup_user("no spaces allowed").await, "username");

    // Registered, no keys: found, not published.
    let (_carol, _e, carol) = app.register(&unique("Carol")).await;
    let found = bob
        .lookup_user(&carol.username.to_uppercase())
        .await
        .unwrap();
    assert_eq!(found.user_id, carol.user_id);
    assert_eq!(found.username, carol.username, "as registered");
    assert_eq!(found.identity_key, None);

    // Published: the identity key, and nothing taken however often asked.
    let me = TestIdentity::generate();
    let (alice, _e, alice_id) = user_with(&app, "alice", me.upload(7, 1..=3, 1..=3, 100)).await;
    let alice_name = alice.who_am_i().await.unwrap().username;
    for _ in 0..5 {
        let found = bob.lookup_user(&alice_name).await.unwrap();
        assert_eq!(found.user_id, alice_id);
        assert_eq!(found.identity_key.as_deref(), Some(&me.identity_key()[..]));
    }
    assert_eq!(count(&alice).await, (3, 3));

    // One's own account too: the identity the relay holds for it, which
    // shows when another device replaced it.
    let own = bob.lookup_user(&bob_auth.username).await.unwrap();
    assert_eq!((own.user_id, own.identity_key), (bob_auth.user_id, None));
    assert_eq!(
        alice.lookup_user(&alice_name).await.unwrap().identity_key,
        Some(me.identity_key().to_vec())
    );
    let other_device = TestIdentity::generate();
    alice
        .upload_keys(other_device.upload(9, [], [], 200))
        .await
        .unwrap();
    assert_eq!(
        alice.lookup_user(&alice_name).await.unwrap().identity_key,
        Some(other_device.identity_key().to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_are_rate_limited_per_requester() {
    let app = spawn_app_with(|config| {
        config.limits.rates.lookup_burst = 3.0;
        config.limits.rates.lookup_rate_per_sec = 5.0;
    })
    .await;
    let (_alice, _e, alice) = app.register(&unique("alice")).await;
    let (bob, _e, _) = app.register(&unique("bob")).await;
    for _ in 0..3 {
        bob.lookup_user(&alice.username).await.unwrap();
    }
    let retry_after = match bob.lookup_user(&alice.username).await {
        Err(ClientError::Status {
            status: Status::RateLimited,
            retry_after: Some(retry_after),
            ..
        }) => retry_after,
        other => panic!("expected rate limited with a retry-after, got {other:?}"),
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200),
        "{retry_after:?}"
    );
    // An unknown name costs a token too: probing names is what is limited.
    let (carol, _e, _) = app.register(&unique("carol")).await;
    for _ in 0..3 {
        let (status, _) = failure(carol.lookup_user("nobody_here").await);
        assert_eq!(status, Status::NotFound);
    }
    let (status, _) = failure(carol.lookup_user(&alice.username).await);
    assert_eq!(status, Status::RateLimited);
    // Waiting as told is enough. (This wait is the behaviour under test,
    // not a stand-in for synchronisation.)
    tokio::time::sleep(retry_after).await;
    bob.lookup_user(&alice.username).await.unwrap();
}
