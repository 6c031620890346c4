//! The `connections` scenario: many idle authenticated connections, held
//! by agent processes, to measure the server's memory per connection.

use serde_json::json;

use super::agents::{start_agents, stop_agents};
use super::{Run, secs};
use crate::metrics::{Kind, ProcWindow};
use crate::procfs;
use crate::report::Row;

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

pub(super) async fn scenario(
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
