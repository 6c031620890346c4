//! The `login` scenario: a storm of password logins, each on a new
//! connection, with live traffic alongside; or, with `--flood`, one client
//! address flooding wrong passwords while a legitimate user (from another
//! address) logs in, one login at a time: its latency, alone and under the
//! flood, shows whether one address can make everyone else's logins wait.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use signal_relay::client::{Client, ClientError, ConnectOptions};
use signal_relay::proto::Status;

use super::background::{Background, live_alone, push_storm_rows, start_background};
use super::{Run, Servers};
use crate::metrics::{Kind, Metrics, ProcWindow};
use crate::report::Row;
use crate::seed::{Account, PASSWORD};

#[derive(Debug, Clone, clap::Args)]
pub struct LoginArgs {
    /// Password logins to perform.
    #[arg(long, default_value_t = 1_000)]
    pub logins: usize,
    /// Logins in progress at once (each on its own new connection).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Distinct accounts logged into (round robin).
    #[arg(long, default_value_t = 64)]
    pub accounts: usize,
    /// Sockets flooding wrong passwords from `--flood-from`, each one
    /// attempt at a time; with it, the legitimate logins below replace the
    /// storm.
    #[arg(long, default_value_t = 0)]
    pub flood: usize,
    /// The flood's client address (on Linux all of 127.0.0.0/8 is
    /// loopback).
    #[arg(long, default_value = "127.0.0.2")]
    pub flood_from: IpAddr,
    /// Legitimate logins, one at a time, alone and then under the flood.
    #[arg(long, default_value_t = 100)]
    pub legit_logins: usize,
    /// The legitimate user's client address.
    #[arg(long, default_value = "127.0.0.1")]
    pub legit_from: IpAddr,
    /// Seconds the flood runs before the legitimate logins start, to fill
    /// the server's queue.
    #[arg(long, default_value_t = 2.0)]
    pub flood_warmup: f64,
    #[command(flatten)]
    pub background: Background,
}

pub(super) async fn scenario(run: &mut Run, a: LoginArgs) -> anyhow::Result<serde_json::Value> {
    let b = &a.background;
    let params = json!({
        "logins": a.logins, "concurrency": a.concurrency, "accounts": a.accounts,
        "live_pairs": b.pairs, "live_rate": b.rate, "calm_s": b.calm, "size": b.size,
    });
    let accounts = run.seed("lg", a.accounts.max(1)).await?;
    let live_accounts = run.seed("lgl", b.pairs * 2).await?;
    let servers = Servers::of(run, None);
    let running = start_background(run, b, &live_accounts, &servers).await?;
    live_alone(run, b, "calm", &servers).await;
    if a.flood > 0 {
        flooded(run, &a, &accounts).await;
        running.stop().await;
        let mut params = params;
        params["flood"] = json!(a.flood);
        params["flood_from"] = json!(a.flood_from.to_string());
        params["legit_logins"] = json!(a.legit_logins);
        params["legit_from"] = json!(a.legit_from.to_string());
        return Ok(params);
    }

    run.phase("storm");
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let workers = (0..a.concurrency.max(1)).map(|_| {
        let (next, ok, accounts, metrics, url) = (
            next.clone(),
            ok.clone(),
            &accounts,
            run.metrics.clone(),
            run.relay.url.clone(),
        );
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.logins {
                    break;
                }
                let account = &accounts[i % accounts.len()];
                let t = Instant::now();
                let result = async {
                    let (client, _events) = Client::connect(&url).await?;
                    let r = client.login(&account.username, PASSWORD).await;
                    client.close().await;
                    r
                }
                .await;
                match result {
                    Ok(_) => {
                        metrics.record(Kind::Op, t.elapsed());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => metrics.error(format!("login: {e}")),
                }
            }
        }
    });
    futures::future::join_all(workers).await;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = window.finish();
    let ok = ok.load(Ordering::Relaxed);
    push_storm_rows(
        run,
        servers.target(),
        "logins",
        &snap,
        usage,
        ok as u64,
        seconds,
    );
    run.summary("logins_per_s", (ok as f64 / seconds * 10.0).round() / 10.0);
    run.summary("logins_ok", ok);
    running.stop().await;
    Ok(params)
}

/// The flood variant: legitimate logins alone, then under the flood.
async fn flooded(run: &mut Run, a: &LoginArgs, accounts: &[Account]) {
    run.phase("legit");
    let window = ProcWindow::start(run.relay.pid);
    legit_logins(run, a, accounts).await;
    let snap = run.metrics.take();
    let alone = Row::new(
        "legit logins, alone",
        "relay",
        Kind::Op,
        &snap,
        window.finish(),
    )
    .only(&[Kind::Op]);
    let alone_p99 = snap.latency_ms.get(&Kind::Op).map(|p| p.p99);
    run.rows.push(alone);

    run.phase("flood");
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..a.flood)
        .map(|worker| {
            tokio::spawn(flood_worker(
                run.relay.url.clone(),
                a.flood_from,
                worker,
                run.metrics.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(super::secs(a.flood_warmup)).await;
    run.metrics.take();
    let window = ProcWindow::start(run.relay.pid);
    let start = Instant::now();
    legit_logins(run, a, accounts).await;
    let seconds = start.elapsed().as_secs_f64();
    let snap = run.metrics.take();
    let usage = window.finish();
    stop.store(true, Ordering::Relaxed);
    for worker in flood {
        let _ = worker.await;
    }
    run.rows.push(
        Row::new(
            "live, during flood",
            "relay",
            Kind::Delivery,
            &snap,
            usage.clone(),
        )
        .only(&[Kind::Delivery, Kind::Answer]),
    );
    let flooded_p99 = snap.latency_ms.get(&Kind::Op).map(|p| p.p99);
    run.rows.push(
        Row::new("legit logins, under flood", "relay", Kind::Op, &snap, usage).only(&[Kind::Op]),
    );
    let attempts: u64 = snap
        .counts
        .iter()
        .filter(|(k, _)| k.starts_with("flood "))
        .map(|(_, n)| n)
        .sum();
    run.summary("flood_attempts_per_s", (attempts as f64 / seconds).round());
    for (outcome, n) in snap.counts.iter().filter(|(k, _)| k.starts_with("flood ")) {
        run.summary(&outcome.replace(' ', "_"), *n);
    }
    if let (Some(alone), Some(flooded)) = (alone_p99, flooded_p99) {
        run.summary("legit_p99_ms_alone", alone);
        run.summary("legit_p99_ms_under_flood", flooded);
    }
}

/// `--legit-logins` logins from `--legit-from`, one at a time, each on a
/// new connection: each one's latency (connect to answer) as an `Op`.
async fn legit_logins(run: &Run, a: &LoginArgs, accounts: &[Account]) {
    let options = ConnectOptions {
        bind: Some(a.legit_from),
        ..ConnectOptions::default()
    };
    for i in 0..a.legit_logins {
        let account = &accounts[i % accounts.len()];
        let t = Instant::now();
        let result = async {
            let (client, _events) = Client::connect_with(&run.relay.url, options.clone()).await?;
            let r = client.login(&account.username, PASSWORD).await;
            client.close().await;
            r
        }
        .await;
        match result {
            Ok(_) => run.metrics.record(Kind::Op, t.elapsed()),
            Err(e) => run.metrics.error(format!("legit login: {}", outcome(&e))),
        }
    }
}

/// One flooding socket at a time: wrong passwords for made-up names (a
/// password spray, so no one account's limit stops it), one attempt
/// waiting at a time, reconnecting whenever the relay closes the socket.
async fn flood_worker(
    url: String,
    from: IpAddr,
    worker: usize,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
) {
    let options = ConnectOptions {
        bind: Some(from),
        ..ConnectOptions::default()
    };
    let mut attempt = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let client = match Client::connect_with(&url, options.clone()).await {
            Ok((client, _events)) => client,
            Err(e) => {
                metrics.count(&format!("flood {}", outcome(&e)), 1);
                // Refused sockets are answered at once: don't spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            attempt += 1;
            let name = format!("flood{worker}x{attempt}");
            match client.login(&name, "wrong password!").await {
                Ok(_) => metrics.count("flood ok", 1),
                Err(ClientError::Closed { .. }) => break,
                Err(e) => {
                    metrics.count(&format!("flood {}", outcome(&e)), 1);
                    if let ClientError::Status {
                        retry_after: Some(wait),
                        ..
                    } = e
                    {
                        // An honest client would wait; a flood does not,
                        // but a short pause keeps the generator's own CPU
                        // off the relay's two cores.
                        tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
                    }
                }
            }
        }
    }
}

/// A short name for how a request ended.
fn outcome(err: &ClientError) -> String {
    match err {
        ClientError::Status { status, .. } => match status {
            Status::Unauthorized => "unauthorized".into(),
            Status::RateLimited => "rate_limited".into(),
            Status::Unavailable => "unavailable".into(),
            other => format!("{other:?}").to_lowercase(),
        },
        ClientError::Http { status, .. } => format!("http_{status}"),
        ClientError::Closed { code, .. } => format!("closed_{}", code.unwrap_or(0)),
        other => format!("error: {other}"),
    }
}
