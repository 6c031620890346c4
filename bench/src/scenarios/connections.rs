//! The `connections` scenario: many idle authenticated connections, held
//! by agent processes, to measure the server's memory per connection. With
//! `--nodes N` on a cluster of N relays the bench starts, the connections
//! spread evenly over the nodes and each node's memory measured apart.

use serde_json::json;

use super::agents::{check_open_files, start_agents, stop_agents};
use super::{Run, Servers, by_process, round_to, secs, with_cluster};
use crate::metrics::Kind;
use crate::procfs;
use crate::report::Row;
use crate::server::Cluster;

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
    /// With 2 or more: hold the connections on a cluster of this many
    /// relays instead (a private redis-server and the nodes on one fresh
    /// database; see docs/cluster.md), spread evenly: each node's share is
    /// split into agents of at most --per-agent, each agent connected to
    /// one node. Memory and file descriptors are reported per node, CPU
    /// per node and for Redis. Each node may hold no more open files than
    /// one process may (the bench checks before connecting).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
}

pub(super) async fn scenario(
    run: &mut Run,
    a: ConnectionsArgs,
) -> anyhow::Result<serde_json::Value> {
    with_cluster(run, a.nodes, async move |run, cluster| {
        hold(run, a, cluster).await
    })
    .await
}

/// A relay process's memory and sockets at one moment, from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
struct Footprint {
    rss_kib: Option<u64>,
    fds: Option<usize>,
}

impl Footprint {
    fn of(pid: Option<u32>) -> Footprint {
        Footprint {
            rss_kib: pid.and_then(procfs::rss_kib),
            fds: pid.and_then(procfs::open_fds),
        }
    }
}

async fn hold(
    run: &mut Run,
    a: ConnectionsArgs,
    cluster: Option<&Cluster>,
) -> anyhow::Result<serde_json::Value> {
    let servers = Servers::of(run, cluster);
    let params = json!({
        "connections": a.connections, "per_agent": a.per_agent,
        "concurrency": a.concurrency, "hold_s": a.hold, "nodes": a.nodes,
    });
    // The relay processes, in node order: the single relay, or the nodes.
    let relays: Vec<(String, Option<u32>)> = match servers.is_cluster() {
        true => (servers.procs.relays())
            .map(|(name, pid)| (name.clone(), Some(*pid)))
            .collect(),
        false => vec![("server".into(), servers.procs.server)],
    };
    if servers.is_cluster() {
        let nodes: Vec<(String, u32)> = servers.procs.relays().cloned().collect();
        check_open_files(&nodes, a.connections)?;
    }
    let accounts = run.seed_into(&servers.db, "idle", a.connections).await?;
    let before: Vec<Footprint> = relays.iter().map(|(_, pid)| Footprint::of(*pid)).collect();
    run.phase("connect");
    run.metrics.take();
    let window = servers.procs.window();
    let started = start_agents(run, &servers.urls, &accounts, a.per_agent, a.concurrency).await?;
    let (report, seconds) = (&started.report, started.seconds);
    let snap = run.metrics.take();
    let connect = Row::new(
        "connect",
        servers.target(),
        Kind::Op,
        &snap,
        servers.procs.usage(&window),
    )
    .with_rate(report.ok as u64, seconds);
    run.rows.push(connect.clone());
    run.phase("hold");
    let window = servers.procs.window();
    tokio::time::sleep(secs(a.hold)).await;
    let after: Vec<Footprint> = relays.iter().map(|(_, pid)| Footprint::of(*pid)).collect();
    let snap = run.metrics.take();
    let hold = Row::new(
        "hold (idle)",
        servers.target(),
        Kind::Op,
        &snap,
        servers.procs.usage(&window),
    );
    run.rows.push(hold.clone());
    run.summary("connections_held", report.ok);
    run.summary("connections_failed", report.failed);
    run.summary("agents", started.agents.len());
    run.summary("connect_seconds", round_to(seconds, 3));
    if servers.is_cluster() {
        for (i, ((name, _), ok)) in relays.iter().zip(&started.ok_by_node).enumerate() {
            run.summary(&format!("{name}_connections"), *ok);
            summarize_footprint(run, name, before[i], after[i], *ok);
        }
        // Idle connections should cost the nodes and Redis nothing once
        // held; setting them up is each node's claim of its users.
        run.summary(
            "connect_cpu_percent_by_process",
            by_process(&connect.usage.processes_cpu_percent),
        );
        run.summary(
            "connect_cpu_us_per_connection_by_process",
            by_process(&connect.process_cpu_us_per_op),
        );
        run.summary(
            "hold_cpu_percent_by_process",
            by_process(&hold.usage.processes_cpu_percent),
        );
    }
    // All relays together: the single relay, or the cluster's nodes.
    let total = |of: &[Footprint]| Footprint {
        rss_kib: of.iter().map(|f| f.rss_kib).sum(),
        fds: of.iter().map(|f| f.fds).sum(),
    };
    let measured = summarize_footprint(run, "server", total(&before), total(&after), report.ok);
    if !measured {
        run.notes
            .push("no server pid: memory per connection not measured".into());
    }
    stop_agents(started.agents).await;
    Ok(params)
}

/// The summary's memory and descriptors of `name` (a node, or "server"
/// for all): what holding `held` connections added. Returns whether its
/// memory was measured.
fn summarize_footprint(
    run: &mut Run,
    name: &str,
    before: Footprint,
    after: Footprint,
    held: usize,
) -> bool {
    if let (Some(b), Some(f)) = (before.fds, after.fds) {
        // The server's own file descriptors, counted from outside: proof
        // that it really holds the sockets.
        run.summary(&format!("{name}_fds_added"), f as i64 - b as i64);
    }
    let (Some(b), Some(r)) = (before.rss_kib, after.rss_kib) else {
        return false;
    };
    run.summary(&format!("{name}_rss_before_kib"), b);
    run.summary(&format!("{name}_rss_after_kib"), r);
    if held > 0 {
        let per = (r as f64 - b as f64) / held as f64;
        run.summary(&format!("{name}_rss_per_connection_kib"), round_to(per, 2));
    }
    true
}
