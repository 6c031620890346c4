//! The scenarios, one module each, and the harness they share: start the
//! relay (and with `--nodes N` a cluster), seed accounts, sample `/proc`
//! once a second, run phases, and report.

mod agents;
mod background;
mod connections;
mod live;
mod login;
mod offline;
mod prekeys;
mod reconnect;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;

use crate::OutputArgs;
use crate::live::Target;
use crate::metrics::{Kind, Metrics, ProcWindow, Sampler, Usage};
use crate::procfs;
use crate::report::{Report, Row};
use crate::seed::{self, Account};
use crate::server::{Cluster, Relay, ServerArgs};

pub use connections::ConnectionsArgs;
pub use live::LiveArgs;
pub use login::LoginArgs;
pub use offline::OfflineArgs;
pub use prekeys::PrekeysArgs;
pub use reconnect::ReconnectArgs;

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
    /// How to start relays, for scenarios that start more (a cluster).
    pub server_args: ServerArgs,
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
        self.seed_into(&self.relay.db, prefix, count).await
    }

    /// [`Run::seed`] into another database: a cluster's.
    pub async fn seed_into(
        &self,
        db: &PgPool,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Vec<Account>> {
        self.phase("seed");
        seed::accounts(db, prefix, count).await
    }
}

/// Runs `scenario` with a cluster of `nodes` relays when asked for (2 or
/// more), else with none. The bench starts the cluster and its Redis for
/// this scenario alone and stops them after it, whatever its outcome.
async fn with_cluster(
    run: &mut Run,
    nodes: usize,
    scenario: impl AsyncFnOnce(&mut Run, Option<&Cluster>) -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    if nodes < 2 {
        return scenario(run, None).await;
    }
    run.phase("cluster");
    let cluster = Cluster::start(&run.server_args, nodes).await?;
    for log in &cluster.log_paths {
        run.notes.push(format!("cluster log: {}", log.display()));
    }
    // The single relay stays up but idle: the timeline's server column
    // would show its nothing as the cluster's load.
    run.sampler.set_server(None);
    let result = scenario(run, Some(&cluster)).await;
    cluster.stop().await;
    result
}

/// The processes a phase measures.
#[derive(Default)]
struct Procs {
    /// The single server process (the relay or a forwarder).
    server: Option<u32>,
    /// Further processes by name: a cluster's nodes first, then its Redis.
    named: Vec<(String, u32)>,
    /// How many of `named` are relay nodes, together the cluster's server.
    nodes: usize,
    /// A cluster's Redis port: its commands and bytes are counted too.
    redis_port: Option<u16>,
}

impl Procs {
    fn single(pid: Option<u32>) -> Procs {
        Procs {
            server: pid,
            ..Procs::default()
        }
    }

    fn cluster(cluster: &Cluster) -> Procs {
        let mut named: Vec<(String, u32)> = (cluster.pids.iter().enumerate())
            .map(|(i, &pid)| (format!("node{}", i + 1), pid))
            .collect();
        named.push(("redis".into(), cluster.redis_pid));
        Procs {
            server: None,
            nodes: cluster.pids.len(),
            named,
            redis_port: Some(cluster.redis_port),
        }
    }

    /// A cluster's Redis counters now (`INFO stats`, through
    /// `redis-cli`): commands processed, bytes in, bytes out. `None`
    /// without a cluster or if they cannot be read.
    fn redis_counters(&self) -> Option<[u64; 3]> {
        let port = self.redis_port?;
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "info", "stats"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
        };
        Some([
            field("total_commands_processed")?,
            field("total_net_input_bytes")?,
            field("total_net_output_bytes")?,
        ])
    }

    /// Starts measuring every process.
    fn window(&self) -> ProcWindow {
        ProcWindow::start(self.server).with_processes(&self.named)
    }

    /// What `window` measured. A cluster's server CPU is its nodes
    /// together (not Redis), so its CPU per operation compares with the
    /// single node's.
    fn usage(&self, window: &ProcWindow) -> Usage {
        let mut usage = window.finish();
        if self.server.is_none() && self.nodes > 0 {
            usage.server_cpu_percent = Some(
                self.relays()
                    .filter_map(|(n, _)| usage.processes_cpu_percent.get(n))
                    .sum(),
            );
        }
        usage
    }

    /// A cluster's relay nodes, by name and pid.
    fn relays(&self) -> impl Iterator<Item = &(String, u32)> {
        self.named[..self.nodes].iter()
    }
}

/// Where a scenario's clients go: the single relay, or the nodes of a
/// cluster the bench started for `--nodes N`.
struct Servers {
    /// WebSocket URLs in node order; one for the single relay.
    urls: Vec<String>,
    /// Their database, for seeding accounts.
    db: PgPool,
    /// Their processes, for CPU and memory.
    procs: Procs,
}

impl Servers {
    fn of(run: &Run, cluster: Option<&Cluster>) -> Servers {
        match cluster {
            Some(c) => Servers {
                urls: c.urls.clone(),
                db: c.db.clone(),
                procs: Procs::cluster(c),
            },
            None => Servers {
                urls: vec![run.relay.url.clone()],
                db: run.relay.db.clone(),
                procs: Procs::single(run.relay.pid),
            },
        }
    }

    fn is_cluster(&self) -> bool {
        self.procs.nodes > 0
    }

    /// The rows' target: "relay" or "cluster".
    fn target(&self) -> &'static str {
        match self.is_cluster() {
            true => Target::Cluster.name(),
            false => Target::Relay.name(),
        }
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
        server_args: server.clone(),
        metrics,
        sampler,
        progress,
        rows: Vec::new(),
        summary: BTreeMap::new(),
        notes: Vec::new(),
    };
    let params = match scenario {
        Scenario::Live(a) => live::scenario(&mut run, a).await,
        Scenario::Offline(a) => offline::scenario(&mut run, a).await,
        Scenario::Connections(a) => connections::scenario(&mut run, a).await,
        Scenario::Reconnect(a) => reconnect::scenario(&mut run, a).await,
        Scenario::Login(a) => login::scenario(&mut run, a).await,
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

/// Seconds from a command-line flag; a negative value counts as none.
fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The median, sorting `values` in place; 0 for none.
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

/// `value` rounded to `places` decimal places.
fn round_to(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// A number per named process, rounded to two places, as a JSON object for
/// the summary.
fn by_process(values: &BTreeMap<String, f64>) -> serde_json::Value {
    values
        .iter()
        .map(|(name, v)| (name.clone(), serde_json::json!(round_to(*v, 2))))
        .collect::<serde_json::Map<_, _>>()
        .into()
}
