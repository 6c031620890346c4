//! relay-cli end to end: the real binary, as child processes, against a real
//! relay (in this process) on its own fresh PostgreSQL database.

mod support;

use libsignal_protocol_syft::{PreKeySignalMessage, SignalMessage};
use signal_relay::client::Client;
use signal_relay::testing::{spawn_app, spawn_app_with};
use support::*;

/// Two users, from first contact to a conversation that survives restarts:
/// offline delivery in order, live chat both ways with receipts, and what
/// the relay stores is only ever ciphertext.
#[tokio::test(flavor = "multi_thread")]
async fn two_users_converse_offline_online_and_after_restarts() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    let alice_id = alice.register_with_keys().await;
    let bob_id = bob.register_with_keys().await;
    assert_eq!(key_counts(&app.db, bob_id).await, (100, 100));

    // Bob is offline: every message is queued on the relay.
    let offline: Vec<String> = (1..=5).map(|i| format!("offline message {i}")).collect();
    let mut sent_ids = Vec::new();
    for (i, text) in offline.iter().enumerate() {
        let sent = alice.send(&bob, text).await;
        assert_eq!(sent["outcome"], "queued", "{sent}");
        // Until Bob answers, every message is a PreKeySignalMessage; only
        // the first one fetched a bundle.
        assert_eq!(sent["envelope"], "prekey_bundle", "{sent}");
        assert_eq!(sent.get("session").is_some(), i == 0, "{sent}");
        sent_ids.push(sent["id"].clone());
    }
    // The first fetch consumed one of Bob's one-time keys of each kind.
    assert_eq!(key_counts(&app.db, bob_id).await, (99, 99));
    let rows = queued(&app.db, bob_id).await;
    assert_eq!(rows.len(), 5);
    for (envelope_type, content) in &rows {
        assert_eq!(*envelope_type, 3, "PREKEY_BUNDLE");
        PreKeySignalMessage::try_from(&content[..])
            .expect("what the relay stores is a libsignal PreKeySignalMessage");
    }
    let all_texts: Vec<&str> = offline.iter().map(String::as_str).collect();
    assert_no_plaintext(&app.db, &all_texts).await;

    // Bob comes online and gets every message, in order, once.
    let received = bob.ok(&["recv"]).await;
    assert_eq!(received.texts(), offline);
    for message in received.named("message") {
        assert_eq!(message["from"], alice.name.as_str());
        assert_eq!(message["from_id"], alice_id.to_string());
    }
    assert!(queued(&app.db, bob_id).await.is_empty(), "all acked");
    assert!(bob.ok(&["recv"]).await.texts().is_empty(), "nothing twice");

    // Both online, chatting both ways.
    let mut bob_chat = bob.spawn(&["chat", &alice.name]);
    bob_chat.event("chat").await;
    let mut alice_chat = alice.spawn(&["chat", &bob.name]);
    alice_chat.event("chat").await;
    // Bob acked while Alice was offline: the relay kept the receipts for her.
    for id in &sent_ids {
        alice_chat
            .expect("a receipt", |v| {
                v["event"] == "receipt" && v["delivered"] == *id
            })
            .await;
    }
    let mut live = Vec::new();
    for round in 1..=3 {
        let from_alice = format!("live from alice {round}");
        alice_chat.type_line(&from_alice).await;
        let got = bob_chat.message(&from_alice).await;
        let sent = alice_chat.event("sent").await;
        assert_eq!(sent["outcome"], "delivered", "{sent}");
        assert_eq!(sent["id"], got["id"]);

        let from_bob = format!("live from bob {round}");
        bob_chat.type_line(&from_bob).await;
        alice_chat.message(&from_bob).await;
        let sent = bob_chat.event("sent").await;
        assert_eq!(sent["outcome"], "delivered", "{sent}");
        // Bob's first reply is a SignalMessage: Alice's PreKey messages set
        // the session up. Once Alice has read it, hers are too.
        assert_eq!(sent["envelope"], "ciphertext", "{sent}");
        live.push(from_alice);
        live.push(from_bob);
    }
    assert_eq!(
        alice_chat.close_input().await.code(),
        Some(0),
        "alice's chat"
    );
    assert_eq!(bob_chat.close_input().await.code(), Some(0), "bob's chat");
    let live_texts: Vec<&str> = live.iter().map(String::as_str).collect();
    assert_no_plaintext(&app.db, &live_texts).await;

    // New processes, same profiles: the sessions were persisted, so no
    // bundle is fetched and the messages are plain SignalMessages.
    let keys_before = key_counts(&app.db, bob_id).await;
    let sent = alice.send(&bob, "after the restart").await;
    assert_eq!(sent["envelope"], "ciphertext", "{sent}");
    assert!(sent.get("session").is_none(), "no new session: {sent}");
    let rows = queued(&app.db, bob_id).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 1, "CIPHERTEXT");
    SignalMessage::try_from(&rows[0].1[..]).expect("a libsignal SignalMessage");
    assert_no_plaintext(&app.db, &["after the restart"]).await;
    assert_eq!(bob.ok(&["recv"]).await.texts(), ["after the restart"]);
    let reply = bob.send(&alice, "still here").await;
    assert_eq!(reply["envelope"], "ciphertext", "{reply}");
    let alice_recv = alice.ok(&["recv"]).await;
    assert_eq!(alice_recv.texts(), ["still here"]);
    assert_eq!(key_counts(&app.db, bob_id).await, keys_before);

    // The profiles hold private keys and plaintext: owner-only.
    assert_private(&alice.profile);
    assert_private(&bob.profile);
    // Received messages are kept in the profile's inbox.
    let inbox = std::fs::read_to_string(bob.profile.join("inbox.jsonl")).expect("bob's inbox");
    for text in offline.iter().chain(&live).filter(|t| t.contains("alice")) {
        assert!(inbox.contains(text.as_str()), "{text:?} not in bob's inbox");
    }
}

/// A message already stored in the inbox but not acked (the client died
/// between the two) is redelivered by the relay, acked, and not shown or
/// stored twice; and `recv` leaves nothing behind on the relay.
#[tokio::test(flavor = "multi_thread")]
async fn a_redelivered_message_is_acked_but_not_received_twice() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    alice.register_with_keys().await;
    let bob_id = bob.register_with_keys().await;
    let first = alice.send(&bob, "already have this one").await;
    alice.send(&bob, "but not this one").await;

    // What bob's client wrote before dying: the first message's inbox line.
    let line = serde_json::json!({
        "event": "message", "id": first["id"], "from_id": first["to_id"],
        "from": alice.name, "text": "already have this one",
        "sent_at_ms": 0, "server_at_ms": 0, "envelope": "prekey_bundle",
    });
    std::fs::create_dir_all(&bob.profile).expect("profile exists");
    let inbox = bob.profile.join("inbox.jsonl");
    let mut contents = std::fs::read_to_string(&inbox).unwrap_or_default();
    contents.push_str(&format!("{line}\n"));
    std::fs::write(&inbox, contents).expect("write inbox");

    // The second message is a PreKey message of the same session as the
    // first, so bob still decrypts it without having decrypted the first.
    let received = bob.ok(&["recv"]).await;
    assert_eq!(received.texts(), ["but not this one"]);
    assert!(queued(&app.db, bob_id).await.is_empty(), "both acked");
    let stored = std::fs::read_to_string(&inbox).expect("read inbox");
    assert_eq!(stored.matches("already have this one").count(), 1);
    assert_eq!(stored.matches("but not this one").count(), 1);
}

/// Once Alice's one-time keys are gone, senders get her last-resort Kyber
/// key (and no one-time EC key), and the sessions still work both ways. When
/// Alice next connects she tops her keys up.
#[tokio::test(flavor = "multi_thread")]
async fn last_resort_kyber_key_after_one_time_keys_run_out() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let carol = User::new(&app, "carol");
    let dave = User::new(&app, "dave");
    let alice_id = alice.register_with_keys().await;
    carol.register_with_keys().await;
    dave.register_with_keys().await;

    // Someone fetches all of Alice's one-time keys while she is offline.
    let (drainer, _events, _) = app.register(&unique("drainer")).await;
    drain(&drainer, &alice.name, 100).await;
    assert_eq!(key_counts(&app.db, alice_id).await, (0, 0));

    // Two different senders now start sessions on the last-resort key.
    for (sender, text) in [(&carol, "from carol"), (&dave, "from dave")] {
        let sent = sender.send(&alice, text).await;
        let session = &sent["session"];
        assert_eq!(session["one_time_pre_key"], false, "{sent}");
        assert_eq!(session["kyber_last_resort"], true, "{sent}");
    }
    assert_eq!(key_counts(&app.db, alice_id).await, (0, 0));

    // Alice connects: she replenishes (the count is below the threshold)
    // and decrypts both messages.
    let received = alice.ok(&["recv"]).await;
    let up = received.one("keys_uploaded");
    assert_eq!(up["reason"], "count", "{up}");
    assert_eq!(up["new_one_time_pre_keys"], 100, "{up}");
    assert_eq!(up["new_kyber_pre_keys"], 100, "{up}");
    assert_eq!(received.texts(), ["from carol", "from dave"]);
    assert_eq!(key_counts(&app.db, alice_id).await, (100, 100));

    // Replies go back over the same sessions.
    let reply = alice.send(&carol, "hi carol").await;
    assert_eq!(reply["envelope"], "ciphertext", "{reply}");
    assert!(reply.get("session").is_none(), "{reply}");
    assert_eq!(carol.ok(&["recv"]).await.texts(), ["hi carol"]);
    alice.send(&dave, "hi dave").await;
    assert_eq!(dave.ok(&["recv"]).await.texts(), ["hi dave"]);
    assert_no_plaintext(&app.db, &["from carol", "from dave", "hi carol", "hi dave"]).await;
}

/// While Alice is online, the relay's "pre-keys low" push makes her client
/// upload more, with no command from her.
#[tokio::test(flavor = "multi_thread")]
async fn pre_keys_replenished_when_the_relay_says_they_run_low() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let alice_id = alice.register_with_keys().await;
    let mut online = alice.spawn(&["recv", "--follow"]);
    online.event("drained").await;

    // 91 fetches leave 9, below the relay's threshold of 10.
    let (drainer, _events, _) = app.register(&unique("drainer")).await;
    drain(&drainer, &alice.name, 91).await;
    let up = online.event("keys_uploaded").await;
    assert_eq!(up["reason"], "low", "{up}");
    assert_eq!(up["new_one_time_pre_keys"], 91, "{up}");
    assert_eq!(up["new_kyber_pre_keys"], 91, "{up}");
    assert_eq!(up["one_time_pre_keys"], 100, "{up}");
    assert_eq!(key_counts(&app.db, alice_id).await, (100, 100));

    // The new keys work: a newcomer gets one of them and Alice decrypts.
    let erin = User::new(&app, "erin");
    erin.register_with_keys().await;
    let sent = erin.send(&alice, "new keys work").await;
    assert_eq!(sent["session"]["one_time_pre_key"], true, "{sent}");
    assert_eq!(sent["session"]["kyber_last_resort"], false, "{sent}");
    online.message("new keys work").await;
    assert_eq!(online.terminate().await.code(), Some(0));
}

/// A peer whose identity key changes (a reinstall, or an impostor) is not
/// trusted silently: the message is held on the relay with a loud warning
/// and a distinct exit code until the user runs `trust`.
#[tokio::test(flavor = "multi_thread")]
async fn changed_identity_is_held_until_trusted() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    let alice_id = alice.register_with_keys().await;
    bob.register_with_keys().await;
    alice.send(&bob, "before").await;
    assert_eq!(bob.ok(&["recv"]).await.texts(), ["before"]);
    bob.send(&alice, "reply").await;
    assert_eq!(alice.ok(&["recv"]).await.texts(), ["reply"]);
    let number_before = alice.ok(&["safety-number", &bob.name]).await;

    // Bob loses his profile and signs in from a new one: a new identity.
    let new_bob = bob.reinstalled();
    let login = new_bob
        .run_with(
            &["login", &bob.name, "--replace-device"],
            &format!("{PASSWORD}\n"),
        )
        .await;
    assert!(login.status.success(), "{login:#?}");
    login.one("device_replaced");
    new_bob.send(&alice, "new phone, who dis").await;

    let held = alice.fails(&["recv"], EXIT_IDENTITY_CHANGED).await;
    let warning = held.one("identity_changed");
    assert_eq!(warning["user"], bob.name.as_str());
    assert_eq!(warning["new_account"], false);
    assert_eq!(warning["held_messages"], 1);
    assert!(held.texts().is_empty());
    assert_eq!(
        queued(&app.db, alice_id).await.len(),
        1,
        "held on the relay"
    );

    alice.ok(&["trust", &bob.name]).await;
    assert_eq!(alice.ok(&["recv"]).await.texts(), ["new phone, who dis"]);
    let number_after = alice.ok(&["safety-number", &bob.name]).await;
    assert_ne!(
        number_before.one("safety_number")["safety_number"],
        number_after.one("safety_number")["safety_number"]
    );
    // Both sides compute the same number.
    assert_eq!(
        number_after.one("safety_number")["safety_number"],
        new_bob
            .ok(&["safety-number", &alice.name])
            .await
            .one("safety_number")["safety_number"]
    );
}

/// Each failure a script must tell apart has its own exit code.
#[tokio::test(flavor = "multi_thread")]
async fn distinct_exit_codes_and_account_lifecycle() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let alice_id = alice.register_with_keys().await;

    // No such user, and a user who has not published keys: each its own
    // message and exit code, from send and from chat alike.
    let carol = User::new(&app, "carol");
    let registered = carol
        .run_with(&["register", &carol.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(registered.status.success(), "{registered:#?}");
    for command in ["send", "chat"] {
        let mut args = vec![command, "nobody_here_at_all"];
        if command == "send" {
            args.push("hi");
        }
        let unknown = alice.fails(&args, EXIT_UNKNOWN_USER).await;
        assert_eq!(
            unknown.error_message(),
            "no user named \"nobody_here_at_all\" on this relay"
        );
        args[1] = &carol.name;
        let keyless = alice.fails(&args, EXIT_NO_KEYS).await;
        assert!(
            keyless
                .error_message()
                .starts_with(&format!("{} has not published keys yet", carol.name)),
            "{keyless:#?}"
        );
    }

    let impostor = alice.reinstalled();
    let wrong = impostor
        .run_with(&["login", &alice.name], "wrong password\n")
        .await;
    assert_eq!(wrong.code(), Some(EXIT_BAD_CREDENTIALS), "{wrong:#?}");

    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let done = alice
        .run_at(&format!("ws://127.0.0.1:{closed}"), &["whoami"])
        .await;
    assert_eq!(done.code(), Some(EXIT_UNREACHABLE), "{done:#?}");

    // One process per profile.
    let mut running = alice.spawn(&["recv", "--follow"]);
    running.event("drained").await;
    alice.fails(&["whoami"], EXIT_PROFILE).await;
    assert_eq!(running.terminate().await.code(), Some(0));

    // Logout ends the saved session; login brings it back.
    alice.ok(&["logout"]).await;
    alice.fails(&["whoami"], EXIT_BAD_CREDENTIALS).await;
    let login = alice
        .run_with(&["login", &alice.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(login.status.success(), "{login:#?}");
    let me = alice.ok(&["whoami"]).await;
    assert_eq!(me.one("whoami")["user_id"], alice_id.to_string());

    // Deleting needs the password, and removes the user on the relay.
    let refused = alice
        .run_with(&["delete-account"], "not my password\n")
        .await;
    assert_eq!(refused.code(), Some(EXIT_BAD_CREDENTIALS), "{refused:#?}");
    let deleted = alice
        .run_with(&["delete-account"], &format!("{PASSWORD}\n"))
        .await;
    assert!(deleted.status.success(), "{deleted:#?}");
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE id = $1")
        .bind(alice_id)
        .fetch_one(&app.db)
        .await
        .expect("count users");
    assert_eq!(users, 0);
    alice.fails(&["whoami"], EXIT_PROFILE).await;
}

/// wss:// with a local CA: refused (as unreachable, with a hint) without
/// `--ca-cert`; with it, remembered from register on, a conversation works.
#[tokio::test(flavor = "multi_thread")]
async fn wss_with_a_local_ca_certificate() {
    let certs = tempfile::tempdir().expect("temp dir");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let server_key = rcgen::KeyPair::generate().expect("server key");
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&server_key, &ca, &ca_key)
        .expect("server certificate");
    let ca_path = certs.path().join("ca.pem");
    let cert_path = certs.path().join("server.pem");
    let key_path = certs.path().join("server-key.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    std::fs::write(&cert_path, server_cert.pem()).expect("write certificate");
    std::fs::write(&key_path, server_key.serialize_pem()).expect("write key");
    let app = spawn_app_with(|c| {
        c.tls.tls_cert = Some(cert_path.clone());
        c.tls.tls_key = Some(key_path.clone());
    })
    .await;
    assert!(app.url.starts_with("wss://"), "{}", app.url);

    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    let refused = alice
        .run_with(&["register", &alice.name], &format!("{PASSWORD}\n"))
        .await;
    assert_eq!(refused.code(), Some(EXIT_UNREACHABLE), "{refused:#?}");
    let message = refused.one("error")["message"].as_str().expect("message");
    assert!(message.contains("--ca-cert"), "{message}");

    let ca = ca_path.to_str().expect("UTF-8 path");
    for user in [&alice, &bob] {
        let done = user
            .run_with(
                &["--ca-cert", ca, "register", &user.name],
                &format!("{PASSWORD}\n"),
            )
            .await;
        assert!(done.status.success(), "{done:#?}");
        // No --ca-cert from here on: the profile remembers it.
        user.ok(&["keys"]).await;
    }
    alice.send(&bob, "over TLS").await;
    assert_eq!(bob.ok(&["recv"]).await.texts(), ["over TLS"]);
}

/// Fetches `user`'s bundle `n` times, as a sender starting sessions would.
async fn drain(client: &Client, user: &str, n: usize) {
    for _ in 0..n {
        client
            .fetch_bundle_by_username(user)
            .await
            .expect("fetch bundle");
    }
}

/// Logging in again from a profile revokes the session token it held, so
/// repeated logins do not leave live tokens behind on the relay; a token
/// the relay already dropped is no obstacle.
#[tokio::test(flavor = "multi_thread")]
async fn login_revokes_the_profiles_previous_session() {
    use base64::Engine as _;

    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let registered = alice
        .run_with(&["register", &alice.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(registered.status.success(), "{registered:#?}");
    let alice_id = user_id(&app.db, &alice.name).await;
    let saved_token = || {
        let account: serde_json::Value = serde_json::from_slice(
            &std::fs::read(alice.profile.join("account.json")).expect("account.json"),
        )
        .expect("account JSON");
        let token = account["token"].as_str().expect("a saved token");
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .expect("base64url token")
    };
    let sessions = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sessions WHERE user_id = $1")
            .bind(alice_id)
            .fetch_one(&app.db)
            .await
            .expect("count sessions")
    };
    let first = saved_token();
    assert_eq!(sessions().await, 1);

    let login = alice
        .run_with(&["login", &alice.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(login.status.success(), "{login:#?}");
    assert!(login.named("warning").is_empty(), "{login:#?}");
    let second = saved_token();
    assert_ne!(first, second, "login saved a new token");
    assert_eq!(sessions().await, 1, "the previous session was revoked");
    let (client, _events) = app.connect().await;
    let err = client
        .resume(&first)
        .await
        .expect_err("the old token is dead");
    assert_eq!(
        err.status(),
        Some(signal_relay::proto::Status::Unauthorized)
    );
    alice.ok(&["whoami"]).await;

    // The relay dropped the saved session already (an operator revoked it):
    // login still succeeds, quietly.
    sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(alice_id)
        .execute(&app.db)
        .await
        .expect("revoke on the relay");
    let login = alice
        .run_with(&["login", &alice.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(login.status.success(), "{login:#?}");
    assert!(login.named("warning").is_empty(), "{login:#?}");
    assert_eq!(sessions().await, 1);
    assert_ne!(saved_token(), second);
    alice.ok(&["whoami"]).await;
}

/// A text too long for the relay once encrypted is refused before it is
/// encrypted, saying the limit: no pre-key of the peer's is used up and no
/// ratchet step spent. The longest text allowed goes through, even as a
/// pre-key message (the larger kind); in chat an oversize line is refused
/// and the chat goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_message_too_long_for_the_relay_is_refused_before_it_is_encrypted() {
    let app = spawn_app_with(|c| c.limits.messaging.max_message_bytes = 4096).await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    alice.register_with_keys().await;
    let bob_id = bob.register_with_keys().await;

    let long = "x".repeat(3000);
    let refused = alice.fails(&["send", &bob.name, &long], 1).await;
    let message = refused.error_message();
    assert!(
        message.contains("too long: 3000 bytes") && message.contains("at most 1919 bytes"),
        "{message}"
    );
    assert_eq!(
        key_counts(&app.db, bob_id).await,
        (100, 100),
        "no bundle was fetched for it"
    );
    assert!(queued(&app.db, bob_id).await.is_empty());

    let longest = "y".repeat(1919);
    let sent = alice.send(&bob, &longest).await;
    assert_eq!(sent["envelope"], "prekey_bundle", "{sent}");
    assert_eq!(bob.ok(&["recv"]).await.texts(), [longest]);

    let mut chat = alice.spawn(&["chat", &bob.name]);
    chat.event("chat").await;
    chat.type_line(&long).await;
    let warning = chat.event("warning").await;
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("too long")),
        "{warning}"
    );
    chat.type_line("short").await;
    chat.event("sent").await;
    assert_eq!(chat.close_input().await.code(), Some(0));
    assert_eq!(bob.ok(&["recv"]).await.texts(), ["short"]);
}

/// The relay restarts (stopped, then started again on the same address and
/// database): `chat` and `recv --follow` notice, reconnect, and keep
/// sending and receiving; a line typed while the relay was down is sent
/// once it is back.
#[tokio::test(flavor = "multi_thread")]
async fn chat_and_recv_follow_reconnect_after_the_relay_restarts() {
    let mut app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    let carol = User::new(&app, "carol");
    alice.register_with_keys().await;
    bob.register_with_keys().await;
    carol.register_with_keys().await;

    let mut bob_recv = bob.spawn(&["recv", "--follow"]);
    bob_recv.event("drained").await;
    let mut alice_chat = alice.spawn(&["chat", &bob.name]);
    alice_chat.event("chat").await;
    alice_chat.type_line("before the restart").await;
    bob_recv.message("before the restart").await;
    assert_eq!(alice_chat.event("sent").await["outcome"], "delivered");

    app.stop().await;
    for running in [&mut bob_recv, &mut alice_chat] {
        let lost = running
            .expect("the connection lost", |v| {
                v["event"] == "warning"
                    && v["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("connection to the relay lost"))
            })
            .await;
        assert!(
            lost["message"].as_str().is_some_and(|m| m.contains("1001")),
            "{lost}"
        );
    }
    alice_chat.type_line("while the relay was down").await;
    app.start_again().await;
    bob_recv.event("reconnected").await;
    alice_chat.event("reconnected").await;
    bob_recv.message("while the relay was down").await;
    alice_chat.event("sent").await;

    // Both keep receiving on the new connections.
    carol.send(&alice, "to alice's chat").await;
    alice_chat.message("to alice's chat").await;
    alice_chat.type_line("after the restart").await;
    bob_recv.message("after the restart").await;
    assert_eq!(alice_chat.event("sent").await["outcome"], "delivered");

    assert_eq!(alice_chat.close_input().await.code(), Some(0));
    assert_eq!(bob_recv.terminate().await.code(), Some(0));
}
