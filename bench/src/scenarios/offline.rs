//! The `offline` scenario: senders store messages for offline recipients
//! as fast as the relay takes them, then each recipient connects and
//! drains its queue, acking in batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde_json::json;
use signal_relay::client::{Event, Outgoing};
use signal_relay::proto::SendOutcome;
use uuid::Uuid;

use super::Run;
use crate::live;
use crate::metrics::{Kind, Metrics, ProcWindow};
use crate::payload;
use crate::report::Row;
use crate::seed::Account;

#[derive(Debug, Clone, clap::Args)]
pub struct OfflineArgs {
    /// Messages to store.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Connected senders.
    #[arg(long, default_value_t = 16)]
    pub senders: usize,
    /// Offline recipients (the drain target is one reconnecting client).
    #[arg(long, default_value_t = 1)]
    pub recipients: usize,
    /// Sends in flight per sender.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Store only: leave the messages queued (with --keep-db, to study the
    /// drain's queries by hand).
    #[arg(long)]
    pub skip_drain: bool,
    /// Experiment: run ANALYZE on the messages table before the drain, so
    /// the drain's queries are planned with statistics that know about the
    /// burst just stored (autovacuum would do it within a minute or so).
    #[arg(long)]
    pub analyze_before_drain: bool,
}

/// PostgreSQL's own counters, read before and after the store phase. Both
/// are current at once (the cumulative statistics views lag by up to ten
/// seconds, which is why they are not used), and both are cluster-wide: other
/// users of the same PostgreSQL add to them.
#[derive(Debug, Default, Clone, Copy)]
struct PgCounters {
    /// The next transaction id: write transactions started so far.
    next_xid: Option<i64>,
    /// Bytes of WAL written so far.
    wal_bytes: Option<f64>,
}

async fn pg_counters(db: &sqlx::PgPool) -> PgCounters {
    PgCounters {
        next_xid: sqlx::query_scalar(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
        )
        .fetch_one(db)
        .await
        .ok(),
        wal_bytes: sqlx::query_scalar(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
        )
        .fetch_one(db)
        .await
        .ok(),
    }
}

pub(super) async fn scenario(run: &mut Run, a: OfflineArgs) -> anyhow::Result<serde_json::Value> {
    let params = json!({
        "messages": a.messages, "senders": a.senders, "recipients": a.recipients,
        "window": a.window, "size": a.size,
    });
    let senders = run.seed("snd", a.senders.max(1)).await?;
    let recipients = run.seed("rcp", a.recipients.max(1)).await?;
    let db = run.relay.db.clone();
    let sync_commit: String = sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
        .fetch_one(&db)
        .await?;
    let fsync: String = sqlx::query_scalar("SELECT current_setting('fsync')")
        .fetch_one(&db)
        .await?;
    run.summary("postgres_synchronous_commit", sync_commit);
    run.summary("postgres_fsync", fsync);

    // Senders stay online: during the drain they receive the delivery
    // receipts and ack them, as real clients do.
    run.phase("connect");
    let url = run.relay.url.clone();
    let mut clients = Vec::new();
    let mut receipt_tasks = Vec::new();
    for account in &senders {
        let (client, mut events) = live::connect_relay(&url, account).await?;
        live::wait_queue_empty(&mut events).await?;
        let (c, m) = (client.clone(), run.metrics.clone());
        receipt_tasks.push(tokio::spawn(async move {
            live::receive_relay(&c, events, &m).await
        }));
        clients.push(client);
    }

    run.phase("store");
    let before = pg_counters(&db).await;
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let template = payload::payload_template(a.size, 0).to_vec();
    let stores = clients.iter().map(|client| {
        let (next, metrics, recipients, template) = (
            next.clone(),
            run.metrics.clone(),
            &recipients,
            template.clone(),
        );
        async move {
            let mut inflight = FuturesUnordered::new();
            loop {
                while inflight.len() < a.window.max(1) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.messages {
                        break;
                    }
                    let mut content = template.clone();
                    let t = metrics.now_ns();
                    content[..8].copy_from_slice(&t.to_le_bytes());
                    let out = Outgoing::new(recipients[i % recipients.len()].user_id, content);
                    let client = client.clone();
                    inflight.push(async move { (t, client.send(out).await) });
                    metrics.sent(1);
                }
                let Some((t, result)) = inflight.next().await else {
                    break;
                };
                match result {
                    Ok(sent) if sent.outcome == SendOutcome::Queued => {
                        metrics.record_since(Kind::Answer, t);
                    }
                    Ok(sent) => {
                        metrics.error(format!("answer {:?} instead of Queued", sent.outcome))
                    }
                    Err(e) => metrics.error(format!("send: {e}")),
                }
            }
        }
    });
    futures::future::join_all(stores).await;
    let store_seconds = start.elapsed().as_secs_f64();
    let usage = window.finish();
    let snap = run.metrics.take();
    let after = pg_counters(&db).await;
    let recipient_ids: Vec<Uuid> = recipients.iter().map(|r| r.user_id).collect();
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE recipient_id = ANY($1)")
            .bind(&recipient_ids)
            .fetch_one(&db)
            .await?;
    let queued = snap.count(Kind::Answer);
    if stored as u64 != queued {
        run.notes.push(format!(
            "the server answered queued {queued} times but the database holds {stored} messages"
        ));
    }
    run.rows.push(
        Row::new("store", "relay", Kind::Answer, &snap, usage)
            .with_rate(stored as u64, store_seconds),
    );
    run.summary("store_msgs_per_s", (stored as f64 / store_seconds).round());
    run.summary("stored_rows_counted_in_db", stored);
    if let (Some(b), Some(a2)) = (before.next_xid, after.next_xid) {
        // Each storing transaction commits (and so waits for one WAL flush
        // with synchronous_commit on), so messages per transaction is what
        // the store writer's batching achieved.
        let xacts = a2 - b;
        run.summary("store_write_transactions", xacts);
        if xacts > 0 {
            run.summary(
                "store_msgs_per_transaction",
                (stored as f64 / xacts as f64 * 10.0).round() / 10.0,
            );
        }
    }
    if let (Some(b), Some(a2)) = (before.wal_bytes, after.wal_bytes) {
        run.summary(
            "store_wal_bytes_per_msg",
            ((a2 - b) / stored.max(1) as f64).round(),
        );
    }

    if a.skip_drain {
        for client in &clients {
            client.close().await;
        }
        return Ok(params);
    }
    if a.analyze_before_drain {
        sqlx::query("ANALYZE messages").execute(&db).await?;
        run.summary("analyzed_before_drain", true);
    }
    run.phase("drain");
    let window = ProcWindow::start(run.relay.pid);
    let drains = recipients.iter().map(|account| {
        let (url, metrics) = (url.clone(), run.metrics.clone());
        async move { drain_one(&url, account, &metrics).await }
    });
    let results = futures::future::join_all(drains).await;
    let usage = window.finish();
    let mut received = 0u64;
    let mut empty_at = 0f64;
    let mut acked_at = 0f64;
    for r in results {
        let (n, empty, acked) = r?;
        received += n;
        empty_at = empty_at.max(empty);
        acked_at = acked_at.max(acked);
    }
    let snap = run.metrics.take();
    let mut receipts = snap.counts.get("receipts").copied().unwrap_or(0);
    run.rows
        .push(Row::new("drain", "relay", Kind::Op, &snap, usage).with_rate(received, empty_at));
    run.summary(
        "drain_msgs_per_s",
        (received as f64 / empty_at.max(1e-9)).round(),
    );
    run.summary("drain_received", received);
    run.summary(
        "drain_seconds_to_queue_empty",
        (empty_at * 1000.0).round() / 1000.0,
    );
    run.summary(
        "drain_seconds_to_all_acked",
        (acked_at * 1000.0).round() / 1000.0,
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE recipient_id = ANY($1)")
            .bind(&recipient_ids)
            .fetch_one(&db)
            .await?;
    run.summary("rows_left_after_acks", left);

    // Let the receipts reach the senders and be acked, then close.
    for client in &clients {
        client.close().await;
    }
    for task in receipt_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let snap = run.metrics.take();
    receipts += snap.counts.get("receipts").copied().unwrap_or(0);
    run.summary("receipts_received_by_senders", receipts);
    Ok(params)
}

/// Connects a recipient and takes everything queued for it, acking in
/// batches. Returns (messages, seconds to queue-empty, seconds to all acked).
async fn drain_one(
    url: &str,
    account: &Account,
    metrics: &Metrics,
) -> anyhow::Result<(u64, f64, f64)> {
    let start = Instant::now();
    let (client, mut events) = live::connect_relay(url, account).await?;
    let mut received = 0u64;
    let mut empty_at = None;
    let mut acks = FuturesUnordered::new();
    let mut ids = Vec::new();
    loop {
        if empty_at.is_some() && acks.is_empty() {
            break;
        }
        tokio::select! {
            event = events.next(), if empty_at.is_none() => {
                let mut event = event.context("connection closed while draining")?;
                loop {
                    match event {
                        Event::Deliver(envelope) => {
                            received += 1;
                            if let Ok(id) = Uuid::from_slice(&envelope.message_id) {
                                ids.push(id);
                            }
                        }
                        Event::QueueEmpty => {
                            empty_at = Some(start.elapsed().as_secs_f64());
                            metrics.record(Kind::Op, start.elapsed());
                        }
                        Event::PreKeysLow(_) => {}
                    }
                    if ids.len() >= live::MAX_ACK_IDS || empty_at.is_some() {
                        break;
                    }
                    match futures::FutureExt::now_or_never(events.next()) {
                        Some(Some(next)) => event = next,
                        _ => break,
                    }
                }
                if !ids.is_empty() {
                    let batch: Vec<Uuid> = std::mem::take(&mut ids);
                    let client = client.clone();
                    acks.push(async move { (batch.len(), client.ack(&batch).await) });
                }
            }
            Some((asked, result)) = acks.next() => match result {
                Ok((acked, unknown)) => {
                    metrics.count("acked", acked.len() as u64);
                    if !unknown.is_empty() || acked.len() != asked {
                        metrics.error(format!("ack: {} ids unknown", unknown.len()));
                    }
                }
                Err(e) => metrics.error(format!("ack: {e}")),
            },
        }
    }
    let acked_at = start.elapsed().as_secs_f64();
    client.close().await;
    Ok((received, empty_at.unwrap_or(acked_at), acked_at))
}
