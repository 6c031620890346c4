//! The `login` scenario: a storm of password logins, each on a new
//! connection, with live traffic alongside.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::json;
use signal_relay::client::Client;

use super::Run;
use super::background::{Background, live_alone, push_storm_rows, start_background};
use crate::metrics::{Kind, ProcWindow};
use crate::seed::PASSWORD;

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
    let running = start_background(run, b, &live_accounts).await?;
    live_alone(run, b, "calm").await;

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
    push_storm_rows(run, "logins", &snap, usage, ok as u64, seconds);
    run.summary("logins_per_s", (ok as f64 / seconds * 10.0).round() / 10.0);
    run.summary("logins_ok", ok);
    running.stop().await;
    Ok(params)
}
