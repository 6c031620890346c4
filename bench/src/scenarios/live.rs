//! The `live` scenario: messages between connected pairs, on the relay and
//! on the bare forwarder baseline in the same run, closed loop (maximum
//! throughput) and open loop (latency at a fixed offered rate). With
//! `--nodes N` also on a cluster of N relays the bench starts, every pair
//! split across two nodes.

use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use signal_relay::client::Encoding;

use super::{Procs, Run, by_process, median, round_to, secs, with_cluster};
use crate::live::{self, Load, Pairs, Target};
use crate::metrics::Kind;
use crate::report::Row;
use crate::server::{Cluster, Forwarder};

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

/// The subprotocol the relay pairs speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encodings {
    /// relay.v1.proto (binary protobuf frames).
    Proto,
    /// relay.v1.json (text frames, proto3 JSON).
    Json,
    /// Each relay phase twice, protobuf then JSON, on the same accounts:
    /// the JSON encoding's cost side by side in one run.
    Both,
}

impl Encodings {
    fn list(self) -> &'static [Encoding] {
        match self {
            Encodings::Proto => &[Encoding::Proto],
            Encodings::Json => &[Encoding::Json],
            Encodings::Both => &[Encoding::Proto, Encoding::Json],
        }
    }
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
    /// Open loop at each of these offered rates (comma-separated), each
    /// `--runs` times with the targets alternating; the summary gives each
    /// target's median delivery p99 per rate and the medians of the
    /// per-run ratios of the first target's p99 to every other's (with
    /// `--answered-baseline`: the relay against the answered forwarder).
    /// Replaces `--rate`.
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    pub rates: Vec<f64>,
    #[arg(long, value_enum, default_value = "both")]
    pub target: Targets,
    /// The relay pairs' encoding; `both` measures each, alternating.
    #[arg(long, value_enum, default_value = "proto")]
    pub encoding: Encodings,
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
    /// Also run the relay with every pair on bare sockets that send and
    /// read the client library's protobuf frames with none of its
    /// machinery, right after the relay: the summary's
    /// `relay_to_relay_raw_generator_cpu_per_msg_ratio` is then what the
    /// library costs the generator over raw sockets with the same frames.
    #[arg(long)]
    pub raw_client: bool,
    /// Experiment: the baseline's WebSocket write buffer in bytes, on both
    /// ends (0: one write syscall per frame). By default the forwarder uses
    /// the relay's settings and its clients the client library's, so the
    /// ratio compares like with like.
    #[arg(long)]
    pub baseline_write_buffer: Option<usize>,
    /// With 2 or more: also measure a cluster of this many relays, side by
    /// side with the single node. The bench starts a private redis-server
    /// and the nodes on one fresh database (each with its own node id and
    /// port; see docs/cluster.md), and puts each pair's sender on node i
    /// and its recipient on node i+1 mod N, so every message crosses
    /// nodes. CPU is reported per node and for Redis.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
}

/// Runs one measured phase of live traffic and returns its row.
#[allow(clippy::too_many_arguments)]
async fn measure_live(
    run: &mut Run,
    name: &str,
    pairs: Pairs,
    target: Target,
    procs: &Procs,
    load: Load,
    size: usize,
    warmup: f64,
    duration: f64,
) -> Row {
    run.phase(&format!("{name} {}", target.name()));
    run.sampler.set_server(procs.server);
    let running = pairs.start(load, size, &run.metrics);
    tokio::time::sleep(secs(warmup)).await;
    run.metrics.take();
    let window = procs.window();
    let redis_before = procs.redis_counters();
    tokio::time::sleep(secs(duration)).await;
    let snap = run.metrics.take();
    let usage = procs.usage(&window);
    let redis_after = procs.redis_counters();
    running.stop().await;
    run.metrics.take();
    let mut row = Row::new(name, target.name(), Kind::Delivery, &snap, usage);
    if let (Some(before), Some(after)) = (redis_before, redis_after) {
        for (key, (b, a)) in REDIS_COUNTS.iter().zip(before.into_iter().zip(after)) {
            row.counts.insert((*key).into(), a.saturating_sub(b));
        }
    }
    row
}

/// A cluster row's Redis counts over its window, in `Procs::redis_counters`
/// order.
const REDIS_COUNTS: [&str; 3] = ["redis_commands", "redis_bytes_in", "redis_bytes_out"];

/// A cluster row's Redis commands and bytes per delivered message.
fn redis_per_msg(row: &Row) -> serde_json::Value {
    let messages = row.rate_per_sec * row.seconds;
    REDIS_COUNTS
        .iter()
        .filter_map(|key| {
            let n = *row.counts.get(*key)?;
            (messages > 0.0).then(|| ((*key).to_owned(), json!(round_to(n as f64 / messages, 2))))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

pub(super) async fn scenario(run: &mut Run, a: LiveArgs) -> anyhow::Result<serde_json::Value> {
    if a.nodes >= 2 && a.target == Targets::Baseline {
        bail!("--nodes needs the relay: --target relay or both");
    }
    with_cluster(run, a.nodes, async move |run, cluster| {
        scenario_on(run, a, cluster).await
    })
    .await
}

async fn scenario_on(
    run: &mut Run,
    a: LiveArgs,
    cluster: Option<&Cluster>,
) -> anyhow::Result<serde_json::Value> {
    let params = json!({
        "nodes": a.nodes,
        "pairs": a.pairs, "size": a.size, "duration_s": a.duration, "warmup_s": a.warmup,
        "window": a.window, "mode": format!("{:?}", a.mode), "target": format!("{:?}", a.target),
        "runs": a.runs, "rate": a.rate, "rates": a.rates, "rate_fraction": a.rate_fraction,
        "tick_us": a.tick_us,
        "max_in_flight": a.max_in_flight, "answered_baseline": a.answered_baseline,
        "raw_client": a.raw_client,
        "encoding": format!("{:?}", a.encoding),
    });
    if a.mode == Mode::Open && a.rate.is_none() && a.rates.is_empty() {
        bail!("--mode open needs --rate or --rates (or use --mode both)");
    }
    if a.rates.iter().any(|r| *r <= 0.0) {
        bail!("--rates must be positive");
    }
    if a.answered_baseline && a.target == Targets::Relay {
        bail!("--answered-baseline needs --target baseline or both");
    }
    if a.raw_client && a.target == Targets::Baseline {
        bail!("--raw-client needs the relay: --target relay or both");
    }
    // The relay targets come first: ratios are of the first to the others.
    let mut targets = Vec::new();
    if a.target != Targets::Baseline {
        targets.extend(a.encoding.list().iter().map(|&e| Target::relay(e)));
        if a.raw_client {
            targets.push(Target::RelayRaw);
        }
        if cluster.is_some() {
            targets.push(Target::Cluster);
        }
    }
    if a.target != Targets::Relay {
        targets.push(Target::Baseline);
        if a.answered_baseline {
            targets.push(Target::Answered);
        }
    }
    let relay_on = targets.iter().any(|t| t.is_relay());
    let accounts = if relay_on {
        run.seed("live", a.pairs * 2).await?
    } else {
        Vec::new()
    };
    let cluster_accounts = match cluster {
        Some(c) => run.seed_into(&c.db, "live", a.pairs * 2).await?,
        None => Vec::new(),
    };
    let forwarder = if targets.iter().any(|t| !t.is_relay()) {
        Some(Forwarder::start(a.baseline_write_buffer)?)
    } else {
        None
    };
    let url = run.relay.url.clone();
    let relay_pid = run.relay.pid;
    let mut pair_base = 0;
    // Connects fresh pairs for one phase against `target`.
    let mut connect = async |target: Target| -> anyhow::Result<(Pairs, Procs)> {
        let encoding = match target {
            Target::Relay => Some(Encoding::Proto),
            Target::RelayJson => Some(Encoding::Json),
            Target::Cluster => {
                let c = cluster.expect("cluster started");
                let pairs = Pairs::cluster(&c.urls, &cluster_accounts).await?;
                return Ok((pairs, Procs::cluster(c)));
            }
            Target::RelayRaw => {
                let pairs = Pairs::relay_raw(&url, &accounts).await?;
                return Ok((pairs, Procs::single(relay_pid)));
            }
            Target::Baseline | Target::Answered => None,
        };
        if let Some(encoding) = encoding {
            let pairs = Pairs::relay(&url, &accounts, encoding).await?;
            return Ok((pairs, Procs::single(relay_pid)));
        }
        let f = forwarder.as_ref().expect("forwarder started");
        let base = pair_base;
        pair_base += a.pairs;
        let answered = target == Target::Answered;
        let pairs = Pairs::baseline(&f.url, base, a.pairs, a.baseline_write_buffer, answered);
        Ok((pairs.await?, Procs::single(Some(f.pid))))
    };

    // Closed-loop rates and server CPU per message per target, in
    // `targets` order.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    // Per run, `None` where a process's CPU could not be read, so runs
    // stay aligned for the per-run ratios.
    let mut cpu_per_msg: Vec<Vec<Option<f64>>> = vec![Vec::new(); targets.len()];
    let mut generator_per_msg: Vec<Vec<Option<f64>>> = vec![Vec::new(); targets.len()];
    // The cluster's CPU per message per process, in the last closed-loop
    // run.
    let mut cluster_closed_cpu = None;
    let mut cluster_closed_redis = None;
    if a.mode != Mode::Open {
        let load = Load::Closed { window: a.window };
        for r in 1..=a.runs.max(1) {
            for (t, &target) in targets.iter().enumerate() {
                let (pairs, procs) = connect(target).await?;
                let name = format!("closed #{r}");
                let row = measure_live(
                    run, &name, pairs, target, &procs, load, a.size, a.warmup, a.duration,
                )
                .await;
                rates[t].push(row.rate_per_sec);
                cpu_per_msg[t].push(row.server_cpu_us_per_op);
                generator_per_msg[t].push(row.generator_cpu_us_per_op);
                if target == Target::Cluster {
                    cluster_closed_cpu = Some(process_cpu(&row));
                    cluster_closed_redis = Some(redis_per_msg(&row));
                }
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
            for (what, per_msg) in [("server", &cpu_per_msg), ("generator", &generator_per_msg)] {
                if per_msg[t].iter().any(Option::is_some) {
                    run.summary(
                        &format!("{name}_closed_loop_{what}_cpu_us_per_msg_median"),
                        round_to(median_known(&per_msg[t]), 2),
                    );
                }
            }
            if relay_on && t > 0 {
                // Ratios per run (same invocation, alternating), then the
                // median: throughput, and what a message costs the server
                // and the generator (issue #16's verdicts).
                let known = |v: &[f64]| v.iter().map(|x| Some(*x)).collect::<Vec<_>>();
                for (key, of) in [
                    (
                        format!("relay_to_{name}_ratio"),
                        vec![known(&rates[0]), known(&rates[t])],
                    ),
                    (
                        format!("relay_to_{name}_server_cpu_per_msg_ratio"),
                        vec![cpu_per_msg[0].clone(), cpu_per_msg[t].clone()],
                    ),
                    (
                        format!("relay_to_{name}_generator_cpu_per_msg_ratio"),
                        vec![generator_per_msg[0].clone(), generator_per_msg[t].clone()],
                    ),
                ] {
                    per_run_ratios(run, &key, &of[0], &of[1]);
                }
            }
        }
    }
    if let Some(c) = targets.iter().position(|&t| t == Target::Cluster)
        && !rates[c].is_empty()
    {
        // The cluster's throughput as a share of the single node's, per run
        // (alternating in one invocation), then the median.
        let mut shares: Vec<f64> = rates[0]
            .iter()
            .zip(&rates[c])
            .filter(|(r, _)| **r > 0.0)
            .map(|(r, c)| c / r)
            .collect();
        if !shares.is_empty() {
            run.summary(
                "cluster_to_relay_closed_loop_ratio_median",
                round_to(median(&mut shares), 3),
            );
        }
        if let Some(cpu) = cluster_closed_cpu {
            run.summary("cluster_closed_loop_cpu_us_per_msg_by_process", cpu);
        }
        if let Some(redis) = cluster_closed_redis {
            run.summary("cluster_closed_loop_redis_per_msg", redis);
        }
    }
    if a.mode != Mode::Closed && !a.rates.is_empty() {
        let load = |rate: f64| Load::Open {
            rate,
            tick: Duration::from_micros(a.tick_us.max(10)),
            max_in_flight: a.max_in_flight.max(1),
        };
        for &rate in &a.rates {
            // Delivery p99 per target, one per run (none if the run
            // delivered nothing), in `targets` order.
            let mut p99s: Vec<Vec<Option<f64>>> = vec![Vec::new(); targets.len()];
            for r in 1..=a.runs.max(1) {
                for (t, &target) in targets.iter().enumerate() {
                    let (pairs, procs) = connect(target).await?;
                    let name = format!("open {rate} #{r}");
                    let row = measure_live(
                        run,
                        &name,
                        pairs,
                        target,
                        &procs,
                        load(rate),
                        a.size,
                        a.warmup,
                        a.duration,
                    )
                    .await;
                    p99s[t].push(row.latency_ms.get(&Kind::Delivery).map(|p| p.p99));
                    run.rows.push(row);
                }
            }
            summarize_rate(run, rate, &targets, &p99s);
        }
    } else if a.mode != Mode::Closed {
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
        let mut open_cpu = Vec::new();
        let mut open_p99 = Vec::new();
        for &target in &targets {
            let (pairs, procs) = connect(target).await?;
            let row = measure_live(
                run, "open", pairs, target, &procs, load, a.size, a.warmup, a.duration,
            )
            .await;
            if let Some(p) = row.latency_ms.get(&Kind::Delivery) {
                run.summary(
                    &format!("{}_open_loop_delivery_p99_ms", target.name()),
                    p.p99,
                );
                open_p99.push((target, p.p99));
            }
            if target == Target::Cluster {
                run.summary(
                    "cluster_open_loop_cpu_us_per_msg_by_process",
                    process_cpu(&row),
                );
                run.summary("cluster_open_loop_redis_per_msg", redis_per_msg(&row));
            }
            if let Some(cpu) = row.server_cpu_us_per_op {
                run.summary(
                    &format!("{}_open_loop_server_cpu_us_per_msg", target.name()),
                    round_to(cpu, 2),
                );
                open_cpu.push((target, cpu));
            }
            run.rows.push(row);
        }
        let p99_of = |want: Target| open_p99.iter().find(|(t, _)| *t == want).map(|p| p.1);
        if let (Some(single), Some(cluster)) = (p99_of(Target::Relay), p99_of(Target::Cluster))
            && single > 0.0
        {
            run.summary(
                "cluster_to_relay_open_loop_p99_ratio",
                round_to(cluster / single, 3),
            );
        }
        // The JSON encoding's server CPU per message over protobuf's, at
        // the same offered rate.
        let cpu_of = |want: Target| open_cpu.iter().find(|(t, _)| *t == want).map(|p| p.1);
        if let (Some(proto), Some(json)) = (cpu_of(Target::Relay), cpu_of(Target::RelayJson))
            && proto > 0.0
        {
            run.summary(
                "relay_json_to_relay_open_loop_cpu_per_msg_ratio",
                round_to(json / proto, 3),
            );
        }
    }
    if a.mode != Mode::Open && targets.contains(&Target::RelayJson) {
        let (proto, json) = (
            median_known(&cpu_per_msg[0]),
            targets
                .iter()
                .position(|&t| t == Target::RelayJson)
                .map_or(0.0, |j| median_known(&cpu_per_msg[j])),
        );
        if targets[0] == Target::Relay && proto > 0.0 && json > 0.0 {
            run.summary(
                "relay_json_to_relay_closed_loop_cpu_per_msg_ratio",
                round_to(json / proto, 3),
            );
        }
    }
    Ok(params)
}

/// The summary of one offered rate under `--rates`: each target's median
/// delivery p99, and the median over runs of each relay target's p99 over
/// every later target's (each ratio taken within one run, the targets
/// measured one after the other): the relay with the client library and
/// with raw clients, each against the baselines.
fn summarize_rate(run: &mut Run, rate: f64, targets: &[Target], p99s: &[Vec<Option<f64>>]) {
    let at = rate.round() as u64;
    for (target, p99) in targets.iter().zip(p99s) {
        let mut measured: Vec<f64> = p99.iter().flatten().copied().collect();
        if !measured.is_empty() {
            run.summary(
                &format!("open_loop_{at}_{}_delivery_p99_ms_median", target.name()),
                round_to(median(&mut measured), 3),
            );
        }
    }
    for (i, (first, first_p99)) in targets.iter().zip(p99s).enumerate() {
        if !first.is_relay() {
            continue;
        }
        for (target, p99) in targets.iter().zip(p99s).skip(i + 1) {
            // Run by run: a run either target measured nothing in is left
            // out.
            let mut ratios: Vec<f64> = first_p99
                .iter()
                .zip(p99)
                .filter_map(|(f, b)| Some((*f)? / (*b).filter(|b| *b > 0.0)?))
                .collect();
            if ratios.is_empty() {
                continue;
            }
            let runs: Vec<f64> = ratios.iter().map(|r| round_to(*r, 3)).collect();
            let key = format!(
                "open_loop_{at}_{}_to_{}_p99_ratio",
                first.name(),
                target.name()
            );
            run.summary(&format!("{key}_median"), round_to(median(&mut ratios), 3));
            run.summary(&format!("{key}_runs"), runs);
        }
    }
}

/// A row's CPU per message of each named process, rounded, as JSON.
fn process_cpu(row: &Row) -> serde_json::Value {
    by_process(&row.process_cpu_us_per_op)
}

/// The median of the runs that have a figure (0 if none has).
fn median_known(runs: &[Option<f64>]) -> f64 {
    median(&mut runs.iter().flatten().copied().collect::<Vec<_>>())
}

/// Summarises `a[i] / b[i]` for each run `i` (the runs alternate in one
/// invocation, so each pair saw the same machine): `KEY_median` and
/// `KEY_runs`. Nothing when no run has both.
fn per_run_ratios(run: &mut Run, key: &str, a: &[Option<f64>], b: &[Option<f64>]) {
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        // A run whose CPU read as 0 (10 ms ticks, a short run) says
        // nothing: skipped on either side rather than reported as 0 or ∞.
        .filter_map(|(a, b)| a.filter(|a| *a > 0.0).zip(b.filter(|b| *b > 0.0)))
        .map(|(a, b)| a / b)
        .collect();
    if ratios.is_empty() {
        return;
    }
    let runs: Vec<f64> = ratios.iter().map(|r| round_to(*r, 3)).collect();
    run.summary(&format!("{key}_median"), round_to(median(&mut ratios), 3));
    run.summary(&format!("{key}_runs"), runs);
}
