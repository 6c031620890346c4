//! The `relay.v1.json` subprotocol: subprotocol negotiation at the upgrade,
//! the whole protocol over JSON text frames (with the shared libsignal
//! vectors), the same error answers and limits as protobuf, the close
//! codes, the wire format as a hand-typing websocat user sees it, and
//! clients of the two encodings working together for every request kind.

use std::net::SocketAddr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use signal_relay::client::{AuthInfo, ClientError, CloseInfo, Encoding, Event, Events, Outgoing};
use signal_relay::proto::{self, EnvelopeType, SendOutcome, Status, client_frame::Request};
use signal_relay::testing::{spawn_app, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use crate::helpers::{WAIT, expect_queue_empty, next_delivery, next_event, unique};
use crate::keys::{hex_bytes, id, signed_ec, signed_kyber, vector_upload, vectors};

const JSON: Encoding = Encoding::Json;
const PROTO: Encoding = Encoding::Proto;
const PASSWORD: &str = "password123";

/// How the connection closed, or panic after [`WAIT`].
async fn close_info(events: &mut Events) -> CloseInfo {
    tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("timed out waiting for the close")
}

fn id_of(envelope: &proto::Envelope) -> Uuid {
    Uuid::from_slice(&envelope.message_id).expect("a message id")
}

fn text(recipient: Uuid, body: &str) -> Outgoing {
    Outgoing::new(recipient, Bytes::copy_from_slice(body.as_bytes()))
}

fn low(one_time: u32, kyber: u32) -> Event {
    Event::PreKeysLow(proto::PreKeysLow {
        one_time_pre_keys: one_time,
        kyber_pre_keys: kyber,
        threshold: 10,
    })
}

#[track_caller]
fn assert_low(event: Event, one_time: u32, kyber: u32) {
    match (&event, low(one_time, kyber)) {
        (Event::PreKeysLow(got), Event::PreKeysLow(want)) => assert_eq!(got, &want),
        _ => panic!("expected pre-keys-low ({one_time}, {kyber}), got {event:?}"),
    }
}

/// Asserts that `bundle` carries exactly the keys of vector `u`, with the
/// lowest one-time keys handed out first.
#[track_caller]
fn assert_bundle_is_vector(bundle: &proto::PreKeyBundle, u: &Value, user: &AuthInfo) {
    assert_eq!(bundle.user_id.as_ref(), user.user_id.as_bytes());
    assert_eq!(bundle.username, user.username);
    assert_eq!(bundle.device_id, 1);
    assert_eq!(bundle.registration_id, id(&u["registration_id"]));
    assert_eq!(bundle.identity_key, hex_bytes(&u["identity_key"]));
    assert_eq!(bundle.signed_pre_key, Some(signed_ec(&u["signed_pre_key"])));
    let lowest = |field: &str| {
        u[field]
            .as_array()
            .and_then(|keys| keys.iter().min_by_key(|k| id(&k["id"])))
            .cloned()
            .expect("the vector has keys")
    };
    let otk = lowest("one_time_pre_keys");
    assert_eq!(
        bundle.one_time_pre_key,
        Some(proto::EcPreKey {
            id: id(&otk["id"]),
            public_key: hex_bytes(&otk["public_key"]),
        })
    );
    assert_eq!(
        bundle.kyber_pre_key,
        Some(signed_kyber(&lowest("kyber_pre_keys")))
    );
    assert!(!bundle.kyber_is_last_resort);
}

// ------------------------------------------------------------ negotiation

/// Sends a raw upgrade request with `extra` headers and returns the
/// response head (and body, for refusals).
async fn upgrade_head(addr: SocketAddr, extra: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            head.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&head);
            let complete = text.find("\r\n\r\n").is_some_and(|end| {
                // A refusal has a body; wait for all of it.
                !text.starts_with("HTTP/1.1 4") || n == 0 || {
                    let length = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|l| l.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    head.len() >= end + 4 + length
                }
            });
            if complete || n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the server answers");
    String::from_utf8_lossy(&head).into_owned()
}

fn subprotocol_header(head: &str) -> Option<&str> {
    head.lines().find_map(|l| {
        l.split_once(':')
            .filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-protocol"))
            .map(|(_, value)| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_negotiates_the_subprotocol() {
    let app = spawn_app().await;
    let head = upgrade_head(app.addr, "").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        subprotocol_header(&head),
        None,
        "nothing asked, nothing named"
    );

    let ask = |list: &str| format!("Sec-WebSocket-Protocol: {list}\r\n");
    let head = upgrade_head(app.addr, &ask("relay.v1.proto")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(subprotocol_header(&head), Some("relay.v1.proto"));
    let head = upgrade_head(app.addr, &ask("chat, relay.v1.json, relay.v1.proto")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        subprotocol_header(&head),
        Some("relay.v1.json"),
        "the client's first supported choice"
    );

    // Refused before authentication: a bad password would be a 401.
    let basic = STANDARD.encode("nobody:wrong-password");
    let refused = format!("{}Authorization: Basic {basic}\r\n", ask("chat, mqtt"));
    let head = upgrade_head(app.addr, &refused).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("relay.v1.proto") && head.contains("relay.v1.json"),
        "the refusal names what is supported: {head}"
    );

    // The client library asks for JSON and checks the answer.
    let (client, _events) = app.connect_as(JSON).await;
    assert_eq!(
        client.header("sec-websocket-protocol"),
        Some("relay.v1.json")
    );
}

// ------------------------------------------------- the protocol over JSON

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_protocol_over_json() {
    let app = spawn_app().await;
    let v = vectors();
    let upload = &v["valid"][0];

    // Register, upload libsignal's keys, count them.
    let (alice, mut alice_events, alice_auth) = app.register_live_as(JSON, &unique("alice")).await;
    assert_eq!(alice.encoding(), JSON);
    assert_eq!(alice_auth.token.len(), 32);
    let uploaded = alice.upload_keys(vector_upload(upload)).await.unwrap();
    assert_eq!(
        (uploaded.one_time_pre_keys, uploaded.kyber_pre_keys),
        (3, 2)
    );
    let me = alice.who_am_i().await.unwrap();
    assert_eq!(me.user_id.as_ref(), alice_auth.user_id.as_bytes());
    assert_eq!(me.username, alice_auth.username);

    // Bob fetches her bundle, by id and by name: exactly libsignal's keys,
    // and Alice is told once that her keys run low (not again until she
    // uploads).
    let (bob, mut bob_events, bob_auth) = app.register_live_as(JSON, &unique("bob")).await;
    let bundle = bob.fetch_bundle(alice_auth.user_id).await.unwrap();
    assert_bundle_is_vector(&bundle, upload, &alice_auth);
    assert_low(next_event(&mut alice_events).await, 2, 1);
    let second = bob
        .fetch_bundle_by_username(&alice_auth.username.to_uppercase())
        .await
        .unwrap();
    assert_ne!(second.one_time_pre_key, bundle.one_time_pre_key);
    let count = alice.pre_key_count().await.unwrap();
    assert_eq!((count.one_time_pre_keys, count.kyber_pre_keys), (1, 0));

    // Live: send, receive, ack, delivered.
    let send = tokio::spawn({
        let alice = alice.clone();
        let mut message = text(bob_auth.user_id, "hello bob");
        message.client_timestamp_ms = u64::MAX / 3;
        message.client_message_id = Some(Bytes::from_static(b"m-1"));
        async move { alice.send(message).await }
    });
    let envelope = next_delivery(&mut bob_events).await;
    assert_eq!(envelope.content.as_ref(), b"hello bob");
    assert_eq!(envelope.sender_id.as_ref(), alice_auth.user_id.as_bytes());
    assert_eq!(envelope.sender_username, alice_auth.username);
    assert_eq!(envelope.r#type, EnvelopeType::Ciphertext as i32);
    assert_eq!(
        envelope.client_timestamp_ms,
        u64::MAX / 3,
        "64-bit integers survive JSON"
    );
    assert!(envelope.server_timestamp_ms > 0);
    let (acked, unknown) = bob.ack(&[id_of(&envelope)]).await.unwrap();
    assert_eq!((acked, unknown), (vec![id_of(&envelope)], vec![]));
    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent.outcome, SendOutcome::Delivered);
    assert_eq!(sent.message_id, id_of(&envelope));

    // Stored: Bob is away, then drains it, acks, and Alice gets a receipt.
    bob.close().await;
    bob.closed().await;
    drop(bob_events);
    let queued = alice.send(text(bob_auth.user_id, "later")).await.unwrap();
    assert_eq!(queued.outcome, SendOutcome::Queued);
    let (bob, mut bob_events) = app.resume_as(JSON, &bob_auth.token).await;
    let stored = next_delivery(&mut bob_events).await;
    assert_eq!(stored.content.as_ref(), b"later");
    expect_queue_empty(&mut bob_events).await;
    bob.ack(&[id_of(&stored)]).await.unwrap();
    let receipt = next_event(&mut alice_events).await;
    assert_eq!(receipt.receipt_for(), Some(queued.message_id));
    let Event::Deliver(receipt) = receipt else {
        unreachable!()
    };
    assert_eq!(receipt.r#type, EnvelopeType::Receipt as i32);
    assert_eq!(receipt.sender_id.as_ref(), bob_auth.user_id.as_bytes());
    assert_eq!(alice.ack(&[id_of(&receipt)]).await.unwrap().0.len(), 1);

    // An error answer, and the socket stays open.
    let err = alice.send(text(Uuid::new_v4(), "who?")).await.unwrap_err();
    assert_eq!(err.status(), Some(Status::NotFound));

    // Login on a new socket takes over (4409 for the old one), logout
    // ends it with 1000 and revokes its token.
    let (again, mut again_events) = app.connect_as(JSON).await;
    let login = again.login(&alice_auth.username, PASSWORD).await.unwrap();
    assert_eq!(login.user_id, alice_auth.user_id);
    assert_eq!(close_info(&mut alice_events).await.code, Some(4409));
    again.logout().await.unwrap();
    assert_eq!(close_info(&mut again_events).await.code, Some(1000));
    let (late, _late_events) = app.connect_as(JSON).await;
    assert_eq!(
        late.resume(&login.token).await.unwrap_err().status(),
        Some(Status::Unauthorized)
    );

    // Deleting the account closes with 1000, and the account is gone.
    bob.delete_account(PASSWORD).await.unwrap();
    assert_eq!(close_info(&mut bob_events).await.code, Some(1000));
    let (carol, _carol_events, _) = app.register_live_as(JSON, &unique("carol")).await;
    assert_eq!(
        carol
            .fetch_bundle(bob_auth.user_id)
            .await
            .unwrap_err()
            .status(),
        Some(Status::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_close_codes() {
    let app = spawn_app_with(|c| c.limits.connection.max_frame_bytes = 4096).await;

    // A binary frame on a JSON socket: 1003, saying which subprotocol
    // binary frames belong to.
    let (client, mut events, _) = app.register_live_as(JSON, &unique("a")).await;
    client
        .send_ws(WsMessage::Binary(vec![8, 1].into()))
        .await
        .unwrap();
    let close = close_info(&mut events).await;
    assert_eq!(close.code, Some(1003));
    assert!(close.reason.contains("relay.v1.proto"), "{}", close.reason);

    // Text that is not JSON, or not a ClientFrame: 1007, naming what is
    // wrong (an unknown field, an enum value the schema does not name).
    for (bad, says) in [
        ("hello", "expected value"),
        (
            r#"{"requestId":"1","sendMesage":{}}"#,
            "unknown field `sendMesage`",
        ),
        (
            r#"{"requestId":"1","sendMessage":{"type":"CIPHERTXT"}}"#,
            "unknown variant `CIPHERTXT`",
        ),
        (
            r#"{"requestId":"1","whoAmI":{},"logout":{}}"#,
            "duplicate field",
        ),
        (r#"{"requestId":"x1"}"#, "invalid digit"),
        (r#"{"sendMessage":{"content":"not base64!"}}"#, "Invalid"),
    ] {
        let (client, mut events, _) = app.register_live_as(JSON, &unique("b")).await;
        client.send_ws(WsMessage::Text(bad.into())).await.unwrap();
        let close = close_info(&mut events).await;
        assert_eq!(close.code, Some(1007), "{bad}");
        assert!(close.reason.contains(says), "{bad}: {}", close.reason);
    }

    // A frame over the limit: 1009, as under protobuf.
    let (client, mut events, _) = app.register_live_as(JSON, &unique("c")).await;
    let big = format!(
        r#"{{"requestId":"1","register":{{"username":"{}"}}}}"#,
        "x".repeat(4096)
    );
    client.send_ws(WsMessage::Text(big.into())).await.unwrap();
    assert_eq!(close_info(&mut events).await.code, Some(1009));

    // A request before authentication: UNAUTHORIZED, then 1008.
    let (client, mut events) = app.connect_as(JSON).await;
    assert_eq!(
        client.who_am_i().await.unwrap_err().status(),
        Some(Status::Unauthorized)
    );
    assert_eq!(close_info(&mut events).await.code, Some(1008));

    // A valid frame without a request is an invalid field, not an invalid
    // frame: an error answer, and the socket stays open.
    let (client, _events, auth) = app.register_live_as(JSON, &unique("d")).await;
    client
        .send_ws(WsMessage::Text(r#"{"requestId":"77"}"#.into()))
        .await
        .unwrap();
    assert_eq!(client.who_am_i().await.unwrap().username, auth.username);
}

/// Every way a request can be refused is answered the same, status and
/// message, whichever encoding asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_answered_the_same_in_both_encodings() {
    let app = spawn_app_with(|c| c.limits.messaging.max_message_bytes = 1024).await;
    let v = vectors();
    let (proto_client, _pe, _) = app.register_live_as(PROTO, &unique("p")).await;
    let (json_client, _je, _) = app.register_live_as(JSON, &unique("j")).await;
    let (_bob, _be, bob) = app.register_live_as(PROTO, &unique("bob")).await;
    let to_bob = Bytes::copy_from_slice(bob.user_id.as_bytes());
    let send = |change: &dyn Fn(&mut proto::SendMessage)| {
        let mut send = proto::SendMessage {
            recipient_id: to_bob.clone(),
            r#type: EnvelopeType::Ciphertext as i32,
            content: Bytes::from_static(b"x"),
            ..Default::default()
        };
        change(&mut send);
        Request::SendMessage(send)
    };
    let mut cases = vec![
        (
            "short recipient".to_owned(),
            send(&|s| s.recipient_id = Bytes::from_static(&[1, 2, 3])),
        ),
        (
            "unknown recipient".to_owned(),
            send(&|s| s.recipient_id = Bytes::copy_from_slice(Uuid::new_v4().as_bytes())),
        ),
        (
            "empty content".to_owned(),
            send(&|s| s.content = Bytes::new()),
        ),
        (
            "content over the limit".to_owned(),
            send(&|s| s.content = vec![0u8; 1025].into()),
        ),
        (
            "forged receipt".to_owned(),
            send(&|s| s.r#type = EnvelopeType::Receipt as i32),
        ),
        ("no type".to_owned(), send(&|s| s.r#type = 0)),
        (
            "long client message id".to_owned(),
            send(&|s| s.client_message_id = Some(vec![1u8; 65].into())),
        ),
        (
            "empty ack".to_owned(),
            Request::AckMessages(Default::default()),
        ),
        (
            "short ack id".to_owned(),
            Request::AckMessages(proto::AckMessages {
                message_ids: vec![Bytes::from_static(&[9])],
            }),
        ),
        (
            "fetch nobody".to_owned(),
            Request::FetchBundle(Default::default()),
        ),
        (
            "fetch an unknown name".to_owned(),
            Request::FetchBundle(proto::FetchBundle {
                target: Some(proto::fetch_bundle::Target::Username("no_such_user".into())),
            }),
        ),
        (
            "fetch keys never published".to_owned(),
            Request::FetchBundle(proto::FetchBundle {
                target: Some(proto::fetch_bundle::Target::UserId(to_bob.clone())),
            }),
        ),
        (
            "look up a malformed name".to_owned(),
            Request::LookupUser(proto::LookupUser {
                username: "x".into(),
            }),
        ),
        (
            "look up an unknown name".to_owned(),
            Request::LookupUser(proto::LookupUser {
                username: "no_such_user".into(),
            }),
        ),
        (
            "first upload without an identity".to_owned(),
            Request::UploadKeys(Default::default()),
        ),
        (
            "register again".to_owned(),
            Request::Register(proto::Register {
                username: "someone".into(),
                password: PASSWORD.into(),
            }),
        ),
    ];
    for (i, entry) in v["invalid"]
        .as_array()
        .expect("invalid uploads")
        .iter()
        .enumerate()
    {
        let why = entry["why"].as_str().expect("a reason");
        let request = Request::UploadKeys(vector_upload(&entry["upload"]));
        cases.push((format!("invalid[{i}]: {why}"), request));
    }
    for (what, request) in cases {
        let by_proto = proto_client.request_raw(request.clone()).await.unwrap();
        let by_json = json_client.request_raw(request).await.unwrap();
        assert_ne!(by_proto.status, Status::Ok as i32, "{what}: refused");
        assert_eq!(
            (by_json.status, &by_json.message, by_json.retry_after_ms),
            (by_proto.status, &by_proto.message, by_proto.retry_after_ms),
            "{what}"
        );
    }

    // Before authentication too: a malformed name, a taken one, a wrong
    // password. Each on its own socket, as failures count towards a close.
    let taken = bob.username.clone();
    let attempts = [
        Request::Register(proto::Register {
            username: "x".into(),
            password: PASSWORD.into(),
        }),
        Request::Register(proto::Register {
            username: taken.clone(),
            password: PASSWORD.into(),
        }),
        Request::Login(proto::Login {
            username: taken,
            password: "not-the-password".into(),
        }),
        Request::Resume(proto::Resume {
            token: Bytes::from_static(&[7; 32]),
        }),
    ];
    for request in attempts {
        let (p, _pe) = app.connect_as(PROTO).await;
        let (j, _je) = app.connect_as(JSON).await;
        let by_proto = p.request_raw(request.clone()).await.unwrap();
        let by_json = j.request_raw(request.clone()).await.unwrap();
        assert_ne!(by_proto.status, Status::Ok as i32, "{request:?}");
        assert_eq!(
            (by_json.status, &by_json.message),
            (by_proto.status, &by_proto.message),
            "{request:?}"
        );
    }
}

/// Every limit holds under JSON as under protobuf: the send rate, with its
/// retry hint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_senders_are_rate_limited_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.limits.rates.send_burst = 3.0;
        // Slow enough that no token comes back during the test, however
        // loaded the host.
        c.limits.rates.send_rate_per_sec = 0.01;
    })
    .await;
    let (alice, _ae, _) = app.register_live_as(JSON, &unique("alice")).await;
    let (_bob, _be, bob) = app.register_as(PROTO, &unique("bob")).await;
    for _ in 0..3 {
        alice.send(text(bob.user_id, "ok")).await.unwrap();
    }
    match alice.send(text(bob.user_id, "too many")).await.unwrap_err() {
        ClientError::Status {
            status,
            retry_after,
            ..
        } => {
            assert_eq!(status, Status::RateLimited);
            let retry = retry_after.expect("a retry-after in JSON too");
            assert!(retry > std::time::Duration::ZERO);
        }
        other => panic!("{other}"),
    }
}

// ---------------------------------------------------------- the wire itself

/// A raw JSON socket, frames written and read as text.
struct Raw {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Raw {
    async fn send(&mut self, frame: &str) {
        self.ws
            .send(WsMessage::Text(frame.into()))
            .await
            .expect("send a frame");
    }

    /// The next frame, as JSON; panics on a binary frame or after [`WAIT`].
    async fn next(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .expect("a frame");
            match message {
                WsMessage::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }
}

/// A JSON socket as a tool like websocat opens it: Basic credentials and
/// the subprotocol on the upgrade, frames typed by hand. Checks the wire
/// format itself (names, base64, enums by name, 64-bit integers as
/// strings, the lenient forms accepted) with a protobuf client at the
/// other end. The README's session is this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_typed_json_session_with_a_protobuf_peer() {
    let app = spawn_app().await;
    let (_, _, alice) = app.register(&unique("alice")).await;
    let (bob, mut bob_events, bob_auth) = app.register_live_as(PROTO, &unique("bob")).await;

    let mut request = app.url.as_str().into_client_request().unwrap();
    let basic = STANDARD.encode(format!("{}:{PASSWORD}", alice.username));
    let headers = request.headers_mut();
    headers.insert("authorization", format!("Basic {basic}").parse().unwrap());
    headers.insert("sec-websocket-protocol", "relay.v1.json".parse().unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "relay.v1.json"
    );
    let mut raw = Raw { ws };
    let b64 = |id: Uuid| STANDARD.encode(id.as_bytes());
    assert_eq!(raw.next().await, json!({"push": {"queueEmpty": {}}}));

    raw.send(r#"{"requestId": "1", "whoAmI": {}}"#).await;
    assert_eq!(
        raw.next().await,
        json!({"response": {"requestId": "1", "status": "OK",
            "whoAmI": {"userId": b64(alice.user_id), "username": alice.username}}})
    );

    // Alice (JSON) to Bob (protobuf): he gets it, acks, she hears DELIVERED.
    raw.send(&format!(
        r#"{{"requestId": "2", "sendMessage": {{"recipientId": "{}", "type": "CIPHERTEXT",
            "content": "aGVsbG8=", "clientTimestampMs": 1700000000000}}}}"#,
        b64(bob_auth.user_id)
    ))
    .await;
    let envelope = next_delivery(&mut bob_events).await;
    assert_eq!(envelope.content.as_ref(), b"hello");
    assert_eq!(envelope.client_timestamp_ms, 1_700_000_000_000);
    bob.ack(&[id_of(&envelope)]).await.unwrap();
    assert_eq!(
        raw.next().await,
        json!({"response": {"requestId": "2", "status": "OK",
            "send": {"messageId": b64(id_of(&envelope)), "outcome": "DELIVERED"}}})
    );

    // Bob (protobuf) to Alice (JSON): the push as she sees it.
    let reply = tokio::spawn({
        let bob = bob.clone();
        let mut message = text(alice.user_id, "hi alice");
        message.client_timestamp_ms = 1_700_000_000_001;
        async move { bob.send(message).await }
    });
    let push = raw.next().await;
    let deliver = &push["push"]["deliver"];
    let server_ts = deliver["serverTimestampMs"]
        .as_str()
        .expect("64-bit integers are strings");
    assert!(server_ts.parse::<u64>().unwrap() > 0);
    let message_id = deliver["messageId"].as_str().expect("base64 id").to_owned();
    assert_eq!(
        push,
        json!({"push": {"deliver": {"messageId": message_id,
            "senderId": b64(bob_auth.user_id), "senderUsername": bob_auth.username,
            "type": "CIPHERTEXT", "content": STANDARD.encode("hi alice"),
            "serverTimestampMs": server_ts, "clientTimestampMs": "1700000000001"}}})
    );
    // Acked with the lenient forms: URL-safe base64 without padding, a
    // number for the request id, the proto field name.
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(STANDARD.decode(&message_id).unwrap());
    raw.send(&format!(
        r#"{{"request_id": 3, "ackMessages": {{"message_ids": ["{url_safe}"]}}}}"#
    ))
    .await;
    assert_eq!(
        raw.next().await,
        json!({"response": {"requestId": "3", "status": "OK",
            "ack": {"acked": [message_id]}}})
    );
    assert_eq!(
        reply.await.unwrap().unwrap().outcome,
        SendOutcome::Delivered
    );

    // An invalid field: an error answer with its message; enums by name.
    raw.send(
        r#"{"requestId": "4", "sendMessage": {"recipientId": "AQID", "type": 1, "content": "eA"}}"#,
    )
    .await;
    assert_eq!(
        raw.next().await,
        json!({"response": {"requestId": "4", "status": "BAD_REQUEST",
            "message": "recipient_id must be a 16-byte UUID, got 3 bytes"}})
    );
    raw.send(r#"{"requestId": "5"}"#).await;
    assert_eq!(
        raw.next().await,
        json!({"response": {"requestId": "5", "status": "BAD_REQUEST",
            "message": "frame carries no request"}})
    );
}

// ------------------------------------------------- the encodings together

/// Alice speaks `a`, Bob speaks `b`: every request kind made in one
/// encoding is seen, with its effects, from the other.
async fn every_request_kind_across(a: Encoding, b: Encoding) {
    let app = spawn_app().await;
    let v = vectors();

    // Register in each; log in and resume across.
    let (alice, mut alice_events, alice_auth) = app.register_live_as(a, &unique("alice")).await;
    let (bob_first, mut bob_first_events, bob_auth) = app.register_live_as(b, &unique("bob")).await;
    let (login_client, _login_events) = app.connect_as(a).await;
    let login = login_client
        .login(&bob_auth.username, PASSWORD)
        .await
        .expect("an account made in one encoding logs in from the other");
    assert_eq!(login.user_id, bob_auth.user_id);
    assert_eq!(close_info(&mut bob_first_events).await.code, Some(4409));
    drop(bob_first);
    let (bob, mut bob_events) = app.resume_as(b, &login.token).await;
    expect_queue_empty(&mut bob_events).await;
    assert_eq!(bob.who_am_i().await.unwrap().username, bob_auth.username);
    assert_eq!(
        alice.who_am_i().await.unwrap().user_id.as_ref(),
        alice_auth.user_id.as_bytes()
    );

    // A lookup from either encoding finds the other's user, keys not yet
    // published.
    let found = alice.lookup_user(&bob_auth.username).await.unwrap();
    assert_eq!(
        (found.user_id, &found.username, &found.identity_key),
        (bob_auth.user_id, &bob_auth.username, &None)
    );
    assert_eq!(
        bob.lookup_user(&alice_auth.username).await.unwrap().user_id,
        alice_auth.user_id
    );

    // Keys uploaded in one encoding are fetched in the other, both ways;
    // counts and the low-keys push follow.
    alice
        .upload_keys(vector_upload(&v["valid"][1]))
        .await
        .unwrap();
    bob.upload_keys(vector_upload(&v["valid"][2]))
        .await
        .unwrap();
    let alice_bundle = bob.fetch_bundle(alice_auth.user_id).await.unwrap();
    assert_bundle_is_vector(&alice_bundle, &v["valid"][1], &alice_auth);
    assert_low(next_event(&mut alice_events).await, 2, 1);
    let bob_bundle = alice
        .fetch_bundle_by_username(&bob_auth.username)
        .await
        .unwrap();
    assert_bundle_is_vector(&bob_bundle, &v["valid"][2], &bob_auth);
    assert_low(next_event(&mut bob_events).await, 2, 1);
    // Looked up across once published: the identity key, and no one-time
    // key consumed (the counts below are what the two fetches left).
    let found = bob.lookup_user(&alice_auth.username).await.unwrap();
    assert_eq!(
        found.identity_key.as_deref(),
        Some(alice_bundle.identity_key.as_ref())
    );
    let found = alice.lookup_user(&bob_auth.username).await.unwrap();
    assert_eq!(
        found.identity_key.as_deref(),
        Some(bob_bundle.identity_key.as_ref())
    );
    let counted = alice.pre_key_count().await.unwrap();
    assert_eq!((counted.one_time_pre_keys, counted.kyber_pre_keys), (2, 1));

    // Live messages both ways, acked by the recipient in its encoding.
    for (from, to, to_events, to_id) in [
        (&alice, &bob, &mut bob_events, bob_auth.user_id),
        (&bob, &alice, &mut alice_events, alice_auth.user_id),
    ] {
        let send = tokio::spawn({
            let from = from.clone();
            let mut message = Outgoing::new(to_id, vec![0u8, 0xff, 0x80, b'"', b'\\']);
            message.envelope_type = EnvelopeType::PrekeyBundle;
            message.client_message_id = Some(Bytes::from_static(&[0xfe; 64]));
            async move { from.send(message).await }
        });
        let envelope = next_delivery(to_events).await;
        assert_eq!(envelope.content.as_ref(), &[0u8, 0xff, 0x80, b'"', b'\\']);
        assert_eq!(envelope.r#type, EnvelopeType::PrekeyBundle as i32);
        to.ack(&[id_of(&envelope)]).await.unwrap();
        let sent = send.await.unwrap().unwrap();
        assert_eq!(sent.outcome, SendOutcome::Delivered);
        assert_eq!(sent.message_id, id_of(&envelope));
    }

    // Stored for Bob, drained and acked in his encoding, receipted to
    // Alice in hers.
    bob.close().await;
    bob.closed().await;
    drop(bob_events);
    let queued = alice.send(text(bob_auth.user_id, "stored")).await.unwrap();
    assert_eq!(queued.outcome, SendOutcome::Queued);
    let (bob, mut bob_events) = app.resume_as(b, &login.token).await;
    let stored = next_delivery(&mut bob_events).await;
    assert_eq!(stored.content.as_ref(), b"stored");
    expect_queue_empty(&mut bob_events).await;
    bob.ack(&[id_of(&stored)]).await.unwrap();
    let receipt = next_event(&mut alice_events).await;
    assert_eq!(receipt.receipt_for(), Some(queued.message_id));
    let Event::Deliver(receipt) = receipt else {
        unreachable!()
    };
    assert_eq!(alice.ack(&[id_of(&receipt)]).await.unwrap().0.len(), 1);

    // Logout in Alice's encoding revokes the token for Bob's.
    let (alice_again, mut alice_again_events) = app.connect_as(b).await;
    let alice_login = alice_again
        .login(&alice_auth.username, PASSWORD)
        .await
        .unwrap();
    assert_eq!(close_info(&mut alice_events).await.code, Some(4409));
    drop(alice);
    let (alice, mut alice_events) = app.resume_as(a, &alice_login.token).await;
    assert_eq!(close_info(&mut alice_again_events).await.code, Some(4409));
    alice.logout().await.unwrap();
    assert_eq!(close_info(&mut alice_events).await.code, Some(1000));
    let (late, _late_events) = app.connect_as(b).await;
    assert_eq!(
        late.resume(&alice_login.token).await.unwrap_err().status(),
        Some(Status::Unauthorized)
    );

    // Deleting Bob's account in his encoding: gone for Alice in hers.
    bob.delete_account(PASSWORD).await.unwrap();
    assert_eq!(close_info(&mut bob_events).await.code, Some(1000));
    let (alice, _alice_events) = app.resume_as(a, &alice_auth.token).await;
    assert_eq!(
        alice
            .fetch_bundle(bob_auth.user_id)
            .await
            .unwrap_err()
            .status(),
        Some(Status::NotFound)
    );
    assert_eq!(
        alice
            .send(text(bob_auth.user_id, "anyone?"))
            .await
            .unwrap_err()
            .status(),
        Some(Status::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_kind_from_json_to_protobuf() {
    every_request_kind_across(JSON, PROTO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_kind_from_protobuf_to_json() {
    every_request_kind_across(PROTO, JSON).await;
}
