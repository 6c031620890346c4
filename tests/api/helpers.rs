//! Shared test helpers.

use std::time::Duration;

use signal_relay::client::{Event, Events};
use signal_relay::proto::Envelope;

/// Upper bound on any single wait, so a broken server fails the test
/// instead of hanging it. Not a sleep: waits end as soon as the event comes.
pub const WAIT: Duration = Duration::from_secs(20);

/// The next push, or panic after [`WAIT`].
pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("timed out waiting for a push")
        .expect("connection closed while waiting for a push")
}

/// The next delivered envelope, skipping nothing: panics on another event.
pub async fn next_delivery(events: &mut Events) -> Envelope {
    match next_event(events).await {
        Event::Deliver(envelope) => envelope,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

/// Waits for queue-empty, panicking on anything else.
pub async fn expect_queue_empty(events: &mut Events) {
    match next_event(events).await {
        Event::QueueEmpty => {}
        other => panic!("expected queue-empty, got {other:?}"),
    }
}

/// Waits for the connection to close and returns its close code.
pub async fn close_code(events: &mut Events) -> Option<u16> {
    tokio::time::timeout(WAIT, events.closed())
        .await
        .expect("timed out waiting for the close")
        .code
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Waits until `condition` holds, re-checking every few milliseconds, and
/// panics with `what` after [`WAIT`]. For state the server changes without
/// telling the client (rows swept, a socket dropped); the wait ends as soon
/// as the condition holds.
pub async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
