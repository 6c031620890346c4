//! Abuse from one client or many: password guessing (per-address and
//! per-account limits on every password path), one address flooding the
//! Argon2 queue, password checks of sockets that left, silent sockets
//! filling the connection slots. Distinct client addresses are distinct
//! loopback addresses (127.0.0.N), which the server sees as TCP peers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use signal_relay::client::{Client, ClientError, ConnectOptions};
use signal_relay::proto::Status;
use signal_relay::testing::{TestApp, spawn_app_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    BINARY, CLOSE, Raw, WAIT, connect_from, exchange, expect_queue_empty, frame, metric, tcp_from,
    wait_until,
};

/// The status and retry hint of a refused request.
fn refusal(err: ClientError) -> (Status, Option<Duration>) {
    match err {
        ClientError::Status {
            status,
            retry_after,
            ..
        } => (status, retry_after),
        other => panic!("expected a status error, got {other}"),
    }
}

/// A `Basic` upgrade from `127.0.0.N`, raw, so the answer's headers show.
async fn basic_upgrade_from(app: &TestApp, n: u8, user: &str, password: &str) -> String {
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let request = format!(
        "GET /v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Basic {credentials}\r\n\r\n"
    );
    let mut stream = tcp_from(app.addr, n).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    // A refusal is answered and closed; an upgrade is not closed, so read
    // only the head.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap() == 1 {
            head.push(byte[0]);
        }
    })
    .await
    .expect("an answer to the upgrade");
    String::from_utf8_lossy(&head).into_owned()
}

/// One address gets its burst of password attempts, then `RATE_LIMITED`
/// with a retry hint, on every password path (login, register, the Basic
/// header), right or wrong; another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_attempts_are_limited_per_address() {
    let app = spawn_app_with(|c| {
        let auth = &mut c.limits.auth;
        auth.password_address_rate_per_sec = 0.001;
        auth.password_address_burst = 3.0;
    })
    .await;
    let (owner, _e) = connect_from(&app, 9).await;
    owner.register("alice", "password123").await.unwrap();

    // Three attempts from 127.0.0.2: a right one, two wrong ones.
    let (c, _e) = connect_from(&app, 2).await;
    c.login("alice", "password123").await.unwrap();
    for _ in 0..2 {
        let (c, _e) = connect_from(&app, 2).await;
        let err = c.login("alice", "wrong password").await.unwrap_err();
        assert_eq!(refusal(err).0, Status::Unauthorized);
    }
    // Now every password path from 127.0.0.2 is refused before hashing.
    let (c, _e) = connect_from(&app, 2).await;
    let (status, retry) = refusal(c.login("alice", "password123").await.unwrap_err());
    assert_eq!(status, Status::RateLimited);
    assert!(retry.is_some_and(|r| r > Duration::ZERO), "{retry:?}");
    let (c, _e) = connect_from(&app, 2).await;
    let (status, _) = refusal(c.register("mallory", "password123").await.unwrap_err());
    assert_eq!(status, Status::RateLimited);
    let head = basic_upgrade_from(&app, 2, "alice", "password123").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains("Retry-After: "), "{head}");

    // Another address is not limited by 127.0.0.2's attempts.
    let (c, _e) = connect_from(&app, 3).await;
    c.login("alice", "password123").await.unwrap();
    let head = basic_upgrade_from(&app, 3, "alice", "password123").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let limited = metric(
        &app,
        r#"relay_rate_limited_total{limit="password_address"}"#,
    )
    .await;
    assert_eq!(limited, 3.0);
}

/// An attempt the limits refuse is refused before the account is looked
/// up: a flood of refused guesses costs the database nothing. With the
/// users table locked, a login from the limited address is still answered
/// `RATE_LIMITED` at once (it used to wait for the lock, as it waited for a
/// pool connection when refused guesses had taken them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_attempt_does_not_reach_the_database() {
    let app = spawn_app_with(|c| {
        let auth = &mut c.limits.auth;
        auth.password_address_rate_per_sec = 0.001;
        auth.password_address_burst = 1.0;
    })
    .await;
    let (owner, _e) = connect_from(&app, 9).await;
    owner.register("alice", "password123").await.unwrap();
    let (c, _e) = connect_from(&app, 2).await;
    let err = c.login("alice", "wrong password").await.unwrap_err();
    assert_eq!(refusal(err).0, Status::Unauthorized);

    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    for n in [2, 2] {
        let (c, _e) = connect_from(&app, n).await;
        let refused = tokio::time::timeout(WAIT, c.login("alice", "password123"))
            .await
            .expect("refused without waiting for the database");
        assert_eq!(refusal(refused.unwrap_err()).0, Status::RateLimited);
    }
    lock.rollback().await.unwrap();
    let (c, _e) = connect_from(&app, 3).await;
    c.login("alice", "password123").await.unwrap();
}

/// Guesses against one account from many addresses drain its bucket: its
/// password logins wait, whoever tries (the documented trade-off), while
/// the owner's own right logins never drain it and a session token still
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_limit_the_account_but_not_its_tokens() {
    let app = spawn_app_with(|c| {
        let auth = &mut c.limits.auth;
        auth.password_account_rate_per_sec = 0.001;
        auth.password_account_burst = 3.0;
    })
    .await;
    let (_owner, _e, registered) = app.register("alice").await;
    // Right passwords give their token back: the owner logs in often.
    for _ in 0..5 {
        let (c, _e) = connect_from(&app, 2).await;
        c.login("alice", "password123").await.unwrap();
    }
    // Three wrong guesses, each from its own address, in any case.
    for (n, name) in [(10, "alice"), (11, "ALICE"), (12, "Alice")] {
        let (c, _e) = connect_from(&app, n).await;
        let err = c.login(name, "guess-guess").await.unwrap_err();
        assert_eq!(refusal(err).0, Status::Unauthorized);
    }
    let (c, _e) = connect_from(&app, 13).await;
    let (status, retry) = refusal(c.login("alice", "guess-guess").await.unwrap_err());
    assert_eq!(status, Status::RateLimited);
    assert!(retry.is_some());
    let (c, _e) = connect_from(&app, 2).await;
    let (status, _) = refusal(c.login("alice", "password123").await.unwrap_err());
    assert_eq!(
        status,
        Status::RateLimited,
        "the owner's password waits too"
    );
    let (resumed, mut events) = app.resume(&registered.token).await;
    expect_queue_empty(&mut events).await;
    assert_eq!(resumed.who_am_i().await.unwrap().username, "alice");
    // Other accounts are not limited.
    let (_bob, _e, _) = app.register("bob").await;
    let (c, _e) = connect_from(&app, 13).await;
    c.login("bob", "password123").await.unwrap();
}

/// The account's bucket holds on the `Basic` header too: wrong guesses
/// there drain it, and then the header is refused (429) like a login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_basic_headers_limit_the_account_too() {
    let app = spawn_app_with(|c| {
        let auth = &mut c.limits.auth;
        auth.password_account_rate_per_sec = 0.001;
        auth.password_account_burst = 2.0;
    })
    .await;
    let (_owner, _e, _) = app.register("alice").await;
    for n in [20, 21] {
        let head = basic_upgrade_from(&app, n, "alice", "guess-guess").await;
        assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    }
    let head = basic_upgrade_from(&app, 22, "alice", "password123").await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains("Retry-After: "), "{head}");
    let (c, _e) = connect_from(&app, 23).await;
    let (status, _) = refusal(c.login("alice", "password123").await.unwrap_err());
    assert_eq!(status, Status::RateLimited);
    let limited = metric(
        &app,
        r#"relay_rate_limited_total{limit="password_account"}"#,
    )
    .await;
    assert_eq!(limited, 2.0);
}

/// One Argon2 worker. The per-address limits stay raised (as for every
/// test), so a flood from one address reaches the queue and the queue's
/// fairness alone is tested.
fn one_hasher(config: &mut signal_relay::Config) {
    config.limits.auth.argon2_concurrency = 1;
}

/// `n` sockets from `127.0.0.2`, each with one wrong password check
/// waiting; resolves once the server's Argon2 queue holds `queued` of them.
/// Each socket's answer bumps `answered`.
async fn flood(
    app: &TestApp,
    n: usize,
    queued: f64,
    answered: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Client>> {
    flood_pipelining(app, n, queued, answered, 0).await
}

/// [`flood`], each socket pipelining `behind` more requests behind its
/// login.
async fn flood_pipelining(
    app: &TestApp,
    n: usize,
    queued: f64,
    answered: &Arc<AtomicUsize>,
    behind: usize,
) -> Vec<tokio::task::JoinHandle<Client>> {
    let mut floods = Vec::new();
    for i in 0..n {
        let (client, events) = connect_from(app, 2).await;
        let answered = answered.clone();
        floods.push(tokio::spawn(async move {
            // A different unknown name each: no account bucket runs dry.
            let name = format!("nobody_{i}");
            let login = client.login(&name, "wrong password");
            let pipelined = futures::future::join_all((0..behind).map(|_| client.who_am_i()));
            let _ = futures::future::join(login, pipelined).await;
            answered.fetch_add(1, Ordering::SeqCst);
            drop(events);
            client
        }));
    }
    wait_until("the flood fills the Argon2 queue", || async {
        metric(app, "relay_argon2_queue_depth").await >= queued
    })
    .await;
    floods
}

/// One address with a hundred password checks waiting makes another
/// address's login wait for a few hashes, not a hundred: the queue serves
/// addresses in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_delays_another_by_a_few_hashes() {
    let app = spawn_app_with(one_hasher).await;
    let (_alice, _e, _) = app.register("alice").await;
    let answered = Arc::new(AtomicUsize::new(0));
    let floods = flood(&app, 100, 90.0, &answered).await;

    let (legit, _e) = connect_from(&app, 3).await;
    let start = answered.load(Ordering::SeqCst);
    legit.login("alice", "password123").await.unwrap();
    let meanwhile = answered.load(Ordering::SeqCst) - start;
    assert!(
        meanwhile <= 6,
        "{meanwhile} of the flood's checks ran before the other address's one"
    );
    for flood in floods {
        flood.await.unwrap();
    }
}

/// A password check queued by a socket that closed is skipped, not run:
/// the queue empties at once, and the next login does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_of_closed_sockets_are_skipped() {
    checks_of_closed_sockets_are_skipped(0).await;
}

/// A socket that pipelined a request behind its login is still watched
/// while the check waits: when it closes, the check is skipped too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checks_of_closed_sockets_that_pipelined_are_skipped() {
    checks_of_closed_sockets_are_skipped(2).await;
}

/// A flood whose sockets each pipeline `behind` requests behind their login
/// closes; their queued checks are skipped, and a login after them passes.
async fn checks_of_closed_sockets_are_skipped(behind: usize) {
    let app = spawn_app_with(one_hasher).await;
    let (_alice, _e, _) = app.register("alice").await;
    let answered = Arc::new(AtomicUsize::new(0));
    let floods = flood_pipelining(&app, 60, 50.0, &answered, behind).await;
    // The flood's sockets close; their answers never come.
    for flood in &floods {
        flood.abort();
    }
    for flood in floods {
        let _ = flood.await;
    }
    wait_until("the closed sockets' checks are skipped", || async {
        metric(&app, "relay_argon2_abandoned_total").await >= 40.0
    })
    .await;
    let (legit, _e) = connect_from(&app, 3).await;
    legit.login("alice", "password123").await.unwrap();
}

/// A socket that pipelines more than the budget behind a waiting check is
/// closed (1008) and its check withdrawn, rather than left unwatched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_past_the_budget_before_authentication_closes_the_socket() {
    let app = spawn_app_with(|c| {
        one_hasher(c);
        c.limits.auth.max_early_bytes = 0;
    })
    .await;
    let answered = Arc::new(AtomicUsize::new(0));
    // Checks that keep the one hasher busy, so this one is still waiting
    // when the pipelined requests arrive.
    let floods = flood(&app, 30, 25.0, &answered).await;
    let (client, mut events) = connect_from(&app, 3).await;
    // The first pipelined request is held whatever its size, the second
    // is over a budget of nothing.
    let (login, _, _) = tokio::join!(
        client.login("nobody", "wrong password"),
        client.who_am_i(),
        client.who_am_i()
    );
    assert!(login.is_err());
    let closed = tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("the socket is closed");
    assert_eq!(closed.code, Some(1008));
    assert_eq!(closed.reason, "too much sent before authentication");
    for flood in floods {
        flood.abort();
    }
}

/// Empty frames are not free to hold: each is charged its place in the
/// queue, so a stream of them behind a waiting check meets the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_frames_pipelined_before_authentication_count_too() {
    let app = spawn_app_with(|c| {
        one_hasher(c);
        c.limits.auth.max_early_bytes = 4096;
    })
    .await;
    let answered = Arc::new(AtomicUsize::new(0));
    let floods = flood(&app, 30, 25.0, &answered).await;
    let mut raw = Raw::upgrade_on(tcp_from(app.addr, 3).await, None).await;
    let mut bytes = wrong_login_frame();
    for _ in 0..1000 {
        bytes.extend(frame(true, 0, BINARY, &[]));
    }
    raw.send(&bytes).await;
    assert_eq!(raw.close_code().await, 1008);
    for flood in floods {
        flood.abort();
    }
}

/// A masked binary frame with a `Login` for an unknown user.
fn wrong_login_frame() -> Vec<u8> {
    use prost::Message as _;
    use signal_relay::proto::{ClientFrame, Login, client_frame::Request};
    let login = ClientFrame {
        request_id: 1,
        request: Some(Request::Login(Login {
            username: "nobody".into(),
            password: "wrong password".into(),
        })),
    }
    .encode_to_vec();
    frame(true, 0, BINARY, &login)
}

/// A protocol violation pipelined behind a waiting check closes the socket
/// at once and withdraws the check, rather than ending the watch: the
/// first frame the client sees is the close, not the login's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_violation_behind_a_waiting_check_closes_at_once() {
    let app = spawn_app_with(one_hasher).await;
    let answered = Arc::new(AtomicUsize::new(0));
    // Checks that keep the one hasher busy, so this one is still waiting
    // when the violation arrives.
    let floods = flood(&app, 30, 25.0, &answered).await;
    let mut raw = Raw::upgrade_on(tcp_from(app.addr, 3).await, None).await;
    let mut bytes = wrong_login_frame();
    // A text frame, which the protobuf encoding does not take.
    bytes.extend(frame(true, 0, 0x1, b"hello"));
    raw.send(&bytes).await;
    let (opcode, payload) = raw.next_frame().await;
    assert_eq!(opcode, CLOSE, "the close comes first, not an answer");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1003);
    for flood in floods {
        flood.abort();
    }
}

/// On the header path the socket is watched until the check answers: a
/// client that sends more than a request head's worth before its answer
/// (which RFC 6455 forbids) is dropped, its check withdrawn, rather than
/// left unwatched and answered when the check is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_check_whose_client_sends_on_is_withdrawn() {
    let app = spawn_app_with(one_hasher).await;
    let credentials = base64::engine::general_purpose::STANDARD.encode("nobody:wrong password");
    let request = format!(
        "GET /v1/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Authorization: Basic {credentials}\r\n\r\n"
    );
    let mut stream = tcp_from(app.addr, 4).await;
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(&[0u8; 9 * 1024]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("the server drops the socket");
    // Dropped with unread bytes: a reset, or an end with nothing.
    assert!(
        read.is_err() || answer.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// A socket that sends its request head slowly gets 408 at the handshake
/// timeout, not silence at the (longer) auth timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_gets_408() {
    let app = spawn_app_with(|c| c.limits.connection.handshake_timeout_secs = 1).await;
    let mut stream = tcp_from(app.addr, 2).await;
    let response = exchange(&mut stream, b"GET /v1/websocket HTTP/1.1\r\nHost: x\r\n").await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
}

/// Sockets that never authenticate hold only the unauthenticated budget:
/// with as many of them open as there are connection slots, authenticated
/// users still connect, up to the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_take_authenticated_slots() {
    let app = spawn_app_with(|c| {
        c.limits.connection.max_connections = 2;
        c.limits.connection.max_unauthenticated = 8;
    })
    .await;
    let mut silent = Vec::new();
    for n in 2..6 {
        silent.push(tcp_from(app.addr, n).await);
    }
    wait_until("the silent sockets are accepted", || async {
        metric(&app, "relay_connections_unauthenticated").await >= 4.0
    })
    .await;
    let (_a, mut ae, _) = app.register("alice").await;
    let (_b, mut be, _) = app.register("bob").await;
    expect_queue_empty(&mut ae).await;
    expect_queue_empty(&mut be).await;
    // The authenticated cap holds: a third is refused at the upgrade.
    match Client::connect_with(&app.url, ConnectOptions::default()).await {
        Err(ClientError::Http { status, .. }) => assert_eq!(status, 503),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("over the cap"),
    }
    drop(silent);
}

/// The unauthenticated budget and each address's share of it are
/// enforced at once, before anything is read: 429 for an address over its
/// share, 503 when the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_sockets_are_capped_per_address_and_in_all() {
    let app = spawn_app_with(|c| {
        c.limits.connection.max_unauthenticated = 3;
        c.limits.connection.max_unauthenticated_per_address = 2;
    })
    .await;
    let _a1 = tcp_from(app.addr, 2).await;
    let _a2 = tcp_from(app.addr, 2).await;
    let mut a3 = tcp_from(app.addr, 2).await;
    let response = exchange(&mut a3, b"").await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    let _b1 = tcp_from(app.addr, 3).await;
    let mut c1 = tcp_from(app.addr, 4).await;
    let response = exchange(&mut c1, b"").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let rejected = |reason: &str| {
        let app = &app;
        let series = format!(r#"relay_upgrades_rejected_total{{reason="{reason}"}}"#);
        async move { metric(app, &series).await }
    };
    assert_eq!(rejected("address_full").await, 1.0);
    assert_eq!(rejected("unauthenticated_full").await, 1.0);
}
