//! The `reconnect` scenario: a storm of clients dropping and resuming their
//! sessions with tokens, with live traffic alongside. With `--nodes N` on a
//! cluster of N relays the bench starts, each client coming back on the
//! next node, so every reconnect is a hand-off between nodes.

use std::time::Instant;

use serde_json::json;

use super::agents::{collect_reports, start_agents, stop_agents};
use super::background::{Background, live_alone, push_storm_rows, start_background};
use super::{Run, Servers, by_process, round_to, with_cluster};
use crate::server::Cluster;

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
    /// With 2 or more: a cluster of this many relays instead (a private
    /// redis-server and the nodes on one fresh database; see
    /// docs/cluster.md). The clients are spread evenly over the nodes and
    /// each comes back on the next node (i+1 mod N), as a load balancer
    /// may send it elsewhere, so the new node must ask the old one to let
    /// go; the live pairs cross nodes as in `live --nodes`. CPU is
    /// reported per node and for Redis.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Reconnect before the old sockets are closed, as when a phone's old
    /// TCP connection outlives a network change it did not notice: the
    /// server must displace each old socket (4409) as its user comes back.
    /// With --nodes that is the cross-node hand-off, the new node asking
    /// the old one to let go, for every client (without it the old node
    /// has mostly let go on its own by the time the client is back). The
    /// summary counts the old sockets closed as displaced.
    #[arg(long)]
    pub linger: bool,
    #[command(flatten)]
    pub background: Background,
}

pub(super) async fn scenario(run: &mut Run, a: ReconnectArgs) -> anyhow::Result<serde_json::Value> {
    with_cluster(run, a.nodes, async move |run, cluster| {
        storm(run, a, cluster).await
    })
    .await
}

async fn storm(
    run: &mut Run,
    a: ReconnectArgs,
    cluster: Option<&Cluster>,
) -> anyhow::Result<serde_json::Value> {
    let servers = Servers::of(run, cluster);
    let b = &a.background;
    let params = json!({
        "clients": a.clients, "per_agent": a.per_agent, "concurrency": a.concurrency,
        "live_pairs": b.pairs, "live_rate": b.rate, "calm_s": b.calm, "size": b.size,
        "nodes": a.nodes, "linger": a.linger,
    });
    let accounts = run.seed_into(&servers.db, "rc", a.clients).await?;
    let live_accounts = run.seed_into(&servers.db, "rcl", b.pairs * 2).await?;
    run.phase("connect");
    let started = start_agents(run, &servers.urls, &accounts, a.per_agent, a.concurrency).await?;
    let mut agents = started.agents;
    run.metrics.take();
    run.summary("clients_connected", started.report.ok);
    let running = start_background(run, b, &live_accounts, &servers).await?;
    live_alone(run, b, "calm", &servers).await;

    run.phase("storm");
    let window = servers.procs.window();
    let start = Instant::now();
    let command = match a.linger {
        true => "reconnect linger",
        false => "reconnect",
    };
    for agent in agents.iter_mut() {
        agent.command(command)?;
    }
    // Live latency during the storm goes to the same metrics as the
    // reconnect latencies (different kinds), both until the last is back.
    let report = collect_reports(run, &mut agents, "reconnect").await?;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = servers.procs.usage(&window);
    push_storm_rows(
        run,
        servers.target(),
        "reconnects",
        &snap,
        usage,
        report.ok as u64,
        seconds,
    );
    run.summary("reconnected", report.ok);
    run.summary("reconnect_failed", report.failed);
    run.summary("seconds_to_full_reconnection", round_to(seconds, 3));
    if a.linger {
        run.summary("displaced", report.displaced);
    }
    if servers.is_cluster()
        && let Some(storm) = run.rows.last()
    {
        let (cpu, per_reconnect) = (
            by_process(&storm.usage.processes_cpu_percent),
            by_process(&storm.process_cpu_us_per_op),
        );
        run.summary("storm_cpu_percent_by_process", cpu);
        run.summary("storm_cpu_us_per_reconnect_by_process", per_reconnect);
    }

    live_alone(run, b, "after", &servers).await;
    running.stop().await;
    stop_agents(agents).await;
    Ok(params)
}
