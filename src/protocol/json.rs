//! The `relay.v1.json` encoding: one frame per text message, in the
//! canonical proto3 JSON mapping of `ClientFrame` and `ServerFrame`. The
//! serde implementations are generated from `proto/relay.proto` by
//! pbjson-build (see `build.rs`), so they follow the schema by
//! construction: lowerCamelCase names (the proto names are accepted too),
//! bytes as base64 (standard or URL-safe, padded or not), enums by name
//! (or number), 64-bit integers as strings (or numbers), defaults omitted.
//! Strict where the mapping allows it: an unknown field or an enum value
//! the schema does not name is an error, which names it.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Text that is not JSON, or not the JSON of the expected message.
///
/// Its message goes into the close reason and the connection's closing
/// log line, so it never quotes a value the client sent: serde's "invalid
/// type: string \"…\"" would put whatever the client wrote there (a
/// password sent in the wrong shape) into the logs. The source, serde's
/// own error, does quote it: it is kept for its category and position,
/// and left out of `Debug`.
#[derive(thiserror::Error)]
#[error("{message}")]
pub struct InvalidJson {
    /// What is wrong and where, short enough for a close reason: serde's
    /// message without the list of every field it expected, and without
    /// the value it could not take.
    message: String,
    #[source]
    source: serde_json::Error,
}

impl std::fmt::Debug for InvalidJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvalidJson")
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl From<serde_json::Error> for InvalidJson {
    fn from(source: serde_json::Error) -> Self {
        InvalidJson {
            message: describe(&source),
            source,
        }
    }
}

/// Decodes one frame.
pub fn decode<T: DeserializeOwned>(text: &str) -> Result<T, InvalidJson> {
    Ok(serde_json::from_str(text)?)
}

/// Appends `value`'s JSON to `buf`. Fails only for a value the mapping
/// cannot write: an enum field holding a number the schema does not name.
pub fn encode_into<T: Serialize>(value: &T, buf: &mut BytesMut) -> Result<(), serde_json::Error> {
    serde_json::to_writer(buf.writer(), value)
}

/// Encodes one frame.
pub fn encode<T: Serialize>(value: &T) -> Result<Bytes, serde_json::Error> {
    let mut buf = BytesMut::new();
    encode_into(value, &mut buf)?;
    Ok(buf.freeze())
}

/// serde's message, with the list of expected names cut from an unknown
/// field's or variant's: the name that was wrong and the position are what
/// a person needs, and a close reason has room for little more. A value
/// of the wrong type or out of range is named by its kind alone.
fn describe(err: &serde_json::Error) -> String {
    let full = err.to_string();
    if let Some(prefix) = ["invalid type: ", "invalid value: "]
        .into_iter()
        .find(|p| full.starts_with(p))
    {
        // "invalid type: string \"<the client's text>\", expected …": the
        // kind is what precedes the quoted value, and the last ", expected"
        // is serde's own (the client's text may contain one too).
        let rest = &full[prefix.len()..];
        let kind = rest[..rest.find(['"', '`', ',']).unwrap_or(rest.len())].trim_end();
        let expected = rest.rfind(", expected").map_or("", |at| &rest[at..]);
        return format!("{prefix}{kind}{expected}");
    }
    if !(full.starts_with("unknown field") || full.starts_with("unknown variant")) {
        return full;
    }
    let Some(list) = full
        .find(", expected")
        .or_else(|| full.find(", there are no"))
    else {
        return full;
    };
    let position = full[list..]
        .rfind(" at line")
        .map_or("", |at| &full[list + at..]);
    format!("{}{position}", &full[..list])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::proto::{
        self, ClientFrame, ServerFrame, client_frame::Request, fetch_bundle, push, response,
        server_frame,
    };

    fn client(text: &str) -> Result<ClientFrame, InvalidJson> {
        decode(text)
    }

    #[test]
    fn the_canonical_mapping() {
        let frame = ClientFrame {
            request_id: u64::MAX,
            request: Some(Request::SendMessage(proto::SendMessage {
                recipient_id: Bytes::from_static(&[0xfb; 16]),
                r#type: proto::EnvelopeType::Ciphertext as i32,
                content: Bytes::from_static(b"hi"),
                client_timestamp_ms: 7,
                ephemeral: false,
                ttl_seconds: 60,
                client_message_id: None,
            })),
        };
        let text = String::from_utf8(encode(&frame).unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"requestId":"18446744073709551615","sendMessage":{"recipientId":"+/v7+/v7+/v7+/v7+/v7+w==","type":"CIPHERTEXT","content":"aGk=","clientTimestampMs":"7","ttlSeconds":60}}"#
        );
        assert_eq!(client(&text).unwrap(), frame);
    }

    #[test]
    fn the_lenient_forms_the_mapping_accepts() {
        // URL-safe base64 without padding, numbers for a 64-bit integer
        // and an enum, proto field names.
        let text = r#"{"request_id":18446744073709551615,"send_message":{"recipient_id":"-_v7-_v7-_v7-_v7-_v7-w","type":1,"content":"aGk","client_timestamp_ms":"7"}}"#;
        let frame = client(text).unwrap();
        assert_eq!(frame.request_id, u64::MAX);
        let Some(Request::SendMessage(send)) = frame.request else {
            panic!("{frame:?}");
        };
        assert_eq!(send.recipient_id.as_ref(), &[0xfb; 16]);
        assert_eq!(send.r#type, proto::EnvelopeType::Ciphertext as i32);
        assert_eq!(send.content.as_ref(), b"hi");
        assert_eq!(send.client_timestamp_ms, 7);
        // Oneofs of strings and empty messages.
        let frame = client(r#"{"requestId":"3","fetchBundle":{"username":"Bob"}}"#).unwrap();
        assert_eq!(
            frame.request,
            Some(Request::FetchBundle(proto::FetchBundle {
                target: Some(fetch_bundle::Target::Username("Bob".into()))
            }))
        );
        // URL-safe with padding, and standard without: the same bytes.
        for content in [r#""_-8=""#, r#""/+8""#] {
            let text = format!(r#"{{"sendMessage":{{"content":{content}}}}}"#);
            let Some(Request::SendMessage(send)) = client(&text).unwrap().request else {
                panic!("{text}");
            };
            assert_eq!(send.content.as_ref(), &[0xff, 0xef], "{text}");
        }
        let frame = client(r#"{"requestId":"4","whoAmI":{}}"#).unwrap();
        assert_eq!(frame.request, Some(Request::WhoAmI(proto::WhoAmI {})));
        assert_eq!(client("{}").unwrap(), ClientFrame::default());
    }

    #[test]
    fn errors_name_what_is_wrong_without_the_whole_schema() {
        let err = |text: &str| client(text).unwrap_err().to_string();
        assert_eq!(
            err(r#"{"requestId":"1","sendMesage":{}}"#),
            "unknown field `sendMesage` at line 1 column 29"
        );
        assert_eq!(
            err(r#"{"whoAmI":{"x":1}}"#),
            "unknown field `x` at line 1 column 14"
        );
        assert_eq!(
            err(r#"{"sendMessage":{"type":"CIPHERTXT"}}"#),
            "unknown variant `CIPHERTXT` at line 1 column 34"
        );
        assert!(
            err("not json").starts_with("expected"),
            "{}",
            err("not json")
        );
        assert!(err(r#"{"sendMessage":{"content":"!!"}}"#).contains("line 1"));
        assert!(err(r#"{"whoAmI":{},"logout":{}}"#).contains("duplicate field `logout`"));
        assert!(err("[1]").contains("invalid type"));
    }

    /// A close reason, and the log line that records it, never quote what
    /// the client sent in the wrong shape: a password, say.
    #[test]
    fn errors_do_not_quote_the_value_they_could_not_take() {
        let err = |text: &str| client(text).unwrap_err();
        for (text, expected) in [
            (
                r#"{"deleteAccount":"hunter2hunter2"}"#,
                "invalid type: string, expected struct relay.v1.DeleteAccount at line 1 column 33",
            ),
            (
                r#"{"deleteAccount":{"password":12345678901}}"#,
                "invalid type: integer, expected a string at line 1 column 40",
            ),
            (
                r#"{"login":{"password":"x, expected y","username":5.5}}"#,
                "invalid type: floating point, expected a string at line 1 column 51",
            ),
        ] {
            let err = err(text);
            assert_eq!(err.to_string(), expected, "{text}");
            for secret in ["hunter2", "12345678901", "5.5", "x, expected y"] {
                assert!(!err.to_string().contains(secret), "{err}");
                assert!(!format!("{err:?}").contains(secret), "{err:?}");
            }
        }
        let invalid_value = err(r#"{"requestId":"seven"}"#).to_string();
        assert!(invalid_value.starts_with("invalid "), "{invalid_value}");
        assert!(!invalid_value.contains("seven"), "{invalid_value}");
    }

    #[test]
    fn server_frames_encode_enums_by_name_and_omit_defaults() {
        let frame = ServerFrame {
            kind: Some(server_frame::Kind::Response(proto::Response {
                request_id: 9,
                status: proto::Status::RateLimited as i32,
                message: "slow down".into(),
                retry_after_ms: 50,
                result: None,
            })),
        };
        let text = String::from_utf8(encode(&frame).unwrap().to_vec()).unwrap();
        assert_eq!(
            text,
            r#"{"response":{"requestId":"9","status":"RATE_LIMITED","message":"slow down","retryAfterMs":"50"}}"#
        );
        let frame = ServerFrame {
            kind: Some(server_frame::Kind::Push(proto::Push {
                event: Some(push::Event::QueueEmpty(proto::QueueEmpty {})),
            })),
        };
        let text = String::from_utf8(encode(&frame).unwrap().to_vec()).unwrap();
        assert_eq!(text, r#"{"push":{"queueEmpty":{}}}"#);
    }

    fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
    }

    fn envelope_type() -> impl Strategy<Value = i32> {
        prop_oneof![Just(0), Just(1), Just(3), Just(5), Just(8)]
    }

    fn signed_ec() -> impl Strategy<Value = proto::SignedEcPreKey> {
        (any::<u32>(), bytes(40), bytes(70)).prop_map(|(id, public_key, signature)| {
            proto::SignedEcPreKey {
                id,
                public_key,
                signature,
            }
        })
    }

    fn signed_kyber() -> impl Strategy<Value = proto::SignedKyberPreKey> {
        (any::<u32>(), bytes(64), bytes(70)).prop_map(|(id, public_key, signature)| {
            proto::SignedKyberPreKey {
                id,
                public_key,
                signature,
            }
        })
    }

    /// Every kind of request, with arbitrary field values (enums among
    /// the values the schema names).
    fn request() -> impl Strategy<Value = Request> {
        let upload = (
            proptest::option::of(bytes(40)),
            proptest::option::of(any::<u32>()),
            proptest::option::of(signed_ec()),
            proptest::collection::vec(
                (any::<u32>(), bytes(40))
                    .prop_map(|(id, public_key)| proto::EcPreKey { id, public_key }),
                0..3,
            ),
            proptest::collection::vec(signed_kyber(), 0..3),
            proptest::option::of(signed_kyber()),
        )
            .prop_map(|(ik, reg, spk, otk, kyber, last)| {
                Request::UploadKeys(proto::UploadKeys {
                    identity_key: ik,
                    registration_id: reg,
                    signed_pre_key: spk,
                    one_time_pre_keys: otk,
                    kyber_pre_keys: kyber,
                    last_resort_kyber_pre_key: last,
                })
            });
        let send = (
            bytes(20),
            envelope_type(),
            bytes(200),
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            proptest::option::of(bytes(70)),
        )
            .prop_map(|(to, ty, content, ts, ephemeral, ttl, cmid)| {
                Request::SendMessage(proto::SendMessage {
                    recipient_id: to,
                    r#type: ty,
                    content,
                    client_timestamp_ms: ts,
                    ephemeral,
                    ttl_seconds: ttl,
                    client_message_id: cmid,
                })
            });
        let target = prop_oneof![
            bytes(20).prop_map(fetch_bundle::Target::UserId),
            any::<String>().prop_map(fetch_bundle::Target::Username),
        ];
        prop_oneof![
            (any::<String>(), any::<String>()).prop_map(|(username, password)| {
                Request::Register(proto::Register { username, password })
            }),
            (any::<String>(), any::<String>()).prop_map(|(username, password)| Request::Login(
                proto::Login { username, password }
            )),
            bytes(40).prop_map(|token| Request::Resume(proto::Resume { token })),
            any::<bool>().prop_map(|all| Request::Logout(proto::Logout { all })),
            any::<String>()
                .prop_map(|password| Request::DeleteAccount(proto::DeleteAccount { password })),
            Just(Request::WhoAmI(proto::WhoAmI {})),
            any::<String>()
                .prop_map(|username| Request::LookupUser(proto::LookupUser { username })),
            upload,
            Just(Request::GetPreKeyCount(proto::GetPreKeyCount {})),
            proptest::option::of(target)
                .prop_map(|target| Request::FetchBundle(proto::FetchBundle { target })),
            send,
            proptest::collection::vec(bytes(20), 0..4)
                .prop_map(|ids| Request::AckMessages(proto::AckMessages { message_ids: ids })),
        ]
    }

    fn frame() -> impl Strategy<Value = ClientFrame> {
        (any::<u64>(), proptest::option::of(request())).prop_map(|(request_id, request)| {
            ClientFrame {
                request_id,
                request,
            }
        })
    }

    /// Every server frame a response or push can be, for the client's
    /// decoder.
    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        let status = 0..=10i32;
        let result = prop_oneof![
            Just(response::Result::Empty(proto::Empty {})),
            (bytes(20), any::<String>(), bytes(40), any::<i64>()).prop_map(|(u, n, t, e)| {
                response::Result::Auth(proto::AuthResult {
                    user_id: u,
                    username: n,
                    token: t,
                    token_expires_at_ms: e,
                    max_message_bytes: e as u32,
                })
            }),
            (bytes(20), proptest::collection::vec(bytes(20), 0..3)).prop_map(|(id, ids)| {
                response::Result::Ack(proto::AckResult {
                    acked: vec![id],
                    unknown: ids,
                })
            }),
            (bytes(20), 0..=3i32).prop_map(|(id, outcome)| {
                response::Result::Send(proto::SendResult {
                    message_id: id,
                    outcome,
                })
            }),
            (signed_ec(), signed_kyber(), any::<bool>()).prop_map(|(spk, kyber, last)| {
                response::Result::Bundle(proto::PreKeyBundle {
                    signed_pre_key: Some(spk),
                    kyber_pre_key: Some(kyber),
                    kyber_is_last_resort: last,
                    ..Default::default()
                })
            }),
        ];
        let response = (
            any::<u64>(),
            status,
            any::<String>(),
            any::<u64>(),
            proptest::option::of(result),
        )
            .prop_map(|(request_id, status, message, retry, result)| {
                server_frame::Kind::Response(proto::Response {
                    request_id,
                    status,
                    message,
                    retry_after_ms: retry,
                    result,
                })
            });
        let deliver = (
            bytes(20),
            envelope_type(),
            bytes(100),
            any::<u64>(),
            any::<String>(),
        )
            .prop_map(|(id, ty, content, ts, sender)| {
                server_frame::Kind::Push(proto::Push {
                    event: Some(push::Event::Deliver(proto::Envelope {
                        message_id: id,
                        sender_id: Bytes::new(),
                        sender_username: sender,
                        r#type: ty,
                        content,
                        server_timestamp_ms: ts,
                        client_timestamp_ms: ts / 2,
                    })),
                })
            });
        proptest::option::of(prop_oneof![response, deliver]).prop_map(|kind| ServerFrame { kind })
    }

    proptest! {
        // Short in the normal suite; PROPTEST_CASES raises it.
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn valid_client_frames_round_trip(frame in frame()) {
            let text = encode(&frame).expect("every named enum value encodes");
            let text = std::str::from_utf8(&text).expect("JSON is UTF-8");
            prop_assert_eq!(client(text).expect("our own JSON decodes"), frame);
        }

        #[test]
        fn valid_server_frames_round_trip(frame in server_frame()) {
            let text = encode(&frame).expect("every named enum value encodes");
            let text = std::str::from_utf8(&text).expect("JSON is UTF-8");
            let back: ServerFrame = decode(text).expect("our own JSON decodes");
            prop_assert_eq!(back, frame);
        }

        #[test]
        fn mutated_frames_never_panic(
            frame in frame(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6),
        ) {
            let mut text = encode(&frame).expect("encodes").to_vec();
            for (at, byte, how) in edits {
                match how {
                    0 if !text.is_empty() => { let i = at.index(text.len()); text[i] = byte; }
                    1 => { let i = at.index(text.len() + 1); text.insert(i, byte); }
                    _ if !text.is_empty() => { let i = at.index(text.len()); text.remove(i); }
                    _ => {}
                }
            }
            // Only UTF-8 reaches the decoder (tungstenite checks text
            // frames); anything else is not a text frame at all.
            if let Ok(text) = std::str::from_utf8(&text) {
                let _ = client(text);
            }
        }

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            let _ = client(&text);
        }

        #[test]
        fn arbitrary_json_shaped_text_never_panics(
            text in r#"[\[\]{}",:0-9a-zA-Z_\-+=/ .eE\\]{0,80}"#,
        ) {
            let _ = client(&text);
            let _ = decode::<ServerFrame>(&text);
        }
    }
}
