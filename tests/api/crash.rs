//! The no-loss contract under crashes: the real `relay` binary runs as a
//! child process and is killed with SIGKILL at random points, several times,
//! while senders send thousands of messages to online and offline
//! recipients. Every message whose sender heard `delivered` or `queued` must
//! reach its recipient at least once, and first arrivals must keep the
//! order in which each sender sent to each recipient.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use signal_relay::client::{Client, Event, Outgoing};
use signal_relay::proto::SendOutcome;
use signal_relay::testing::create_database;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;

const SENDERS: usize = 3;
const ONLINE: usize = 2;
const OFFLINE: usize = 2;
/// Messages each sender sends to each recipient.
const PER_PAIR: usize = 250;
const KILLS: usize = 4;
/// Upper bound on the whole exchange, so a bug fails rather than hangs.
const DEADLINE: Duration = Duration::from_secs(240);

struct Relay {
    addr: SocketAddr,
    db_url: String,
    child: Option<Child>,
}

impl Relay {
    async fn start(addr: SocketAddr, db_url: &str) -> Relay {
        let mut relay = Relay {
            addr,
            db_url: db_url.to_owned(),
            child: None,
        };
        relay.spawn().await;
        relay
    }

    async fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_relay"))
            .env("RELAY_LISTEN", self.addr.to_string())
            // Several relays may run at once: none takes the default port.
            .env("RELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", &self.db_url)
            .env("RELAY_SEND_BURST", "100000")
            .env("RELAY_SEND_RATE", "100000")
            .env("RELAY_ARGON2_CONCURRENCY", "2")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the relay binary");
        self.child = Some(child);
        // Ready once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(60);
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            assert!(Instant::now() < deadline, "relay did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reap");
        }
    }
}

fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/v1/websocket")
}

/// Connects and resumes, retrying while the server is down.
async fn reconnect(addr: SocketAddr, token: &[u8]) -> (Client, signal_relay::client::Events) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Ok((client, events)) = Client::connect(&url(addr)).await
            && client.resume(token).await.is_ok()
        {
            return (client, events);
        }
        assert!(Instant::now() < deadline, "could not reconnect");
        // Back off while the server restarts; this is a retry delay, not a
        // stand-in for synchronisation.
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// What recipients saw: (message id, content) in arrival order.
type Inbox = Arc<Mutex<Vec<(Uuid, String)>>>;

/// An always-connected recipient: records every delivery, then acks it.
async fn recipient_loop(
    addr: SocketAddr,
    token: Vec<u8>,
    inbox: Inbox,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let (client, mut events) = tokio::select! {
            _ = stop.cancelled() => return,
            c = reconnect(addr, &token) => c,
        };
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = events.next() => e,
            };
            match event {
                Some(Event::Deliver(envelope)) => {
                    let id = Uuid::from_slice(&envelope.message_id).unwrap();
                    let body = String::from_utf8(envelope.content.to_vec()).unwrap();
                    inbox.lock().unwrap().push((id, body));
                    // Acked only after it was recorded; a lost ack means a
                    // redelivery, which the check deduplicates.
                    let _ = client.ack(&[id]).await;
                }
                Some(_) => {}
                None => break,
            }
        }
    }
}

/// Sends PER_PAIR messages to each recipient, one at a time, retrying each
/// (same client message id) until the server confirms it.
async fn sender_loop(
    addr: SocketAddr,
    sender: usize,
    token: Vec<u8>,
    recipients: Vec<Uuid>,
) -> Vec<(Uuid, usize, Uuid)> {
    let mut confirmed = Vec::new();
    let (mut client, mut _events) = reconnect(addr, &token).await;
    for n in 0..PER_PAIR {
        for (r, recipient) in recipients.iter().enumerate() {
            let mut message = Outgoing::new(*recipient, Bytes::from(format!("s{sender}-r{r}-{n}")));
            message.client_message_id = Some(Bytes::from(format!("s{sender}-r{r}-{n}")));
            loop {
                match client.send(message.clone()).await {
                    Ok(sent) => {
                        assert!(matches!(
                            sent.outcome,
                            SendOutcome::Delivered | SendOutcome::Queued
                        ));
                        confirmed.push((*recipient, n, sent.message_id));
                        break;
                    }
                    Err(_) => (client, _events) = reconnect(addr, &token).await,
                }
            }
        }
    }
    confirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9_in_order() {
    let (db_name, db_url) = create_database().await;
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut relay = Relay::start(addr, &db_url).await;

    // Everyone registers while the server is up.
    let mut tokens = Vec::new();
    let mut ids = Vec::new();
    for i in 0..SENDERS + ONLINE + OFFLINE {
        let (client, _events) = Client::connect(&url(addr)).await.unwrap();
        let auth = client
            .register(&format!("user{i}"), "password123")
            .await
            .unwrap();
        tokens.push(auth.token);
        ids.push(auth.user_id);
        client.close().await;
    }
    let recipients: Vec<Uuid> = ids[SENDERS..].to_vec();

    let stop = tokio_util::sync::CancellationToken::new();
    let inboxes: Vec<Inbox> = (0..ONLINE + OFFLINE).map(|_| Inbox::default()).collect();
    let mut listeners = Vec::new();
    for r in 0..ONLINE {
        listeners.push(tokio::spawn(recipient_loop(
            addr,
            tokens[SENDERS + r].clone(),
            inboxes[r].clone(),
            stop.clone(),
        )));
    }
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| tokio::spawn(sender_loop(addr, s, tokens[s].clone(), recipients.clone())))
        .collect();

    // Kill the server at random points while the traffic flows.
    for _ in 0..KILLS {
        let pause = rand::rng().random_range(200..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        relay.kill9().await;
        relay.spawn().await;
    }

    let mut confirmed = Vec::new();
    for sender in senders {
        let sent = tokio::time::timeout(DEADLINE, sender)
            .await
            .expect("senders finished")
            .unwrap();
        confirmed.push(sent);
    }
    stop.cancel();
    for listener in listeners {
        listener.await.unwrap();
    }

    // Every recipient now connects once more and drains what is stored.
    for (r, inbox) in inboxes.iter().enumerate() {
        let (client, mut events) = reconnect(addr, &tokens[SENDERS + r]).await;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .expect("the drain finishes")
                .expect("connection stays open");
            match event {
                Event::Deliver(envelope) => {
                    let id = Uuid::from_slice(&envelope.message_id).unwrap();
                    inbox
                        .lock()
                        .unwrap()
                        .push((id, String::from_utf8(envelope.content.to_vec()).unwrap()));
                    client.ack(&[id]).await.unwrap();
                }
                Event::QueueEmpty => break,
                Event::PreKeysLow(_) => {}
            }
        }
    }
    relay.kill9().await;

    let mut total = 0;
    for (s, sent) in confirmed.iter().enumerate() {
        for (r, recipient) in recipients.iter().enumerate() {
            let inbox = inboxes[r].lock().unwrap();
            // First arrival of each message id, in arrival order.
            let mut seen = HashSet::new();
            let firsts: Vec<usize> = inbox
                .iter()
                .filter(|(id, _)| seen.insert(*id))
                .filter_map(|(_, body)| {
                    body.strip_prefix(&format!("s{s}-r{r}-"))
                        .map(|n| n.parse().unwrap())
                })
                .collect();
            let wanted: HashMap<usize, Uuid> = sent
                .iter()
                .filter(|(to, _, _)| to == recipient)
                .map(|(_, n, id)| (*n, *id))
                .collect();
            total += wanted.len();
            let got: HashSet<usize> = firsts.iter().copied().collect();
            for n in wanted.keys() {
                assert!(
                    got.contains(n),
                    "s{s}-r{r}-{n} was confirmed but never arrived"
                );
            }
            assert!(
                firsts.windows(2).all(|w| w[0] < w[1]),
                "s{s} -> r{r} arrived out of order: {firsts:?}"
            );
            let ids_seen: HashSet<Uuid> = inbox.iter().map(|(id, _)| *id).collect();
            assert!(
                wanted.values().all(|id| ids_seen.contains(id)),
                "ids match the confirmations"
            );
        }
    }
    assert_eq!(
        total,
        SENDERS * (ONLINE + OFFLINE) * PER_PAIR,
        "every send was eventually confirmed"
    );

    // Clean up the database the relay used.
    let admin = sqlx::PgPool::connect(&signal_relay::testing::admin_url())
        .await
        .unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"))
        .execute(&admin)
        .await;
}
