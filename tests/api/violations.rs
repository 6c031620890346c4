//! WebSocket protocol violations: each is answered with the close frame
//! RFC 6455 asks for (1002, or 1007 for text that is not UTF-8) before the
//! socket closes, whether it comes before authentication or in a session;
//! and a peer's own close frame is answered. Raw bytes on a TCP socket
//! after a real upgrade, since no WebSocket library sends these.

use signal_relay::testing::spawn_app;

use crate::helpers::{BINARY, CLOSE, Raw, frame, masked_header};

/// The opcodes the tests use.
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const PING: u8 = 0x9;

/// The same frame, unmasked, as only a server may send it.
fn unmasked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = masked_header(true, 0, opcode, payload.len());
    bytes[1] &= 0x7f;
    bytes.extend_from_slice(payload);
    bytes
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason);
    payload
}

/// Each violation, with the close code it must get.
fn violations() -> Vec<(&'static str, Vec<u8>, u16)> {
    let mut fragmented_then_new = frame(false, 0, BINARY, b"first half");
    fragmented_then_new.extend(frame(true, 0, BINARY, b"not a continuation"));
    vec![
        ("an unmasked frame", unmasked(BINARY, b"hello"), 1002),
        ("RSV1 set", frame(true, 0b100, BINARY, b"hello"), 1002),
        ("RSV3 set", frame(true, 0b001, PING, b""), 1002),
        ("an oversize ping", frame(true, 0, PING, &[7; 126]), 1002),
        ("a fragmented ping", frame(false, 0, PING, b"x"), 1002),
        (
            "an orphan continuation",
            frame(true, 0, CONTINUATION, b"x"),
            1002,
        ),
        ("a reserved data opcode", frame(true, 0, 0x3, b"x"), 1002),
        ("a reserved control opcode", frame(true, 0, 0xb, b""), 1002),
        (
            "a new message inside a fragmented one",
            fragmented_then_new,
            1002,
        ),
        (
            "close code 999",
            frame(true, 0, CLOSE, &close_payload(999, b"")),
            1002,
        ),
        (
            "a one-byte close payload",
            frame(true, 0, CLOSE, &[3]),
            1002,
        ),
        (
            "a close reason that is not UTF-8",
            frame(true, 0, CLOSE, &close_payload(1000, &[0xff, 0xfe])),
            1007,
        ),
        (
            "a text frame that is not UTF-8",
            frame(true, 0, TEXT, &[0xc3, 0x28]),
            1007,
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_before_authentication_get_a_close_frame() {
    let app = spawn_app().await;
    for (what, bytes, code) in violations() {
        let mut raw = Raw::upgrade(&app, None).await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, code, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_in_a_session_get_a_close_frame() {
    let app = spawn_app().await;
    let (client, _events, auth) = app.register("alice").await;
    client.close().await;
    for (what, bytes, code) in violations() {
        let mut raw = Raw::upgrade(&app, Some(&auth.token)).await;
        raw.send(&bytes).await;
        assert_eq!(raw.close_code().await, code, "{what}");
    }
}

/// RFC 6455 section 5.5.1: an endpoint that receives a close frame sends
/// one back. The relay echoes the peer's code, in a session and before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_close_is_answered() {
    let app = spawn_app().await;
    let (client, _events, auth) = app.register("alice").await;
    client.close().await;
    for token in [None, Some(&auth.token[..])] {
        let mut raw = Raw::upgrade(&app, token).await;
        raw.send(&frame(true, 0, CLOSE, &close_payload(1000, b"bye")))
            .await;
        assert_eq!(
            raw.close_code().await,
            1000,
            "authenticated: {}",
            token.is_some()
        );
    }
}
