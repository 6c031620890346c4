//! Registration, login, sessions, logout, account deletion.

use signal_relay::client::{Client, ClientError, ConnectOptions};
use signal_relay::proto::Status;
use signal_relay::testing::{spawn_app, spawn_app_with};

use crate::helpers::{WAIT, close_code, expect_queue_empty};

fn status(err: ClientError) -> Status {
    err.status()
        .unwrap_or_else(|| panic!("expected a status error, got {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_resume_logout() {
    let app = spawn_app().await;
    let (client, mut events) = app.connect().await;
    let reg = client.register("alice", "correct horse").await.unwrap();
    assert_eq!(reg.username, "alice");
    assert_eq!(reg.token.len(), 32);
    assert!(reg.token_expires_at_ms > 0);
    expect_queue_empty(&mut events).await;
    let me = client.who_am_i().await.unwrap();
    assert_eq!(me.user_id.as_ref(), reg.user_id.as_bytes());

    let (login_client, _e) = app.connect().await;
    let login = login_client.login("ALICE", "correct horse").await.unwrap();
    assert_eq!(login.user_id, reg.user_id);
    assert_ne!(login.token, reg.token, "each login issues a new token");

    // Resume with the first token (on a new socket, displacing the login one).
    let (resumed, _e2) = app.resume(&reg.token).await;
    assert_eq!(resumed.who_am_i().await.unwrap().username, "alice");

    resumed.logout().await.unwrap();
    let (again, _e3) = app.connect().await;
    let err = again.resume(&reg.token).await.unwrap_err();
    assert_eq!(
        status(err),
        Status::Unauthorized,
        "a logged-out token is revoked"
    );
    // The other session is unaffected.
    let (other, _e4) = app.connect().await;
    other.resume(&login.token).await.unwrap();
}

/// Every way of authenticating states the largest message content the
/// relay accepts, so a client can refuse an oversize message before it
/// encrypts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_states_the_message_size_limit() {
    let app = spawn_app_with(|c| c.limits.messaging.max_message_bytes = 5_000).await;
    let (client, _events) = app.connect().await;
    let registered = client.register("alice", "correct horse").await.unwrap();
    let (other, _e) = app.connect().await;
    let logged_in = other.login("alice", "correct horse").await.unwrap();
    let (resumed, _e) = app.connect().await;
    let resumed = resumed.resume(&registered.token).await.unwrap();
    for auth in [registered, logged_in, resumed] {
        assert_eq!(auth.max_message_bytes, 5_000, "{auth:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_cap_revoke_the_oldest() {
    let app = spawn_app_with(|c| c.limits.auth.max_sessions_per_user = 3).await;
    // Registering issues the first session; three logins make four.
    let (_c, _e, first) = app.register("dave").await;
    let mut tokens = vec![first.token.clone()];
    for _ in 0..3 {
        let (client, _events) = app.connect().await;
        tokens.push(client.login("dave", "password123").await.unwrap().token);
    }

    let (stale, _e) = app.connect().await;
    let err = stale.resume(&tokens[0]).await.unwrap_err();
    assert_eq!(
        status(err),
        Status::Unauthorized,
        "the oldest session was revoked"
    );
    for token in &tokens[1..] {
        let (client, _events) = app.connect().await;
        client
            .resume(token)
            .await
            .expect("the newest three still resume");
    }
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE u.username = 'dave'",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(held, 3, "never more than the cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_get_the_same_error() {
    let app = spawn_app().await;
    app.register("bob").await;
    let (c1, _e1) = app.connect().await;
    let wrong = c1.login("bob", "wrong password").await.unwrap_err();
    let (c2, _e2) = app.connect().await;
    let unknown = c2.login("nobody_here", "wrong password").await.unwrap_err();
    let (
        ClientError::Status {
            status: s1,
            message: m1,
            ..
        },
        ClientError::Status {
            status: s2,
            message: m2,
            ..
        },
    ) = (wrong, unknown)
    else {
        panic!("expected status errors");
    };
    assert_eq!(s1, Status::Unauthorized);
    assert_eq!((s1, m1), (s2, m2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_username_in_any_case_conflicts() {
    let app = spawn_app().await;
    app.register("Carol").await;
    for name in ["Carol", "carol", "CAROL"] {
        let (c, _e) = app.connect().await;
        let err = c.register(name, "password123").await.unwrap_err();
        assert_eq!(status(err), Status::Conflict, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_rules_are_named() {
    let app = spawn_app().await;
    let long = "x".repeat(51);
    let cases: &[(&str, &str, &str)] = &[
        ("ab", "password123", "at least 3"),
        (&long, "password123", "at most 50"),
        ("has space", "password123", "letters, digits"),
        ("émile", "password123", "letters, digits"),
        ("dave", "short", "at least 8"),
    ];
    for (username, password, rule) in cases {
        let (c, _e) = app.connect().await;
        match c.register(username, password).await.unwrap_err() {
            ClientError::Status {
                status, message, ..
            } => {
                assert_eq!(status, Status::BadRequest);
                assert!(
                    message.contains(rule),
                    "{message:?} should mention {rule:?}"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    let (c, _e) = app.connect().await;
    let too_long = "p".repeat(257);
    let err = c.register("dave", &too_long).await.unwrap_err();
    assert_eq!(status(err), Status::BadRequest);
    // Limits are inclusive.
    let (c, _e) = app.connect().await;
    c.register(&"y".repeat(50), &"p".repeat(256)).await.unwrap();
    let (c, _e) = app.connect().await;
    c.register("a.b-c_9", "12345678").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_before_authentication_are_refused_and_the_socket_closed() {
    let app = spawn_app().await;
    let (c, mut events) = app.connect().await;
    let err = c.who_am_i().await.unwrap_err();
    assert_eq!(status(err), Status::Unauthorized);
    assert_eq!(close_code(&mut events).await, Some(1008));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_header_bearer_and_basic() {
    let app = spawn_app().await;
    let (_c, _e, reg) = app.register("erin").await;
    let token = base64_url(&reg.token);

    let options = ConnectOptions {
        authorization: Some(format!("Bearer {token}")),
        ..ConnectOptions::default()
    };
    let (bearer, mut events) = Client::connect_with(&app.url, options).await.unwrap();
    assert_eq!(bearer.who_am_i().await.unwrap().username, "erin");
    expect_queue_empty(&mut events).await;

    let basic = base64_std(b"erin:password123");
    let options = ConnectOptions {
        authorization: Some(format!("Basic {basic}")),
        ..ConnectOptions::default()
    };
    let (basic_client, _e) = Client::connect_with(&app.url, options).await.unwrap();
    assert_eq!(basic_client.who_am_i().await.unwrap().username, "erin");
    let issued = basic_client
        .header("x-relay-session-token")
        .expect("token header");
    assert_eq!(issued.len(), 43);

    for bad in [
        "Bearer AAAA",
        "Basic ZXJpbjp3cm9uZ3Bhc3N3b3Jk",
        "Digest foo",
    ] {
        let options = ConnectOptions {
            authorization: Some(bad.into()),
            ..ConnectOptions::default()
        };
        match Client::connect_with(&app.url, options).await {
            Err(ClientError::Http { status, .. }) => assert_eq!(status, 401, "{bad}"),
            Err(other) => panic!("{bad}: {other}"),
            Ok(_) => panic!("{bad}: accepted"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_account_removes_everything_and_closes_the_socket() {
    let app = spawn_app().await;
    let (alice, mut alice_events, a) = app.register("alice").await;
    expect_queue_empty(&mut alice_events).await;
    let (bob, _bob_events, b) = app.register("bob").await;
    bob.logout().await.unwrap();
    // A message queued for Bob (offline now).
    let sent = alice
        .send(signal_relay::client::Outgoing::new(b.user_id, &b"hi"[..]))
        .await
        .unwrap();
    assert_eq!(sent.outcome, signal_relay::proto::SendOutcome::Queued);

    let (bob, mut bob_events) = app.connect().await;
    let b2 = bob.login("bob", "password123").await.unwrap();
    let err = bob.delete_account("not the password").await.unwrap_err();
    assert_eq!(
        status(err),
        Status::Unauthorized,
        "password must be confirmed"
    );
    bob.delete_account("password123").await.unwrap();
    assert_eq!(close_code(&mut bob_events).await, Some(1000));

    let count = |table: &'static str| {
        let db = app.db.clone();
        async move {
            let sql = format!(
                "SELECT count(*) FROM {table} WHERE {}",
                match table {
                    "users" => "id = $1",
                    "messages" => "recipient_id = $1",
                    _ => "user_id = $1",
                }
            );
            sqlx::query_scalar::<_, i64>(&sql)
                .bind(b.user_id)
                .fetch_one(&db)
                .await
                .unwrap()
        }
    };
    for table in [
        "users",
        "sessions",
        "messages",
        "identity_keys",
        "one_time_pre_keys",
    ] {
        assert_eq!(count(table).await, 0, "{table}");
    }
    let (c, _e) = app.connect().await;
    assert_eq!(
        status(c.resume(&b2.token).await.unwrap_err()),
        Status::Unauthorized
    );
    let (c, _e) = app.connect().await;
    assert_eq!(
        status(c.login("bob", "password123").await.unwrap_err()),
        Status::Unauthorized
    );
    let _ = a;
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A socket closes when its session token expires (4401), whether it
/// authenticated with a password or resumed; resume reports the expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_close_when_their_token_expires() {
    let app = spawn_app_with(|c| c.limits.auth.session_ttl_secs = 2).await;
    // Alice's socket authenticated with her password (registering).
    let (_alice, mut alice_events, alice) = app.register("alice").await;
    expect_queue_empty(&mut alice_events).await;
    assert!(alice.token_expires_at_ms > 0);
    // Carol's second socket resumed her token.
    let (_carol, mut carol_events, carol) = app.register("carol").await;
    let (resumed, mut resumed_events) = app.connect().await;
    let info = resumed.resume(&carol.token).await.unwrap();
    assert_eq!(info.token_expires_at_ms, carol.token_expires_at_ms);
    assert_eq!(close_code(&mut carol_events).await, Some(4409), "displaced");
    for (events, expires_at_ms) in [
        (&mut alice_events, alice.token_expires_at_ms),
        (&mut resumed_events, carol.token_expires_at_ms),
    ] {
        let closed = tokio::time::timeout(WAIT, events.closed())
            .await
            .expect("closed at expiry");
        assert_eq!(closed.code, Some(4401));
        assert_eq!(closed.reason, "session token expired");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!(now_ms >= expires_at_ms, "not before expiry");
    }
}

/// `Logout{all}` revokes every session of the user, not only the socket's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_revokes_every_session() {
    let app = spawn_app().await;
    let (_c, _e, first) = app.register("alice").await;
    let (other, _e2) = app.connect().await;
    let second = other.login("alice", "password123").await.unwrap();
    let (bob, _eb, bob_auth) = app.register("bob").await;
    drop(bob);

    let (client, mut events) = app.resume(&second.token).await;
    client.logout_all().await.unwrap();
    assert_eq!(close_code(&mut events).await, Some(1000));
    for token in [&first.token, &second.token] {
        let (c, _e) = app.connect().await;
        assert_eq!(
            status(c.resume(token).await.unwrap_err()),
            Status::Unauthorized
        );
    }
    let (c, _e) = app.connect().await;
    c.resume(&bob_auth.token)
        .await
        .expect("other users keep theirs");
}

/// A request pipelined behind the authentication (sent before its answer)
/// is answered once the socket is authenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_pipelined_behind_login_is_answered() {
    let app = spawn_app().await;
    app.register("alice").await;
    let (client, _e) = app.connect().await;
    let (login, me) = tokio::join!(client.login("alice", "password123"), client.who_am_i());
    login.unwrap();
    assert_eq!(me.unwrap().username, "alice");
}

/// Usernames differing only in letter case are one name; look-alike
/// characters (0 and O, 1 and l) are not folded: see the README.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_usernames_are_distinct_but_case_is_not() {
    let app = spawn_app().await;
    app.register("config").await;
    let (c, _e) = app.connect().await;
    assert_eq!(
        status(c.register("CONFIG", "password123").await.unwrap_err()),
        Status::Conflict
    );
    for name in ["c0nfig", "conf1g", "confIg"] {
        let (c, _e) = app.connect().await;
        let result = c.register(name, "password123").await;
        if name == "confIg" {
            assert_eq!(status(result.unwrap_err()), Status::Conflict, "{name}");
        } else {
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
