//! relay-bench: the load generator and benchmark suite of signal-relay.
//!
//! Each scenario is a subcommand (`live`, `offline`, `connections`,
//! `reconnect`, `login`, `prekeys`) with flags for its sizes. By default the
//! bench starts the `relay` binary on a fresh PostgreSQL database with the
//! per-client rate limits raised, drives it through the library's client
//! over loopback, measures the server's CPU and memory from `/proc`, and
//! prints a summary table (or JSON with `--json`, and an SVG chart with
//! `--plot`). `forwarder` and `agent` are this binary's helper processes;
//! `seed` writes accounts for other load generators.
//! See BENCHMARKS.md for the method and the results.

#![forbid(unsafe_code)]

mod agent;
mod forwarder;
mod live;
mod metrics;
mod payload;
mod procfs;
mod raw_relay;
mod report;
mod scenarios;
mod seed;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::server::ServerArgs;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    version,
    about = "Load generator and benchmarks for signal-relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,

    #[command(flatten)]
    server: ServerArgs,

    #[command(flatten)]
    output: OutputArgs,

    /// Generator worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

/// Where results go.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long, global = true)]
    pub json: bool,

    /// Write a chart of latency percentiles and throughput over time (SVG).
    #[arg(long, global = true, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// No progress bar.
    #[arg(long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Live messaging between connected pairs, against the relay and the
    /// bare forwarder baseline: closed-loop maximum throughput and open-loop
    /// latency at a fixed rate.
    Live(scenarios::LiveArgs),
    /// Messages to offline recipients: store rate, then drain rate.
    Offline(scenarios::OfflineArgs),
    /// Many idle authenticated connections: server memory per connection.
    Connections(scenarios::ConnectionsArgs),
    /// A reconnect storm with session tokens, with live traffic alongside.
    Reconnect(scenarios::ReconnectArgs),
    /// A password-login storm, with live traffic alongside.
    Login(scenarios::LoginArgs),
    /// Pre-key bundle fetches, consuming one-time keys.
    Prekeys(scenarios::PrekeysArgs),
    /// Create accounts with session tokens in the relay's database
    /// (--database-url) and write them to a CSV file, for other load
    /// generators (bench/artillery, bench/tsung).
    Seed(seed::SeedArgs),
    /// (helper) The bare WebSocket forwarder baseline.
    #[command(hide = true)]
    Forwarder {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        write_buffer: Option<usize>,
    },
    /// (helper) A generator process holding many connections.
    #[command(hide = true)]
    Agent(agent::AgentArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    raise_open_files_limit();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.build()?;
    runtime.block_on(async move {
        match cli.command {
            Cmd::Forwarder {
                listen,
                write_buffer,
            } => forwarder::run(listen, write_buffer).await,
            Cmd::Agent(args) => agent::run(args).await,
            Cmd::Seed(args) => seed::export(&args, &cli.server.database_url).await,
            command => scenarios::run(command_kind(command), &cli.server, &cli.output).await,
        }
    })
}

fn command_kind(command: Cmd) -> scenarios::Scenario {
    match command {
        Cmd::Live(a) => scenarios::Scenario::Live(a),
        Cmd::Offline(a) => scenarios::Scenario::Offline(a),
        Cmd::Connections(a) => scenarios::Scenario::Connections(a),
        Cmd::Reconnect(a) => scenarios::Scenario::Reconnect(a),
        Cmd::Login(a) => scenarios::Scenario::Login(a),
        Cmd::Prekeys(a) => scenarios::Scenario::Prekeys(a),
        Cmd::Forwarder { .. } | Cmd::Agent(_) | Cmd::Seed(_) => unreachable!("handled in main"),
    }
}

/// Raises the soft open-files limit to the hard one: each connection is a
/// file descriptor. Best effort: the scenarios report their own failures.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
