//! Graceful shutdown: stop accepting, close sockets with 1001, finish
//! in-flight work (unacked live messages are stored, their senders told
//! `queued`), and a restarted server delivers them.

use std::time::{Duration, Instant};

use signal_relay::client::{Client, Outgoing};
use signal_relay::proto::SendOutcome;
use signal_relay::testing::spawn_app;

use crate::helpers::{close_code, expect_queue_empty, next_delivery};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_with_1001_and_keeps_in_flight_messages() {
    let mut app = spawn_app().await;
    let (alice, mut alice_events, _) = app.register("alice").await;
    expect_queue_empty(&mut alice_events).await;
    let (_bob, mut bob_events, bob) = app.register("bob").await;
    expect_queue_empty(&mut bob_events).await;

    // Bob receives a live message but never acks it: Alice is still waiting.
    let send = tokio::spawn({
        let alice = alice.clone();
        async move {
            alice
                .send(Outgoing::new(bob.user_id, &b"in flight"[..]))
                .await
        }
    });
    let delivered = next_delivery(&mut bob_events).await;

    let url = app.url.clone();
    app.stop().await;
    assert_eq!(close_code(&mut bob_events).await, Some(1001));
    assert_eq!(close_code(&mut alice_events).await, Some(1001));
    // The message was stored before the server let go: Alice heard `queued`.
    let sent = send.await.unwrap().expect("the in-flight send completed");
    assert_eq!(sent.outcome, SendOutcome::Queued);
    assert_eq!(sent.message_id.as_bytes(), delivered.message_id.as_ref());
    // The listener is gone.
    assert!(Client::connect(&url).await.is_err());

    app.restart().await;
    let (_bob, mut bob_events) = app.resume(&bob.token).await;
    let again = next_delivery(&mut bob_events).await;
    assert_eq!(again.message_id, delivered.message_id);
    assert_eq!(again.content.as_ref(), b"in flight");
    expect_queue_empty(&mut bob_events).await;
}

/// The client library answers the server's close frame, so a shutdown with
/// clients connected does not wait out the server's close timeout (2 s) for
/// them: it takes nowhere near that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connected_clients_answer_the_close_so_shutdown_is_quick() {
    let mut app = spawn_app().await;
    let (_alice, mut alice_events, _) = app.register("alice").await;
    expect_queue_empty(&mut alice_events).await;
    let (_bob, mut bob_events, _) = app.register("bob").await;
    expect_queue_empty(&mut bob_events).await;

    let started = Instant::now();
    app.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1_000),
        "shutdown took {took:?}"
    );
    assert_eq!(close_code(&mut alice_events).await, Some(1001));
    assert_eq!(close_code(&mut bob_events).await, Some(1001));
}
