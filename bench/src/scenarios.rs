//! The scenarios, and the harness they share: start the relay, seed
//! accounts, sample `/proc` once a second, run phases, and report.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use signal_relay::client::{Client, Event, Outgoing};
use signal_relay::proto::SendOutcome;
use uuid::Uuid;

use crate::OutputArgs;
use crate::agent::{Agent, AgentReport, source_address};
use crate::live::{self, Load, Pairs, Target};
use crate::metrics::{Kind, Metrics, ProcWindow, Sampler};
use crate::prekeys::{self, PrekeysArgs};
use crate::report::{Report, Row};
use crate::seed::{self, Account};
use crate::server::{Forwarder, Relay, ServerArgs};
use crate::{procfs, seed::PASSWORD};

pub enum Scenario {
    Live(LiveArgs),
    Offline(OfflineArgs),
    Connections(ConnectionsArgs),
    Reconnect(ReconnectArgs),
    Login(LoginArgs),
    Prekeys(PrekeysArgs),
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Live(_) => "live",
            Scenario::Offline(_) => "offline",
            Scenario::Connections(_) => "connections",
            Scenario::Reconnect(_) => "reconnect",
            Scenario::Login(_) => "login",
            Scenario::Prekeys(_) => "prekeys",
        }
    }

    fn primary(&self) -> Kind {
        match self {
            Scenario::Live(_) | Scenario::Reconnect(_) | Scenario::Login(_) => Kind::Delivery,
            Scenario::Offline(_) => Kind::Answer,
            Scenario::Connections(_) | Scenario::Prekeys(_) => Kind::Op,
        }
    }
}

/// What every scenario works with.
pub struct Run {
    pub relay: Relay,
    pub metrics: Metrics,
    pub sampler: Sampler,
    pub progress: ProgressBar,
    pub rows: Vec<Row>,
    pub summary: BTreeMap<String, serde_json::Value>,
    pub notes: Vec<String>,
}

impl Run {
    /// Labels what follows in the timeline and the progress bar.
    pub fn phase(&self, name: &str) {
        self.sampler.set_phase(name);
        self.progress.set_prefix(name.to_owned());
    }

    pub fn summary(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.summary.insert(key.to_owned(), value.into());
    }

    pub async fn seed(&self, prefix: &str, count: usize) -> anyhow::Result<Vec<Account>> {
        self.phase("seed");
        seed::accounts(&self.relay.db, prefix, count).await
    }
}

pub async fn run(
    scenario: Scenario,
    server: &ServerArgs,
    output: &OutputArgs,
) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().collect();
    if let Some(plot) = &output.plot
        && plot.extension().and_then(|e| e.to_str()) != Some("svg")
    {
        bail!("--plot writes SVG; name the file *.svg");
    }
    let relay = Relay::start(server).await?;
    let busy_before = procfs::machine_busy(Duration::from_secs(1)).await;
    let metrics = Metrics::new();
    let progress = if output.quiet || output.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {prefix:>8} {msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    };
    let sampler = Sampler::start(
        metrics.clone(),
        relay.pid,
        scenario.primary(),
        progress.clone(),
    );
    let (name, primary) = (scenario.name(), scenario.primary());
    let server_url = relay.url.clone();
    let server_pid = relay.pid;
    let mut run = Run {
        relay,
        metrics,
        sampler,
        progress,
        rows: Vec::new(),
        summary: BTreeMap::new(),
        notes: Vec::new(),
    };
    let params = match scenario {
        Scenario::Live(a) => live_scenario(&mut run, a).await,
        Scenario::Offline(a) => offline_scenario(&mut run, a).await,
        Scenario::Connections(a) => connections_scenario(&mut run, a).await,
        Scenario::Reconnect(a) => reconnect_scenario(&mut run, a).await,
        Scenario::Login(a) => login_scenario(&mut run, a).await,
        Scenario::Prekeys(a) => prekeys::scenario(&mut run, a).await,
    };
    let Run {
        relay,
        sampler,
        progress,
        rows,
        summary,
        mut notes,
        ..
    } = run;
    let timeline = sampler.finish().await;
    progress.finish_and_clear();
    if let Some(log) = &relay.log_path {
        notes.push(format!("relay log: {}", log.display()));
    }
    relay.stop().await;
    let params = params?;
    let (cpus, cpu_model) = procfs::hardware();
    let report = Report {
        scenario: name.into(),
        command: command.join(" "),
        cpus,
        cpu_model,
        machine_busy_before_percent: busy_before.map(|b| b.round()),
        server_url,
        server_pid,
        params,
        rows,
        summary,
        notes,
        primary,
        timeline,
    };
    if output.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_table();
    }
    if let Some(plot) = &output.plot {
        report.write_plot(plot)?;
    }
    Ok(())
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

// ------------------------------------------------------------------ live

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Closed,
    Open,
    /// Closed loop first, then open loop at a fraction of its rate.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Targets {
    Relay,
    Baseline,
    Both,
}

#[derive(Debug, Clone, clap::Args)]
pub struct LiveArgs {
    /// Connected pairs (A sends to B).
    #[arg(long, default_value_t = 64)]
    pub pairs: usize,
    /// Payload bytes per message (at least 16: the timestamp header).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Seconds measured per phase.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of traffic before each measurement, discarded.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Closed loop: messages in flight per pair.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    #[arg(long, value_enum, default_value = "both")]
    pub mode: Mode,
    /// Open loop: offered messages per second, in total. With --mode both
    /// it defaults to --rate-fraction of the relay's closed-loop median.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 0.5)]
    pub rate_fraction: f64,
    #[arg(long, value_enum, default_value = "both")]
    pub target: Targets,
    /// Closed-loop runs per target, alternating relay and baseline; the
    /// summary quotes medians.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Open-loop pacing tick, microseconds.
    #[arg(long, default_value_t = 100)]
    pub tick_us: u64,
    /// Open loop, relay pairs: unanswered messages per pair beyond which
    /// sending waits (what it delays is still charged from the schedule).
    /// Below the relay's RELAY_MAX_INFLIGHT_REQUESTS (256), so the generator
    /// is not refused for having too many requests open. The baselines'
    /// sends wait on their writer's queue (1,024 frames) instead.
    #[arg(long, default_value_t = live::OPEN_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Also run the answered baseline after the baseline: the forwarder
    /// with B answering every message back to A, so the relay's frames per
    /// message (one to the recipient, one back to the sender) with none of
    /// its work, and a message complete at the answer as on the relay.
    #[arg(long)]
    pub answered_baseline: bool,
    /// Experiment: the baseline's WebSocket write buffer in bytes, on both
    /// ends (0: one write syscall per frame). By default the forwarder uses
    /// the relay's settings and its clients the client library's, so the
    /// ratio compares like with like.
    #[arg(long)]
    pub baseline_write_buffer: Option<usize>,
}

/// Runs one measured phase of live traffic and returns its row.
#[allow(clippy::too_many_arguments)]
async fn measure_live(
    run: &mut Run,
    name: &str,
    pairs: Pairs,
    target: Target,
    pid: Option<u32>,
    load: Load,
    size: usize,
    warmup: f64,
    duration: f64,
) -> Row {
    run.phase(&format!("{name} {}", target.name()));
    run.sampler.set_server(pid);
    let running = pairs.start(load, size, &run.metrics);
    tokio::time::sleep(secs(warmup)).await;
    run.metrics.take();
    let window = ProcWindow::start(pid);
    tokio::time::sleep(secs(duration)).await;
    let snap = run.metrics.take();
    let usage = window.finish();
    running.stop().await;
    run.metrics.take();
    Row::new(name, target.name(), Kind::Delivery, &snap, usage)
}

async fn live_scenario(run: &mut Run, a: LiveArgs) -> anyhow::Result<serde_json::Value> {
    let params = json!({
        "pairs": a.pairs, "size": a.size, "duration_s": a.duration, "warmup_s": a.warmup,
        "window": a.window, "mode": format!("{:?}", a.mode), "target": format!("{:?}", a.target),
        "runs": a.runs, "rate": a.rate, "rate_fraction": a.rate_fraction, "tick_us": a.tick_us,
        "max_in_flight": a.max_in_flight, "answered_baseline": a.answered_baseline,
    });
    if a.mode == Mode::Open && a.rate.is_none() {
        bail!("--mode open needs --rate (or use --mode both)");
    }
    if a.answered_baseline && a.target == Targets::Relay {
        bail!("--answered-baseline needs --target baseline or both");
    }
    let mut targets = Vec::new();
    if a.target != Targets::Baseline {
        targets.push(Target::Relay);
    }
    if a.target != Targets::Relay {
        targets.push(Target::Baseline);
        if a.answered_baseline {
            targets.push(Target::Answered);
        }
    }
    let relay_on = targets.contains(&Target::Relay);
    let accounts = if relay_on {
        run.seed("live", a.pairs * 2).await?
    } else {
        Vec::new()
    };
    let forwarder = if targets.len() > usize::from(relay_on) {
        Some(Forwarder::start(a.baseline_write_buffer)?)
    } else {
        None
    };
    let url = run.relay.url.clone();
    let relay_pid = run.relay.pid;
    let mut pair_base = 0;
    // Connects fresh pairs for one phase against `target`.
    let mut connect = async |target: Target| -> anyhow::Result<(Pairs, Option<u32>)> {
        if target == Target::Relay {
            return Ok((Pairs::relay(&url, &accounts).await?, relay_pid));
        }
        let f = forwarder.as_ref().expect("forwarder started");
        let base = pair_base;
        pair_base += a.pairs;
        let answered = target == Target::Answered;
        let pairs = Pairs::baseline(&f.url, base, a.pairs, a.baseline_write_buffer, answered);
        Ok((pairs.await?, Some(f.pid)))
    };

    // Closed-loop rates per target, in `targets` order.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    if a.mode != Mode::Open {
        let load = Load::Closed { window: a.window };
        for r in 1..=a.runs.max(1) {
            for (t, &target) in targets.iter().enumerate() {
                let (pairs, pid) = connect(target).await?;
                let name = format!("closed #{r}");
                let row = measure_live(
                    run, &name, pairs, target, pid, load, a.size, a.warmup, a.duration,
                )
                .await;
                rates[t].push(row.rate_per_sec);
                run.rows.push(row);
            }
        }
        for (t, target) in targets.iter().enumerate() {
            let name = target.name();
            run.summary(
                &format!("{name}_closed_loop_msgs_per_s_median"),
                median(&mut rates[t].clone()).round(),
            );
            run.summary(
                &format!("{name}_closed_loop_msgs_per_s_runs"),
                rates[t].iter().map(|r| r.round()).collect::<Vec<_>>(),
            );
            if relay_on && t > 0 {
                // Ratios per run (same invocation, alternating), then the
                // median.
                let mut ratios: Vec<f64> = rates[0]
                    .iter()
                    .zip(&rates[t])
                    .filter(|(_, b)| **b > 0.0)
                    .map(|(r, b)| r / b)
                    .collect();
                if ratios.is_empty() {
                    continue;
                }
                let round = |r: f64| (r * 1000.0).round() / 1000.0;
                let runs: Vec<f64> = ratios.iter().copied().map(round).collect();
                run.summary(
                    &format!("relay_to_{name}_ratio_median"),
                    round(median(&mut ratios)),
                );
                run.summary(&format!("relay_to_{name}_ratio_runs"), runs);
            }
        }
    }
    if a.mode != Mode::Closed {
        let rate = match a.rate {
            Some(rate) => rate,
            // The relay's closed-loop median if it ran, else the baseline's.
            None => median(&mut rates[0]) * a.rate_fraction,
        };
        if rate <= 0.0 {
            bail!("no open-loop rate: the closed loop completed nothing");
        }
        run.summary("open_loop_offered_msgs_per_s", rate.round());
        let load = Load::Open {
            rate,
            tick: Duration::from_micros(a.tick_us.max(10)),
            max_in_flight: a.max_in_flight.max(1),
        };
        for &target in &targets {
            let (pairs, pid) = connect(target).await?;
            let row = measure_live(
                run, "open", pairs, target, pid, load, a.size, a.warmup, a.duration,
            )
            .await;
            if let Some(p) = row.latency_ms.get(&Kind::Delivery) {
                run.summary(
                    &format!("{}_open_loop_delivery_p99_ms", target.name()),
                    p.p99,
                );
            }
            run.rows.push(row);
        }
    }
    Ok(params)
}

// --------------------------------------------------------------- offline

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

async fn offline_scenario(run: &mut Run, a: OfflineArgs) -> anyhow::Result<serde_json::Value> {
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
    let template = vec![0x5au8; a.size.max(live::HEADER)];
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

// ----------------------------------------------------------- connections

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionsArgs {
    /// Idle authenticated connections to hold.
    #[arg(long, default_value_t = 19_000)]
    pub connections: usize,
    /// Connections per generator process (each may hold at most 20,000
    /// open files).
    #[arg(long, default_value_t = 9_000)]
    pub per_agent: usize,
    /// Connections set up at once, per agent.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to hold them all before measuring memory.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
}

/// Starts agents for `accounts`, `per_agent` each, and waits for them to
/// connect everything. Returns the agents and their merged report.
async fn start_agents(
    run: &Run,
    accounts: &[Account],
    per_agent: usize,
    concurrency: usize,
) -> anyhow::Result<(Vec<Agent>, AgentReport, f64)> {
    let start = Instant::now();
    let mut agents = Vec::new();
    for (i, chunk) in accounts.chunks(per_agent.max(1)).enumerate() {
        let tokens: Vec<Vec<u8>> = chunk.iter().map(|a| a.token.clone()).collect();
        agents.push(Agent::spawn(
            &run.relay.url,
            source_address(i),
            &tokens,
            concurrency,
        )?);
    }
    let merged = collect_reports(run, &mut agents, "connected").await?;
    Ok((agents, merged, start.elapsed().as_secs_f64()))
}

/// Waits for one report from every agent; records each client's latency.
async fn collect_reports(
    run: &Run,
    agents: &mut [Agent],
    what: &str,
) -> anyhow::Result<AgentReport> {
    let reports = futures::future::join_all(agents.iter_mut().map(Agent::report)).await;
    let mut merged = AgentReport {
        event: what.into(),
        ..AgentReport::default()
    };
    for report in reports {
        let report = report?;
        merged.ok += report.ok;
        merged.failed += report.failed;
        merged.seconds = merged.seconds.max(report.seconds);
        run.metrics.record_reported(
            Kind::Op,
            report
                .latencies_us
                .iter()
                .map(|us| Duration::from_micros(*us)),
        );
        for (e, n) in report.errors {
            for _ in 0..n {
                run.metrics.error(format!("{what}: {e}"));
            }
        }
    }
    Ok(merged)
}

async fn stop_agents(agents: Vec<Agent>) {
    let _ = tokio::task::spawn_blocking(move || {
        for agent in agents {
            agent.stop();
        }
    })
    .await;
}

async fn connections_scenario(
    run: &mut Run,
    a: ConnectionsArgs,
) -> anyhow::Result<serde_json::Value> {
    let params = json!({
        "connections": a.connections, "per_agent": a.per_agent,
        "concurrency": a.concurrency, "hold_s": a.hold,
    });
    let accounts = run.seed("idle", a.connections).await?;
    let pid = run.relay.pid;
    let rss_before = pid.and_then(procfs::rss_kib);
    let fds_before = pid.and_then(procfs::open_fds);
    run.phase("connect");
    run.metrics.take();
    let window = ProcWindow::start(pid);
    let (agents, report, seconds) =
        start_agents(run, &accounts, a.per_agent, a.concurrency).await?;
    let snap = run.metrics.take();
    run.rows.push(
        Row::new("connect", "relay", Kind::Op, &snap, window.finish())
            .with_rate(report.ok as u64, seconds),
    );
    run.phase("hold");
    let window = ProcWindow::start(pid);
    tokio::time::sleep(secs(a.hold)).await;
    let rss_after = pid.and_then(procfs::rss_kib);
    let fds_after = pid.and_then(procfs::open_fds);
    let snap = run.metrics.take();
    run.rows.push(Row::new(
        "hold (idle)",
        "relay",
        Kind::Op,
        &snap,
        window.finish(),
    ));
    run.summary("connections_held", report.ok);
    run.summary("connections_failed", report.failed);
    run.summary("agents", agents.len());
    run.summary("connect_seconds", (seconds * 1000.0).round() / 1000.0);
    if let (Some(b), Some(f)) = (fds_before, fds_after) {
        // The server's own file descriptors, counted from outside: proof
        // that it really holds the sockets.
        run.summary("server_fds_added", f as i64 - b as i64);
    }
    if let (Some(b), Some(r)) = (rss_before, rss_after) {
        run.summary("server_rss_before_kib", b);
        run.summary("server_rss_after_kib", r);
        if report.ok > 0 {
            let per = (r as f64 - b as f64) / report.ok as f64;
            run.summary(
                "server_rss_per_connection_kib",
                (per * 100.0).round() / 100.0,
            );
        }
    } else {
        run.notes
            .push("no server pid: memory per connection not measured".into());
    }
    stop_agents(agents).await;
    Ok(params)
}

// ---------------------------------------------------- background traffic

/// Live traffic at a modest fixed rate, whose latency shows what a storm
/// does to everyone else.
#[derive(Debug, Clone, clap::Args)]
pub struct Background {
    /// Pairs carrying live traffic during the storm.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Their offered rate, messages per second in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Seconds of live traffic alone, before the storm.
    #[arg(long, default_value_t = 3.0)]
    pub calm: f64,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

async fn start_background(
    run: &Run,
    b: &Background,
    accounts: &[Account],
) -> anyhow::Result<live::Running> {
    let pairs = Pairs::relay(&run.relay.url, accounts).await?;
    let load = Load::Open {
        rate: b.rate,
        tick: Duration::from_micros(100),
        max_in_flight: live::OPEN_MAX_IN_FLIGHT,
    };
    run.phase("warmup");
    let running = pairs.start(load, b.size, &run.metrics);
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.metrics.take();
    Ok(running)
}

/// The live traffic alone, as the reference for the storm.
async fn calm_phase(run: &mut Run, b: &Background) {
    run.phase("calm");
    let window = ProcWindow::start(run.relay.pid);
    tokio::time::sleep(secs(b.calm)).await;
    let snap = run.metrics.take();
    run.rows.push(Row::new(
        "live, calm",
        "relay",
        Kind::Delivery,
        &snap,
        window.finish(),
    ));
}

// ------------------------------------------------------------- reconnect

#[derive(Debug, Clone, clap::Args)]
pub struct ReconnectArgs {
    /// Clients that drop and come back.
    #[arg(long, default_value_t = 10_000)]
    pub clients: usize,
    /// Clients per generator process (old and new sockets overlap during
    /// the storm, so keep this under half the 20,000 open-file limit).
    #[arg(long, default_value_t = 5_000)]
    pub per_agent: usize,
    /// Reconnections in progress at once, per agent.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    #[command(flatten)]
    pub background: Background,
}

async fn reconnect_scenario(run: &mut Run, a: ReconnectArgs) -> anyhow::Result<serde_json::Value> {
    let b = &a.background;
    let params = json!({
        "clients": a.clients, "per_agent": a.per_agent, "concurrency": a.concurrency,
        "live_pairs": b.pairs, "live_rate": b.rate, "calm_s": b.calm, "size": b.size,
    });
    let accounts = run.seed("rc", a.clients).await?;
    let live_accounts = run.seed("rcl", b.pairs * 2).await?;
    run.phase("connect");
    let (mut agents, report, _) = start_agents(run, &accounts, a.per_agent, a.concurrency).await?;
    run.metrics.take();
    run.summary("clients_connected", report.ok);
    let running = start_background(run, b, &live_accounts).await?;
    calm_phase(run, b).await;

    run.phase("storm");
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    for agent in agents.iter_mut() {
        agent.command("reconnect")?;
    }
    // Live latency during the storm goes to the same metrics as the
    // reconnect latencies (different kinds), both until the last is back.
    let report = collect_reports(run, &mut agents, "reconnect").await?;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = window.finish();
    run.rows.push(
        Row::new(
            "live, during storm",
            "relay",
            Kind::Delivery,
            &snap,
            usage.clone(),
        )
        .only(&[Kind::Delivery, Kind::Answer]),
    );
    run.rows.push(
        Row::new("reconnects", "relay", Kind::Op, &snap, usage)
            .only(&[Kind::Op])
            .with_rate(report.ok as u64, seconds),
    );
    run.summary("reconnected", report.ok);
    run.summary("reconnect_failed", report.failed);
    run.summary(
        "seconds_to_full_reconnection",
        (seconds * 1000.0).round() / 1000.0,
    );

    run.phase("after");
    let window = ProcWindow::start(run.relay.pid);
    tokio::time::sleep(secs(b.calm)).await;
    let snap = run.metrics.take();
    run.rows.push(Row::new(
        "live, after",
        "relay",
        Kind::Delivery,
        &snap,
        window.finish(),
    ));
    running.stop().await;
    stop_agents(agents).await;
    Ok(params)
}

// ----------------------------------------------------------------- login

#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    /// Password logins to perform.
    #[arg(long, default_value_t = 1_000)]
    pub logins: usize,
    /// Logins in progress at once (each on its own new connection).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Distinct accounts logged into (round robin).
    #[arg(long, default_value_t = 64)]
    pub accounts: usize,
    #[command(flatten)]
    pub background: Background,
}

async fn login_scenario(run: &mut Run, a: LoginArgs) -> anyhow::Result<serde_json::Value> {
    let b = &a.background;
    let params = json!({
        "logins": a.logins, "concurrency": a.concurrency, "accounts": a.accounts,
        "live_pairs": b.pairs, "live_rate": b.rate, "calm_s": b.calm, "size": b.size,
    });
    let accounts = run.seed("lg", a.accounts.max(1)).await?;
    let live_accounts = run.seed("lgl", b.pairs * 2).await?;
    let running = start_background(run, b, &live_accounts).await?;
    calm_phase(run, b).await;

    run.phase("storm");
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers = (0..a.concurrency.max(1)).map(|_| {
        let (next, ok, accounts, metrics, url) = (
            next.clone(),
            ok.clone(),
            &accounts,
            run.metrics.clone(),
            run.relay.url.clone(),
        );
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.logins {
                    break;
                }
                let account = &accounts[i % accounts.len()];
                let t = Instant::now();
                let result = async {
                    let (client, _events) = Client::connect(&url).await?;
                    let r = client.login(&account.username, PASSWORD).await;
                    client.close().await;
                    r
                }
                .await;
                match result {
                    Ok(_) => {
                        metrics.record(Kind::Op, t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => metrics.error(format!("login: {e}")),
                }
            }
        }
    });
    futures::future::join_all(workers).await;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = window.finish();
    let ok = ok.load(Ordering::Relaxed);
    run.rows.push(
        Row::new(
            "live, during storm",
            "relay",
            Kind::Delivery,
            &snap,
            usage.clone(),
        )
        .only(&[Kind::Delivery, Kind::Answer]),
    );
    run.rows.push(
        Row::new("logins", "relay", Kind::Op, &snap, usage)
            .only(&[Kind::Op])
            .with_rate(ok as u64, seconds),
    );
    run.summary("logins_per_s", (ok as f64 / seconds * 10.0).round() / 10.0);
    run.summary("logins_ok", ok);
    running.stop().await;
    Ok(params)
}
