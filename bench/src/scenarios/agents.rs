//! Driving the agent processes that hold the connections of the
//! `connections` and `reconnect` scenarios: one process cannot hold tens of
//! thousands of sockets within its open-files limit. In a cluster the
//! clients are spread evenly over the nodes, each agent connecting to one
//! node and reconnecting to the next.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::Run;
use crate::agent::{Agent, AgentReport, source_address};
use crate::metrics::Kind;
use crate::seed::Account;

/// Agents that connected their clients.
pub(super) struct Started {
    pub agents: Vec<Agent>,
    /// Their reports, merged.
    pub report: AgentReport,
    /// Clients connected per node, in node order: each node's memory is
    /// divided by its own count.
    pub ok_by_node: Vec<usize>,
    /// From the first agent's start to the last client connected.
    pub seconds: f64,
}

/// Starts agents for `accounts` spread over the nodes at `urls` (see
/// [`plan`]), each reconnecting to the next node, and waits for them to
/// connect everything.
pub(super) async fn start_agents(
    run: &Run,
    urls: &[String],
    accounts: &[Account],
    per_agent: usize,
    concurrency: usize,
) -> anyhow::Result<Started> {
    anyhow::ensure!(!urls.is_empty(), "no relay to connect to");
    let start = Instant::now();
    let shares = plan(accounts.len(), urls.len(), per_agent);
    let mut agents = Vec::with_capacity(shares.len());
    for (i, share) in shares.iter().enumerate() {
        let tokens: Vec<Vec<u8>> = accounts[share.clients.clone()]
            .iter()
            .map(|a| a.token.clone())
            .collect();
        agents.push(Agent::spawn(
            &urls[share.node],
            &urls[(share.node + 1) % urls.len()],
            source_address(i),
            &tokens,
            concurrency,
        )?);
    }
    let (report, ok_per_agent) = collect_each(run, &mut agents, "connected").await?;
    let mut ok_by_node = vec![0; urls.len()];
    for (share, ok) in shares.iter().zip(ok_per_agent) {
        ok_by_node[share.node] += ok;
    }
    Ok(Started {
        agents,
        report,
        ok_by_node,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// One agent's part of the clients.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Share {
    /// The node it connects to, an index into the URLs.
    node: usize,
    /// Its clients, an index range into the accounts.
    clients: Range<usize>,
}

/// How many of `clients` node `node` of `nodes` gets: an even split, the
/// remainder one each to the first nodes.
fn node_share(clients: usize, nodes: usize, node: usize) -> usize {
    clients / nodes + usize::from(node < clients % nodes)
}

/// Splits `clients` evenly over `nodes`, and each node's share into agents
/// of at most `per_agent`, so every agent talks to one node and a node's
/// clients are all its agents' clients. The agents come round robin over
/// the nodes (node 1, 2, …, 1, 2, …), so they start spread over the nodes.
/// With one node these are consecutive chunks of `per_agent`.
fn plan(clients: usize, nodes: usize, per_agent: usize) -> Vec<Share> {
    let (nodes, per_agent) = (nodes.max(1), per_agent.max(1));
    let mut by_node: Vec<Vec<Range<usize>>> = Vec::with_capacity(nodes);
    let mut start = 0;
    for node in 0..nodes {
        let end = start + node_share(clients, nodes, node);
        by_node.push(
            (start..end)
                .step_by(per_agent)
                .map(|from| from..(from + per_agent).min(end))
                .collect(),
        );
        start = end;
    }
    let rounds = by_node.iter().map(Vec::len).max().unwrap_or(0);
    (0..rounds)
        .flat_map(|round| {
            let by_node = &by_node;
            (0..nodes).filter_map(move |node| {
                let clients = by_node[node].get(round)?.clone();
                Some(Share { node, clients })
            })
        })
        .collect()
}

/// Checks that each node may open enough files for its share of `clients`
/// (each connection is one) beside what it already holds, before minutes
/// are spent connecting them. The nodes inherit the bench's limit, raised
/// to the hard one at start as for the single relay.
pub(super) fn check_open_files(nodes: &[(String, u32)], clients: usize) -> anyhow::Result<()> {
    // The database and Redis connections a node opens on demand, and the
    // like.
    const HEADROOM: u64 = 64;
    for (i, (name, pid)) in nodes.iter().enumerate() {
        let (Some(limit), Some(open)) = (
            crate::procfs::open_files_limit(*pid),
            crate::procfs::open_fds(*pid),
        ) else {
            continue;
        };
        let share = node_share(clients, nodes.len(), i) as u64;
        anyhow::ensure!(
            open as u64 + share + HEADROOM <= limit,
            "{name} may hold {limit} open files, {open} already open: too few for its \
             {share} connections; raise the hard limit (ulimit -Hn) or use more nodes"
        );
    }
    Ok(())
}

/// Waits for one report from every agent; records each client's latency.
pub(super) async fn collect_reports(
    run: &Run,
    agents: &mut [Agent],
    what: &str,
) -> anyhow::Result<AgentReport> {
    Ok(collect_each(run, agents, what).await?.0)
}

/// [`collect_reports`], with the clients each agent got through, in agent
/// order.
async fn collect_each(
    run: &Run,
    agents: &mut [Agent],
    what: &str,
) -> anyhow::Result<(AgentReport, Vec<usize>)> {
    let reports = futures::future::join_all(agents.iter_mut().map(Agent::report)).await;
    let mut merged = AgentReport {
        event: what.into(),
        ..AgentReport::default()
    };
    let mut ok_per_agent = Vec::with_capacity(reports.len());
    for report in reports {
        let report = report?;
        ok_per_agent.push(report.ok);
        merged.ok += report.ok;
        merged.failed += report.failed;
        merged.displaced += report.displaced;
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
    Ok((merged, ok_per_agent))
}

pub(super) async fn stop_agents(agents: Vec<Agent>) {
    let _ = tokio::task::spawn_blocking(move || {
        for agent in agents {
            agent.stop();
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::{Share, plan};

    fn sizes(shares: &[Share]) -> Vec<(usize, usize)> {
        shares.iter().map(|s| (s.node, s.clients.len())).collect()
    }

    #[test]
    fn one_node_takes_consecutive_chunks_as_before() {
        let shares = plan(19_000, 1, 9_000);
        assert_eq!(sizes(&shares), [(0, 9_000), (0, 9_000), (0, 1_000)]);
        assert_eq!(shares[2].clients, 18_000..19_000);
    }

    #[test]
    fn each_node_gets_its_share_in_whole_agents_round_robin() {
        let shares = plan(57_000, 3, 9_500);
        assert_eq!(
            sizes(&shares),
            [
                (0, 9_500),
                (1, 9_500),
                (2, 9_500),
                (0, 9_500),
                (1, 9_500),
                (2, 9_500)
            ]
        );
        // With the default 9,000: 9,000 + 9,000 + 1,000 on each node.
        let shares = plan(57_000, 3, 9_000);
        for node in 0..3 {
            let mine: Vec<usize> = (shares.iter().filter(|s| s.node == node))
                .map(|s| s.clients.len())
                .collect();
            assert_eq!(mine, [9_000, 9_000, 1_000]);
        }
    }

    #[test]
    fn every_client_once_even_with_a_remainder() {
        let shares = plan(200, 3, 50);
        let mut all: Vec<usize> = shares.iter().flat_map(|s| s.clients.clone()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
        let per_node = |n| -> usize {
            (shares.iter().filter(|s| s.node == n))
                .map(|s| s.clients.len())
                .sum()
        };
        assert_eq!([per_node(0), per_node(1), per_node(2)], [67, 67, 66]);
        assert!(shares.iter().all(|s| s.clients.len() <= 50));
        assert!(plan(0, 3, 50).is_empty());
    }
}
