//! Connection hygiene: the HTTP upgrade, frame checks, displacement, idle
//! timeout and the connection cap.

use signal_relay::client::{Client, ClientError, ConnectOptions};
use signal_relay::proto::Status;
use signal_relay::proto::client_frame::Request;
use signal_relay::testing::{spawn_app, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::helpers::{WAIT, close_code, exchange, expect_queue_empty, wait_until};

async fn http_status(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("server answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_wrong_paths_get_http_errors() {
    let app = spawn_app().await;
    let status = http_status(app.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    let status = http_status(app.addr, "GET /v1/websocket HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 426"), "{status}");
    let status = http_status(app.addr, "POST /v1/websocket HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 405"), "{status}");
    let status = http_status(app.addr, "garbage\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    let other = format!("ws://{}/other", app.addr);
    match Client::connect(&other).await {
        Err(ClientError::Http { status, .. }) => assert_eq!(status, 404),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("upgraded on the wrong path"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_frames_close_with_1003() {
    let app = spawn_app().await;
    let (client, mut events, _) = app.register("alice").await;
    expect_queue_empty(&mut events).await;
    client
        .send_ws(WsMessage::Text("hello".into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut events).await, Some(1003));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_with_1007() {
    let app = spawn_app().await;
    let (client, mut events) = app.connect().await;
    client
        .send_ws(WsMessage::Binary(vec![0xff; 8].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut events).await, Some(1007));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_close_with_1009() {
    let app = spawn_app_with(|c| c.limits.connection.max_frame_bytes = 4096).await;
    let (client, mut events, _) = app.register("alice").await;
    expect_queue_empty(&mut events).await;
    client
        .send_ws(WsMessage::Binary(vec![0u8; 4097].into()))
        .await
        .unwrap();
    assert_eq!(close_code(&mut events).await, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_fields_get_an_error_and_the_socket_survives() {
    let app = spawn_app().await;
    let (client, mut events, _) = app.register("alice").await;
    expect_queue_empty(&mut events).await;
    let bad = Request::SendMessage(signal_relay::proto::SendMessage {
        recipient_id: vec![1, 2, 3].into(),
        r#type: 1,
        content: vec![1].into(),
        ..Default::default()
    });
    match client.request(bad).await.unwrap_err() {
        ClientError::Status {
            status, message, ..
        } => {
            assert_eq!(status, Status::BadRequest);
            assert!(message.contains("recipient_id"), "{message}");
        }
        other => panic!("{other}"),
    }
    // An empty frame decodes to a ClientFrame without a request: an error
    // response (for request id 0), and the socket stays open.
    client
        .send_ws(WsMessage::Binary(Vec::new().into()))
        .await
        .unwrap();
    assert_eq!(client.who_am_i().await.unwrap().username, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_displaces_the_first_with_4409() {
    let app = spawn_app().await;
    let (first, mut first_events, auth) = app.register("alice").await;
    expect_queue_empty(&mut first_events).await;
    let (second, mut second_events) = app.resume(&auth.token).await;
    expect_queue_empty(&mut second_events).await;
    assert_eq!(close_code(&mut first_events).await, Some(4409));
    assert!(first.who_am_i().await.is_err());
    assert_eq!(second.who_am_i().await.unwrap().username, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_closed_after_the_idle_timeout() {
    let app = spawn_app_with(|c| c.limits.connection.idle_timeout_secs = 1).await;
    let (_c, _e, auth) = app.register("alice").await;
    let token = {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&auth.token)
    };
    // A raw socket that authenticates at upgrade and then only listens: it
    // never answers the server's pings, as a dead peer would not.
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the silent socket")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // An unmasked server close frame: 0x88, length, code 1001 (0x03e9).
    let close = bytes
        .windows(4)
        .position(|w| w[0] == 0x88 && w[2] == 0x03 && w[3] == 0xe9)
        .expect("a close frame with code 1001");
    assert!(bytes[close..].windows(12).any(|w| w == b"idle timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_answers_503() {
    let app = spawn_app_with(|c| c.limits.connection.max_connections = 2).await;
    let (_a, mut ae, _) = app.register("alice").await;
    let (b, mut be, _) = app.register("bob").await;
    expect_queue_empty(&mut ae).await;
    expect_queue_empty(&mut be).await;
    match Client::connect_with(&app.url, ConnectOptions::default()).await {
        Err(ClientError::Http { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("over the cap"),
    }
    // A slot frees when a connection ends.
    b.close().await;
    b.closed().await;
    wait_until("a connection slot frees", || async {
        match Client::connect(&app.url).await {
            Ok((client, _events)) => client.login("bob", "password123").await.is_ok(),
            Err(ClientError::Http { status: 503, .. }) => false,
            Err(e) => panic!("{e}"),
        }
    })
    .await;
}

/// A socket that upgraded while there was room, but tries to authenticate
/// once every slot is taken, is told so and closed with 1013.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticating_into_a_full_server_closes_with_1013() {
    let app = spawn_app_with(|c| c.limits.connection.max_connections = 1).await;
    let (late, mut late_events) = app.connect().await;
    let (_a, mut ae, _) = app.register("alice").await;
    expect_queue_empty(&mut ae).await;
    let err = late.login("alice", "password123").await.unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable));
    assert_eq!(close_code(&mut late_events).await, Some(1013));
}

/// The request head may be 8 KiB (its closing blank line included), as
/// documented, and not a byte more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_head_limit_is_8_kib() {
    let app = spawn_app().await;
    let head_of = |len: usize| {
        let start = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let mut head = start.to_vec();
        head.resize(len - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        head
    };
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let response = exchange(&mut stream, &head_of(8 * 1024)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let response = exchange(&mut stream, &head_of(8 * 1024 + 1)).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
}

/// Graceful shutdown ends when the work does, not at the grace deadline:
/// the storage reader's and store writers' tasks, which shutdown waits for,
/// must stop once the last connection has gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_the_grace_deadline() {
    let mut app = spawn_app_with(|c| c.limits.housekeeping.shutdown_grace_secs = 600).await;
    let (alice, _alice_events, auth) = app.register_live("alice").await;
    alice.close().await;
    // A reconnect exercises the reader (session lookup and drain read).
    let (_again, mut again_events) = app.resume(&auth.token).await;
    expect_queue_empty(&mut again_events).await;
    tokio::time::timeout(WAIT, app.stop())
        .await
        .expect("the server stopped without waiting for its grace deadline");
}

/// Session lookups are batched, so two resumes with the same token can be
/// answered by one statement: both must authenticate (the later connection
/// then displaces the earlier, as usual).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_token_twice_at_once_authenticates_both() {
    let app = spawn_app_with(|c| c.limits.reader.db_readers = 1).await;
    let (alice, _alice_events, auth) = app.register_live("alice").await;
    alice.close().await;
    for _ in 0..5 {
        let ((first, _fe), (second, _se)) =
            tokio::join!(app.resume(&auth.token), app.resume(&auth.token));
        first.close().await;
        second.close().await;
    }
}
