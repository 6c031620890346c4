//! One account is one device (issue 14), with two profiles of one account
//! as separate `relay-cli` processes: a second profile signing in to an
//! account whose keys another profile published is refused unless the user
//! says `--replace-device`; a replacement publishes a full set of one-time
//! keys; the replaced device learns it was replaced and uploads nothing;
//! and what it can no longer decrypt is kept, reported and counted, never
//! silently acked and dropped.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use signal_relay::testing::spawn_app;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_second_profile_takes_the_account_over_only_when_told_and_nothing_is_lost() {
    let app = spawn_app().await;
    let alice = User::new(&app, "alice");
    let bob = User::new(&app, "bob");
    let alice_id = alice.register_with_keys().await;
    let bob_id = bob.register_with_keys().await;
    // Bob writes to Alice's first device while she is offline.
    bob.send(&alice, "to the first device").await;
    let for_first = queued(&app.db, alice_id).await;
    assert_eq!(for_first.len(), 1);
    let first_identity = identity_on_relay(&app.db, alice_id).await;
    assert!(first_identity.is_some());
    assert_eq!(key_counts(&app.db, alice_id).await, (99, 99));
    let password = format!("{PASSWORD}\n");

    // A second profile signing in as Alice is refused, says why and what
    // to do, and changes nothing on the relay.
    let second = alice.reinstalled();
    let refused = second
        .fails_with(&["login", &alice.name], &password, EXIT_OTHER_DEVICE)
        .await;
    let message = refused.error_message();
    for needed in [
        "in use on another device",
        "stop working",
        "safety-number change",
        "--replace-device",
    ] {
        assert!(message.contains(needed), "{needed:?} not in {message:?}");
    }
    assert!(!second.profile.join("account.json").exists());
    second.fails(&["recv"], EXIT_PROFILE).await;
    assert_eq!(identity_on_relay(&app.db, alice_id).await, first_identity);
    assert_eq!(key_counts(&app.db, alice_id).await, (99, 99));
    assert_eq!(
        sessions(&app.db, alice_id).await,
        1,
        "the refused login left no session behind"
    );

    // Told to, it takes over, with a full set of one-time keys: counted
    // after the new identity deleted the first device's.
    let login = second
        .run_with(&["login", &alice.name, "--replace-device"], &password)
        .await;
    assert!(login.status.success(), "{login:#?}");
    assert_eq!(
        login.one("device_replaced")["username"],
        alice.name.as_str()
    );
    let up = login.one("keys_uploaded");
    assert_eq!(up["reason"], "replace device", "{up}");
    for field in [
        "new_one_time_pre_keys",
        "new_kyber_pre_keys",
        "one_time_pre_keys",
        "kyber_pre_keys",
    ] {
        assert_eq!(up[field], 100, "{field} in {up}");
    }
    assert_eq!(key_counts(&app.db, alice_id).await, (100, 100));
    let second_identity = identity_on_relay(&app.db, alice_id).await;
    assert!(second_identity.is_some() && second_identity != first_identity);

    // Bob's message was for the first device: the second cannot decrypt
    // it, and keeps it raw, reports it with its sender and counts it.
    let received = second.ok(&["recv"]).await;
    assert!(received.texts().is_empty(), "{received:#?}");
    let lost = received.one("undecryptable");
    assert_eq!(lost["from"], bob.name.as_str());
    assert_eq!(lost["from_id"], bob_id.to_string());
    let drained = received.one("drained");
    assert_eq!(
        (&drained["received"], &drained["undecryptable"]),
        (&Value::from(0), &Value::from(1))
    );
    let inbox =
        std::fs::read_to_string(second.profile.join("inbox.jsonl")).expect("the second inbox");
    let kept: Vec<Value> = inbox
        .lines()
        .map(|l| serde_json::from_str(l).expect("inbox JSON"))
        .filter(|l: &Value| l["event"] == "undecryptable")
        .collect();
    assert_eq!(kept.len(), 1, "{inbox}");
    assert_eq!(kept[0]["id"], lost["id"]);
    assert_eq!(kept[0]["from"], bob.name.as_str());
    assert_eq!(kept[0]["envelope_type"], i64::from(for_first[0].0));
    assert_eq!(kept[0]["content"], STANDARD.encode(&for_first[0].1));
    assert!(
        queued(&app.db, alice_id).await.is_empty(),
        "acked once kept"
    );

    // The first device learns it was replaced, and uploads nothing.
    for args in [&["recv"][..], &["send", &bob.name, "still me?"], &["keys"]] {
        let done = alice.fails(args, EXIT_OTHER_DEVICE).await;
        let message = done.error_message();
        assert!(
            message.contains("another device signed in as") && message.contains("replaced"),
            "{args:?}: {message}"
        );
        assert!(message.contains("--replace-device"), "{message}");
        assert!(done.named("keys_uploaded").is_empty(), "{done:#?}");
    }
    assert_eq!(identity_on_relay(&app.db, alice_id).await, second_identity);
    assert_eq!(key_counts(&app.db, alice_id).await, (100, 100));
    let me = alice.ok(&["whoami"]).await;
    let me = me.one("whoami");
    assert_eq!(
        (&me["keys_published"], &me["other_device"]),
        (&Value::from(false), &Value::from(true)),
        "{me}"
    );

    // Bob's session is with the first device: he sees the safety number
    // change before anything goes to the new one, and after verifying,
    // writes to it.
    let changed = bob
        .fails(&["send", &alice.name, "hello?"], EXIT_IDENTITY_CHANGED)
        .await;
    assert_eq!(changed.one("identity_changed")["new_account"], false);
    bob.ok(&["trust", &alice.name]).await;
    bob.send(&alice, "hello, new device").await;
    assert_eq!(second.ok(&["recv"]).await.texts(), ["hello, new device"]);

    // Taking the account back is the same explicit step.
    alice
        .fails_with(&["login", &alice.name], &password, EXIT_OTHER_DEVICE)
        .await;
    let back = alice
        .run_with(&["login", &alice.name, "--replace-device"], &password)
        .await;
    assert!(back.status.success(), "{back:#?}");
    back.one("device_replaced");
    assert_eq!(identity_on_relay(&app.db, alice_id).await, first_identity);
    assert_eq!(key_counts(&app.db, alice_id).await, (100, 100));
    second.fails(&["recv"], EXIT_OTHER_DEVICE).await;
}

/// Two profiles signed in before either published: the first to publish
/// holds the account, and the other does not publish over it.
#[tokio::test(flavor = "multi_thread")]
async fn a_profile_that_never_published_does_not_publish_over_another() {
    let app = spawn_app().await;
    let dave = User::new(&app, "dave");
    let registered = dave
        .run_with(&["register", &dave.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(registered.status.success(), "{registered:#?}");
    let dave_id = user_id(&app.db, &dave.name).await;

    // Nothing is published yet, so a second profile signs in freely.
    let second = dave.reinstalled();
    let login = second
        .run_with(&["login", &dave.name], &format!("{PASSWORD}\n"))
        .await;
    assert!(login.status.success(), "{login:#?}");
    assert!(login.named("device_replaced").is_empty(), "{login:#?}");
    second.ok(&["keys"]).await;
    let published = identity_on_relay(&app.db, dave_id).await;
    assert!(published.is_some());

    // The first profile's first use finds another device's keys.
    for args in [&["recv"][..], &["keys"]] {
        let done = dave.fails(args, EXIT_OTHER_DEVICE).await;
        let message = done.error_message();
        assert!(
            message.contains("published from another device"),
            "{message}"
        );
    }
    assert_eq!(identity_on_relay(&app.db, dave_id).await, published);
    assert_eq!(key_counts(&app.db, dave_id).await, (100, 100));
}
