//! PostgreSQL going away under a running relay, on a private server the
//! test stops and starts: connected users keep talking live, password and
//! token logins fail fast with `unavailable` and a retry hint, `/readyz`
//! says so, and once the database is back nothing that was not in flight
//! during the outage fails, although every connection the relay held died
//! with the old server.

use std::time::{Duration, Instant};

use bytes::Bytes;
use signal_relay::client::{Client, Events, Outgoing};
use signal_relay::config::Config;
use signal_relay::proto::{SendOutcome, Status};
use signal_relay::testing::{PrivatePostgres, spawn_on};
use uuid::Uuid;

use crate::helpers::{expect_queue_empty, next_delivery, wait_until};

async fn readyz(addr: std::net::SocketAddr) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return 0;
    };
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\n\r\n").await;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// One live message from `alice` to `bob`, acked: `Delivered`.
async fn live(alice: &Client, bob: &Client, bob_events: &mut Events, bob_id: Uuid, n: u8) {
    let deliver_and_ack = async {
        let delivery = next_delivery(bob_events).await;
        bob.ack(&[Uuid::from_slice(&delivery.message_id).unwrap()])
            .await
            .unwrap();
    };
    let (sent, ()) = tokio::join!(
        alice.send(Outgoing::new(bob_id, Bytes::from(vec![n]))),
        deliver_and_ack
    );
    assert_eq!(sent.unwrap().outcome, SendOutcome::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_fails_fast_and_costs_nothing_after_it() {
    let pg = PrivatePostgres::start();
    // A name no shared server has, since the app's clean-up drops it there.
    let name = format!(
        "relay_outage_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let mut config = Config::for_tests(&pg.url(&name));
    config.limits.auth.argon2_concurrency = 2;
    let app = spawn_on(config, name).await;

    let (alice, _alice_events, _) = app.register_live("alice").await;
    let (bob, mut bob_events, bob_auth) = app.register_live("bob").await;
    let (carol, _carol_events, carol_auth) = app.register_live("carol").await;
    // Dave only logs in, on sockets of his own: a login as alice or bob
    // would displace their live connections.
    let (dave, _dave_events, _) = app.register_live("dave").await;
    dave.close().await;
    carol.close().await;
    carol.closed().await;
    wait_until("carol is offline", || async {
        !app.registry.is_online(carol_auth.user_id)
    })
    .await;
    live(&alice, &bob, &mut bob_events, bob_auth.user_id, 1).await;

    tokio::task::block_in_place(|| pg.stop());
    wait_until("readyz says the database is gone", || async {
        readyz(app.admin_addr).await == 503
    })
    .await;
    // Live delivery between connected users does not need the database.
    live(&alice, &bob, &mut bob_events, bob_auth.user_id, 2).await;
    // A send that must be stored cannot be: it is refused as retryable,
    // not as the server's failure.
    let err = alice
        .send(Outgoing::new(carol_auth.user_id, Bytes::from_static(b"y")))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    // Logins fail at once, with a hint, instead of after the pool's
    // acquire timeout.
    let (dave, _dave_events) = app.connect().await;
    let started = Instant::now();
    let err = dave.login("dave", "password123").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    assert!(
        matches!(
            err,
            signal_relay::client::ClientError::Status {
                retry_after: Some(_),
                ..
            }
        ),
        "{err}"
    );

    tokio::task::block_in_place(|| pg.start_again());
    wait_until("readyz says ready again", || async {
        readyz(app.admin_addr).await == 200
    })
    .await;
    // Every connection the relay held died with the old server; none of
    // these may fail for it.
    let (again, _again_events) = app.connect().await;
    again
        .login("dave", "password123")
        .await
        .expect("login after the outage");
    let stored = alice
        .send(Outgoing::new(carol_auth.user_id, Bytes::from_static(b"x")))
        .await
        .expect("store after the outage");
    assert_eq!(stored.outcome, SendOutcome::Queued);
    let (carol, mut carol_events) = app.connect().await;
    carol
        .resume(&carol_auth.token)
        .await
        .expect("resume after the outage");
    let delivery = next_delivery(&mut carol_events).await;
    assert_eq!(
        Uuid::from_slice(&delivery.message_id).unwrap(),
        stored.message_id
    );
    expect_queue_empty(&mut carol_events).await;
    live(&alice, &bob, &mut bob_events, bob_auth.user_id, 3).await;
}
