//! Generator processes for the many-connection scenarios. One process may
//! hold at most 20,000 open files here, so `connections` and `reconnect`
//! spread their clients over several agents (this binary, `agent`
//! subcommand), each bound to its own 127.x.y.z source address so each has
//! a full ephemeral port range. In a cluster each agent connects to one
//! node and comes back on another after a `reconnect`.
//!
//! The parent talks to an agent over its stdin and stdout, one line at a
//! time: the agent prints a JSON [`AgentReport`] after connecting all its
//! clients and after each `reconnect` (or `reconnect linger`) command;
//! `stop` (or end of input) closes everything and exits.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use signal_relay::client::{Client, ConnectOptions, Event, Events};
use signal_relay::protocol::CloseCode;
use tokio::io::AsyncBufReadExt;

/// How an agent is started.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    #[arg(long)]
    pub url: String,
    /// Where the `reconnect` command brings the clients back (default:
    /// --url). In a cluster, another node: a load balancer may send a
    /// returning client anywhere, and the new node must then take the
    /// user over from the old one.
    #[arg(long)]
    pub reconnect_url: Option<String>,
    /// Source address for every connection.
    #[arg(long)]
    pub bind: IpAddr,
    /// File with one hex session token per line.
    #[arg(long)]
    pub tokens: PathBuf,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
}

/// What an agent says after connecting or reconnecting its clients.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentReport {
    pub event: String,
    pub ok: usize,
    pub failed: usize,
    /// From the command (or start) to the last client authenticated and
    /// told its queue is empty.
    pub seconds: f64,
    /// Per client: connect, resume and queue-empty, in microseconds.
    pub latencies_us: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    /// After `reconnect linger`: old sockets the server closed as displaced
    /// (4409) when their user came back, as it must. Proof that each
    /// reconnect was a hand-off, not a fresh start.
    #[serde(default)]
    pub displaced: usize,
}

struct Held {
    client: Client,
    _events: Events,
}

async fn connect_one(url: &str, bind: IpAddr, token: &[u8]) -> Result<(Held, Duration), String> {
    let start = Instant::now();
    let options = ConnectOptions {
        bind: Some(bind),
        // An idle client receives one push (queue empty); keep it small.
        event_buffer: 8,
        ..ConnectOptions::default()
    };
    let (client, mut events) = Client::connect_with(url, options)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    client
        .resume(token)
        .await
        .map_err(|e| format!("resume: {e}"))?;
    loop {
        match events.next().await {
            Some(Event::QueueEmpty) => break,
            Some(_) => {}
            None => return Err("closed before queue-empty".into()),
        }
    }
    Ok((
        Held {
            client,
            _events: events,
        },
        start.elapsed(),
    ))
}

async fn connect_all(
    args: &AgentArgs,
    url: &str,
    tokens: &[Vec<u8>],
    event: &str,
) -> (Vec<Held>, AgentReport) {
    let start = Instant::now();
    let results: Vec<_> = futures::stream::iter(tokens)
        .map(|t| connect_one(url, args.bind, t))
        .buffer_unordered(args.concurrency.max(1))
        .collect()
        .await;
    let mut report = AgentReport {
        event: event.into(),
        seconds: start.elapsed().as_secs_f64(),
        ..AgentReport::default()
    };
    let mut held = Vec::with_capacity(tokens.len());
    for result in results {
        match result {
            Ok((h, latency)) => {
                report.ok += 1;
                report.latencies_us.push(latency.as_micros() as u64);
                held.push(h);
            }
            Err(e) => {
                report.failed += 1;
                *report.errors.entry(e).or_default() += 1;
            }
        }
    }
    (held, report)
}

fn emit(report: &AgentReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(report).expect("serializable")
    );
    let _ = out.flush();
}

/// The agent's main loop.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let tokens: Vec<Vec<u8>> = std::fs::read_to_string(&args.tokens)
        .with_context(|| format!("cannot read {}", args.tokens.display()))?
        .lines()
        .filter(|l| !l.is_empty())
        .map(hex::decode)
        .collect::<Result<_, _>>()?;
    let (mut held, report) = connect_all(&args, &args.url, &tokens, "connected").await;
    let reconnect_url = args.reconnect_url.as_deref().unwrap_or(&args.url);
    emit(&report);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "reconnect" => {
                let old = std::mem::take(&mut held);
                held = reconnect(&args, reconnect_url, &tokens, old, false).await;
            }
            "reconnect linger" => {
                let old = std::mem::take(&mut held);
                held = reconnect(&args, reconnect_url, &tokens, old, true).await;
            }
            "stop" => break,
            other => bail!("unknown agent command {other:?}"),
        }
    }
    for h in held.drain(..) {
        h.client.close().await;
    }
    Ok(())
}

/// Brings every client back on `url` with its token and reports. Without
/// `linger` the old connections are dropped first, the way a network
/// change does it for a fleet of phones; with it they stay open, as when
/// a phone's old TCP connection outlives a change it did not notice, so
/// the server must displace each (4409) as its user comes back: on a
/// cluster, the new node asking the old one to let go.
async fn reconnect(
    args: &AgentArgs,
    url: &str,
    tokens: &[Vec<u8>],
    old: Vec<Held>,
    linger: bool,
) -> Vec<Held> {
    let start = Instant::now();
    let lingering = match linger {
        true => old,
        false => {
            for h in old {
                h.client.close().await;
            }
            Vec::new()
        }
    };
    let (again, mut report) = connect_all(args, url, tokens, "reconnected").await;
    report.seconds = start.elapsed().as_secs_f64();
    report.displaced = displaced(lingering).await;
    emit(&report);
    again
}

/// How many of the `old` connections the server closed as displaced; then
/// closes the rest. The server sends each close before it lets the user
/// go, so by now every one is at most on its way: the wait is a bound for
/// a server that never sends it, not a guess at how long it takes.
async fn displaced(old: Vec<Held>) -> usize {
    const BOUND: Duration = Duration::from_secs(5);
    let closes = old
        .iter()
        .map(|h| tokio::time::timeout(BOUND, h.client.closed()));
    let displaced = futures::future::join_all(closes)
        .await
        .into_iter()
        .filter(|c| matches!(c, Ok(info) if info.code == Some(CloseCode::Displaced.code())))
        .count();
    for h in old {
        h.client.close().await;
    }
    displaced
}

/// The parent's handle on a running agent.
pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Reports, read from the agent's stdout by a thread of their own so
    /// waiting for them never blocks the runtime.
    reports: tokio::sync::mpsc::UnboundedReceiver<AgentReport>,
    _tokens: TempFile,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Agent {
    /// Starts an agent for `tokens`, connecting from `bind` to `url`, and
    /// to `reconnect_url` on a `reconnect`.
    pub fn spawn(
        url: &str,
        reconnect_url: &str,
        bind: IpAddr,
        tokens: &[Vec<u8>],
        concurrency: usize,
    ) -> anyhow::Result<Agent> {
        let path = std::env::temp_dir().join(format!(
            "relay-bench-tokens-{}-{}.txt",
            std::process::id(),
            bind
        ));
        let text: String = tokens.iter().map(|t| hex::encode(t) + "\n").collect();
        std::fs::write(&path, text)?;
        let tokens_file = TempFile(path.clone());
        let mut child = Command::new(std::env::current_exe()?)
            .arg("agent")
            .args(["--url", url])
            .args(["--reconnect-url", reconnect_url])
            .arg("--bind")
            .arg(bind.to_string())
            .arg("--tokens")
            .arg(&path)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start an agent")?;
        let stdin = child.stdin.take();
        let stdout: ChildStdout = child.stdout.take().expect("piped stdout");
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(report) => {
                        if tx.send(report).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("agent said something unexpected ({e}): {line}"),
                }
            }
        });
        Ok(Agent {
            child,
            stdin,
            reports,
            _tokens: tokens_file,
        })
    }

    /// The agent's next report.
    pub async fn report(&mut self) -> anyhow::Result<AgentReport> {
        self.reports
            .recv()
            .await
            .context("an agent exited early (see its stderr above)")
    }

    pub fn command(&mut self, command: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("agent stdin closed")?;
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Tells the agent to close its connections and waits for it to exit.
    pub fn stop(mut self) {
        let _ = self.command("stop");
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The source address of agent `i`: 127.0.1.1, 127.0.1.2, … (the whole of
/// 127/8 is local on Linux).
pub fn source_address(i: usize) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::new(
        127,
        0,
        1 + (i / 250) as u8,
        1 + (i % 250) as u8,
    ))
}
