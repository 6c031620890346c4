//! The frame decoder: every binary WebSocket message is decoded as a
//! protobuf `ClientFrame`, and its request validated into a command
//! (`AuthCommand::from_frame` before authentication, `Command::from_frame`
//! after). Neither may panic, whatever the bytes; what decodes re-encodes
//! to the same frame; a refusal is always the client's fault, never an
//! internal error.

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message as _;
use signal_relay::cmd::{AuthCommand, Command, Counted};
use signal_relay::config::{Config, MessagingLimits};
use signal_relay::proto::{self, ClientFrame, client_frame::Request};

use crate::support;

fn limits() -> MessagingLimits {
    Config::for_tests("postgres://unused").limits.messaging
}

/// Bytes of lengths a field is likely to check (empty, a UUID, a key)
/// and any other.
fn field_bytes() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        Just(Bytes::new()),
        vec(any::<u8>(), 16).prop_map(Bytes::from),
        vec(any::<u8>(), 0..80).prop_map(Bytes::from),
    ]
}

/// Strings near the rules for usernames and passwords, and any other.
fn field_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.-]{0,60}",
        "\\PC{0,20}",
        Just(String::new()),
        "[a-z]{3,8}",
    ]
}

fn ec_pre_key() -> impl Strategy<Value = proto::EcPreKey> {
    (any::<u32>(), field_bytes()).prop_map(|(id, public_key)| proto::EcPreKey { id, public_key })
}

fn signed_ec_pre_key() -> impl Strategy<Value = proto::SignedEcPreKey> {
    (any::<u32>(), field_bytes(), field_bytes()).prop_map(|(id, public_key, signature)| {
        proto::SignedEcPreKey {
            id,
            public_key,
            signature,
        }
    })
}

fn signed_kyber_pre_key() -> impl Strategy<Value = proto::SignedKyberPreKey> {
    (any::<u32>(), field_bytes(), field_bytes()).prop_map(|(id, public_key, signature)| {
        proto::SignedKyberPreKey {
            id,
            public_key,
            signature,
        }
    })
}

fn upload_keys() -> impl Strategy<Value = proto::UploadKeys> {
    (
        proptest::option::of(field_bytes()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(signed_ec_pre_key()),
        vec(ec_pre_key(), 0..4),
        vec(signed_kyber_pre_key(), 0..3),
        proptest::option::of(signed_kyber_pre_key()),
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

/// Any request, with fields near and far from what is valid.
fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (field_string(), field_string()).prop_map(|(username, password)| Request::Register(
            proto::Register { username, password }
        )),
        (field_string(), field_string())
            .prop_map(|(username, password)| Request::Login(proto::Login { username, password })),
        field_bytes().prop_map(|token| Request::Resume(proto::Resume { token })),
        any::<bool>().prop_map(|all| Request::Logout(proto::Logout { all })),
        field_string()
            .prop_map(|password| Request::DeleteAccount(proto::DeleteAccount { password })),
        Just(Request::WhoAmI(proto::WhoAmI {})),
        field_string().prop_map(|username| Request::LookupUser(proto::LookupUser { username })),
        upload_keys().prop_map(Request::UploadKeys),
        Just(Request::GetPreKeyCount(proto::GetPreKeyCount {})),
        prop_oneof![
            Just(None),
            field_bytes().prop_map(|b| Some(proto::fetch_bundle::Target::UserId(b))),
            field_string().prop_map(|s| Some(proto::fetch_bundle::Target::Username(s))),
        ]
        .prop_map(|target| Request::FetchBundle(proto::FetchBundle { target })),
        (
            field_bytes(),
            -2..8i32,
            vec(any::<u8>(), 0..64),
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            proptest::option::of(field_bytes()),
        )
            .prop_map(
                |(
                    recipient_id,
                    r#type,
                    content,
                    client_timestamp_ms,
                    ephemeral,
                    ttl_seconds,
                    client_message_id,
                )| {
                    Request::SendMessage(proto::SendMessage {
                        recipient_id,
                        r#type,
                        content: Bytes::from(content),
                        client_timestamp_ms,
                        ephemeral,
                        ttl_seconds,
                        client_message_id,
                    })
                }
            ),
        vec(field_bytes(), 0..6)
            .prop_map(|message_ids| Request::AckMessages(proto::AckMessages { message_ids })),
    ]
}

/// Bytes on the wire: random, or an encoded frame with a fuzzer's edits.
fn wire() -> impl Strategy<Value = Vec<u8>> {
    let encoded = || {
        (any::<u64>(), proptest::option::of(request())).prop_map(|(request_id, request)| {
            ClientFrame {
                request_id,
                request,
            }
            .encode_to_vec()
        })
    };
    prop_oneof![
        1 => vec(any::<u8>(), 0..256),
        2 => encoded(),
        3 => (encoded(), support::edits(4)).prop_map(|(bytes, edits)| support::mutate(bytes, &edits)),
    ]
}

#[test]
fn client_frames() {
    let limits = limits();
    support::run("client_frames", 1, wire(), |bytes| {
        let Ok(frame) = ClientFrame::decode(&bytes[..]) else {
            return Ok(());
        };
        let again = ClientFrame::decode(&frame.encode_to_vec()[..]).ok();
        prop_assert!(
            again.as_ref() == Some(&frame),
            "a decoded frame re-encodes to itself"
        );
        let Some(request) = frame.request else {
            return Ok(());
        };
        let _ = Counted::of(&request);
        let authenticating = AuthCommand::attempt(&request).is_some();
        match AuthCommand::from_frame(request.clone()) {
            Ok(command) => prop_assert_eq!(command.is_some(), authenticating),
            Err(err) => {
                prop_assert!(
                    authenticating,
                    "only authentication requests are parsed here"
                );
                prop_assert!(!err.is_internal(), "a refusal is the client's fault: {err}");
            }
        }
        match Command::from_frame(request, &limits) {
            Ok(_) => prop_assert!(!authenticating, "an authenticated socket refuses these"),
            Err(err) => prop_assert!(!err.is_internal(), "a refusal is the client's fault: {err}"),
        }
        Ok(())
    });
}

/// Text on the wire under `relay.v1.json`: random, or a frame's canonical
/// JSON with a fuzzer's edits (kept as text where the edits broke UTF-8).
fn json_wire() -> impl Strategy<Value = String> {
    // Frames with enum numbers the schema does not name have no canonical
    // JSON (the decoder refuses them): left to the random and edited text.
    let encoded = || {
        (any::<u64>(), proptest::option::of(request())).prop_filter_map(
            "has a JSON form",
            |(request_id, request)| {
                let frame = ClientFrame {
                    request_id,
                    request,
                };
                let json = signal_relay::protocol::json::encode(&frame).ok()?;
                String::from_utf8(json.to_vec()).ok()
            },
        )
    };
    prop_oneof![
        1 => "\\PC{0,200}",
        2 => encoded(),
        3 => (encoded(), support::edits(4)).prop_map(|(text, edits)| {
            String::from_utf8_lossy(&support::mutate(text.into_bytes(), &edits)).into_owned()
        }),
    ]
}

/// The JSON decoder: never panics, and what it accepts re-encodes to JSON
/// that decodes to the same frame (and the same frame as protobuf).
#[test]
fn client_frames_as_json() {
    use signal_relay::protocol::json;
    support::run("client_frames_as_json", 1, json_wire(), |text| {
        let Ok(frame) = json::decode::<ClientFrame>(&text) else {
            return Ok(());
        };
        let encoded = json::encode(&frame).expect("a decoded frame encodes");
        let again: Option<ClientFrame> = std::str::from_utf8(&encoded)
            .ok()
            .and_then(|t| json::decode(t).ok());
        prop_assert!(again.as_ref() == Some(&frame), "JSON round trip");
        let via_proto = ClientFrame::decode(&frame.encode_to_vec()[..]).ok();
        prop_assert!(via_proto.as_ref() == Some(&frame), "protobuf round trip");
        Ok(())
    });
}
