//! Messaging: live delivery and acks, the durable queue and its ordered
//! drain, receipts, idempotent retries, ephemeral messages, expiry, limits
//! and slow readers. Every wait is on an event (with a timeout that fails
//! the test), never a sleep.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use signal_relay::client::{
    Acked, Client, ClientError, ConnectOptions, Event, Events, Outgoing, Pipeline, Sent,
};
use signal_relay::proto::{
    AckMessages, ClientFrame, EnvelopeType, Push, SendOutcome, ServerFrame, Status, client_frame,
    push, server_frame,
};
use signal_relay::testing::{TestApp, spawn_app, spawn_app_with};
use uuid::Uuid;

use crate::helpers::{
    BINARY, Raw, WAIT, expect_queue_empty, frame, next_delivery, next_event, wait_until,
};
use tokio::time::Instant;

/// Registers `name`, waits for its (empty) queue, and returns its token.
async fn online(app: &TestApp, name: &str) -> (Client, Events, Uuid, Vec<u8>) {
    let (client, events, auth) = app.register_live(name).await;
    (client, events, auth.user_id, auth.token)
}

/// Registers `name` and disconnects: a user with an empty queue, offline.
async fn offline(app: &TestApp, name: &str) -> (Uuid, Vec<u8>) {
    let (client, events, id, token) = online(app, name).await;
    client.close().await;
    drop(events);
    client.closed().await;
    (id, token)
}

fn text(recipient: Uuid, body: &str) -> Outgoing {
    Outgoing::new(recipient, Bytes::copy_from_slice(body.as_bytes()))
}

async fn stored_count(app: &TestApp, recipient: Uuid) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages WHERE recipient_id = $1")
        .bind(recipient)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

fn id_of(envelope: &signal_relay::proto::Envelope) -> Uuid {
    Uuid::from_slice(&envelope.message_id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_is_acked_and_reported_delivered() {
    let app = spawn_app().await;
    let (alice, _ae, alice_id, _) = online(&app, "alice").await;
    let (bob, mut bob_events, bob_id, _) = online(&app, "bob").await;

    let send = tokio::spawn({
        let alice = alice.clone();
        async move {
            let mut m = text(bob_id, "hello bob");
            m.client_timestamp_ms = 1234;
            alice.send(m).await
        }
    });
    let envelope = next_delivery(&mut bob_events).await;
    assert_eq!(envelope.content.as_ref(), b"hello bob");
    assert_eq!(envelope.sender_id.as_ref(), alice_id.as_bytes());
    assert_eq!(envelope.sender_username, "alice");
    assert_eq!(envelope.r#type, EnvelopeType::Ciphertext as i32);
    assert_eq!(envelope.client_timestamp_ms, 1234);
    assert!(envelope.server_timestamp_ms > 0);
    let (acked, unknown) = bob.ack(&[id_of(&envelope)]).await.unwrap();
    assert_eq!((acked.len(), unknown.len()), (1, 0));

    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent.outcome, SendOutcome::Delivered);
    assert_eq!(sent.message_id, id_of(&envelope));
    assert_eq!(
        stored_count(&app, bob_id).await,
        0,
        "the live path stores nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_gets_each_send_and_ack_answered_under_its_tag() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (carol, _ce, _, _) = online(&app, "carol").await;
    let (bob, mut bob_events, bob_id, _) = online(&app, "bob").await;
    let (dave_id, _) = offline(&app, "dave").await;

    // Two senders' connections answering into one pipeline.
    let mut sends = Pipeline::new();
    let (a, c) = (sends.attach(&alice).unwrap(), sends.attach(&carol).unwrap());
    for (source, tag) in [(a, "a1"), (c, "c1"), (a, "a2")] {
        sends.send(source, text(bob_id, tag), tag).await.unwrap();
    }
    sends.send(c, text(dave_id, "c2"), "c2").await.unwrap();

    let mut delivered = std::collections::HashMap::new();
    while delivered.len() < 3 {
        let envelope = next_delivery(&mut bob_events).await;
        let body = String::from_utf8(envelope.content.to_vec()).unwrap();
        delivered.insert(body, id_of(&envelope));
    }
    let mut acks = Pipeline::new();
    let b = acks.attach(&bob).unwrap();
    let ids: Vec<Uuid> = delivered.values().copied().collect();
    acks.ack(b, &ids[..1], 1).await.unwrap();
    acks.ack(b, &ids[1..], 2).await.unwrap();
    let mut acked = Vec::new();
    while let Some((tag, answer)) = acks.next().await {
        let answer = Acked::try_from(answer.unwrap()).unwrap();
        assert!(answer.unknown.is_empty());
        acked.push((tag, answer.acked.len()));
    }
    acked.sort();
    assert_eq!(acked, [(1, 1), (2, 2)]);

    let mut answered = std::collections::HashMap::new();
    while let Some((tag, answer)) = sends.next().await {
        answered.insert(tag, Sent::try_from(answer.unwrap()).unwrap());
    }
    assert_eq!(answered.len(), 4);
    for tag in ["a1", "c1", "a2"] {
        assert_eq!(answered[tag].outcome, SendOutcome::Delivered, "{tag}");
        assert_eq!(answered[tag].message_id, delivered[tag], "{tag}");
    }
    assert_eq!(answered["c2"].outcome, SendOutcome::Queued);
    assert_eq!(stored_count(&app, dave_id).await, 1);
}

/// Queues `n` messages for an offline Bob; on reconnecting he gets each in
/// order, then queue-empty, and acking them all empties his queue.
async fn queue_then_drain_in_order(app: &TestApp, n: usize) {
    let (alice, _ae, _, _) = online(app, "alice").await;
    let (bob_id, bob_token) = offline(app, "bob").await;

    let mut ids = Vec::new();
    for i in 0..n {
        let sent = alice.send(text(bob_id, &format!("m{i}"))).await.unwrap();
        assert_eq!(sent.outcome, SendOutcome::Queued);
        ids.push(sent.message_id);
    }
    assert_eq!(stored_count(app, bob_id).await, n as i64);

    let (bob, mut bob_events) = app.resume(&bob_token).await;
    for (i, id) in ids.iter().enumerate() {
        let envelope = next_delivery(&mut bob_events).await;
        assert_eq!(id_of(&envelope), *id);
        assert_eq!(envelope.content.as_ref(), format!("m{i}").as_bytes());
    }
    expect_queue_empty(&mut bob_events).await;
    let (acked, _) = bob.ack(&ids).await.unwrap();
    assert_eq!(acked.len(), n);
    assert_eq!(stored_count(app, bob_id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_drain_in_order_then_queue_empty() {
    let app = spawn_app_with(|c| c.limits.messaging.drain_batch = 7).await;
    queue_then_drain_in_order(&app, 50).await;
}

/// A byte budget smaller than any message still drains everything, one
/// message per read, in order: a read always takes its first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_drain_byte_budget_still_drains_everything_in_order() {
    let app = spawn_app_with(|c| c.limits.messaging.drain_batch_bytes = 1).await;
    queue_then_drain_in_order(&app, 20).await;
}

/// The drain's read takes a message while the content before it is below
/// the byte budget, and at most its row limit: pinned on the function
/// itself, with five 100-byte messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_read_stops_at_its_byte_budget_and_row_limit() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    for i in 0..5u8 {
        alice
            .send(Outgoing::new(bob_id, Bytes::from(vec![i; 100])))
            .await
            .unwrap();
    }
    for (limit, budget, expected) in [
        (100, 1, 1),
        (100, 100, 1),
        (100, 101, 2),
        (100, 250, 3),
        (100, 10_000, 5),
        (2, 10_000, 2),
        (100, 0, 0),
    ] {
        let firsts: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT content FROM relay_drain_read($1, 0, 9223372036854775807, $2, $3)",
        )
        .bind(bob_id)
        .bind(limit as i64)
        .bind(budget as i64)
        .fetch_all(&app.db)
        .await
        .unwrap();
        let order: Vec<u8> = firsts.iter().map(|c| c[0]).collect();
        let want: Vec<u8> = (0..expected).collect();
        assert_eq!(order, want, "limit {limit}, budget {budget}");
    }
}

/// The store's common path writes PostgreSQL's binary copy format by hand:
/// the copy itself must succeed (through `store_batch` a failed copy would
/// be hidden by the fallback) and every column must come back as it went
/// in: a NULL sender, timestamps before PostgreSQL's epoch (2000) and far
/// after it, every byte of the content. A batch that trips a key, early or
/// only in its last row, must still store the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_batch_keeps_every_column_and_skips_only_bad_rows() {
    use signal_relay::envelope::{EnvelopeType, Message};
    use signal_relay::storage::messages::{Stored, copy_batch, store_batch};
    use std::sync::Arc;

    let app = spawn_app().await;
    let (alice_id, _) = offline(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    let message = |seq: i64, sender: Option<Uuid>, recipient: Uuid| Message {
        id: Uuid::new_v4(),
        seq,
        sender_id: sender,
        sender_username: Arc::from(""),
        recipient_id: recipient,
        envelope_type: EnvelopeType::PreKeyBundle,
        content: Bytes::from(
            (0..=255u8)
                .cycle()
                .take(1000 + seq as usize)
                .collect::<Vec<u8>>(),
        ),
        server_timestamp_ms: 1_764_000_000_123 + seq,
        client_timestamp_ms: -5 - seq,
        expires_at_ms: 4_102_444_800_000 + seq,
        ephemeral: false,
    };
    let mut early = message(2, None, bob_id);
    // 1970 and 1999: before PostgreSQL's epoch, so negative offsets.
    early.server_timestamp_ms = 0;
    early.expires_at_ms = 946_684_799_999;
    let mut late = message(3, Some(bob_id), bob_id);
    // The last millisecond of year 9999.
    late.expires_at_ms = 253_402_300_799_999;
    late.envelope_type = EnvelopeType::Ciphertext;
    let first = [message(1, Some(alice_id), bob_id), early, late];
    let mut conn = app.db.acquire().await.unwrap();
    let refs: Vec<&Message> = first.iter().collect();
    copy_batch(&mut conn, &refs)
        .await
        .expect("the copy itself succeeds");
    for m in &first {
        // The content compared in the database: a failure prints a
        // verdict, not a kilobyte of bytes.
        let row: (Option<Uuid>, Uuid, bool, i64, i64, i64, i16, i64) = sqlx::query_as(
            "SELECT sender_id, recipient_id, content = $2, \
                    (extract(epoch FROM created_at) * 1000)::int8, \
                    (extract(epoch FROM expires_at) * 1000)::int8, seq, envelope_type, client_timestamp \
             FROM messages WHERE id = $1",
        )
        .bind(m.id)
        .bind(m.content.to_vec())
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!(
            row,
            (
                m.sender_id,
                m.recipient_id,
                true,
                m.server_timestamp_ms,
                m.expires_at_ms,
                m.seq,
                m.envelope_type.code(),
                m.client_timestamp_ms,
            ),
            "message {}",
            m.seq
        );
    }
    // One row stored already (the copy fails on its first row), then one
    // unknown recipient in the last row only (it fails at the end): each
    // time the guarded insert stores the new ones alone.
    let new = message(4, Some(alice_id), alice_id);
    let stranger = message(5, Some(alice_id), Uuid::new_v4());
    let refs = vec![&first[0], &stranger, &new];
    assert_eq!(
        store_batch(&mut conn, &refs).await.unwrap(),
        [
            Stored::AlreadyStored,
            Stored::UnknownRecipient,
            Stored::Inserted
        ]
    );
    let (newer, stranger) = (message(6, None, bob_id), message(7, None, Uuid::new_v4()));
    assert_eq!(
        store_batch(&mut conn, &[&newer, &stranger]).await.unwrap(),
        [Stored::Inserted, Stored::UnknownRecipient]
    );
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(count, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_during_a_drain_arrive_after_the_drained_ones() {
    let app = spawn_app_with(|c| {
        c.limits.messaging.drain_batch = 4;
        c.limits.rates.send_burst = 10_000.0;
    })
    .await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    for i in 0..300 {
        alice.send(text(bob_id, &format!("old{i}"))).await.unwrap();
    }

    let (bob, mut bob_events) = app.resume(&bob_token).await;
    // The drain has begun; keep sending while it runs.
    let first = next_delivery(&mut bob_events).await;
    assert_eq!(first.content.as_ref(), b"old0");
    let sender = tokio::spawn({
        let alice = alice.clone();
        async move {
            let mut outcomes = Vec::new();
            for i in 0..30 {
                outcomes.push(alice.send(text(bob_id, &format!("new{i}"))).await.unwrap());
            }
            outcomes
        }
    });
    let mut received = vec![String::from_utf8(first.content.to_vec()).unwrap()];
    let mut queue_empty_at = None;
    let mut to_ack = vec![id_of(&first)];
    while received.len() < 330 {
        match next_event(&mut bob_events).await {
            Event::Deliver(envelope) => {
                to_ack.push(id_of(&envelope));
                received.push(String::from_utf8(envelope.content.to_vec()).unwrap());
                // Ack as a real client does, so live sends can complete.
                if to_ack.len() >= 16 {
                    bob.ack(&std::mem::take(&mut to_ack)).await.unwrap();
                }
            }
            Event::QueueEmpty => {
                assert!(queue_empty_at.is_none(), "queue-empty is sent once");
                queue_empty_at = Some(received.len());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    if !to_ack.is_empty() {
        bob.ack(&to_ack).await.unwrap();
    }
    let expected: Vec<String> = (0..300)
        .map(|i| format!("old{i}"))
        .chain((0..30).map(|i| format!("new{i}")))
        .collect();
    assert_eq!(received, expected);
    assert!(
        queue_empty_at.unwrap_or(330) >= 300,
        "queue-empty comes after the drained messages"
    );
    let outcomes = sender.await.unwrap();
    assert!(outcomes.iter().all(|s| s.outcome != SendOutcome::Dropped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_disconnects_before_acking_gets_the_message_again() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob, mut bob_events, bob_id, bob_token) = online(&app, "bob").await;

    let send = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send(text(bob_id, "ack me")).await }
    });
    let first = next_delivery(&mut bob_events).await;
    bob.close().await;
    bob.closed().await;
    let sent = send.await.unwrap().unwrap();
    assert_eq!(
        sent.outcome,
        SendOutcome::Queued,
        "stored when the recipient left"
    );

    let (_bob, mut bob_events) = app.resume(&bob_token).await;
    let again = next_delivery(&mut bob_events).await;
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.content.as_ref(), b"ack me");
    expect_queue_empty(&mut bob_events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_live_message_is_stored_after_the_ack_timeout() {
    let app = spawn_app_with(|c| c.limits.messaging.ack_timeout_ms = 200).await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob, mut bob_events, bob_id, _) = online(&app, "bob").await;
    let send = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send(text(bob_id, "slow ack")).await }
    });
    let envelope = next_delivery(&mut bob_events).await;
    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent.outcome, SendOutcome::Queued);
    assert_eq!(stored_count(&app, bob_id).await, 1);
    // A late ack still removes it.
    let (acked, _) = bob.ack(&[id_of(&envelope)]).await.unwrap();
    assert_eq!(acked, vec![id_of(&envelope)]);
    assert_eq!(stored_count(&app, bob_id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_a_client_message_id_are_idempotent() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    let with_id = |body: &str, client_id: &str| {
        let mut m = text(bob_id, body);
        m.client_message_id = Some(Bytes::copy_from_slice(client_id.as_bytes()));
        m
    };
    let first = alice.send(with_id("once", "c1")).await.unwrap();
    let retry = alice.send(with_id("once", "c1")).await.unwrap();
    assert_eq!(first, retry);
    assert_eq!(first.outcome, SendOutcome::Queued);
    assert_eq!(stored_count(&app, bob_id).await, 1, "never stored twice");

    // Live: delivered once; the retry answers `delivered` without a copy.
    let (bob, mut bob_events) = app.resume(&bob_token).await;
    let queued = next_delivery(&mut bob_events).await;
    expect_queue_empty(&mut bob_events).await;
    bob.ack(&[id_of(&queued)]).await.unwrap();
    // Drain the receipt Alice gets for the queued one later; not checked here.
    let send = tokio::spawn({
        let alice = alice.clone();
        let m = with_id("live", "c2");
        async move { alice.send(m).await }
    });
    let live = next_delivery(&mut bob_events).await;
    bob.ack(&[id_of(&live)]).await.unwrap();
    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent.outcome, SendOutcome::Delivered);
    let retry = alice.send(with_id("live", "c2")).await.unwrap();
    assert_eq!(retry, sent);
    // The next thing Bob sees is a new message, not a second copy.
    let send = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send(text(bob_id, "next")).await }
    });
    let next = next_delivery(&mut bob_events).await;
    assert_eq!(next.content.as_ref(), b"next");
    bob.ack(&[id_of(&next)]).await.unwrap();
    send.await.unwrap().unwrap();

    // Different senders with the same client id get different messages.
    let (carol, _ce, _, _) = online(&app, "carol").await;
    bob.close().await;
    bob.closed().await;
    let other = carol.send(with_id("carol's", "c1")).await.unwrap();
    assert_ne!(other.message_id, first.message_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_messages_to_offline_recipients_are_dropped() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    let mut typing = text(bob_id, "typing...");
    typing.ephemeral = true;
    let sent = alice.send(typing.clone()).await.unwrap();
    assert_eq!(sent.outcome, SendOutcome::Dropped);
    assert_eq!(stored_count(&app, bob_id).await, 0);

    let (bob, mut bob_events, _) = {
        let (c, e) = app.connect().await;
        let auth = c.login("bob", "password123").await.unwrap();
        (c, e, auth)
    };
    expect_queue_empty(&mut bob_events).await;
    let send = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send(typing).await }
    });
    let envelope = next_delivery(&mut bob_events).await;
    bob.ack(&[id_of(&envelope)]).await.unwrap();
    assert_eq!(send.await.unwrap().unwrap().outcome, SendOutcome::Delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_delivered_and_are_swept() {
    let app = spawn_app_with(|c| c.limits.housekeeping.sweep_interval_secs = 1).await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    let mut short = text(bob_id, "expires");
    short.ttl_seconds = 3600;
    alice.send(short).await.unwrap();
    alice.send(text(bob_id, "stays")).await.unwrap();
    // Age the first message past its expiry rather than waiting an hour.
    sqlx::query("UPDATE messages SET expires_at = now() - interval '1 second' WHERE content = $1")
        .bind(&b"expires"[..])
        .execute(&app.db)
        .await
        .unwrap();
    let expires: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT expires_at FROM messages WHERE content = $1")
            .bind(&b"stays"[..])
            .fetch_one(&app.db)
            .await
            .unwrap();
    let ttl = expires - chrono::Utc::now();
    assert!(
        ttl > chrono::Duration::days(29),
        "the default TTL is the server maximum"
    );

    let (_bob, mut bob_events) = app.resume(&bob_token).await;
    let only = next_delivery(&mut bob_events).await;
    assert_eq!(only.content.as_ref(), b"stays");
    expect_queue_empty(&mut bob_events).await;

    // The periodic sweeper removes the expired row.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let expired: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE expires_at <= now()")
                .fetch_one(&app.db)
                .await
                .unwrap();
        if expired == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sweeper never ran"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(stored_count(&app, bob_id).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_in_bounded_batches() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    for i in 0..25 {
        alice.send(text(bob_id, &format!("x{i}"))).await.unwrap();
    }
    sqlx::query("UPDATE messages SET expires_at = now() - interval '1 minute'")
        .execute(&app.db)
        .await
        .unwrap();
    let swept = signal_relay::server::sweeper::sweep_once(&app.db, 4)
        .await
        .unwrap();
    assert_eq!(swept, 25);
    assert_eq!(stored_count(&app, bob_id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acking_a_queued_message_sends_the_sender_a_receipt() {
    let app = spawn_app().await;
    let (alice, mut alice_events, alice_id, alice_token) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    let first = alice.send(text(bob_id, "one")).await.unwrap();
    let second = alice.send(text(bob_id, "two")).await.unwrap();

    let (bob, mut bob_events) = app.resume(&bob_token).await;
    let m1 = next_delivery(&mut bob_events).await;
    let m2 = next_delivery(&mut bob_events).await;
    bob.ack(&[id_of(&m1)]).await.unwrap();
    // Alice is online: a live receipt.
    let receipt = next_event(&mut alice_events).await;
    assert_eq!(receipt.receipt_for(), Some(first.message_id));
    let Event::Deliver(envelope) = receipt else {
        unreachable!()
    };
    assert_eq!(envelope.sender_id.as_ref(), bob_id.as_bytes());
    alice.ack(&[id_of(&envelope)]).await.unwrap();

    // Alice offline: the receipt is stored for her.
    alice.close().await;
    alice.closed().await;
    bob.ack(&[id_of(&m2)]).await.unwrap();
    wait_until("the receipt is stored", || async {
        stored_count(&app, alice_id).await == 1
    })
    .await;
    let (_alice, mut alice_events) = app.resume(&alice_token).await;
    let stored = next_event(&mut alice_events).await;
    assert_eq!(stored.receipt_for(), Some(second.message_id));
    expect_queue_empty(&mut alice_events).await;
}

/// An ack and the receipts it must store commit together (issue 14: a
/// crash between the delete and the receipt's insert lost the receipt).
/// The database itself fails the receipt's insert, through a trigger, as a
/// crash at that point would: the ack must fail whole, leaving the message
/// queued, and succeed with its receipt once the database recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_and_its_stored_receipt_commit_together() {
    let app = spawn_app().await;
    let (alice, _alice_events, alice_id, alice_token) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    let sent = alice.send(text(bob_id, "one")).await.unwrap();
    assert_eq!(sent.outcome, SendOutcome::Queued);
    // Alice offline: her receipt must be stored.
    alice.close().await;
    alice.closed().await;

    sqlx::query(
        "CREATE FUNCTION fail_receipts() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.envelope_type = 5 THEN RAISE EXCEPTION 'injected: receipt insert fails'; END IF; \
           RETURN NEW; \
         END $$",
    )
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER fail_receipts BEFORE INSERT ON messages \
         FOR EACH ROW EXECUTE FUNCTION fail_receipts()",
    )
    .execute(&app.db)
    .await
    .unwrap();

    let (bob, mut bob_events) = app.resume(&bob_token).await;
    let message = next_delivery(&mut bob_events).await;
    match bob.ack(&[id_of(&message)]).await {
        Err(ClientError::Status {
            status: Status::InternalError,
            ..
        }) => {}
        other => panic!("the ack must fail with its receipt, got {other:?}"),
    }
    assert_eq!(
        stored_count(&app, bob_id).await,
        1,
        "the failed ack deleted nothing"
    );
    assert_eq!(stored_count(&app, alice_id).await, 0);

    sqlx::query("DROP TRIGGER fail_receipts ON messages")
        .execute(&app.db)
        .await
        .unwrap();
    let (acked, unknown) = bob.ack(&[id_of(&message)]).await.unwrap();
    assert_eq!((acked, unknown), (vec![id_of(&message)], vec![]));
    assert_eq!(stored_count(&app, bob_id).await, 0);
    // Stored before the ack answered, in its transaction.
    assert_eq!(stored_count(&app, alice_id).await, 1);
    let (_alice, mut alice_events) = app.resume(&alice_token).await;
    let receipt = next_event(&mut alice_events).await;
    assert_eq!(receipt.receipt_for(), Some(sent.message_id));
    expect_queue_empty(&mut alice_events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_foreign_or_unknown_ids_have_no_effect() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    let (carol, _ce, _, _) = online(&app, "carol").await;
    let for_bob = alice.send(text(bob_id, "bob's")).await.unwrap();
    let random = Uuid::new_v4();
    let (acked, unknown) = carol.ack(&[for_bob.message_id, random]).await.unwrap();
    assert!(acked.is_empty());
    assert_eq!(unknown.len(), 2);
    assert_eq!(
        stored_count(&app, bob_id).await,
        1,
        "Bob's message is untouched"
    );
    match carol
        .request(signal_relay::proto::client_frame::Request::AckMessages(
            Default::default(),
        ))
        .await
    {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, Status::BadRequest),
        other => panic!("{other:?}"),
    }
}

/// An ack whose socket goes away at once must leave no transaction open.
/// With sqlx, a transaction whose `BEGIN` is cancelled in flight goes back
/// to the pool still open, and whoever borrows that connection next runs
/// in it, uncommitted, holding locks (in cluster mode: a heartbeat never
/// committed, a claim's lock held for seconds). So acks run detached from
/// their sockets: after each ack cut off by its socket, no connection is
/// left idle in a transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_cut_off_by_their_socket_leave_no_transaction_open() {
    const ROUNDS: usize = 40;
    let app = spawn_app().await;
    let (alice, _alice_events, _, _) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    for round in 0..ROUNDS {
        let sent = alice.send(text(bob_id, "cut off")).await.unwrap();
        assert_eq!(sent.outcome, SendOutcome::Queued);
        let mut bob = Raw::upgrade(&app, Some(&bob_token)).await;
        let message_id = loop {
            let (_, payload) = bob.next_frame().await;
            let frame = ServerFrame::decode(&payload[..]).expect("a server frame");
            if let Some(server_frame::Kind::Push(Push {
                event: Some(push::Event::Deliver(envelope)),
            })) = frame.kind
            {
                break envelope.message_id;
            }
        };
        let ack = ClientFrame {
            request_id: 1,
            request: Some(client_frame::Request::AckMessages(AckMessages {
                message_ids: vec![message_id],
            })),
        };
        bob.send(&frame(true, 0, BINARY, &ack.encode_to_vec()))
            .await;
        // Gone with the ack in flight.
        drop(bob);
        wait_until(
            &format!("no transaction is left open (round {round})"),
            || async {
                let open: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND state LIKE 'idle in transaction%'",
                )
                .fetch_one(&app.db)
                .await
                .unwrap();
                open == 0
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_recipients_bad_types_and_size_limits() {
    let app = spawn_app_with(|c| c.limits.messaging.max_message_bytes = 1024).await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    let status = |r: Result<Sent, ClientError>| r.unwrap_err().status().unwrap();

    assert_eq!(
        status(alice.send(text(Uuid::new_v4(), "who?")).await),
        Status::NotFound
    );
    let big = Outgoing::new(bob_id, vec![7u8; 1025]);
    assert_eq!(status(alice.send(big).await), Status::PayloadTooLarge);
    let ok = Outgoing::new(bob_id, vec![7u8; 1024]);
    assert_eq!(alice.send(ok).await.unwrap().outcome, SendOutcome::Queued);
    let empty = Outgoing::new(bob_id, Vec::new());
    assert_eq!(status(alice.send(empty).await), Status::BadRequest);
    let mut receipt = text(bob_id, "forged");
    receipt.envelope_type = EnvelopeType::Receipt;
    assert_eq!(
        status(alice.send(receipt).await),
        Status::BadRequest,
        "only the server makes receipts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_size_limit_is_96_kib() {
    let app = spawn_app().await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    let at = Outgoing::new(bob_id, vec![1u8; 96 * 1024]);
    assert_eq!(alice.send(at).await.unwrap().outcome, SendOutcome::Queued);
    let over = Outgoing::new(bob_id, vec![1u8; 96 * 1024 + 1]);
    assert_eq!(
        alice.send(over).await.unwrap_err().status(),
        Some(Status::PayloadTooLarge)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_are_rate_limited_with_retry_after() {
    let app = spawn_app_with(|c| {
        c.limits.rates.send_burst = 5.0;
        // Slow enough that no token comes back during the test, however
        // loaded the host.
        c.limits.rates.send_rate_per_sec = 0.01;
    })
    .await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, _) = offline(&app, "bob").await;
    for _ in 0..5 {
        alice.send(text(bob_id, "ok")).await.unwrap();
    }
    match alice.send(text(bob_id, "too many")).await.unwrap_err() {
        ClientError::Status {
            status,
            retry_after,
            ..
        } => {
            assert_eq!(status, Status::RateLimited);
            let retry = retry_after.expect("retry-after");
            assert!(
                retry > std::time::Duration::ZERO && retry <= std::time::Duration::from_secs(100)
            );
        }
        other => panic!("{other}"),
    }
    // Other senders are not affected.
    let (carol, _ce, _, _) = online(&app, "carol").await;
    carol.send(text(bob_id, "fine")).await.unwrap();
}

/// A recipient that stops reading must not make the server buffer without
/// bound: its queue overflows to storage, the stalled socket is closed, and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_overflows_to_storage_and_a_stalled_one_is_closed() {
    let app = spawn_app_with(|c| {
        c.limits.messaging.outbound_queue = 4;
        c.limits.messaging.max_unacked = 4;
        c.limits.connection.write_timeout_secs = 1;
        c.limits.rates.send_burst = 10_000.0;
        // All sends below are in flight at once.
        c.limits.connection.max_inflight_requests = 1_024;
    })
    .await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    // Bob connects but reads only one push, then stops reading entirely.
    let options = ConnectOptions {
        event_buffer: 1,
        ..ConnectOptions::default()
    };
    let (bob, mut bob_events) = Client::connect_with(&app.url, options).await.unwrap();
    bob.resume(&bob_token).await.unwrap();
    expect_queue_empty(&mut bob_events).await;

    const N: usize = 400;
    let payload = vec![0x5a; 60 * 1024];
    let sends = (0..N).map(|i| {
        let alice = alice.clone();
        let mut m = Outgoing::new(bob_id, payload.clone());
        m.client_message_id = Some(Bytes::from(format!("slow{i}")));
        async move { alice.send(m).await }
    });
    // Sends complete even though Bob reads nothing: his queue overflowed to
    // storage rather than into server memory.
    let results = tokio::time::timeout(WAIT, futures::future::join_all(sends))
        .await
        .expect("sends to a stalled reader complete");
    let mut ids = Vec::new();
    for r in results {
        let sent = r.unwrap();
        assert_ne!(sent.outcome, SendOutcome::Dropped);
        ids.push(sent.message_id);
    }
    assert_eq!(
        stored_count(&app, bob_id).await as usize,
        N,
        "everything unacked is in storage"
    );
    // The socket that stopped reading is cut off by the write timeout. (The
    // client itself cannot see that while it refuses to read.)
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.registry.is_online(bob_id) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled socket stays open"
        );
        tokio::task::yield_now().await;
    }
    drop(bob_events);
    tokio::time::timeout(WAIT, bob.closed())
        .await
        .expect("the client sees the close");

    // Nothing was lost.
    let (bob, mut bob_events) = app.resume(&bob_token).await;
    let mut seen = std::collections::HashSet::new();
    loop {
        match next_event(&mut bob_events).await {
            Event::Deliver(envelope) => {
                seen.insert(id_of(&envelope));
                bob.ack(&[id_of(&envelope)]).await.unwrap();
            }
            Event::QueueEmpty => break,
            other => panic!("{other:?}"),
        }
    }
    for id in ids {
        assert!(seen.contains(&id), "message {id} was lost");
    }
}

/// A recipient that authenticates and then never reads must not hold its
/// senders for the write timeout: once the relay's writes to it block, the
/// ack timeout still holds (issue 14: 2,304 senders waited 20 s for the
/// write timeout instead of 5 s). Nothing is lost: reconnecting, the
/// recipient drains every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_never_reads_holds_its_senders_no_longer_than_the_ack_timeout() {
    const ACK_TIMEOUT: Duration = Duration::from_millis(500);
    const WRITE_TIMEOUT_SECS: u64 = 120;
    const SENDERS: usize = 20;
    const EACH: usize = 60;
    let app = spawn_app_with(|c| {
        c.limits.messaging.ack_timeout_ms = ACK_TIMEOUT.as_millis() as u64;
        // Far beyond the test's patience: waiting for it is the bug.
        c.limits.connection.write_timeout_secs = WRITE_TIMEOUT_SECS;
        c.limits.connection.idle_timeout_secs = WRITE_TIMEOUT_SECS;
    })
    .await;
    let (bob_id, bob_token) = offline(&app, "bob").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(online(&app, &format!("sender{i}")).await.0);
    }

    // Bob authenticates at the upgrade, reads up to his queue-empty push
    // (from then on the relay delivers to him live), and never reads
    // again. A small receive buffer makes the relay's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let mut bob = Raw::upgrade_on(stream, Some(&bob_token)).await;
    loop {
        let (_, payload) = bob.next_frame().await;
        let frame = ServerFrame::decode(&payload[..]).expect("a server frame");
        if let Some(server_frame::Kind::Push(Push {
            event: Some(push::Event::QueueEmpty(_)),
        })) = frame.kind
        {
            break;
        }
    }

    // 1,200 messages of 8 KiB: far more than the socket's buffers hold.
    let payload = Bytes::from(vec![0x5a; 8 * 1024]);
    let sends = senders.iter().flat_map(|sender| {
        let payload = payload.clone();
        (0..EACH).map(move |_| {
            let sender = sender.clone();
            let payload = payload.clone();
            async move {
                let started = Instant::now();
                let sent = sender.send(Outgoing::new(bob_id, payload)).await;
                (sent, started.elapsed())
            }
        })
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(sends))
        .await
        .expect("every sender is answered well before the write timeout");
    let mut ids = std::collections::HashSet::new();
    let mut slowest = Duration::ZERO;
    for (sent, took) in results {
        let sent = sent.unwrap();
        assert_eq!(sent.outcome, SendOutcome::Queued, "bob acks nothing");
        ids.insert(sent.message_id);
        slowest = slowest.max(took);
    }
    assert_eq!(ids.len(), SENDERS * EACH);
    // The ack timeout, plus time to store and answer on a busy host: far
    // from the write timeout.
    assert!(
        slowest < ACK_TIMEOUT + Duration::from_secs(10),
        "a sender waited {slowest:?}"
    );

    // Nothing was lost: bob reconnects (displacing his stalled socket) and
    // drains everything.
    let (bob_again, mut bob_events) = app.resume(&bob_token).await;
    let mut seen = std::collections::HashSet::new();
    loop {
        match next_event(&mut bob_events).await {
            Event::Deliver(envelope) => {
                seen.insert(id_of(&envelope));
                bob_again.ack(&[id_of(&envelope)]).await.unwrap();
            }
            Event::QueueEmpty => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, ids, "every message is delivered once bob reads");
    drop(bob);
}

/// Reconnects share the storage reader's statements (session lookups and
/// drain reads are batched over its connections). Many at once through a
/// single reader connection must still each get exactly their own session
/// and their own queue, in order, while a bad token among them is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconnects_each_get_their_own_session_and_queue() {
    let app = spawn_app_with(|c| {
        c.limits.reader.db_readers = 1;
        c.limits.messaging.drain_batch = 3;
    })
    .await;
    let (alice, _ae, _, _) = online(&app, "alice").await;
    let mut users = Vec::new();
    for u in 0..8 {
        let (id, token) = offline(&app, &format!("user{u}")).await;
        for i in 0..5 {
            let sent = alice.send(text(id, &format!("u{u}m{i}"))).await.unwrap();
            assert_eq!(sent.outcome, SendOutcome::Queued);
        }
        users.push((u, token));
    }

    let app = &app;
    let reconnects = users.iter().map(|(u, token)| async move {
        let (client, mut events) = app.resume(token).await;
        for i in 0..5 {
            let envelope = next_delivery(&mut events).await;
            assert_eq!(envelope.content.as_ref(), format!("u{u}m{i}").as_bytes());
        }
        expect_queue_empty(&mut events).await;
        assert_eq!(
            client.who_am_i().await.unwrap().username,
            format!("user{u}")
        );
    });
    let impostor = async {
        let (client, _events) = app.connect().await;
        assert!(client.resume(&[7u8; 32]).await.is_err());
    };
    tokio::join!(futures::future::join_all(reconnects), impostor);
}
