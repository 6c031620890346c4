//! The `reconnect` scenario: a storm of clients dropping and resuming their
//! sessions with tokens, with live traffic alongside.

use std::time::Instant;

use serde_json::json;

use super::Run;
use super::agents::{collect_reports, start_agents, stop_agents};
use super::background::{Background, live_alone, push_storm_rows, start_background};
use crate::metrics::ProcWindow;

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

pub(super) async fn scenario(run: &mut Run, a: ReconnectArgs) -> anyhow::Result<serde_json::Value> {
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
    live_alone(run, b, "calm").await;

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
    push_storm_rows(run, "reconnects", &snap, usage, report.ok as u64, seconds);
    run.summary("reconnected", report.ok);
    run.summary("reconnect_failed", report.failed);
    run.summary(
        "seconds_to_full_reconnection",
        (seconds * 1000.0).round() / 1000.0,
    );

    live_alone(run, b, "after").await;
    running.stop().await;
    stop_agents(agents).await;
    Ok(params)
}
