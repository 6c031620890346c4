//! Driving the agent processes that hold the connections of the
//! `connections` and `reconnect` scenarios: one process cannot hold tens of
//! thousands of sockets within its open-files limit.

use std::time::{Duration, Instant};

use super::Run;
use crate::agent::{Agent, AgentReport, source_address};
use crate::metrics::Kind;
use crate::seed::Account;

/// Starts agents for `accounts`, `per_agent` each, and waits for them to
/// connect everything. Returns the agents and their merged report.
pub(super) async fn start_agents(
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
pub(super) async fn collect_reports(
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

pub(super) async fn stop_agents(agents: Vec<Agent>) {
    let _ = tokio::task::spawn_blocking(move || {
        for agent in agents {
            agent.stop();
        }
    })
    .await;
}
