//! The scenarios.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use signal_relay::client::{CloseInfo, Event, Outgoing};
use signal_relay::proto::{SendOutcome, Status};
use uuid::Uuid;

use crate::checker::Checker;
use crate::support::{Cluster, User, WAIT};
use crate::traffic::{Receiving, read_until_closed, send_all};

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..10])
}

async fn next_event(events: &mut signal_relay::client::Events) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("timed out waiting for a push")
        .expect("connection closed while waiting for a push")
}

/// Connects `user` to node `node`, live once their queue is empty, and
/// records what the socket receives (`via`) until it is closed; the task
/// ends with how it was closed.
async fn connect_and_read(
    cluster: &Cluster,
    node: usize,
    checker: &Arc<Checker>,
    user: &User,
    via: &'static str,
) -> tokio::task::JoinHandle<CloseInfo> {
    let (client, mut events) = cluster.connect(node, user).await;
    assert!(matches!(next_event(&mut events).await, Event::QueueEmpty));
    let (checker, user) = (checker.clone(), user.clone());
    tokio::spawn(async move {
        read_until_closed(&checker, &user, &client, &mut events, via).await;
        client.closed().await
    })
}

/// Waits until every confirmed message has arrived, stops `receiving`,
/// and holds what happened to the contracts.
async fn verify_once_all_arrived(checker: &Checker, receiving: Receiving) {
    wait_until("every confirmed message arrived", || checker.all_arrived()).await;
    receiving.stop().await;
    checker.verify();
}

/// Waits until `condition` holds (re-checking every few milliseconds).
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_live_queued_and_dropped() {
    let cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(1, &unique("bob")).await;

    // Bob offline: queued, through any node; an ephemeral one is dropped.
    let (a, _a_events) = cluster.connect(0, &alice).await;
    let sent = a
        .send(Outgoing::new(bob.id, Bytes::from("0")))
        .await
        .unwrap();
    assert_eq!(sent.outcome, SendOutcome::Queued);
    let mut typing = Outgoing::new(bob.id, Bytes::from("typing"));
    typing.ephemeral = true;
    assert_eq!(
        a.send(typing.clone()).await.unwrap().outcome,
        SendOutcome::Dropped
    );

    // Bob connects to node 3 and drains it there.
    let (b, mut b_events) = cluster.connect(2, &bob).await;
    match next_event(&mut b_events).await {
        Event::Deliver(e) => {
            assert_eq!(&e.content[..], b"0");
            b.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                .await
                .unwrap();
        }
        other => panic!("expected the stored message, got {other:?}"),
    }
    assert!(matches!(next_event(&mut b_events).await, Event::QueueEmpty));

    // Live across nodes: delivered only after Bob's ack.
    let b2 = b.clone();
    let acker = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 50 {
            if let Event::Deliver(e) = next_event(&mut b_events).await {
                got.push(String::from_utf8(e.content.to_vec()).unwrap());
                b2.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                    .await
                    .unwrap();
            }
        }
        (got, b_events)
    });
    let sends = (1..=50).map(|n| {
        let a = a.clone();
        async move {
            a.send(Outgoing::new(bob.id, Bytes::from(n.to_string())))
                .await
        }
    });
    for sent in futures::future::join_all(sends).await {
        assert_eq!(sent.unwrap().outcome, SendOutcome::Delivered);
    }
    let (got, mut b_events) = acker.await.unwrap();
    let expected: Vec<String> = (1..=50).map(|n| n.to_string()).collect();
    assert_eq!(got, expected, "in send order");

    // Ephemeral to an online user on another node: delivered.
    typing_is_delivered(&a, typing, &b, &mut b_events).await;

    // Bob moves to node 2. Node 1 learned from the lane that node 3 held
    // him; an ephemeral message must still find him (node 3 would answer
    // that it dropped it).
    let (b, mut b_events) = cluster.connect(1, &bob).await;
    assert!(matches!(next_event(&mut b_events).await, Event::QueueEmpty));
    let mut moved_typing = Outgoing::new(bob.id, Bytes::from("typing again"));
    moved_typing.ephemeral = true;
    typing_is_delivered(&a, moved_typing, &b, &mut b_events).await;
}

/// Sends the ephemeral `typing` from `a` and expects it pushed to `b`,
/// acked, and confirmed `DELIVERED`.
async fn typing_is_delivered(
    a: &signal_relay::client::Client,
    typing: Outgoing,
    b: &signal_relay::client::Client,
    b_events: &mut signal_relay::client::Events,
) {
    let content = typing.content.clone();
    let typing_sent = tokio::spawn({
        let a = a.clone();
        async move { a.send(typing).await.unwrap().outcome }
    });
    match next_event(b_events).await {
        Event::Deliver(e) => {
            assert_eq!(e.content, content);
            b.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                .await
                .unwrap();
        }
        other => panic!("expected the typing message, got {other:?}"),
    }
    assert_eq!(typing_sent.await.unwrap(), SendOutcome::Delivered);
}

/// Bob moves to another node while Redis is down, so his old node cannot
/// be asked to let him go. The new node used to claim him at once, and the
/// old one went on delivering to his old socket until its next ownership
/// check: a message Alice sent there after one stored for Bob meanwhile
/// reached him first. The old node must have stopped delivering to him (it
/// sees the claim wanted in PostgreSQL, or its lease runs out) before
/// anyone else takes him.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_moving_while_redis_is_down_keeps_order() {
    let mut cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    let old_reader = connect_and_read(&cluster, 1, &checker, &bob, "old").await;
    let (alice_old, _alice_old_events) = cluster.connect(1, &alice).await;
    cluster.redis.kill().await;
    // Bob connects to node 3 and leaves again: nobody holds him then.
    let (bob_new, _bob_new_events) = cluster.connect(2, &bob).await;
    bob_new.close().await;
    let db = sqlx::PgPool::connect(&cluster.db_url()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay_presence WHERE user_id = $1")
                .bind(bob.id)
                .fetch_one(&db)
                .await
                .unwrap();
        if held == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob was never let go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Alice, now on node 1, sends a first message: stored for Bob.
    let (alice_new, _alice_new_events) = cluster.connect(0, &alice).await;
    checker.attempt(alice.id, bob.id, 1, "alice on node 1");
    let first = alice_new
        .send(Outgoing::new(bob.id, Bytes::from("1")))
        .await
        .unwrap();
    assert_eq!(first.outcome, SendOutcome::Queued);
    checker.answered(alice.id, bob.id, 1, first.message_id, first.outcome);
    // Then a second through her old connection, if node 2 still takes it:
    // it must not reach Bob before the first.
    checker.attempt(alice.id, bob.id, 2, "alice on node 2");
    if let Ok(second) = alice_old
        .send(Outgoing::new(bob.id, Bytes::from("2")))
        .await
    {
        checker.answered(alice.id, bob.id, 2, second.message_id, second.outcome);
    }
    old_reader.await.unwrap();
    let receiver = Receiving::start(&checker, &bob, urls(&cluster, &[0]), None);
    verify_once_all_arrived(&checker, receiver).await;
}

/// A node that cannot reach PostgreSQL cannot know whether another node
/// has taken its users over, so once its lease runs out it writes them no
/// more messages: a socket with one due is closed with 1013, the message
/// unconfirmed, and the node lets nobody in until it has confirmed its
/// claims again. Once the database is back the user reconnects, and
/// nothing confirmed was lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_postgres_stops_delivering_once_its_lease_runs_out() {
    let pg = signal_relay::testing::PrivatePostgres::start();
    let db_name = unique("relay_lease");
    let cluster = Cluster::start_on(
        1,
        db_name.clone(),
        pg.url(&db_name),
        &[
            ("RELAY_CLUSTER_RELEASE_TIMEOUT_MS", "1000"),
            // Its heartbeat is stale once the database is back: it must not
            // declare itself dead then.
            ("RELAY_CLUSTER_DEAD_AFTER_MS", "600000"),
        ],
    )
    .await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    let (alice_client, _alice_events) = cluster.connect(0, &alice).await;
    let old_reader = connect_and_read(&cluster, 0, &checker, &bob, "old").await;
    let send = |n: u64| {
        checker.attempt(alice.id, bob.id, n, "alice");
        alice_client.send(Outgoing::new(bob.id, Bytes::from(n.to_string())))
    };
    let first = send(1).await.unwrap();
    assert_eq!(first.outcome, SendOutcome::Delivered);
    checker.answered(alice.id, bob.id, 1, first.message_id, first.outcome);

    tokio::task::block_in_place(|| pg.stop());
    // Live delivery needs no database, until the lease runs out.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 1;
    let refused = loop {
        n += 1;
        match send(n).await {
            Ok(sent) => {
                assert_eq!(sent.outcome, SendOutcome::Delivered);
                checker.answered(alice.id, bob.id, n, sent.message_id, sent.outcome);
            }
            Err(err) => break err,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node went on delivering without its database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.status(), Some(Status::Unavailable), "{refused}");
    let closed = old_reader.await.unwrap();
    assert_eq!(closed.code, Some(1013), "{closed:?}");

    tokio::task::block_in_place(|| pg.start_again());
    let receiver = Receiving::start(&checker, &bob, urls(&cluster, &[0]), None);
    // Refused until the node has confirmed its claims, then live again.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        n += 1;
        if let Ok(sent) = send(n).await {
            checker.answered(alice.id, bob.id, n, sent.message_id, sent.outcome);
            if sent.outcome == SendOutcome::Delivered {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was delivered after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    verify_once_all_arrived(&checker, receiver).await;
}

/// A sender moves to another node while the recipient's node is paused
/// (for less than dead-after), with one message of theirs forwarded there
/// unrouted and the next waiting behind it in the old node's lane. The old
/// node lets them go after the release timeout; the waiting message must
/// then fail (the sender's socket is closed, it was never confirmed)
/// rather than reach the recipient after what the sender sends through
/// their new node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_moving_while_the_recipients_node_is_paused_keeps_order() {
    let cluster = Cluster::start_with(
        3,
        &[
            ("RELAY_CLUSTER_RELEASE_TIMEOUT_MS", "1000"),
            ("RELAY_CLUSTER_DEAD_AFTER_MS", "30000"),
        ],
    )
    .await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(2, &unique("bob")).await;
    let (b, mut b_events) = cluster.connect(2, &bob).await;
    assert!(matches!(next_event(&mut b_events).await, Event::QueueEmpty));
    let received = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.last().map(String::as_str) != Some("last") {
            if let Event::Deliver(e) = next_event(&mut b_events).await {
                got.push(String::from_utf8(e.content.to_vec()).unwrap());
                b.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                    .await
                    .unwrap();
            }
        }
        got
    });
    let in_flight = |i: usize| {
        let node = &cluster.nodes[i];
        async move {
            (
                node.metric("relay_cluster_lanes").await,
                node.metric("relay_cluster_units_in_flight").await,
            )
        }
    };
    let until = async |what: &str, i: usize, lanes_units: (f64, f64)| {
        let deadline = tokio::time::Instant::now() + WAIT;
        while in_flight(i).await != lanes_units {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };

    // Node 1 learns that node 3 holds Bob.
    let (a, _a_events) = cluster.connect(0, &alice).await;
    let first = a.send(Outgoing::new(bob.id, Bytes::from("first")));
    assert_eq!(first.await.unwrap().outcome, SendOutcome::Delivered);

    let paused = cluster.nodes[2].pid_handle();
    paused.pause();
    let mut forwarded = Box::pin(a.send(Outgoing::new(bob.id, Bytes::from("forwarded"))));
    assert!(futures::poll!(&mut forwarded).is_pending());
    until("the first is forwarded", 0, (1.0, 1.0)).await;
    let mut waiting = Box::pin(a.send(Outgoing::new(bob.id, Bytes::from("waiting"))));
    assert!(futures::poll!(&mut waiting).is_pending());
    // Answered after the send before it was applied: it is in the lane.
    a.who_am_i().await.unwrap();

    // Alice moves to node 2 and sends again: forwarded to paused node 3.
    let (a2, _a2_events) = cluster.connect(1, &alice).await;
    let after_move = tokio::spawn({
        let a2 = a2.clone();
        async move {
            a2.send(Outgoing::new(bob.id, Bytes::from("after the move")))
                .await
                .unwrap()
                .outcome
        }
    });
    until("the message after the move is forwarded", 1, (1.0, 1.0)).await;
    paused.resume();
    assert_eq!(after_move.await.unwrap(), SendOutcome::Delivered);
    // Whatever node 1 still had for Bob has gone (or been sent) by now.
    until("node 1 has nothing in flight", 0, (0.0, 0.0)).await;
    drop((forwarded, waiting));
    let last = a2.send(Outgoing::new(bob.id, Bytes::from("last")));
    assert_eq!(last.await.unwrap().outcome, SendOutcome::Delivered);
    assert_eq!(
        received.await.unwrap(),
        ["first", "forwarded", "after the move", "last"],
        "the waiting message is not placed after the move"
    );
}

/// A recipient hopping node 1 → 2 → 3 every 50 ms (each hop displacing the
/// previous connection) while a sender, also hopping, sends 2,000
/// messages: everything confirmed arrives, in order, with one id each.
///
/// It caught acks cancelled with their socket: an ack's transaction cut
/// off in its `BEGIN` went back to the pool open, and the claims, releases
/// and heartbeats that borrowed the connection next ran in it, uncommitted
/// (a claim invisible to the other nodes, its lock held for seconds, a
/// node declared dead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopping_sender_and_recipient_keep_order() {
    let cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(1, &unique("bob")).await;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let checker = Arc::new(Checker::default());
    let receiver = Receiving::start(
        &checker,
        &bob,
        urls.clone(),
        Some(Duration::from_millis(50)),
    );
    let mut reversed = urls.clone();
    reversed.reverse();
    let progress = {
        let checker = checker.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                eprintln!("confirmed so far: {}", checker.confirmed());
            }
        })
    };
    tokio::time::timeout(
        Duration::from_secs(120),
        send_all(
            checker.clone(),
            alice.clone(),
            bob.id,
            2_000,
            16,
            reversed,
            Some(Duration::from_millis(300)),
        ),
    )
    .await
    .expect("the sender finished");
    progress.abort();
    assert_eq!(checker.confirmed(), 2_000);
    let started = tokio::time::Instant::now();
    // Bob stops hopping and stays on one node to take the rest.
    receiver.stop().await;
    eprintln!("the hopping receiver stopped after {:?}", started.elapsed());
    let receiver = Receiving::start(&checker, &bob, urls[..1].to_vec(), None);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !checker.all_arrived() {
        if tokio::time::Instant::now() > deadline {
            let missing = checker.missing();
            let (s, r, n) = missing[0];
            panic!(
                "{} confirmed messages never arrived, e.g. {n}: {}",
                missing.len(),
                checker.history(s, r, n)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("everything arrived after {:?}", started.elapsed());
    receiver.stop().await;
    let (confirmed, arrivals) = checker.verify();
    eprintln!("confirmed {confirmed}, arrivals {arrivals}");
}

/// Bob, connected to node 2 with messages he has not acked, connects to
/// node 3: node 2 closes the old socket with 4409, and what it held
/// reaches the new connection before anything newer, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn displacement_across_nodes_keeps_what_was_held() {
    let cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let (old, mut old_events) = cluster.connect(1, &bob).await;
    assert!(matches!(
        next_event(&mut old_events).await,
        Event::QueueEmpty
    ));
    let (a, _a_events) = cluster.connect(0, &alice).await;
    // Five messages reach the old connection; Bob acks none of them.
    let mut held = Vec::new();
    for n in 0..5 {
        let a = a.clone();
        held.push(tokio::spawn(async move {
            a.send(Outgoing::new(bob.id, Bytes::from(n.to_string())))
                .await
        }));
        match next_event(&mut old_events).await {
            Event::Deliver(e) => assert_eq!(e.content, Bytes::from(n.to_string())),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    let (new, mut new_events) = cluster.connect(2, &bob).await;
    assert_eq!(
        tokio::time::timeout(WAIT, old_events.closed())
            .await
            .expect("the old socket is closed")
            .code,
        Some(4409)
    );
    drop(old);
    // The held messages were stored for Bob: their senders hear QUEUED.
    for sent in held {
        assert_eq!(sent.await.unwrap().unwrap().outcome, SendOutcome::Queued);
    }
    let newer = tokio::spawn({
        let a = a.clone();
        let bob = bob.id;
        async move { a.send(Outgoing::new(bob, Bytes::from("5"))).await }
    });
    let mut got = Vec::new();
    while got.len() < 6 {
        match next_event(&mut new_events).await {
            Event::Deliver(e) => {
                got.push(String::from_utf8(e.content.to_vec()).unwrap());
                new.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                    .await
                    .unwrap();
            }
            Event::QueueEmpty | Event::PreKeysLow(_) => {}
        }
    }
    assert_eq!(got, ["0", "1", "2", "3", "4", "5"]);
    newer.await.unwrap().unwrap();
    // What an operator sees: Alice's node forwarded to Bob's, and node 3
    // took Bob over from node 2, which let go.
    let forwarded = cluster.nodes[0]
        .metric(r#"relay_cluster_forwards_total{result="routed"}"#)
        .await;
    assert!(forwarded >= 1.0, "{forwarded}");
    assert_eq!(
        cluster.nodes[2]
            .metric(r#"relay_cluster_handoffs_total{result="released"}"#)
            .await,
        1.0
    );
}

/// A node's inbox stream deleted under traffic (the node that declares a
/// peer dead deletes its inbox while others may still write to it; a Redis
/// restart loses it without an error on a shared connection) comes back
/// with the next write, and with its expiry: a stream without one would
/// stay in Redis for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_written_again_after_its_deletion_still_expires() {
    let cluster = Cluster::start(2).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(1, &unique("bob")).await;
    let (a, _a_events) = cluster.connect(0, &alice).await;
    let (b, mut b_events) = cluster.connect(1, &bob).await;
    assert!(matches!(next_event(&mut b_events).await, Event::QueueEmpty));
    let redis = redis::Client::open(cluster.redis.url()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    for n in 0..2 {
        if n == 1 {
            let inboxes: Vec<String> = redis::cmd("KEYS")
                .arg("relay:inbox:*")
                .query_async(&mut redis)
                .await
                .unwrap();
            assert!(
                !inboxes.is_empty(),
                "the first message went through an inbox"
            );
            let _: () = redis::cmd("DEL")
                .arg(&inboxes)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        let sent = tokio::spawn({
            let a = a.clone();
            async move {
                a.send(Outgoing::new(bob.id, Bytes::from(n.to_string())))
                    .await
            }
        });
        match next_event(&mut b_events).await {
            Event::Deliver(e) => {
                assert_eq!(e.content, Bytes::from(n.to_string()));
                b.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
                    .await
                    .unwrap();
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
        assert_eq!(sent.await.unwrap().unwrap().outcome, SendOutcome::Delivered);
    }
    let inboxes: Vec<String> = redis::cmd("KEYS")
        .arg("relay:inbox:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!inboxes.is_empty(), "written again after the deletion");
    for inbox in inboxes {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&inbox)
            .query_async(&mut redis)
            .await
            .unwrap();
        assert!(ttl > 0, "{inbox} has no expiry (PTTL {ttl})");
    }
}

/// Alice sends `count` messages to Bob (a window of 8 in flight) through
/// `sender_urls` while Bob receives through `recipient_urls`, each moving
/// to their next URL when a connection fails; `disrupt` runs meanwhile.
/// Returns the checker once every confirmed message has arrived.
async fn traffic(
    cluster: &Cluster,
    count: u64,
    sender_urls: Vec<String>,
    recipient_urls: Vec<String>,
    disrupt: impl std::future::Future<Output = ()>,
) -> Arc<Checker> {
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    let receiver = Receiving::start(&checker, &bob, recipient_urls, None);
    let sender = tokio::spawn(send_all(
        checker.clone(),
        alice,
        bob.id,
        count,
        8,
        sender_urls,
        None,
    ));
    disrupt.await;
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finished")
        .unwrap();
    assert_eq!(
        checker.confirmed() as u64,
        count,
        "every send was confirmed in the end"
    );
    verify_once_all_arrived(&checker, receiver).await;
    checker
}

/// Waits until the checker has seen `n` confirmations.
async fn confirmed_at_least(checker: &Checker, n: usize) {
    wait_until("enough messages were confirmed", || {
        checker.confirmed() >= n
    })
    .await;
}

fn urls(cluster: &Cluster, nodes: &[usize]) -> Vec<String> {
    nodes.iter().map(|&i| cluster.nodes[i].url()).collect()
}

/// kill -9 of the recipient's node mid-stream: the recipient reconnects to a
/// surviving node and drains; the sender, told to retry, retries; nothing
/// confirmed is lost, order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_recipients_node_loses_nothing() {
    let mut cluster = Cluster::start(3).await;
    let sender_urls = urls(&cluster, &[0]);
    let recipient_urls = urls(&cluster, &[1, 2]);
    let victim = cluster.nodes[1].pid_handle();
    traffic(&cluster, 600, sender_urls, recipient_urls, async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        victim.kill9();
    })
    .await;

    // A user of the dead node is live on a surviving one within 15 s.
    cluster.nodes[1].restart().await;
    let carol = cluster.register(0, &unique("carol")).await;
    let (_c, mut events) = cluster.connect(1, &carol).await;
    assert!(matches!(next_event(&mut events).await, Event::QueueEmpty));
    cluster.nodes[1].kill9().await;
    let killed = tokio::time::Instant::now();
    let (_c, mut events) = cluster.connect(2, &carol).await;
    assert!(matches!(next_event(&mut events).await, Event::QueueEmpty));
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(15), "live again after {took:?}");
    eprintln!("a user of a killed node was live elsewhere after {took:?}");
}

/// kill -9 of the sender's node: its in-flight sends fail, and retried
/// through another node they keep their ids; nothing confirmed is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_senders_node_loses_nothing() {
    let cluster = Cluster::start(3).await;
    let sender_urls = urls(&cluster, &[0, 2]);
    let recipient_urls = urls(&cluster, &[1]);
    let victim = cluster.nodes[0].pid_handle();
    traffic(&cluster, 600, sender_urls, recipient_urls, async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        victim.kill9();
    })
    .await;
}

/// kill -9 of a node in the middle of hand-offs: the recipient hops every
/// 50 ms between node 2 and node 3, and node 2 dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_hand_offs_loses_nothing() {
    let cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    let receiver = Receiving::start(
        &checker,
        &bob,
        urls(&cluster, &[1, 2]),
        Some(Duration::from_millis(50)),
    );
    let sender = tokio::spawn(send_all(
        checker.clone(),
        alice,
        bob.id,
        600,
        8,
        urls(&cluster, &[0]),
        None,
    ));
    confirmed_at_least(&checker, 150).await;
    cluster.nodes[1].pid_handle().kill9();
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finished")
        .unwrap();
    verify_once_all_arrived(&checker, receiver).await;
}

/// A node paused (SIGSTOP) for 20 s while its user moves away, then
/// resumed: it finds itself declared dead and stops, and nothing it held
/// or did after waking breaks a contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_wakes_fenced_out() {
    let mut cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    // Bob starts on node 2; when it stops answering he moves to node 3.
    let receiver = Receiving::start(&checker, &bob, urls(&cluster, &[1, 2]), None);
    let sender = tokio::spawn(send_all(
        checker.clone(),
        alice,
        bob.id,
        400,
        8,
        urls(&cluster, &[0]),
        None,
    ));
    confirmed_at_least(&checker, 100).await;
    let paused = cluster.nodes[1].pid_handle();
    paused.pause();
    // Bob's client gives up on the silent node and reconnects to node 3.
    receiver.stop().await;
    let receiver = Receiving::start(&checker, &bob, urls(&cluster, &[2]), None);
    tokio::time::sleep(Duration::from_secs(20)).await;
    paused.resume();
    assert_ne!(
        cluster.nodes[1].exited().await,
        Some(0),
        "a node declared dead stops, and says so"
    );
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finished")
        .unwrap();
    verify_once_all_arrived(&checker, receiver).await;
}

/// Redis killed mid-traffic and started again empty: cross-node sends fail
/// as retryable or are stored meanwhile, never lost or reordered, and
/// everything recovers without restarting a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_empty_loses_nothing() {
    let mut cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let checker = Arc::new(Checker::default());
    let receiver = Receiving::start(&checker, &bob, urls(&cluster, &[1]), None);
    let sender = tokio::spawn(send_all(
        checker.clone(),
        alice,
        bob.id,
        600,
        8,
        urls(&cluster, &[0]),
        None,
    ));
    confirmed_at_least(&checker, 150).await;
    cluster.redis.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.redis.spawn().await;
    tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .expect("the sender finished after Redis came back")
        .unwrap();
    verify_once_all_arrived(&checker, receiver).await;
}

/// Redis down for 20 s: users on one node keep talking live, offline users
/// keep getting their messages stored, cross-node sends fail as retryable
/// (or are stored), and all of it recovers once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_20_s_degrades_and_recovers() {
    let mut cluster = Cluster::start(3).await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;
    let carol = cluster.register(0, &unique("carol")).await;
    let dave = cluster.register(0, &unique("dave")).await;
    let checker = Arc::new(Checker::default());
    // Bob is on node 2 (cross-node from Alice); Carol on node 1 with Alice.
    let receivers = [
        Receiving::start(&checker, &bob, urls(&cluster, &[1]), None),
        Receiving::start(&checker, &carol, urls(&cluster, &[0]), None),
    ];
    // Erin, on node 1, has a message queued for Frank, who is offline.
    let erin = cluster.register(0, &unique("erin")).await;
    let frank = cluster.register(0, &unique("frank")).await;
    let (e, mut e_events) = cluster.connect(0, &erin).await;
    assert!(matches!(next_event(&mut e_events).await, Event::QueueEmpty));
    let for_frank = e
        .send(Outgoing::new(frank.id, Bytes::from("r")))
        .await
        .unwrap();
    assert_eq!(for_frank.outcome, SendOutcome::Queued);
    cluster.redis.kill().await;
    // Frank drains it on node 2, but its receipt cannot cross to Erin's
    // node: the ack fails as retryable and the message stays queued, rather
    // than the receipt being lost.
    let (f, mut f_events) = cluster.connect(1, &frank).await;
    let Event::Deliver(m) = next_event(&mut f_events).await else {
        panic!("expected the stored message")
    };
    let acked_id = Uuid::from_slice(&m.message_id).unwrap();
    let err = f.ack(&[acked_id]).await.unwrap_err();
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    // Same node, live: works without Redis.
    tokio::time::timeout(
        Duration::from_secs(15),
        send_all(
            checker.clone(),
            alice.clone(),
            carol.id,
            200,
            8,
            urls(&cluster, &[0]),
            None,
        ),
    )
    .await
    .expect("same-node traffic needs no Redis");
    // Offline user: stored, whatever node the sender is on.
    let (a, _a_events) = cluster.connect(2, &alice).await;
    let queued = a
        .send(Outgoing::new(dave.id, Bytes::from("0")))
        .await
        .unwrap();
    assert_eq!(queued.outcome, SendOutcome::Queued);
    // Cross-node: retried until Redis is back, then confirmed.
    let cross = tokio::spawn(send_all(
        checker.clone(),
        alice.clone(),
        bob.id,
        100,
        8,
        urls(&cluster, &[0]),
        None,
    ));
    tokio::time::sleep(Duration::from_secs(20)).await;
    cluster.redis.spawn().await;
    tokio::time::timeout(Duration::from_secs(120), cross)
        .await
        .expect("cross-node traffic recovered")
        .unwrap();
    eprintln!(
        "missing: {:?}; bob {}, carol {}",
        checker.missing(),
        bob.id,
        carol.id
    );
    wait_until("every confirmed message arrived", || checker.all_arrived()).await;
    for receiver in receivers {
        receiver.stop().await;
    }
    checker.verify();
    // Acked again with Redis back: Erin gets the receipt on node 1.
    let (acked, _) = f.ack(&[acked_id]).await.unwrap();
    assert_eq!(acked, vec![acked_id]);
    loop {
        match next_event(&mut e_events).await {
            receipt if receipt.receipt_for().is_some() => {
                assert_eq!(receipt.receipt_for(), Some(for_frank.message_id));
                break;
            }
            _ => {}
        }
    }
    // Dave drains his message on any node.
    let (_d, mut d_events) = cluster.connect(1, &dave).await;
    match next_event(&mut d_events).await {
        Event::Deliver(e) => assert_eq!(&e.content[..], b"0"),
        other => panic!("expected the stored message, got {other:?}"),
    }
}

/// Receipts, PreKeysLow and an account's deletion reach a user on whichever
/// node they are connected to. An ack waits for its receipt to be placed
/// on the sender's node, not for the sender to ack the receipt: here the
/// sender never does, and deliveries wait longer for acks than forwards
/// wait for answers, so an ack that waited for more would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_pushes_and_deletion_cross_nodes() {
    use signal_relay::keys::testing::TestIdentity;
    let cluster = Cluster::start_with(
        3,
        &[
            ("RELAY_ACK_TIMEOUT_MS", "60000"),
            ("RELAY_CLUSTER_FORWARD_TIMEOUT_MS", "3000"),
        ],
    )
    .await;
    let alice = cluster.register(0, &unique("alice")).await;
    let bob = cluster.register(0, &unique("bob")).await;

    // Alice, on node 1, queues a message for Bob, who is offline.
    let (a, mut a_events) = cluster.connect(0, &alice).await;
    assert!(matches!(next_event(&mut a_events).await, Event::QueueEmpty));
    let sent = a
        .send(Outgoing::new(bob.id, Bytes::from("0")))
        .await
        .unwrap();
    assert_eq!(sent.outcome, SendOutcome::Queued);
    // Bob drains it on node 2 and acks: Alice's receipt crosses to node 1.
    let (b, mut b_events) = cluster.connect(1, &bob).await;
    let Event::Deliver(e) = next_event(&mut b_events).await else {
        panic!("expected the stored message")
    };
    b.ack(&[Uuid::from_slice(&e.message_id).unwrap()])
        .await
        .unwrap();
    let receipt = next_event(&mut a_events).await;
    assert_eq!(receipt.receipt_for(), Some(sent.message_id));

    // Alice publishes keys on node 1; Bob's fetches on node 2 run them low,
    // and the push reaches Alice on node 1.
    let identity = TestIdentity::generate();
    a.upload_keys(identity.upload(7, 1..=11, 1..=11, 1000))
        .await
        .unwrap();
    b.fetch_bundle(alice.id).await.unwrap();
    b.fetch_bundle(alice.id).await.unwrap();
    loop {
        match next_event(&mut a_events).await {
            Event::PreKeysLow(low) => {
                assert_eq!((low.one_time_pre_keys, low.kyber_pre_keys), (9, 9));
                break;
            }
            Event::Deliver(_) | Event::QueueEmpty => {}
        }
    }

    // An operator deletes Bob; his socket on node 2 closes.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(["users", "delete", &bob.name, "--yes"])
        .env("DATABASE_URL", cluster.db_url())
        .env("RELAY_ADMIN_LISTEN", "off")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let closed = tokio::time::timeout(WAIT, b_events.closed())
        .await
        .expect("closed");
    assert_eq!(closed.code, Some(1000), "{closed:?}");
}

/// Three nodes started at the same moment on a database that does not
/// exist yet all come up (creating it and migrating it concurrently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_create_a_new_database_together() {
    let cluster = Cluster::start(3).await;
    for i in 0..3 {
        cluster.register(i, &unique("user")).await;
    }
}
