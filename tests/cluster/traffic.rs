//! Clients as the scenarios drive them: a sender that keeps a window of
//! sends in flight and retries what fails (same client message id), and a
//! recipient that records and acks every delivery; either may hop between
//! nodes, as a client reconnecting through a load balancer would.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use signal_relay::client::{Client, ClientError, Event, Events, Outgoing};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::checker::Checker;
use crate::support::{User, WAIT, connect_any};

/// Most tries of one message before the test gives up on it.
const MAX_TRIES: usize = 200;

/// Sends messages 0..count from `user` to `recipient`, `window` at a time,
/// starting on `urls[0]` and moving to the next URL every `hop` (if any),
/// without waiting for what is in flight: the new connection displaces the
/// old one, and whatever fails is sent again.
pub async fn send_all(
    checker: Arc<Checker>,
    user: User,
    recipient: Uuid,
    count: u64,
    window: usize,
    urls: Vec<String>,
    hop: Option<Duration>,
) {
    let mut at = 0;
    let mut client = connect_sender(&urls, &mut at, &user).await;
    let mut connections = 0usize;
    let mut next = 0u64;
    let mut retry = BTreeSet::new();
    let mut tries = vec![0usize; count as usize];
    let mut in_flight = FuturesUnordered::new();
    let mut hops = tokio::time::interval(hop.unwrap_or(Duration::from_secs(3600)));
    hops.tick().await;
    loop {
        while in_flight.len() < window {
            let n = match retry.pop_first() {
                Some(n) => n,
                None if next < count => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            tries[n as usize] += 1;
            assert!(tries[n as usize] <= MAX_TRIES, "message {n} kept failing");
            let mut message = Outgoing::new(recipient, Bytes::from(n.to_string()));
            // Unique per sender: the relay derives the message id from it.
            message.client_message_id = Some(Bytes::from(format!("{recipient}/{n}")));
            checker.attempt(
                user.id,
                recipient,
                n,
                &format!("{} #{connections}", urls[at]),
            );
            let client = client.clone();
            let conn = connections;
            in_flight.push(async move {
                let result = client.send(message).await;
                if std::env::var_os("CLUSTER_TRACE").is_some() {
                    eprintln!(
                        "send {n} to {recipient} on connection {conn}: {:?}",
                        result.as_ref().map(|s| s.outcome)
                    );
                }
                (n, result)
            });
        }
        if in_flight.is_empty() {
            return;
        }
        tokio::select! {
            Some((n, result)) = in_flight.next() => match result {
                Ok(sent) => checker.answered(user.id, recipient, n, sent.message_id, sent.outcome),
                Err(err) => {
                    assert!(retryable(&err), "send {n} failed for good: {err}");
                    retry.insert(n);
                    if client.close_info().is_some() {
                        // This connection is over (displaced, node gone):
                        // go on through the next node.
                        at = (at + 1) % urls.len();
                        client = connect_sender(&urls, &mut at, &user).await;
                        connections += 1;
                    } else {
                        // Told to retry (UNAVAILABLE, RATE_LIMITED): the
                        // delay it asked for, not a stand-in for
                        // synchronisation.
                        let delay = match &err {
                            ClientError::Status { retry_after: Some(after), .. } => *after,
                            _ => Duration::from_millis(20),
                        };
                        tokio::time::sleep(delay).await;
                    }
                }
            },
            _ = hops.tick(), if hop.is_some() => {
                if std::env::var_os("CLUSTER_TRACE").is_some() {
                    eprintln!("hop: in flight {}, retry {}, next {next}", in_flight.len(), retry.len());
                }
                at = (at + 1) % urls.len();
                client = connect_sender(&urls, &mut at, &user).await;
                connections += 1;
            }
        }
    }
}

/// Connects a sender, and acks the receipts it is sent as a client would
/// (a client that stops reading its pushes stalls its own responses).
async fn connect_sender(urls: &[String], at: &mut usize, user: &User) -> Client {
    let (client, mut events) = connect_any(urls, at, &user.token).await;
    let acker = client.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Event::Deliver(envelope) = event
                && let Ok(id) = Uuid::from_slice(&envelope.message_id)
            {
                // Not awaited here: the reply comes through the reader
                // that is waiting for this loop to take the next event.
                let acker = acker.clone();
                tokio::spawn(async move { acker.ack(&[id]).await });
            }
        }
    });
    client
}

/// Whether a client should send again: told to retry (UNAVAILABLE, or
/// RATE_LIMITED, which the retry delay honours), or the connection failed.
fn retryable(err: &ClientError) -> bool {
    match err {
        ClientError::Status { status, .. } => matches!(
            status,
            signal_relay::proto::Status::Unavailable | signal_relay::proto::Status::RateLimited
        ),
        _ => true,
    }
}

/// [`receive_all`] on a task of its own, until [`Receiving::stop`].
pub struct Receiving {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Receiving {
    pub fn start(
        checker: &Arc<Checker>,
        user: &User,
        urls: Vec<String>,
        hop: Option<Duration>,
    ) -> Receiving {
        let stop = CancellationToken::new();
        let task = tokio::spawn(receive_all(
            checker.clone(),
            user.clone(),
            urls,
            hop,
            stop.clone(),
        ));
        Receiving { stop, task }
    }

    /// Stops receiving, and waits until it has.
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Receives as `user`, recording and acking everything, from `urls[0]`,
/// moving to the next URL every `hop` (if any) by connecting there while
/// the old connection is still open (so the old node is displaced), until
/// `stop`. A client's arrival order is what it read from the old
/// connection, up to its close, then what it reads from the new one.
pub async fn receive_all(
    checker: Arc<Checker>,
    user: User,
    urls: Vec<String>,
    hop: Option<Duration>,
    stop: CancellationToken,
) {
    let mut at = 0;
    let mut hops = tokio::time::interval(hop.unwrap_or(Duration::from_secs(3600)));
    hops.tick().await;
    let mut next = None;
    let mut count = 0;
    'connections: loop {
        let (client, mut events) = match next.take() {
            Some(connection) => connection,
            None => tokio::select! {
                c = connect_any(&urls, &mut at, &user.token) => c,
                () = stop.cancelled() => break,
            },
        };
        count += 1;
        let via = format!("{} #{count}", urls[at]);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(event) => record(&checker, &user, &client, event, &via),
                    None => {
                        // Closed under us (displaced or node gone).
                        at = (at + 1) % urls.len();
                        continue 'connections;
                    }
                },
                _ = hops.tick(), if hop.is_some() => {
                    at = (at + 1) % urls.len();
                    let new = connect_any(&urls, &mut at, &user.token).await;
                    // The new node has the old connection closed; what
                    // the old one delivered until then came first.
                    read_until_closed(&checker, &user, &client, &mut events, &via).await;
                    next = Some(new);
                    continue 'connections;
                }
                () = stop.cancelled() => break 'connections,
            }
        }
    }
}

/// Records (and acks) what `events` brings until its connection closes.
pub async fn read_until_closed(
    checker: &Checker,
    user: &User,
    client: &Client,
    events: &mut Events,
    via: &str,
) {
    while let Ok(Some(event)) = tokio::time::timeout(WAIT, events.next()).await {
        record(checker, user, client, event, via);
    }
}

fn record(checker: &Checker, user: &User, client: &Client, event: Event, via: &str) {
    if let Event::Deliver(envelope) = event {
        let id = Uuid::from_slice(&envelope.message_id).unwrap();
        if envelope.r#type == signal_relay::proto::EnvelopeType::Receipt as i32 {
            ack(client, id);
            return;
        }
        let sender = Uuid::from_slice(&envelope.sender_id).unwrap();
        let n: u64 = std::str::from_utf8(&envelope.content)
            .unwrap()
            .parse()
            .unwrap();
        checker.arrived(user.id, sender, n, id, via);
        // Acked after it was recorded; a lost ack means a redelivery, which
        // the checker tolerates (same id).
        ack(client, id);
    }
}

/// Acks without waiting for the answer in the event loop: the answer comes
/// through the client's reader, which waits for the event loop to take its
/// next event.
fn ack(client: &Client, id: Uuid) {
    let client = client.clone();
    tokio::spawn(async move { client.ack(&[id]).await });
}
