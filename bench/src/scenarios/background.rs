//! Live traffic alongside the `reconnect` and `login` storms: its latency
//! shows what a storm does to everyone else.

use std::time::Duration;

use super::{Run, secs};
use crate::live::{self, Load, Pairs};
use crate::metrics::{Kind, ProcWindow};
use crate::report::Row;
use crate::seed::Account;

/// Live traffic at a modest fixed rate, whose latency shows what a storm
/// does to everyone else.
#[derive(Debug, Clone, clap::Args)]
pub struct Background {
    /// Pairs carrying live traffic during the storm.
    #[arg(long, default_value_t = 16)]
    pub pairs: usize,
    /// Their offered rate, messages per second in total.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Seconds of live traffic alone, before the storm.
    #[arg(long, default_value_t = 3.0)]
    pub calm: f64,
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

pub(super) async fn start_background(
    run: &Run,
    b: &Background,
    accounts: &[Account],
) -> anyhow::Result<live::Running> {
    let pairs = Pairs::relay(&run.relay.url, accounts).await?;
    let load = Load::Open {
        rate: b.rate,
        tick: Duration::from_micros(100),
        max_in_flight: live::OPEN_MAX_IN_FLIGHT,
    };
    run.phase("warmup");
    let running = pairs.start(load, b.size, &run.metrics);
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.metrics.take();
    Ok(running)
}

/// The live traffic alone, as the reference for the storm.
pub(super) async fn calm_phase(run: &mut Run, b: &Background) {
    run.phase("calm");
    let window = ProcWindow::start(run.relay.pid);
    tokio::time::sleep(secs(b.calm)).await;
    let snap = run.metrics.take();
    run.rows.push(Row::new(
        "live, calm",
        "relay",
        Kind::Delivery,
        &snap,
        window.finish(),
    ));
}
